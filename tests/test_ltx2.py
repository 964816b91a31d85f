"""diffsparse on diffusers LTX-2 (tiny, random weights, offline). The transformer called directly: the video
self-attention of a joint audio-video model, in LTX-2.0's form and LTX-2.3's (perturbed-attention processors for
spatio-temporal guidance, per-head gates, split RoPE); appended keyframe tokens; IC-LoRA's soft self-attention mask.
And the whole `LTX2Pipeline` built (Gemma 3 text encoder, text connectors, video and audio VAEs, vocoder) and run
with classifier-free guidance, with LTX-2.0's sampling and with the pipeline's default LTX-2.3 guidance
(spatio-temporal and modality-isolation guidance calls besides the CFG call). Around the same components,
`LTX2ImageToVideoPipeline` (the image latent written into latent frame 0, its tokens at timestep 0),
`LTX2ConditionPipeline` with a keyframe appended after the grid, and LTX-2.5's `LTX2DFRPipeline`, whose calls (whole
canvas or temporal tiles) give only token coordinates, with its generated keyframe slots after the grid."""

import contextlib
import re
from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2ConditionPipeline,
    LTX2DFRPipeline,
    LTX2ImageToVideoPipeline,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.dfr_layout import LTX2DFREpilogueTile, resolve_canvas
from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from PIL import Image
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.ltx2 import grid_from_coords
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
    run_transformer,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
GRID = (3, 4, 6)  # latent frames, rows, columns: 72 video tokens
VARIANTS = {
    "2.0": {},
    "2.3": {"perturbed_attn": True, "gated_attn": True, "audio_gated_attn": True, "rope_type": "split",
            "cross_attn_mod": True, "audio_cross_attn_mod": True},
}


def tiny_transformer(variant: str, **config):
    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=16, base_height=256, base_width=256,
        **VARIANTS[variant], **config,
    ).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def transformer(request):
    return tiny_transformer(request.param)


def make_inputs(model, batch: int = 1, keyframes: int = 0, **extra):
    """A call on `GRID` with 5 audio tokens; `keyframes`: that many tokens of a keyframe (frame 0's first tokens,
    placed at a later time) appended after the grid, with their coordinates, as LTX2ConditionPipeline does."""
    def inputs():
        g = torch.Generator().manual_seed(1)
        frames, height, width = GRID
        call = {
            "hidden_states": torch.randn(batch, frames * height * width + keyframes, 8, generator=g),
            "audio_hidden_states": torch.randn(batch, 5, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
            "audio_encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
            "timestep": torch.full((batch,), 500.0), "sigma": torch.full((batch,), 0.5),
            "num_frames": frames, "height": height, "width": width, "audio_num_frames": 5, "fps": 24.0, **extra,
        }
        if keyframes:
            coords = model.rope.prepare_video_coords(batch, frames, height, width, torch.device("cpu"), fps=24.0)
            keyframe = coords[:, :, :keyframes].clone()
            keyframe[:, 0] += 1.0  # a later time than frame 0
            call["video_coords"] = torch.cat([coords, keyframe], dim=2)
        return call

    return inputs


def sample(model, inputs, config=None):
    with torch.no_grad():
        if config is None:
            return model(**inputs()).sample
        with diffsparse.sparse(model, config) as handle:
            return model(**inputs()).sample, handle.stats()


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    inputs = make_inputs(transformer)
    radial = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)
    check_against_dense(transformer, inputs, block_size=16, order=order, sparse=radial)
    _, stats = sample(transformer, inputs, radial)
    assert stats.mean_density < 1


def test_appended_keyframe_tokens_are_a_trailing_span_kept_whole(transformer):
    inputs = make_inputs(transformer, keyframes=10)
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(*GRID, text_len=10, text_position="end")
    check_against_dense(transformer, inputs, block_size=16)
    with recorded_attention_calls() as calls:
        sample(transformer, inputs, diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=0))
    assert {(layout, shape) for _, layout, shape in calls} == {(layout, (1, 82))}


