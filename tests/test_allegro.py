"""diffsparse on a diffusers Allegro transformer (tiny, random weights, called directly): video-only
self-attention with the pipeline's 3D RoPE; a video padding mask leaves the call to the original processor."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AllegroPipeline, AllegroTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines import adapter_for

from helpers import check_against_dense, check_other_processors_are_refused, run_transformer

RADIAL = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=24, sample_height=8, sample_width=12, sample_frames=4, caption_channels=16,
    ).eval()


def inputs(transformer, mask=None):
    """4 latent frames of 8 x 12 -> 4 x 4 x 6 = 96 tokens, with the RoPE the pipeline builds for them."""
    # The pipeline's own RoPE preparation, on a stand-in with what it reads (VAE scale 8: 64 x 96 pixels).
    rope = AllegroPipeline._prepare_rotary_positional_embeddings(
        SimpleNamespace(vae_scale_factor_spatial=8, transformer=transformer), 1, 64, 96, 4, torch.device("cpu")
    )

    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(1, 4, 4, 8, 12, generator=g),
                "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "timestep": torch.tensor([500]),
                "image_rotary_emb": rope, "attention_mask": mask}

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs(transformer), block_size=16, order=order, sparse=RADIAL)



def test_layout_and_a_video_padding_mask(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs(transformer)())
    assert layout == VideoLayout(4, 4, 6)
    mask = torch.ones(1, 4, 8, 12)
    mask[..., 8:] = 0  # the right third of the canvas is padding
    reference = run_transformer(transformer, inputs(transformer, mask))
    with torch.no_grad(), diffsparse.sparse(transformer, RADIAL) as handle:
        out = transformer(**inputs(transformer, mask)()).sample
        assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(1, 0), (1, 0)]
    assert torch.equal(out, reference)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Allegro", layer=1)
