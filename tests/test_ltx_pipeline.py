"""diffsparse on real diffusers LTX-Video pipelines (tiny, random weights, offline): video tokens only in
self-attention, the token grid passed to the transformer as `num_frames`, `height`, `width`, or read from its
`video_coords` (the condition and the long multi-prompt pipelines)."""


import pytest
import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from PIL import Image
from transformers import T5Config, T5EncoderModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.ltx import layout_from_coords
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    first_transformer_call,
    recorded_attention_calls,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "up", "low", "quality"]
ALL_BLOCKS = Window3D(window=(99, 99, 99))


def tiny_ltx_components() -> dict:
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=16,
    )
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1), patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, pad_token_id=0, eos_token_id=1))
    return {"tokenizer": word_tokenizer(VOCABULARY), "text_encoder": text_encoder.eval(), "vae": vae.eval(),
            "transformer": transformer.eval(), "scheduler": FlowMatchEulerDiscreteScheduler()}


CALL = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "num_frames": 9, "height": 64,
        "width": 32, "num_inference_steps": 3, "guidance_scale": 3.0, "max_sequence_length": 8,
        # Latents: what the transformer made, without the tiny VAE's decode (seconds per video on CPU).
        "output_type": "latent"}


def generate(pipe, **kwargs):
    call = {**CALL, "generator": torch.Generator().manual_seed(0), **kwargs}
    with torch.no_grad():
        return pipe(**call).frames


@pytest.fixture(scope="module")
def ltx_pipe():
    pipe = LTXPipeline(**tiny_ltx_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _processors(pipe):
    return [block.attn1.processor for block in pipe.transformer.transformer_blocks]


def test_dense_pattern_is_the_unmodified_pipeline_and_remove_restores_it(ltx_pipe):
    originals = _processors(ltx_pipe)
    cross = [block.attn2.processor for block in ltx_pipe.transformer.transformer_blocks]
    reference = generate(ltx_pipe)
    with diffsparse.sparse(ltx_pipe, diffsparse.SparseConfig(pattern="dense")):
        assert [block.attn2.processor for block in ltx_pipe.transformer.transformer_blocks] == cross
        assert torch.equal(generate(ltx_pipe), reference)
        assert [(s.dense_calls, s.sparse_calls) for s in diffsparse.stats(ltx_pipe).layers] == [(3, 0), (3, 0)]
    assert all(p is o for p, o in zip(_processors(ltx_pipe), originals))
    assert torch.equal(generate(ltx_pipe), reference)


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_sparse_path_with_every_block_kept_matches_dense(ltx_pipe, order):
    reference = generate(ltx_pipe)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    with diffsparse.sparse(ltx_pipe, config):
        out = generate(ltx_pipe)
        assert all(s.dense_calls == 0 and s.sparse_calls == 3 for s in diffsparse.stats(ltx_pipe).layers)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


def test_a_direct_transformer_call_the_pipelines_way(ltx_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(ltx_pipe, CALL)
    check_against_dense(ltx_pipe.transformer, lambda: inputs, block_size=8)


def test_sparse_calls_see_the_latent_grid_and_drop_blocks(ltx_pipe):
    reference = generate(ltx_pipe)
    config = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=8, dense_steps=1)
    with diffsparse.sparse(ltx_pipe, config) as handle, recorded_attention_calls() as calls:
        out = generate(ltx_pipe)
        layers = handle.stats().layers
    # This tiny VAE compresses 4x in time and space: 9 frames -> 3 latent frames, 64 x 32 pixels -> 16 x 8.
    assert {layout for _, layout, _ in calls} == {VideoLayout(3, 16, 8)}
    assert all(s.sparse_calls == 2 and s.mean_density < 1 for s in layers)  # CFG batched: one call per step
    assert torch.isfinite(out).all() and not torch.allclose(out, reference, atol=1e-4)


def test_condition_pipeline_with_a_keyframe():
    # A condition at frame 0 replaces the first latent frame; one at frame 8 adds a latent frame of 16 x 8 tokens in
    # front of the 3 x 16 x 8 grid, kept whole like CogVideoX's text.
    from diffusers import LTXConditionPipeline
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    pipe = LTXConditionPipeline(**tiny_ltx_components())
    pipe.set_progress_bar_config(disable=True)
    conditions = [LTXVideoCondition(image=Image.new("RGB", (32, 64), (200, 40, 40)), frame_index=0),
                  LTXVideoCondition(image=Image.new("RGB", (32, 64), (40, 40, 200)), frame_index=8)]
    reference = generate(pipe, conditions=conditions)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="dense")):
        assert torch.equal(generate(pipe, conditions=conditions), reference)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    with diffsparse.sparse(pipe, config), recorded_attention_calls() as calls:
        torch.testing.assert_close(generate(pipe, conditions=conditions), reference, atol=1e-4, rtol=0)
    assert {layout for _, layout, _ in calls} == {VideoLayout(3, 16, 8, text_len=128, text_position="start")}
    config = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)
    with diffsparse.sparse(pipe, config) as handle:
        assert not torch.allclose(generate(pipe, conditions=conditions), reference, atol=1e-4)
        assert handle.stats().mean_density < 1