def test_spatio_temporal_guidance_on_ltx_2_3():
    # STG on block 1: a partly perturbed batch (element 0 takes the values) runs sparse and mixes in the values
    # as the original does; a wholly perturbed batch computes no attention on block 1, so only block 0 is counted.
    model = tiny_transformer("2.3")
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    for mask, counted in ((torch.tensor([0.0, 1.0]), [(0, 1), (1, 1)]), (torch.zeros(2), [(0, 1)])):
        inputs = make_inputs(model, batch=2, spatio_temporal_guidance_blocks=[1], perturbation_mask=mask)
        reference = run_transformer(model, inputs)
        out, stats = sample(model, inputs, every_block)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
        assert [(s.layer, s.sparse_calls) for s in stats.layers] == counted
    unperturbed = run_transformer(model, make_inputs(model, batch=2))
    assert not torch.allclose(reference, unperturbed, atol=1e-4)  # STG changed the output: the test sees it


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keys_take_their_own_rotary_embedding_where_one_is_given(variant):
    # diffusers' LTX-2 processors rotate the keys by `key_rotary_emb` when given, else by the queries' (no diffusers
    # path passes one to self-attention today); the sparse path rotated them by the queries' always.
    model = tiny_transformer(variant)
    inputs = make_inputs(model)
    outputs = []

    def own_key_rope(module, args, kwargs):
        cos, sin = kwargs["query_rotary_emb"]
        return args, {**kwargs, "key_rotary_emb": (cos, -sin)}  # the opposite rotation: a valid RoPE, another one

    def run(config=None, key_rope=True):
        outputs.clear()
        hooks = [block.attn1.register_forward_hook(lambda module, args, out: outputs.append(out))
                 for block in model.transformer_blocks]
        if key_rope:
            hooks += [block.attn1.register_forward_pre_hook(own_key_rope, with_kwargs=True)
                      for block in model.transformer_blocks]
        try:
            if config is None:
                return run_transformer(model, inputs), list(outputs), None
            out, stats = sample(model, inputs, config)
            return out, list(outputs), stats
        finally:
            for hook in hooks:
                hook.remove()

    shared_rope, _, _ = run(key_rope=False)
    reference, reference_attention, _ = run()
    assert not torch.allclose(reference, shared_rope, atol=1e-3)  # the keys' own RoPE changes the output
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    out, attention, stats = run(every_block)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1), (0, 1)]
    for got, want in zip(attention, reference_attention, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_soft_self_attention_mask_runs_the_original_and_counts_as_dense(transformer):
    # IC-LoRA weighs attention between the video and reference tokens with a multiplicative mask.
    weights = torch.ones(1, 72, 72)
    weights[:, :, 36:] = 0.5
    inputs = make_inputs(transformer, video_self_attention_mask=weights)
    reference = run_transformer(transformer, inputs)
    out, stats = sample(transformer, inputs, diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16,
                                                                     dense_steps=0))
    assert torch.equal(out, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 0), (1, 0)]


@pytest.mark.parametrize("keyframes", [0, 10, GRID[1] * GRID[2]])
def test_a_call_with_coordinates_only_reads_the_grid_from_them(transformer, keyframes):
    # LTX-2.5's DFR pipeline passes no num_frames/height/width, only each tile's token coordinates. A whole frame's
    # keyframe (frame 0's rows and columns, later than the grid's end) does not continue the grid's time: not a frame.
    def coords_only():
        call = make_inputs(transformer, keyframes=keyframes)()
        if "video_coords" not in call:
            call["video_coords"] = transformer.rope.prepare_video_coords(1, *GRID, torch.device("cpu"), fps=24.0)
        for name in ("num_frames", "height", "width"):
            del call[name]
        return call

    expected = VideoLayout(*GRID, text_len=keyframes, text_position="end")
    layout, _ = adapter_for(transformer).read_call(transformer, (), coords_only())
    assert layout == expected
    reference = run_transformer(transformer, coords_only)
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    torch.testing.assert_close(run_transformer(transformer, coords_only, every_block), reference, atol=1e-4, rtol=0)
    # The same layout as the call that names its grid: the same sparse result.
    sparse = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)

    def named():
        return {**make_inputs(transformer, keyframes=keyframes)(), "video_coords": coords_only()["video_coords"]}

    torch.testing.assert_close(run_transformer(transformer, coords_only, sparse),
                               run_transformer(transformer, named, sparse), atol=1e-6, rtol=0)


def test_a_call_without_grid_or_coordinates_is_refused(transformer):
    inputs = make_inputs(transformer)()
    del inputs["num_frames"]
    with pytest.raises(ValueError, match="num_frames"):
        adapter_for(transformer).read_call(transformer, (), inputs)


def test_coordinates_whose_first_frame_is_not_whole_rows_are_refused_naming_the_sizes():
    starts = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # (time, y, x) of 3 tokens
    with pytest.raises(ValueError, match=r"first frame's 3 tokens are not whole rows of 2 .*num_frames, height"):
        grid_from_coords(torch.stack([starts, starts + 1], -1)[None])


def test_fewer_video_tokens_than_the_named_grid_holds_are_refused(transformer):
    # One rank's shard under context parallelism, or a caller's crop: no grid to place them on.
    inputs = make_inputs(transformer)()
    inputs["hidden_states"] = inputs["hidden_states"][:, :-1]
    with pytest.raises(ValueError, match=r"got \d+ video tokens, fewer than its .* grid holds"):
        adapter_for(transformer).read_call(transformer, (), inputs)
    # Latent sizes are not the patch count: said as both (it read "3 x 5 x 6 grid holds (18)").
    model = tiny_transformer("2.0", patch_size=2, patch_size_t=2)
    inputs = {**make_inputs(model)(), "hidden_states": torch.zeros(1, 10, 8), "num_frames": 3, "height": 5, "width": 6}
    with pytest.raises(ValueError, match=re.escape("got 10 video tokens, fewer than its 3 x 5 x 6 latent grid holds in "
                                                   "2 x 3 x 3 patches of 2 x 2 x 2 (18)")):
        adapter_for(model).read_call(model, (), inputs)


