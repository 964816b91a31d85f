"""diffsparse on diffusers Kandinsky 6 (tiny, random weights, offline): the transformer called directly, the fused
blocks' video self-attention, on video alone, with audio, and with the image-to-video reference frame appended last.
And the whole `Kandinsky6TI2VAPipeline` built (Qwen2.5-VL and CLIP text encoders, HunyuanVideo VAE, MMAudio VAE and
vocoder) and run with classifier-free guidance, text-to-video (with and without audio) and image-to-video: the
pipeline's own calls, steps, layouts and reference-frame positions."""

import re
from collections import Counter

import PIL.Image
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Kandinsky6TI2VAPipeline,
    Kandinsky6Transformer3DModel,
    MMAudioVAE,
    MMAudioVocoder,
)
from diffusers.pipelines.kandinsky6 import pipeline_kandinsky6_ti2va as ti2va

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines import kandinsky6 as kandinsky6_adapter
from diffsparse.pipelines.base import TOKEN_MASK, SparseProcessor
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_video_token_positions,
    masked_attention_calls,
    qwen_tokenizer,
    recorded_attention_calls,
    run_transformer,
    tiny_clip_text_model,
    tiny_hunyuan_video_vae,
    tiny_qwen25_vl,
)

GRID = (2, 8, 16)  # latent frames 2 of 16 x 32, patchified 1 x 2 x 2: 256 tokens
VIDEO_FRAMES = 3  # generated frames of the image-to-video calls, the reference frame appended after them
FRAME_TOKENS = GRID[1] * GRID[2]
REFERENCE_FIRST = [VIDEO_FRAMES, *range(VIDEO_FRAMES)]  # the pipeline's frames (reference last) in the layout's order
# A window of 1 frame and 3 x 3 tokens: on two frames radial would keep nearly every block.
LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=32, dense_steps=0)
# Each frame attends to its temporal neighbours only, so where the reference frame sits in the layout matters.
NEIGHBOURS = diffsparse.SparseConfig(pattern=Window3D(window=(3, 3, 3)), block_size=32, dense_steps=0)
CHANNELS = 2 * 4 + 1  # `visual_cond`: noisy latent, conditioning latent, conditioning mask
KINDS = [{}, {"audio": True}, {"audio": True, "reference": "last"}]  # video alone, with audio, image-to-video


def tiny_transformer():
    """Text 16 wide (the tiny Qwen2.5-VL's), pooled text 8 wide (the tiny CLIP's), latents 4 channels (the tiny
    VAEs')."""
    # The released checkpoints' switches (`ca_rope`, `cross_gates`, `fix_modulation`, two visual token types).
    # Kandinsky 6, unlike Kandinsky 5, does not zero-initialise its modulation: attention reaches the output, which
    # `check_against_dense`'s sparse comparison verifies.
    return Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4), in_audio_dim=4,
        out_audio_dim=4, text_token_padding=True, ca_rope=True, cross_gates=True, fix_modulation=True,
        visual_token_type_num_embeddings=2,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer()


def inputs(audio: bool = False, reference: str | None = None):
    """A bare call on GRID's video; `audio`: with audio latents (the fused video/audio path). `reference`: the
    image-to-video call instead, `VIDEO_FRAMES` frames and the reference frame with the pipeline's temporal RoPE
    positions and token types, either appended `"last"` (as the pipeline does) or put `"first"` by hand (the
    layout's order, every position non-decreasing)."""
    def call():
        g = torch.Generator().manual_seed(1)
        frames, height, width = GRID
        text = {
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
            "pooled_projections": torch.randn(1, 8, generator=g),
            "encoder_attention_mask": torch.tensor([[True] * 4 + [False] * 2]),  # a padded prompt
            "timestep": torch.tensor([500.0]),
        }
        if audio:
            text["audio_hidden_states"] = torch.randn(1, 10, 4, generator=g)
        if reference is None:
            return {"hidden_states": torch.randn(1, frames, 2 * height, 2 * width, CHANNELS, generator=g), **text}
        video_then_reference = torch.randn(1, VIDEO_FRAMES + 1, 2 * height, 2 * width, CHANNELS, generator=g)
        temporal_positions = torch.tensor([*range(VIDEO_FRAMES), 0])
        token_types = torch.tensor([[0] * VIDEO_FRAMES + [1]])
        if reference == "first":
            video_then_reference = video_then_reference[:, REFERENCE_FIRST]
            temporal_positions, token_types = temporal_positions[REFERENCE_FIRST], token_types[:, REFERENCE_FIRST]
        return {
            "hidden_states": video_then_reference, **text, "visual_token_type_ids": token_types,
            "visual_rope_pos": (temporal_positions, torch.arange(height), torch.arange(width)),
        }

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 4, 4))])
@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, kind, order):
    check_against_dense(transformer, inputs(**kind), block_size=32, order=order, sparse=LOCAL)


