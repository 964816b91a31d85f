"""diffsparse on a diffusers Latte transformer (tiny, random weights): the spatial blocks' per-frame
self-attention, called directly and in a tiny `LattePipeline`; the temporal blocks stay untouched."""

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel
from diffusers.models.attention_processor import AttnProcessor2_0

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline

from helpers import (
    check_a_normalised_self_attention_runs_the_original,
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    masked_attention_calls,
    recorded_attention_calls,
    run_transformer,
)

FRAMES = 3
LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0)


def tiny_transformer(caption_channels: int = 16) -> LatteTransformer3DModel:
    torch.manual_seed(0)
    return LatteTransformer3DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=caption_channels, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, video_length=FRAMES,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def inputs():
    """3 frames of 16 x 24 latents: 8 x 12 = 96 tokens per frame."""
    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(2, 4, FRAMES, 16, 24, generator=g), "timestep": torch.tensor([500, 500]),
                "encoder_hidden_states": torch.randn(2, 5, 16, generator=g)}

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs(), block_size=16, order=order, sparse=LOCAL)


def test_latent_sides_that_are_not_whole_patches(transformer):
    # The patchify drops a partial patch, as a strided convolution does: 17 x 23 latents make 8 x 11 tokens a frame
    # (a grid rounded up would not match the sequence).
    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(2, 4, FRAMES, 17, 23, generator=g), "timestep": torch.tensor([500, 500]),
                "encoder_hidden_states": torch.randn(2, 5, 16, generator=g)}

    assert adapter_for(transformer).read_call(transformer, (), call())[0] == VideoLayout(1, 8, 11)
    check_against_dense(transformer, call, block_size=16)


def test_spatial_self_attention_only(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs()())
    assert layout == VideoLayout(1, 8, 12)
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(), LOCAL)
    # The frames of both videos are the batch of each spatial call; the temporal blocks never reach the runtime.
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (2 * FRAMES, 96)), (1, (2 * FRAMES, 96))]
    temporal = [block.attn1.processor for block in transformer.temporal_transformer_blocks]
    with diffsparse.sparse(transformer, LOCAL):
        assert [block.attn1.processor for block in transformer.temporal_transformer_blocks] == temporal
        assert all(type(block.attn1.processor).__name__ == "FrameSelfAttention"
                   for block in transformer.transformer_blocks)


def test_a_residual_connection_and_output_rescaling_as_the_original(transformer):
    # Latte's blocks build `Attention` without them; diffusers' `Attention(residual_connection=True,
    # rescale_output_factor=...)` gives other models both, which `AttnProcessor2_0` applies after `to_out`.
    model = tiny_transformer()
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    plain = run_transformer(model, inputs())
    for block in model.transformer_blocks:
        block.attn1.residual_connection, block.attn1.rescale_output_factor = True, 2.0
    reference = run_transformer(model, inputs())
    assert not torch.allclose(reference, plain, atol=1e-3)  # the attributes reach the output: the test sees them
    with torch.no_grad(), diffsparse.sparse(model, every_block) as handle:
        out = model(**inputs()()).sample
        assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(0, 1), (0, 1)]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_a_caller_s_attention_mask_runs_the_original_and_counts_dense(transformer):
    # Latte's blocks pass their spatial self-attention no mask, but `Attention` takes one (a caller's own block or
    # processor may pass it): a token-level mask, which the kernel does not apply, so that call runs the original
    # with it and is logged dense. Here layer 1's, in the transformer's call, hides each frame's last key.
    mask = torch.ones(2 * FRAMES, 1, 96, dtype=torch.bool)
    mask[..., -1] = False
    attention = transformer.transformer_blocks[1].attn1
    with masked_attention_calls(attention, "attention_mask", mask) as seen, torch.no_grad(), diffsparse.sparse(
            transformer, LOCAL) as handle:
        transformer(**inputs()())
        assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(0, 1), (1, 0)]
    [(args, kwargs, out)] = seen
    with torch.no_grad():
        assert torch.equal(out, AttnProcessor2_0()(attention, *args, **kwargs))
        unmasked = AttnProcessor2_0()(attention, *args, **{**kwargs, "attention_mask": None})
    assert not torch.equal(out, unmasked)  # the mask reaches the output


@pytest.mark.parametrize("norm", ["group_norm", "spatial_norm"])
def test_a_normalised_self_attention_runs_the_original_not_the_sparse_path(norm):
    # Before, uncounted: stats() showed no call of the layer.
    model = tiny_transformer()
    attentions = [block.attn1 for block in model.transformer_blocks]
    check_a_normalised_self_attention_runs_the_original(model, inputs(), LOCAL, norm, attentions)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Latte", layer=1)


def tiny_pipeline(pipeline_class=LattePipeline) -> LattePipeline:
    base = tiny_wan_pipeline()  # its T5 encoder and word tokenizer
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()
    pipe = pipeline_class(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=vae,
                          transformer=tiny_transformer(base.text_encoder.config.d_model), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline():
    pipe = tiny_pipeline()
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 16, "width": 24,
            "video_length": FRAMES, "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent",
            "clean_caption": False}
    stats, calls = check_pipeline_against_dense(pipe, call)
    # Three steps, CFG batched into one call each (2 videos x 3 frames in every spatial call); the first dense.
    assert {shape for _, _, shape in calls} == {(2 * FRAMES, 8 * 12)}
    assert [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0] == [
        (0, False), (1, True), (2, True)
    ]


class LatteWithoutStepCallback(LattePipeline):
    """A pipeline whose call takes no `callback_on_step_end`, as HunyuanVideo 1.5's does not."""

    def __call__(self, prompt, video_length=16, height=512, width=512, num_inference_steps=50, generator=None,
                 output_type="pil"):
        return super().__call__(prompt=prompt, video_length=video_length, height=height, width=width,
                                num_inference_steps=num_inference_steps, generator=generator, output_type=output_type,
                                clean_caption=False)


@pytest.mark.parametrize("pipeline_class", [LattePipeline, LatteWithoutStepCallback], ids=["latte", "no callback"])
def test_compare_sets_latte_frame_count(pipeline_class, tmp_path):
    # Latte's frame count is `video_length`, not `num_frames`: the commands set it (read as an image pipeline, the
    # call would make Latte's default 16 frames whatever `--frames` said). A pipeline without a step callback is
    # timed to its last transformer call.
    from diffsparse.cli import build_parser
    from diffsparse.compare import call_defaults, frames_argument, run_compare

    pipe = tiny_pipeline(pipeline_class)
    assert frames_argument(pipe, FRAMES) == {"video_length": FRAMES} and call_defaults(pipe)["frames"] == 16
    args = build_parser().parse_args(["compare", "--frames", str(FRAMES), "--height", "16", "--width", "24", "--steps",
                                      "2", "--pattern", "window3d", "--density", "0.3", "--block-size", "16",
                                      "--dense-steps", "1", "--out", str(tmp_path)])
    result = run_compare(args, diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=16, dense_steps=1),
                         pipe=pipe)
    assert result.frames == FRAMES and result.mean_attention_density < 1
    assert 0 < result.dense_denoise_seconds <= result.dense_seconds