@pytest.mark.parametrize("patch, patch_t, latents, grid", [
    (2, 2, (4, 4, 6), (2, 2, 3)),  # whole patches in time and space
    (2, 1, (3, 5, 6), (3, 3, 3)),  # a partial patch per column (height 5): the transformer's coordinates round up
    (2, 1, (2, 4, 5), (2, 2, 3)),  # a partial patch per row (width 5)
    (2, 2, (3, 4, 6), (2, 2, 3)),  # a partial last temporal patch
])
def test_the_grid_is_in_the_transformer_s_patches(patch, patch_t, latents, grid):
    # `num_frames`, `height`, `width` are latent sizes; the tokens are patches of `patch_size_t x patch_size x
    # patch_size`, placed where `prepare_video_coords` puts them (`arange` by the patch: partial patches count).
    model = tiny_transformer("2.0", patch_size=patch, patch_size_t=patch_t)
    frames, height, width = latents

    def inputs():
        call = make_inputs(model)()
        hidden = torch.randn(1, grid[0] * grid[1] * grid[2], 8, generator=torch.Generator().manual_seed(2))
        call.update(hidden_states=hidden, num_frames=frames, height=height, width=width)
        return call

    assert adapter_for(model).read_call(model, (), inputs())[0] == VideoLayout(*grid)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        kept = run_transformer(model, inputs, every_block)
    assert [layout for _, layout, _ in calls] == [VideoLayout(*grid)] * 2
    torch.testing.assert_close(kept, run_transformer(model, inputs), atol=1e-4, rtol=0)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "LTX-2", layer=1)


VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "moving", "left", "low", "quality"]


def tiny_ltx2_pipeline(variant: str, pipeline_class=LTX2Pipeline):
    """`pipeline_class` (`LTX2Pipeline`, or another LTX-2 pipeline taking the same components) around
    `tiny_transformer(variant)`. Its text path is LTX-2.0's for both variants (Gemma's hidden states through shared
    connectors and the transformer's caption projections): what changes between LTX-2.0 and 2.3 for diffsparse is in
    the transformer's blocks."""
    torch.manual_seed(0)
    # Gemma 3 16 wide with 2 layers: the pipeline stacks its 3 hidden states (embeddings included) per token. The
    # class builds a vision tower too, which text prompts never reach.
    text = {"vocab_size": len(VOCABULARY), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "pad_token_id": 0}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    text_encoder = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    )
    # LTX-2.0 connectors project the stacked states back to Gemma's width, which their attention (2 x 8) keeps and
    # the transformer's `caption_channels` (16) takes.
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
    )
    # 8 latent channels (the transformer's `in_channels`); 4 x 4 pixel patches, then one 2x down-sampling in time and
    # space: 8x in space, 2x in time. Only these ratios and its latent statistics are used: the pipeline returns
    # latents.
    vae = AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8,), decoder_block_out_channels=(8,), layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False), downsample_type=("spatiotemporal",), upsample_residual=(False,),
        upsample_factor=(1,), patch_size=4, patch_size_t=1,
    )
    # 2 latent channels x 8 / 4 mel bins: audio tokens 4 wide (the transformer's `audio_in_channels`).
    audio_vae = AutoencoderKLLTX2Audio(base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                                       latent_channels=2, mel_bins=8, resolution=32)
    # Takes the audio VAE's decoded spectrograms, 2 channels x 8 mel bins.
    vocoder = LTX2Vocoder(in_channels=2 * 8, hidden_channels=8, upsample_kernel_sizes=[4], upsample_factors=[2],
                          resnet_kernel_sizes=[3], resnet_dilations=[[1]], output_sampling_rate=16000)
    pipe = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae.eval(),
        audio_vae=audio_vae.eval(), text_encoder=text_encoder.eval(), tokenizer=word_tokenizer(VOCABULARY),
        connectors=connectors.eval(), transformer=tiny_transformer(variant), vocoder=vocoder.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Per variant: the sampling arguments, and the self-attention calls of one denoising step as the transformer's
# cache context (the runtime's branch) -> the blocks whose video self-attention computes attention.
SAMPLING = {
    # LTX-2.0's: classifier-free guidance alone.
    "2.0": ({"stg_scale": 0.0, "audio_stg_scale": 0.0, "modality_scale": 1.0, "audio_modality_scale": 1.0,
             "spatio_temporal_guidance_blocks": None, "use_cross_timestep": False},
            {"cond_uncond": [0, 1]}),
    # The pipeline's defaults (LTX-2.3's) with STG on block 1: besides the CFG call, one with block 1's attention
    # skipped (the values pass: no attention computed, none counted) and one with the audio-video
    # cross-attentions off.
    "2.3": ({"spatio_temporal_guidance_blocks": [1]},
            {"cond_uncond": [0, 1], "uncond_stg": [0], "uncond_modality": [0, 1]}),
}
PIPELINE_CALL = {
    "prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 32, "width": 96,
    "num_frames": 9, "frame_rate": 24.0, "num_inference_steps": 3, "guidance_scale": 3.0, "max_sequence_length": 8,
    # Video and audio latents: what the transformer made, without the VAEs' decode and the vocoder.
    "output_type": "latent",
}


