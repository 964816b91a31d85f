"""diffsparse on a diffusers Wan 2.2 Animate transformer (tiny, random weights, called directly): Wan's
self-attention with its own copy of the processor class; the face adapters' cross-attention untouched."""

import pytest
import torch
from diffusers import WanAnimateTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_other_processors_are_refused

ALL_BLOCKS = Window3D(window=(99, 99, 99))
FRAMES = 20  # pose frames; the reference image's latent is one more frame in front


@pytest.fixture(scope="module")
def transformer():
    # The shapes diffusers' own tests use, at 8 x 8 latents: 21 frames x 4 x 4 tokens = 336.
    torch.manual_seed(0)
    return WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, image_dim=16, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    ).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 12, FRAMES + 1, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 12, 16, generator=g),
        "encoder_hidden_states_image": torch.randn(1, 12, 16, generator=g),
        "pose_hidden_states": torch.randn(1, 4, FRAMES, 8, 8, generator=g),
        "face_pixel_values": torch.randn(1, 3, 77, 16, 16, generator=g),  # one 77-frame segment of face crops
    }


def run(model, config=None):
    with torch.no_grad():
        if config is None:
            return model(**inputs()).sample
        with diffsparse.sparse(model, config) as handle:
            return model(**inputs()).sample, handle.stats()


def test_dense_pattern_is_the_unmodified_model_and_the_face_adapters_are_untouched(transformer):
    originals = [b.attn1.processor for b in transformer.blocks]
    face = [adapter.processor for adapter in transformer.face_adapter]
    reference = run(transformer)
    out, stats = run(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0))
    assert torch.equal(out, reference) and [s.layer for s in stats.layers] == [0, 1]
    assert [b.attn1.processor for b in transformer.blocks] == originals
    assert [adapter.processor for adapter in transformer.face_adapter] == face


@pytest.mark.parametrize("order", [None, TileOrder((2, 2, 2))])
def test_every_block_kept_matches_dense(transformer, order):
    reference = run(transformer)
    out, stats = run(transformer, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0, order=order))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert all(s.sparse_calls == 1 for s in stats.layers)
    sparse, stats = run(transformer, diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0))
    assert stats.mean_density < 0.5 and not torch.allclose(sparse, reference, atol=1e-4)


def test_layout_of_a_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(FRAMES + 1, 4, 4) and int(timestep) == 500


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Wan Animate", layer=1)