def test_image_to_video():
    pipe = LTXImageToVideoPipeline(**tiny_ltx_components())
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (32, 64), (200, 40, 40))
    reference = generate(pipe, image=image)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)):
        torch.testing.assert_close(generate(pipe, image=image), reference, atol=1e-4, rtol=0)


def test_the_grid_comes_from_the_call_or_from_video_coords(ltx_pipe):
    adapter = adapter_for(ltx_pipe.transformer)
    tokens = torch.zeros(1, 3 * 4 * 5, 8)
    call = {"encoder_hidden_states": None, "timestep": torch.tensor([500])}
    layout, _ = adapter.read_call(ltx_pipe.transformer, (tokens,), {**call, "num_frames": 3, "height": 4, "width": 5})
    assert layout == VideoLayout(3, 4, 5)
    with pytest.raises(ValueError, match="gave neither"):
        adapter.read_call(ltx_pipe.transformer, (tokens,), call)
    with pytest.raises(ValueError, match="got 61 tokens for the layout"):
        adapter.read_call(ltx_pipe.transformer, (torch.zeros(1, 61, 8),), {**call, "num_frames": 3, "height": 4, "width": 5})
    # LTXConditionPipeline: a condition frame (time 0.3) in front of a 3 x 4 x 5 grid whose frame 0 is at time 0.
    t, y, x = torch.meshgrid(torch.tensor([0.0, 0.3, 0.6]), torch.arange(4.0), torch.arange(5.0), indexing="ij")
    grid = torch.stack([t, y, x]).flatten(1)
    condition = grid[:, 20:40].clone()
    coords = torch.cat([condition, grid], dim=1)[None]
    layout, _ = adapter.read_call(ltx_pipe.transformer, (torch.zeros(1, 80, 8),), {**call, "video_coords": coords})
    assert layout == VideoLayout(3, 4, 5, text_len=20, text_position="start")
    # Grid arguments beside the coordinates: the transformer's rotary embedding reads the coordinates only, so the
    # layout does too. Before, a grid matching the token count (4 x 4 x 5 = 80) was taken over them.
    both = {**call, "video_coords": coords, "num_frames": 4, "height": 4, "width": 5}
    assert adapter.read_call(ltx_pipe.transformer, (torch.zeros(1, 80, 8),), both)[0] == layout
    # LTXI2VLongMultiPromptPipeline's window: frames whose times start over at its end (the previous window's tail
    # injected) are further frames in token order; the origin anywhere but at the first token is no layout.
    assert layout_from_coords(torch.cat([grid, grid], dim=1)[None]) == VideoLayout(6, 4, 5, text_position="start")
    with pytest.raises(ValueError, match="one token at the origin"):
        layout_from_coords(torch.cat([condition, grid, grid], dim=1)[None])
    # Frames one row tall: each frame's row ends where its time does, though the next frame's row is at y 0 too.
    assert layout_from_coords(grid[:, grid[1] == 0][None]) == VideoLayout(3, 1, 5, text_position="start")
    # Coordinates that are no whole frames of whole rows are refused by name, not floored into a smaller grid.
    # The last frame one token short; every frame's second row one token short (19 tokens a frame, rows 5 wide).
    for cut in (grid[:, :-1], grid[:, ~((grid[1] == 1) & (grid[2] == 4))]):
        with pytest.raises(ValueError, match="no frame-major grid"):
            layout_from_coords(cut[None])