def generate(pipe, call, config=None):
    """`pipe(**call)` from seed 0 (as `helpers.run_pipeline`), the whole output: video and audio latents."""
    with torch.no_grad(), diffsparse.sparse(pipe, config) if config is not None else contextlib.nullcontext():
        return pipe(**call, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ltx2_pipeline(variant):
    pipe = tiny_ltx2_pipeline(variant)
    sampling, branches = SAMPLING[variant]
    call = {**PIPELINE_CALL, **sampling}
    before = pipe.transformer.attn_processors
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(dense_steps=0)):
        replaced = {name for name, p in pipe.transformer.attn_processors.items() if p is not before[name]}
    # Only the video self-attention: audio self-attention, text and audio-video cross-attentions keep theirs.
    assert replaced == {f"transformer_blocks.{i}.attn1.processor" for i in range(2)}

    stats, calls = check_pipeline_against_dense(pipe, call)  # on the video latents (the output's `frames`)
    records = stats.calls["transformer"]
    # The timestep arrives on the scheduler's scale: each step found (a wrong scale puts every call on one step).
    # CFG is batched: the negative and the positive prompt in one call, per block, per step.
    assert Counter((r.step, r.branch, r.layer) for r in records) == Counter(
        (step, branch, layer) for step in range(3) for branch, layers in branches.items() for layer in layers
    )
    assert all(r.sparse == (r.step > 0) for r in records)
    assert all(r.density < 1 for r in records if r.sparse)
    # 9 frames -> 5 latent frames, 32 x 96 pixels -> 4 x 12: the grid of the latent video, no other tokens.
    grid = VideoLayout(5, 4, 12)
    assert Counter(calls) == Counter(
        (layer, grid, (2 if branch == "cond_uncond" else 1, grid.num_tokens))
        for step in (1, 2) for branch, layers in branches.items() for layer in layers
    )

    # The audio latents, which the helper does not compare: the video reaches them through the audio-video
    # cross-attentions, so a sparse video attention changes them too, and keeping every block does not.
    audio = generate(pipe, call).audio
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    torch.testing.assert_close(generate(pipe, call, every_block).audio, audio, atol=1e-4, rtol=0)
    window = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=1)
    assert not torch.allclose(generate(pipe, call, window).audio, audio, atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ltx2_condition_pipeline_keyframe_is_a_trailing_span(variant):
    base = tiny_ltx2_pipeline(variant)
    pipe = LTX2ConditionPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    sampling, branches = SAMPLING[variant]
    image = (np.random.default_rng(0).random((PIPELINE_CALL["height"], PIPELINE_CALL["width"], 3)) * 255)
    # A keyframe after latent frame 0 is appended after the grid, not written into it. `crf=0`: the pipeline's
    # H.264 re-compression of a still needs PyAV, which is not installed (and only changes the image's pixels).
    condition = LTX2VideoCondition(frames=image.astype(np.uint8), index=2, crf=0)
    call = {**PIPELINE_CALL, **sampling, "conditions": [condition]}

    stats, calls = check_pipeline_against_dense(pipe, call)
    records = stats.calls["transformer"]
    # The keyframe tokens get a timestep of 0 (held clean), the grid's the step's: each step is still found.
    assert Counter((r.step, r.branch, r.layer) for r in records) == Counter(
        (step, branch, layer) for step in range(3) for branch, layers in branches.items() for layer in layers
    )
    assert all(r.sparse == (r.step > 0) for r in records)
    # The pipeline names the grid (5 latent frames of 4 x 12, as for LTX2Pipeline); a still encodes to one latent
    # frame of the same rows and columns, the trailing span.
    grid = VideoLayout(5, 4, 12)
    layout = VideoLayout(5, 4, 12, text_len=grid.height * grid.width, text_position="end")
    assert Counter(calls) == Counter(
        (layer, layout, (2 if branch == "cond_uncond" else 1, layout.num_tokens))
        for step in (1, 2) for branch, layers in branches.items() for layer in layers
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ltx2_image_to_video_pipeline_steps_despite_the_clean_first_frame(variant):
    pipe = tiny_ltx2_pipeline(variant, LTX2ImageToVideoPipeline)
    sampling, branches = SAMPLING[variant]
    # A gradient, resized by the pipeline to the video's 32 x 96. `image_crf=0`: the H.264 re-compression of the
    # image needs PyAV, which is not installed (and only changes the image's pixels).
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                                      np.full((64, 64), 128, np.uint8)], axis=-1))
    call = {**PIPELINE_CALL, **sampling, "image": image, "image_crf": 0}
    grid = VideoLayout(5, 4, 12)
    timesteps = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps.append(kwargs["timestep"]), with_kwargs=True)
    try:
        stats, calls = check_pipeline_against_dense(pipe, call)
    finally:
        hook.remove()
    # The image latent is written into latent frame 0, whose tokens get a timestep of 0 (held clean), the others
    # the step's. The step is read from these per-token timesteps: a read of the clean tokens' 0 (or of a mean
    # over all tokens) would put calls on the wrong step, and keep the wrong ones dense.
    frame = grid.height * grid.width
    assert len(timesteps) == 4 * 3 * len(branches)  # the helper's 4 pipeline calls of 3 steps
    assert all(t.shape[1:] == (grid.num_tokens,) and (t[:, :frame] == 0).all() and (t[:, frame:] > 0).all()
               for t in timesteps)
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch, r.layer) for r in records) == Counter(
        (step, branch, layer) for step in range(3) for branch, layers in branches.items() for layer in layers
    )
    assert all(r.sparse == (r.step > 0) for r in records)
    # 5 latent frames of 4 x 12 (as for LTX2Pipeline), the image's frame 0 among them: no tokens after the grid.
    assert Counter(calls) == Counter(
        (layer, grid, (2 if branch == "cond_uncond" else 1, grid.num_tokens))
        for step in (1, 2) for branch, layers in branches.items() for layer in layers
    )


