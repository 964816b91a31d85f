"""diffsparse on a diffusers EasyAnimate transformer (tiny, random weights, called directly): joint [text, video]
self-attention in MMDiT blocks (text through `add_*_proj`) and plain blocks (one set of projections), with a
second (T5) text embedding and inpainting latents on channels."""

import pytest
import torch
from diffusers import EasyAnimateTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls, run_transformer

LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    # 2 layers, the first an MMDiT block; inputs of 4 channels plus 5 of inpainting latents (mask + image).
    torch.manual_seed(0)
    return EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=9, out_channels=4, patch_size=2, sample_width=12,
        sample_height=8, num_layers=2, mmdit_layers=1, time_embed_dim=8, text_embed_dim=16, text_embed_dim_t5=12,
    ).eval()


def inputs():
    """4 frames of 8 x 12 latents -> 4 x 4 x 6 = 96 video tokens behind 6 + 5 text tokens."""
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 4, 4, 8, 12, generator=g), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
            "encoder_hidden_states_t5": torch.randn(1, 5, 12, generator=g),
            "inpaint_latents": torch.randn(1, 5, 4, 8, 12, generator=g)}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs, block_size=16, order=order, sparse=LOCAL)



def test_both_texts_lead_the_layout(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(4, 4, 6, text_len=11, text_position="start")
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs, LOCAL)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, 107)), (1, (1, 107))]


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "EasyAnimate", layer=1)
