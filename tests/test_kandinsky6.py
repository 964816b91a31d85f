"""diffsparse on a diffusers Kandinsky 6 transformer (tiny, random weights, called directly): the fused blocks' video
self-attention, on video alone, with audio, and with the image-to-video reference frame appended last."""

import pytest
import torch
from diffusers import Kandinsky6Transformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines import kandinsky6 as kandinsky6_adapter
from diffsparse.pipelines.base import SparseProcessor

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls, run_transformer

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


@pytest.fixture(scope="module")
def transformer():
    # The released checkpoints' switches (`ca_rope`, `cross_gates`, `fix_modulation`, two visual token types).
    # Kandinsky 6, unlike Kandinsky 5, does not zero-initialise its modulation: attention reaches the output, which
    # `check_against_dense`'s sparse comparison verifies.
    torch.manual_seed(0)
    return Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4), in_audio_dim=4,
        out_audio_dim=4, text_token_padding=True, ca_rope=True, cross_gates=True, fix_modulation=True,
        visual_token_type_num_embeddings=2,
    ).eval()


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


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Kandinsky 6", layer=1)