def temporal_tiles(latent_frames: int, height: int, width: int) -> list[LTX2DFREpilogueTile]:
    """Two tiles over the whole picture, overlapping on the middle latent frame, their weights summing to one."""
    middle = latent_frames // 2
    first = torch.zeros(latent_frames)
    first[:middle], first[middle] = 1.0, 0.5
    second = 1.0 - first
    return [
        LTX2DFREpilogueTile(slice(start, stop), slice(0, height), slice(0, width),
                            weights[start:stop, None, None].expand(-1, height, width).clone())
        for weights, start, stop in ((first, 0, middle + 1), (second, middle, latent_frames))
    ]


def tiny_dfr_pipeline():
    """A tiny `LTX2DFRPipeline` and its call: 3 steps of a given sigma schedule, no CFG (one transformer call per
    step and tile), latents of 5 frames of 4 x 12."""
    base = tiny_ltx2_pipeline("2.0")
    # Generated keyframe slots need the LTX-2.5 marker embedding. The RoPE's VAE ratios must be the tiny VAE's
    # (2x in time, 8x in space), as a checkpoint's are: otherwise the slots' coordinates (placed with the VAE's
    # ratios) would not line up with the grid's, and the case that matters, a slot at the rows and columns of a
    # grid frame, would not be tested.
    transformer = tiny_transformer("2.0", use_keyframes_abs_pos_embedding=True, vae_scale_factors=(2, 8, 8))
    components = {name: module for name, module in base.components.items() if name not in ("transformer", "scheduler")}
    # DFR steps a given (distilled) sigma schedule, without the resolution-dependent shift.
    pipe = LTX2DFRPipeline(**components, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    call = {name: PIPELINE_CALL[name] for name in ("prompt", "height", "width", "num_frames", "frame_rate",
                                                   "max_sequence_length", "output_type")}
    call["sigmas"] = [1.0, 0.7, 0.4]
    return pipe, call


@pytest.mark.parametrize("tiled", [False, True])
def test_ltx2_dfr_pipeline_reads_each_calls_grid_from_its_coordinates(tiled):
    pipe, call = tiny_dfr_pipeline()
    frames, height, width = 5, 4, 12
    _, _, slots = resolve_canvas(call["num_frames"], pipe.vae_temporal_compression_ratio)
    assert (frames - 1) * pipe.vae_temporal_compression_ratio + 1 == call["num_frames"]  # no padded canvas
    # Each slot: one pixel frame inside the video's span, a whole frame of tokens appended after the grid.
    slot_tokens = len(slots) * height * width
    if tiled:
        call["video_tiles"] = temporal_tiles(frames, height, width)
        # The slots sit at the end of the video (the last segment's end): only the last tile's window holds them.
        layouts = [VideoLayout(tile.frames.stop - tile.frames.start, height, width, text_position="end",
                               text_len=slot_tokens if tile.frames.stop == frames else 0)
                   for tile in call["video_tiles"]]
    else:
        layouts = [VideoLayout(frames, height, width, text_len=slot_tokens, text_position="end")]

    stats, calls = check_pipeline_against_dense(pipe, call)
    records = stats.calls["transformer"]
    assert Counter((r.step, r.layer) for r in records) == Counter(
        (step, layer) for step in range(3) for layer in (0, 1) for _ in layouts
    )
    assert all(r.sparse == (r.step > 0) for r in records)
    assert Counter(calls) == Counter(
        (layer, layout, (1, layout.num_tokens)) for step in (1, 2) for layer in (0, 1) for layout in layouts
    )


def test_ltx2_dfr_tile_held_clean_by_a_video_condition_is_on_its_step():
    # A video condition over the first tile's frames gives all its tokens a timestep of 0 (strength 1) or
    # `t * 0.05` (strength 0.95): the largest per-token timestep is no step's, and read from the call the tile went
    # to the last step (sparse in step 0) with a warning of timesteps off the schedule.
    import numpy as np
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    pipe, call = tiny_dfr_pipeline()
    call["video_tiles"] = temporal_tiles(5, 4, 12)
    video = (np.random.default_rng(0).random((5, 32, 96, 3)) * 255).astype(np.uint8)
    for strength in (1.0, 0.95):
        call["conditions"] = [LTX2VideoCondition(frames=video, index=0, strength=strength, crf=0)]
        with torch.no_grad(), diffsparse.sparse(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1)) as handle:
            pipe(**call, generator=torch.Generator().manual_seed(0))
            records = handle.stats().calls["transformer"]
        # Two tiles a step, each on the step it is denoised at.
        assert [(r.step, r.sparse) for r in records if r.layer == 0] == [
            (0, False), (0, False), (1, True), (1, True), (2, True), (2, True)]


def test_a_pipeline_sharing_the_transformer_after_a_run_counts_its_own_steps():
    # LTX-2's pipelines leave `_current_timestep` set after their loop: read as the step, a pipeline sharing the
    # transformer and scheduler (`from_pipe`) put every call on the first run's last step (all dense, a 1-step run).
    pipe = tiny_ltx2_pipeline("2.0")
    call = {**PIPELINE_CALL, **SAMPLING["2.0"][0]}
    handle = diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    try:
        with torch.no_grad():
            pipe(**call, generator=torch.Generator().manual_seed(0))
            other = LTX2Pipeline.from_pipe(pipe)
            other.set_progress_bar_config(disable=True)
            other(**call, generator=torch.Generator().manual_seed(0))
        assert handle.run_step_counts == [3, 3]
        assert [(r.step, r.sparse) for r in handle.stats().calls["transformer"] if r.layer == 0] == [
            (0, False), (1, True), (2, True)]
    finally:
        handle.remove()