def test_layout_and_token_order(transformer):
    adapter = adapter_for(transformer)
    layout, timestep = adapter.read_call(transformer, (), inputs()())
    assert layout == VideoLayout(*GRID) and timestep.item() == 500.0
    layout, _, order = adapter.read_call(transformer, (), inputs(reference="last")())
    assert layout == VideoLayout(VIDEO_FRAMES + 1, *GRID[1:])
    # The video's frames are layout frames 1.., the reference (the model's last frame) layout frame 0.
    video_tokens = VIDEO_FRAMES * FRAME_TOKENS
    assert torch.equal(order, torch.cat([torch.arange(FRAME_TOKENS, FRAME_TOKENS + video_tokens),
                                         torch.arange(FRAME_TOKENS)]))
    # Positions already in order (the reference put first by hand, or none appended) and positions the adapter
    # cannot map keep frame-major order.
    call = inputs(reference="last")()
    for temporal in ([0, 0, 1, 2], [0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 2, 1]):
        call["visual_rope_pos"] = (torch.tensor(temporal), *call["visual_rope_pos"][1:])
        assert len(adapter.read_call(transformer, (), call)) == 2, temporal


def test_each_latent_pixel_moves_the_query_of_its_own_video_token(transformer):
    # 3 x 5 x 7 tokens, each axis told apart by its size: a layout of swapped axes has the same token count, so only
    # the positions tell it apart.
    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(1, 3, 10, 14, CHANNELS, generator=g),
                "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
                "pooled_projections": torch.randn(1, 8, generator=g),
                "encoder_attention_mask": torch.tensor([[True] * 4 + [False] * 2]), "timestep": torch.tensor([500.0])}

    check_video_token_positions(transformer, call, grid=(3, 5, 7), patch=(1, 2, 2), axes="THWC")


def test_reference_first_order_needs_the_video_positions_increasing():
    # A last frame at the first's position is a reference only behind frames in increasing order: with the video's
    # own positions out of order (or repeated) no reordering would attend its frames in RoPE order, so frame-major.
    order = kandinsky6_adapter.reference_first_order
    assert torch.equal(order((0, 1, 2, 0), 2), torch.tensor([2, 3, 4, 5, 6, 7, 0, 1]))
    assert torch.equal(order((3, 5, 3), 1), torch.tensor([1, 2, 0]))  # increasing, not `arange`
    for temporal in ((2, 1, 0, 2), (0, 0, 0), (1, 2, 1, 1)):
        assert order(temporal, 4) is None, temporal


def test_reference_frame_is_attended_next_to_the_first_frame(transformer, monkeypatch):
    # Appended last (the pipeline's call), the reference frame is attended as layout frame 0: the model gets what it
    # gets when the reference comes first in its own input (the same tokens and positions, frame-major).
    appended = run_transformer(transformer, inputs(reference="last"), NEIGHBOURS)[:, REFERENCE_FIRST]
    first = run_transformer(transformer, inputs(reference="first"), NEIGHBOURS)
    torch.testing.assert_close(appended, first, atol=1e-5, rtol=0)
    dense = run_transformer(transformer, inputs(reference="first"))
    assert not torch.allclose(first, dense, atol=1e-4)
    # Attended frame-major instead, the reference would neighbour the last frame, not the first: another result.
    monkeypatch.setattr(kandinsky6_adapter, "reference_first_order", lambda *args: None)
    frame_major = run_transformer(transformer, inputs(reference="last"), NEIGHBOURS)[:, REFERENCE_FIRST]
    assert not torch.allclose(frame_major, first, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_only_the_video_self_attention_is_sparse(transformer, kind):
    call = inputs(**kind)()
    tokens = call["hidden_states"].shape[1] * FRAME_TOKENS
    with recorded_attention_calls() as calls, diffsparse.sparse(transformer, LOCAL):
        sparse_modules = {name for name, module in transformer.named_modules()
                          if isinstance(getattr(module, "processor", None), SparseProcessor)}
        with torch.no_grad():
            transformer(**call)
    assert sparse_modules == {f"visual_transformer_blocks.{i}.video_dec_block.self_attention" for i in range(2)}
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, tokens)), (1, (1, tokens))]