def test_other_processors_are_refused_and_the_model_left_untouched(ltx_pipe):
    check_other_processors_are_refused(ltx_pipe, "LTX", layer=1)


def test_the_long_multi_prompt_pipeline_reads_each_window_from_its_coordinates():
    # LTXI2VLongMultiPromptPipeline: sliding windows over the video, each with the previous window's tail and the
    # image (negative index) injected as its last frames; the transformer gets a 1 x 1 x 1 grid and the window's
    # coordinates. Before, every call was refused (its 1 x 1 x 1 grid against hundreds of tokens).
    from diffusers import LTXEulerAncestralRFScheduler, LTXI2VLongMultiPromptPipeline

    components = tiny_ltx_components()
    pipe = LTXI2VLongMultiPromptPipeline(**components | {"scheduler": LTXEulerAncestralRFScheduler()})
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((torch.rand(64, 32, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    call = {"prompt": "a red circle moving left | a blue square moving up", "negative_prompt": "low quality",
            "num_frames": 25, "height": 64, "width": 32, "num_inference_steps": 3, "guidance_scale": 3.0,
            "max_sequence_length": 8, "cond_image": image, "temporal_tile_size": 16, "temporal_overlap": 8,
            "output_type": "latent"}
    _, calls = check_pipeline_against_dense(pipe, call)
    # 64 x 32 pixels -> 16 x 8 latents; every call one window, CFG batched: its frames in token order, no span.
    windows = {(layout.frames, layout.height, layout.width, layout.text_len, shape) for _, layout, shape in calls}
    assert {(h, w, text, shape) for _, h, w, text, shape in windows} == {
        (16, 8, 0, (2, frames * 16 * 8)) for frames, *_ in windows}
    assert len({frames for frames, *_ in windows}) > 1  # windows of different lengths (the injected frames)


@pytest.mark.parametrize("image_to_video", [False, True])
def test_modular_core_denoise_dense_every_block_kept_and_sparse_after_the_dense_step(image_to_video):
    """diffusers' modular LTX denoise blocks (`LTXCoreDenoiseStep`, `LTXImage2VideoCoreDenoiseStep`) on the tiny
    transformer, a flow-matching scheduler and a CFG guider, fed prompt embeddings: dense identical, every block kept
    within 1e-4, and a sparse run whose calls each fall on their own scheduler step, the first dense."""
    from collections import Counter

    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines.ltx.modular_blocks_ltx import LTXCoreDenoiseStep, LTXImage2VideoCoreDenoiseStep

    pipe = (LTXImage2VideoCoreDenoiseStep if image_to_video else LTXCoreDenoiseStep)().init_pipeline()
    pipe.update_components(transformer=tiny_ltx_components()["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(),
                           guider=ClassifierFreeGuidance(guidance_scale=3.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    # No VAE in the blocks: its default 8x time, 32x space compression; 17 frames of 128 x 192 -> a 3 x 4 x 6 grid.
    call = {"prompt_embeds": torch.randn(1, 5, 16, generator=g), "prompt_attention_mask": torch.ones(1, 5),
            "negative_prompt_embeds": torch.randn(1, 4, 16, generator=g),
            "negative_prompt_attention_mask": torch.ones(1, 4), "num_frames": 17, "height": 128, "width": 192,
            "num_inference_steps": 3, "output": "latents"}
    if image_to_video:  # latent frame 0 held clean: its tokens at timestep 0, the others at the step's
        call["image_latents"] = torch.randn(1, 8, 1, 4, 6, generator=g)

    stats, calls = check_modular_against_dense(pipe, call)
    # The blocks give the transformer the scheduler's own `t` (0-1000; per token for image-to-video, its maximum the
    # step's): each step found. The guider's two calls are the transformer's cache contexts, one per branch.
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {
        (step, branch): 2 for step in range(3) for branch in ("pred_cond", "pred_uncond")}
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    assert {layout for _, layout, _ in calls} == {VideoLayout(3, 4, 6)}