def video_and_audio(out):
    """The modular blocks' video and audio latents (`output=["latents", "audio_latents"]`) as one tensor."""
    return torch.cat([out["latents"].flatten(), out["audio_latents"].flatten()])


@pytest.mark.parametrize("variant, blocks", [
    ("2.3", "text2video"), ("2.0", "image2video"), ("2.0", "condition"), ("2.0", "in_context"),
])
def test_modular_core_denoise_dense_every_block_kept_and_sparse_after_the_dense_step(variant, blocks):
    """diffusers' modular LTX-2 denoise blocks (`LTX2CoreDenoiseStep`, `LTX2Image2VideoCoreDenoiseStep`,
    `LTX2ConditionCoreDenoiseStep`, `LTX2InContextCoreDenoiseStep`) on the tiny transformer, a flow-matching scheduler
    and `LTX2Guidance` guiders (CFG; with LTX-2.3's STG on block 1 and modality guidance), fed connector embeddings:
    dense identical on the video and audio latents, every block kept within 1e-4, and a sparse run whose calls each
    fall on their own scheduler step, the first dense, on the grid with the appended tokens its trailing span."""
    from diffusers.guiders import LTX2Guidance
    from diffusers.modular_pipelines.ltx2 import modular_blocks_ltx2 as modular
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

    step = {"text2video": modular.LTX2CoreDenoiseStep, "image2video": modular.LTX2Image2VideoCoreDenoiseStep,
            "condition": modular.LTX2ConditionCoreDenoiseStep, "in_context": modular.LTX2InContextCoreDenoiseStep}
    pipe = step[blocks]().init_pipeline()
    extra = {} if variant == "2.0" else {"stg_scale": 1.0, "modality_scale": 3.0, "guidance_rescale": 0.7}
    torch.manual_seed(0)
    pipe.update_components(
        transformer=tiny_transformer(variant), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        # 2 latent channels x 8 / 4 mel bins: audio tokens 4 wide (the transformer's `audio_in_channels`).
        audio_vae=AutoencoderKLLTX2Audio(base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                                         latent_channels=2, mel_bins=8, resolution=32).eval(),
        guider=LTX2Guidance(guidance_scale=3.0, spatio_temporal_guidance_blocks=[1] if extra else None, **extra),
        audio_guider=LTX2Guidance(guidance_scale=7.0, **extra),
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    # No VAE in the blocks: its default 8x time, 32x space compression; 17 frames of 128 x 192 -> a 3 x 4 x 6 grid.
    call = {"batch_size": 1, "dtype": torch.float32, "num_frames": 17, "height": 128, "width": 192,
            "num_inference_steps": 3, "output": ["latents", "audio_latents"]}
    for prefix in ("", "negative_"):
        call |= {f"{prefix}connector_prompt_embeds": torch.randn(1, 7, 16, generator=g),
                 f"{prefix}connector_audio_prompt_embeds": torch.randn(1, 7, 16, generator=g),
                 f"{prefix}connector_attention_mask": torch.ones(1, 7)}
    if blocks == "image2video":  # latent frame 0 held clean: its tokens at timestep 0, the others at the step's
        call["image_latents"] = torch.randn(1, 8, 1, 4, 6, generator=g)
    if blocks in ("condition", "in_context"):  # a still at latent frame 0 (written in), one at frame 2 (appended)
        call |= {"condition_latents": [torch.randn(1, 8, 1, 4, 6, generator=g) for _ in range(2)],
                 "condition_strengths": [1.0, 1.0], "condition_indices": [0, 2], "condition_pixel_frames": [1, 1]}
    if blocks == "in_context":  # an IC-LoRA reference video on the grid's coordinates, appended after the keyframe
        call |= {"reference_conditions": [LTX2ReferenceCondition(frames=None)], "reference_token_counts": [72],
                 "reference_latents": torch.randn(1, 72, 8, generator=g),
                 "reference_coords": pipe.transformer.rope.prepare_video_coords(1, 3, 4, 6, torch.device("cpu"))}
    stats, calls = check_modular_against_dense(pipe, call, block_size=16, output=video_and_audio)
    # Each guidance pass its own single-batch call in its own cache context (the branch); the timestep the
    # scheduler's `t` (per token where tokens are held clean, its maximum the step's): each step found. STG's pass
    # computes no attention on block 1, so only block 0 is counted there.
    passes = {"pred_cond": [0, 1], "pred_uncond": [0, 1]}
    if extra:
        passes |= {"pred_cond_stg": [0], "pred_cond_modality": [0, 1]}
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch, r.layer) for r in records) == Counter(
        (step, branch, layer) for step in range(3) for branch, layers in passes.items() for layer in layers)
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    appended = {"condition": 24, "in_context": 24 + 72}.get(blocks, 0)  # the keyframe's 4 x 6 tokens, the reference's
    assert {layout for _, layout, _ in calls} == {VideoLayout(3, 4, 6, text_len=appended, text_position="end")}


