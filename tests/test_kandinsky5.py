"""diffsparse on diffusers Kandinsky 5 (tiny, random weights, offline): the transformer called directly, the visual
blocks' video-only self-attention, in frame-major token order and in the tiled ("fractal") order NABLA checkpoints
use. And the whole `Kandinsky5T2VPipeline` built (Qwen2.5-VL and CLIP text encoders, HunyuanVideo VAE) and run with
classifier-free guidance, its regular attention type (NABLA's mask needs flex attention)."""

from collections import Counter

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Kandinsky5T2VPipeline,
    Kandinsky5Transformer3DModel,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.kandinsky5 import fractal_order
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    qwen_tokenizer,
    recorded_attention_calls,
    run_transformer,
    tiny_clip_text_model,
    tiny_hunyuan_video_vae,
    tiny_qwen25_vl,
)

GRID = (2, 8, 16)  # latent frames 2 of 16 x 32, patchified 1 x 2 x 2: 256 tokens, two 8 x 8 tiles per row
# A window of 1 frame and 3 x 3 tokens: on two frames radial would keep nearly every block.
LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=32, dense_steps=0)


def tiny_transformer():
    """Text 16 wide (the tiny Qwen2.5-VL's), pooled text 8 wide (the tiny CLIP's)."""
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4),
    ).eval()
    # Kandinsky zero-initialises its modulation layers: every gate would be 0 and the attention never reach the
    # output, so nothing below could fail. Random values instead.
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer()


def inputs(fractal: bool = False):
    """`fractal`: the `sparse_params` a NABLA pipeline passes reduced to what the forward reads for the token
    order (the NABLA mask itself is built only by the original processor, i.e. on dense calls)."""
    def call():
        g = torch.Generator().manual_seed(1)
        frames, height, width = GRID
        return {
            "hidden_states": torch.randn(1, frames, 2 * height, 2 * width, 4, generator=g),
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "pooled_projections": torch.randn(1, 8, generator=g),
            "timestep": torch.tensor([500.0]),
            "visual_rope_pos": [torch.arange(frames), torch.arange(height), torch.arange(width)],
            "text_rope_pos": torch.arange(6), "sparse_params": {"to_fractal": True} if fractal else None,
        }

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 4, 4))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs(), block_size=32, order=order, sparse=LOCAL)


def test_tiled_token_order_is_attended_as_frame_major(transformer):
    # The sparse path restores frame-major order for the pattern: with the tiled order the model gets what it gets
    # with frame-major tokens and the same pattern (a pattern applied to tiled positions would differ).
    assert sorted(fractal_order(*GRID).tolist()) == list(range(256))
    assert fractal_order(*GRID)[:8].tolist() == list(range(8))  # the first tile's first row
    assert fractal_order(*GRID)[8].item() == 16  # then the tile's next row, one token row (16) later
    frame_major = run_transformer(transformer, inputs(), LOCAL)
    tiled = run_transformer(transformer, inputs(fractal=True), LOCAL)
    torch.testing.assert_close(tiled, frame_major, atol=1e-5, rtol=0)
    assert not torch.allclose(frame_major, run_transformer(transformer, inputs()), atol=1e-4)


def test_layout_and_sparse_calls(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs()())
    assert layout == VideoLayout(*GRID)
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(), LOCAL)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, 256)), (1, (1, 256))]  # visual blocks only


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Kandinsky 5", layer=1)


# The word tokenizer's tokens (CLIP's prompts end with `</s>`) and Qwen's chat tokens first; the template's other words
# are not needed (`<unk>`), the pipeline drops them.
VOCABULARY = ["<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "a", "red", "circle", "moving", "left",
              "blurry"]


@pytest.fixture(scope="module")
def kandinsky_pipe():
    torch.manual_seed(0)
    vae = tiny_hunyuan_video_vae()
    clip = tiny_clip_text_model(len(VOCABULARY))
    pipe = Kandinsky5T2VPipeline(
        transformer=tiny_transformer(), vae=vae.eval(), text_encoder=tiny_qwen25_vl(VOCABULARY),
        tokenizer=qwen_tokenizer(VOCABULARY), text_encoder_2=clip.eval(),
        tokenizer_2=word_tokenizer(VOCABULARY, max_length=77), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINE_CALL = {"prompt": "a red circle moving left", "negative_prompt": "blurry", "guidance_scale": 5.0,
                 "num_inference_steps": 3, "height": 64, "width": 64, "num_frames": 9, "output_type": "latent"}


def test_pipeline_with_cfg_dense_every_block_kept_and_sparse_after_the_dense_step(kandinsky_pipe):
    template = kandinsky_pipe.prompt_template
    # The pipeline's fixed drop stays inside the template: the prompt reaches the transformer whole.
    prefix = kandinsky_pipe.tokenizer(template[:template.index("{}")]).input_ids
    assert len(prefix) >= kandinsky_pipe.prompt_template_encode_start_idx
    stats, calls = check_pipeline_against_dense(kandinsky_pipe, PIPELINE_CALL, block_size=8)
    records = stats.calls["transformer"]
    # The pipeline passes the scheduler's timesteps as they are. Each step: the prompt's and the negative prompt's
    # call (outside any `cache_context`: one branch), through both visual blocks.
    assert Counter(r.step for r in records) == {step: 4 for step in range(3)}
    assert all(r.sparse == (r.step > 0) for r in records)
    assert all(r.density < 1 for r in records if r.sparse)
    # 9 frames, 64 x 64 pixels -> 3 latent frames of 8 x 8 (4x, 8x VAE) -> 4 x 4 patches (1 x 2 x 2).
    assert {layout for _, layout, _ in calls} == {VideoLayout(3, 4, 4)}