def test_a_caller_s_attention_mask_runs_the_original_and_counts_dense(transformer):
    # The fused blocks pass their video self-attention no mask, but the module takes one (`attn_mask`: a caller's own
    # block may pass it): a token-level mask, which the kernel does not apply, so that call runs the original with it
    # and is logged dense, with a warning. Here layer 1, in the transformer's call, hides the last video token's key.
    from diffusers.models.transformers.transformer_kandinsky6 import Kandinsky6AttnProcessor

    mask = torch.ones(1, 1, 1, GRID[0] * FRAME_TOKENS, dtype=torch.bool)
    mask[..., -1] = False
    attention = transformer.visual_transformer_blocks[1].video_dec_block.self_attention
    with masked_attention_calls(attention, "attn_mask", mask) as seen, torch.no_grad(), diffsparse.sparse(
            transformer, LOCAL) as handle:
        with pytest.warns(diffsparse.DiffsparseWarning, match=re.escape(TOKEN_MASK)):
            transformer(**inputs()())
        assert [(s.layer, s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(0, 0, 1), (1, 1, 0)]
    [(args, kwargs, out)] = seen
    assert type(attention.processor) is Kandinsky6AttnProcessor  # given back on leaving `sparse`
    with torch.no_grad():
        original, unmasked = (attention(*args, **{**kwargs, "attn_mask": m}) for m in (mask, None))
    assert torch.equal(out, original)
    assert not torch.equal(out, unmasked)  # the mask reaches the output


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Kandinsky 6", layer=1)


# The word tokenizer's tokens (CLIP's prompts end with `</s>`) and Qwen's chat tokens first; the template's other words
# are not needed (`<unk>`), the pipeline drops them.
VOCABULARY = ["<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "a", "red", "circle", "moving", "left",
              "blurry"]
# Audio on (the pipeline's default: the fused blocks' video/audio path), latents returned: sparse attention is all in
# the transformer, so decoding video or audio would check nothing more. Prompts padded to 8 tokens (a text mask).
PIPELINE_CALL = {"prompt": "a red circle moving left", "negative_prompt": "blurry", "guidance_scale": 5.0,
                 "num_inference_steps": 3, "height": 64, "width": 64, "num_frames": 9, "max_sequence_length": 8,
                 "output_type": "latent"}


@pytest.fixture(scope="module")
def kandinsky_pipe():
    torch.manual_seed(0)
    vae = tiny_hunyuan_video_vae()
    clip = tiny_clip_text_model(len(VOCABULARY))
    # With audio the pipeline requires both; it reads their sample rate and hop length for the audio latents' length.
    # The vocoder's upsampling (8 x 8 x 8) matches the VAE's mel hop length, as a real pair's does.
    audio_vae = MMAudioVAE(mel_bins=8, latent_channels=4, hidden_channels=8, channel_multipliers=(1,),
                           layers_per_block=1)
    vocoder = MMAudioVocoder(num_mels=8, upsample_initial_channel=8, upsample_rates=(8, 8, 8),
                             upsample_kernel_sizes=(16, 16, 16), resblock_kernel_sizes=(3,),
                             resblock_dilation_sizes=((1,),))
    pipe = Kandinsky6TI2VAPipeline(
        transformer=tiny_transformer(), vae=vae.eval(), text_encoder=tiny_qwen25_vl(VOCABULARY),
        tokenizer=qwen_tokenizer(VOCABULARY), text_encoder_2=clip.eval(),
        tokenizer_2=word_tokenizer(VOCABULARY, max_length=77), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        audio_vae=audio_vae.eval(), vocoder=vocoder.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video_layout(pipe, call) -> VideoLayout:
    """The generated video's token layout: the VAE's compression, then the transformer's patches."""
    p_t, p_h, p_w = pipe.transformer.config.patch_size
    frames = (call["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    space = pipe.vae_scale_factor_spatial
    return VideoLayout(frames // p_t, call["height"] // (space * p_h), call["width"] // (space * p_w))


def check_cfg_steps(pipe, records) -> None:
    """Each step: the prompt's and the negative prompt's calls, apart (each in its `cache_context`), through both
    fused blocks; the first step dense (`check_pipeline_against_dense`'s default config), the others sparse with
    blocks left out. The step clock finds every step, so the transformer gets the scheduler's timesteps as they are
    (on another scale, every call would fall on one step)."""
    layers = len(pipe.transformer.visual_transformer_blocks)
    steps = PIPELINE_CALL["num_inference_steps"]
    assert Counter((r.step, r.branch) for r in records) == {
        (step, branch): layers for step in range(steps) for branch in ("cond", "uncond")
    }
    assert all(r.sparse == (r.step > 0) for r in records)
    assert all(r.density < 1 for r in records if r.sparse)


@pytest.mark.parametrize("sample_audio", [True, False], ids=["with audio", "video alone"])
def test_pipeline_text_to_video_with_cfg(kandinsky_pipe, sample_audio):
    # The pipeline drops a fixed number of the template's first tokens: it must stay inside the template, for the
    # prompt to reach the transformer whole.
    prefix = kandinsky_pipe.tokenizer(ti2va._PROMPT_TEMPLATE[:ti2va._PROMPT_TEMPLATE.index("{}")]).input_ids
    assert len(prefix) >= ti2va._QWEN_CROP_START
    stats, calls = check_pipeline_against_dense(kandinsky_pipe, {**PIPELINE_CALL, "sample_audio": sample_audio})
    check_cfg_steps(kandinsky_pipe, stats.calls["transformer"])
    layout = video_layout(kandinsky_pipe, PIPELINE_CALL)
    assert {(layout_, shape) for _, layout_, shape in calls} == {(layout, (1, layout.num_tokens))}


def test_pipeline_image_to_video_attends_the_reference_first(kandinsky_pipe, monkeypatch):
    adapter = adapter_for(kandinsky_pipe.transformer)
    read_call, seen = adapter.read_call, []

    def recording_read_call(transformer, args, kwargs):
        seen.append((kwargs, read_call(transformer, args, kwargs)))
        return seen[-1][1]

    # `apply` takes the adapter's `read_call` when it installs its hook: patched first, every pipeline call under
    # diffsparse goes through it.
    monkeypatch.setattr(adapter, "read_call", recording_read_call)
    # Another size than the video's: the pipeline resizes and crops it.
    pixels = torch.randint(0, 256, (48, 80, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    call = {**PIPELINE_CALL, "image": PIL.Image.fromarray(pixels.numpy())}
    stats, calls = check_pipeline_against_dense(kandinsky_pipe, call)
    check_cfg_steps(kandinsky_pipe, stats.calls["transformer"])
    video = video_layout(kandinsky_pipe, PIPELINE_CALL)
    layout = VideoLayout(video.frames + 1, video.height, video.width)  # text-to-video's, and the reference frame
    assert {(layout_, shape) for _, layout_, shape in calls} == {(layout, (1, layout.num_tokens))}
    # The three diffsparse runs' calls, each CFG branch apart.
    assert len(seen) == 3 * PIPELINE_CALL["num_inference_steps"] * 2
    for kwargs, answer in seen:
        # What the adapter assumes of the pipeline: the clean reference is the last frame (the one the conditioning
        # mask, the last channel, marks; token type 1), at the first frame's temporal RoPE position.
        mask = kwargs["hidden_states"][..., -1]
        assert mask[:, -1].eq(1).all() and not mask[:, :-1].any()
        assert kwargs["visual_token_type_ids"].tolist() == [[0] * video.frames + [1]]
        assert kwargs["visual_rope_pos"][0].tolist() == [*range(video.frames), 0]
        # So the adapter answers its reference-first order: each generated frame's tokens one layout frame later,
        # the reference's wrapping round to layout frame 0.
        assert len(answer) == 3 and answer[0] == layout
        tokens = torch.arange(layout.num_tokens)
        assert torch.equal(answer[2], (tokens + layout.tokens_per_frame) % layout.num_tokens)