@pytest.mark.parametrize("frames", [1, 3])
def test_echo_memory_leads_and_a_keyframe_trails_a_one_frame_grid_too(frames):
    # Echo's memory slots are single frames, so with a one-frame grid the tokens read as the grid from token 0 as
    # well as from the memory's end: before, the first memory slot was taken for the grid and the frame being made
    # kept whole. Time tells them apart: the generated grid's first frame starts at time 0 (`prepare_video_coords`),
    # the memory where its offset puts it (500, after the video, by default).
    from diffusers.modular_pipelines.echo.before_denoise import _video_memory_coords

    from diffsparse.pipelines.ltx2 import extra_tokens_position

    model, cpu = tiny_transformer("2.0"), torch.device("cpu")
    grid = model.rope.prepare_video_coords(1, frames, 4, 6, cpu, fps=24.0)
    memory = _video_memory_coords(model, 2, 4, 6, 24.0, 500.0, 50.0, cpu)
    assert extra_tokens_position(torch.cat([memory, grid], dim=2), (frames, 4, 6), 48) == "start"
    # Two memory slots behind the grid are not Echo's layout, and read as trailing tokens as before.
    assert extra_tokens_position(torch.cat([grid, memory], dim=2), (frames, 4, 6), 48) == "end"
    # HDR-LoRA's reference, as long and as large as the video, on the grid's own coordinates, appended: a one-frame
    # grid was read with it as one frame of twice the rows, and the grid taken from the reference.
    assert extra_tokens_position(torch.cat([grid, grid], dim=2), (frames, 4, 6), 24 * frames) == "end"


@pytest.mark.parametrize("offset", [-100.0, 0.0])
@pytest.mark.parametrize("frames", [1, 3])
def test_echo_memory_leads_the_grid_wherever_its_offset_puts_it(frames, offset):
    # `memory_position_offset` is Echo's user's: with the memory before the video in time (or around 0), the first
    # memory slot was taken for a one-frame grid (the span starting earlier), the generated frame kept whole and the
    # pattern laid on a memory frame. Three frames of grid: the memory reads as no grid, which alone says it leads.
    from diffusers.modular_pipelines.echo.before_denoise import _video_memory_coords

    from diffsparse.pipelines.ltx2 import extra_tokens_position

    model, cpu = tiny_transformer("2.0"), torch.device("cpu")
    grid = model.rope.prepare_video_coords(1, frames, 4, 6, cpu, fps=24.0)
    memory = _video_memory_coords(model, 2, 4, 6, 24.0, offset, 50.0, cpu)
    assert extra_tokens_position(torch.cat([memory, grid], dim=2), (frames, 4, 6), 48) == "start"
    assert extra_tokens_position(torch.cat([grid, memory], dim=2), (frames, 4, 6), 48) == "end"


@pytest.mark.parametrize("frames", [1, 3])
def test_echo_memory_on_the_generated_frame_is_told_by_the_timesteps(frames):
    # A memory slot centred on the generated video's first frame takes that frame's coordinates: with a one-frame
    # grid, time cannot tell which span is the grid. The call's per-token timesteps can: Echo gives its memory 0 and
    # the grid the step's sigma. Without them (or with the grid clean too) only a longer grid tells.
    from diffusers.modular_pipelines.echo.before_denoise import _video_memory_coords

    model, cpu = tiny_transformer("2.0"), torch.device("cpu")
    grid = model.rope.prepare_video_coords(1, frames, 4, 6, cpu, fps=24.0)
    memory = _video_memory_coords(model, 2, 4, 6, 24.0, float(grid[0, 0, 0].mean()), 50.0, cpu)
    assert torch.equal(memory[:, :, :24], grid[:, :, :24])

    def position(coords, timestep):
        call = {"hidden_states": torch.zeros(1, coords.shape[2], 8), "timestep": timestep, "video_coords": coords,
                "num_frames": frames, "height": 4, "width": 6}
        layout, _ = adapter_for(model).read_call(model, (), call)
        assert layout == VideoLayout(frames, 4, 6, text_len=48, text_position=layout.text_position)
        return layout.text_position

    clean, noisy = torch.zeros(1, 48), torch.full((1, 24 * frames), 900.0)
    assert position(torch.cat([memory, grid], dim=2), torch.cat([clean, noisy], dim=1)) == "start"
    # Per token as `(B, N, 1)` too, which the transformer flattens as it does `(B, N)` (read as no per-token timestep
    # before).
    assert position(torch.cat([memory, grid], dim=2), torch.cat([clean, noisy], dim=1)[..., None]) == "start"
    # Clean tokens behind a noisy grid (keyframes, references) stay trailing.
    assert position(torch.cat([grid, memory], dim=2), torch.cat([noisy, clean], dim=1)) == "end"
    blind = "start" if frames > 1 else "end"
    assert position(torch.cat([memory, grid], dim=2), torch.full((1,), 900.0)) == blind
    assert position(torch.cat([memory, grid], dim=2), torch.zeros(1, 48 + 24 * frames)) == blind


