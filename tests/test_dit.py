"""diffsparse on diffusers' DiT pipeline (tiny, random weights, offline): each block's self-attention on a
one-frame layout of the patch grid."""

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines import adapter_for

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_read_call_by_position,
    first_transformer_call,
    tiny_image_vae,
)


@pytest.fixture(scope="module")
def dit_pipe():
    torch.manual_seed(0)
    # 16 x 16 latents -> 8 x 8 patches of 2 x 2; learned sigma (out_channels = 2 x in_channels) as the checkpoints.
    transformer = DiTTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, norm_num_groups=4,
    )
    pipe = DiTPipeline(transformer=transformer.eval(), vae=tiny_image_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = {"class_labels": [3, 7], "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "pt"}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_the_layout_is_the_patch_grid(dit_pipe, order):
    stats, calls = check_pipeline_against_dense(dit_pipe, CALL, order=order)
    # One batched call per step: two labels and their two unconditional copies.
    assert {(layout, shape) for _, layout, shape in calls} == {(VideoLayout(1, 8, 8), (4, 64))}
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(dit_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(dit_pipe, CALL)
    check_against_dense(dit_pipe.transformer, lambda: inputs, block_size=16)


def test_latent_sides_that_are_not_whole_patches(dit_pipe):
    # The patchify drops a partial patch, as a strided convolution does: 17 x 17 latents make 8 x 8 tokens (DiT's
    # unpatchify takes the grid as square; a grid rounded up would not match the sequence).
    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(2, 4, 17, 17, generator=g), "timestep": torch.tensor([500, 500]),
                "class_labels": torch.tensor([3, 7])}

    transformer = dit_pipe.transformer
    assert adapter_for(transformer).read_call(transformer, (), call())[0] == VideoLayout(1, 8, 8)
    check_against_dense(transformer, call, block_size=16)


def test_read_call_takes_every_argument_by_position(dit_pipe):
    check_read_call_by_position(dit_pipe.transformer, first_transformer_call(dit_pipe, CALL))


def test_other_processors_are_refused_and_the_model_left_untouched(dit_pipe):
    check_other_processors_are_refused(dit_pipe, "DiT", layer=1)


def test_context_parallelism_is_refused_though_the_processors_do_not_carry_it(dit_pipe):
    # DiT has no diffusers plan and the frame path does not gather a split sequence. `AttnProcessor2_0` has no
    # `_parallel_config`: `enable_parallelism` sets it on the model, and on the processors that declare it.
    from diffusers import ContextParallelConfig, ParallelConfig

    transformer = dit_pipe.transformer
    parallel = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=0)

    def processors():
        return [module.processor for module in transformer.modules() if hasattr(module, "processor")]

    def enable():
        transformer._parallel_config = parallel
        for processor in processors():
            if hasattr(processor, "_parallel_config"):
                processor._parallel_config = parallel

    before = [type(p) for p in processors()]
    try:
        enable()
        with pytest.raises(NotImplementedError, match="not on FrameSelfAttention"):
            diffsparse.apply(dit_pipe, config)
        assert [type(p) for p in processors()] == before
        transformer._parallel_config = None
        diffsparse.apply(dit_pipe, config)
        enable()  # after apply
        with pytest.raises(NotImplementedError, match="not on FrameSelfAttention"):
            dit_pipe(class_labels=[3], num_inference_steps=1, output_type="pt")
    finally:
        diffsparse.remove(dit_pipe)
        transformer._parallel_config = None
    assert [type(p) for p in processors()] == before


def test_the_compare_command_takes_the_class_labels_from_call_kwargs(dit_pipe, tmp_path, capsys):
    import json

    from diffsparse.cli import main

    dit_pipe.save_pretrained(tmp_path / "dit")
    command = ["compare", "--model", str(tmp_path / "dit"), "--pattern", "window3d", "--density", "0.3",
               "--block-size", "16", "--dense-steps", "1", "--steps", "2", "--frames", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main(command)
    assert "DiTPipeline takes no prompt and needs class_labels: give it with --call-kwargs" in capsys.readouterr().err
    assert main([*command, "--call-kwargs", '{"class_labels": [3]}']) == 0
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["mean_attention_density"] < 1 and result["psnr_db"] > 0
    assert result["prompt"] is None and result["call_kwargs"] == {"class_labels": [3]}  # it was given no prompt
