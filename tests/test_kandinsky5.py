"""diffsparse on a diffusers Kandinsky 5 transformer (tiny, random weights, called directly): the visual blocks'
video-only self-attention, in frame-major token order and in the tiled ("fractal") order NABLA checkpoints use."""

import pytest
import torch
from diffusers import Kandinsky5Transformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.kandinsky5 import fractal_order

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls, run_transformer

GRID = (2, 8, 16)  # latent frames 2 of 16 x 32, patchified 1 x 2 x 2: 256 tokens, two 8 x 8 tiles per row
# A window of 1 frame and 3 x 3 tokens: on two frames radial would keep nearly every block.
LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=32, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
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