@pytest.mark.parametrize("memory_slots", [0, 2])
def test_echo_denoise_blocks_keep_the_memory_frames_whole_in_front_of_the_grid(memory_slots):
    """diffusers' Echo denoise blocks (`EchoDenoiseStep`: LTX-2's transformer, DMD sigmas, no scheduler, no guidance)
    with a clean first frame and `memory_slots` clean memory frames, which the blocks put *before* the grid's tokens
    at times of their own: dense identical, every block kept within 1e-4, each call its own step (counted from the
    timesteps), the first dense, and the memory frames the layout's leading span. Before, they were read as a
    trailing span: the grid taken from the memory tokens on, the video's last frames kept whole as if conditions."""
    from diffusers.modular_pipelines.echo.modular_blocks_echo import EchoDenoiseStep

    pipe = EchoDenoiseStep().init_pipeline()
    pipe.update_components(transformer=tiny_transformer("2.3"))
    # Only its latent mel bins (8 / 4) are read, to unpack the audio tokens; the blocks hold no such component.
    pipe.audio_vae = AutoencoderKLLTX2Audio(base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                                            latent_channels=2, mel_bins=8, resolution=32).eval()
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    call = {"num_frames": 17, "height": 128, "width": 192, "sigmas": (1.0, 0.9, 0.5, 0.0),  # a 3 x 4 x 6 grid
            "connector_prompt_embeds": torch.randn(1, 7, 16, generator=g),
            "connector_audio_prompt_embeds": torch.randn(1, 7, 16, generator=g),
            "connector_attention_mask": torch.ones(1, 7),
            "first_frame_latents": torch.randn(1, 8, 1, 4, 6, generator=g), "output": ["latents", "audio_latents"]}
    if memory_slots:
        call |= {"memory_video_latents": [torch.randn(1, 8, 1, 4, 6, generator=g) for _ in range(memory_slots)],
                 "memory_audio_latents": [torch.randn(1, 2, 3, 2, generator=g) for _ in range(memory_slots)]}
    # No scheduler: the step count is unknown, so `dense_steps` must be an int (the default 0.2 is refused).
    with (pytest.raises(ValueError, match="pipeline without a scheduler"), torch.no_grad(),
          diffsparse.sparse(pipe, diffsparse.SparseConfig())):
        pipe(**call, generator=torch.Generator().manual_seed(0))
    stats, calls = check_modular_against_dense(pipe, call, block_size=16, output=video_and_audio)
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {(step, "call 0"): 2 for step in range(3)}
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    assert {layout for _, layout, _ in calls} == {VideoLayout(3, 4, 6, text_len=24 * memory_slots,
                                                              text_position="start" if memory_slots else "end")}


def test_a_half_strength_reference_on_a_one_frame_grid_trails_it():
    # IC-LoRA's reference on the grid's own coordinates, appended: with a one-frame grid, coordinates and time read
    # both spans as the grid, so the per-token timesteps decide. A reference of strength 0.5 is noisy too (the step's
    # t / 2), so nothing is clean in front: it trails. Read from the trailing tokens' noise alone, the grid's
    # noisy tokens in front would be taken for clean memory, and the reference for the grid.
    from diffusers.guiders import LTX2Guidance
    from diffusers.modular_pipelines.ltx2.modular_blocks_ltx2 import LTX2InContextCoreDenoiseStep
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

    pipe = LTX2InContextCoreDenoiseStep().init_pipeline()
    torch.manual_seed(0)
    pipe.update_components(
        transformer=tiny_transformer("2.0"), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        audio_vae=AutoencoderKLLTX2Audio(base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                                         latent_channels=2, mel_bins=8, resolution=32).eval(),
        guider=LTX2Guidance(guidance_scale=3.0), audio_guider=LTX2Guidance(guidance_scale=7.0),
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    # No VAE in the blocks: its default 32x space compression; one frame of 128 x 192 -> a 1 x 4 x 6 grid.
    call = {"batch_size": 1, "dtype": torch.float32, "num_frames": 1, "height": 128, "width": 192,
            "num_inference_steps": 3, "output": ["latents", "audio_latents"], "condition_latents": [],
            "condition_strengths": [], "condition_indices": [], "condition_pixel_frames": [],
            "reference_conditions": [LTX2ReferenceCondition(frames=None, strength=0.5)],
            "reference_token_counts": [24], "reference_latents": torch.randn(1, 24, 8, generator=g),
            "reference_coords": pipe.transformer.rope.prepare_video_coords(1, 1, 4, 6, torch.device("cpu"))}
    for prefix in ("", "negative_"):
        call |= {f"{prefix}connector_prompt_embeds": torch.randn(1, 7, 16, generator=g),
                 f"{prefix}connector_audio_prompt_embeds": torch.randn(1, 7, 16, generator=g),
                 f"{prefix}connector_attention_mask": torch.ones(1, 7)}
    _, calls = check_modular_against_dense(pipe, call, block_size=8, output=video_and_audio)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 4, 6, text_len=24, text_position="end")}


def test_one_timestep_for_every_token_does_not_tell_the_grid_from_a_reference():
    # A `(B, 1)` timestep is valid (the transformer broadcasts it over the tokens) but is no per-token one: it cannot
    # say which span of a one-frame grid and a reference on its coordinates is clean. At 0 (every token clean), read
    # as per-token, its one column would make the leading tokens clean and leave no others to be noisy: "start".
    model = tiny_transformer("2.0")
    grid = model.rope.prepare_video_coords(1, 1, 4, 6, torch.device("cpu"), fps=24.0)

    def call():
        return {**make_inputs(model)(), "hidden_states": torch.randn(1, 48, 8, generator=torch.Generator()),
                "num_frames": 1, "timestep": torch.zeros(1, 1), "video_coords": torch.cat([grid, grid], dim=2)}

    layout, _ = adapter_for(model).read_call(model, (), call())
    assert layout == VideoLayout(1, 4, 6, text_len=24, text_position="end")
    run_transformer(model, call, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0))
