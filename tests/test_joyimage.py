"""diffsparse on diffusers' JoyImage Edit transformer (tiny, random weights, offline, called directly as its
pipeline calls it): `[image, text]` joint attention, an edit's references as further frames after the target."""

import pytest
import torch
from diffusers import JoyImageEditTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls, run_transformer

TEXT_LEN, TEXT_DIM = 5, 8
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)


def tiny_transformer(rope_type: str = "rope", layers: int = 2):
    torch.manual_seed(0)
    return JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=16, num_attention_heads=2, text_dim=TEXT_DIM, num_layers=layers,
        rope_dim_list=[2, 2, 4], rope_type=rope_type,
    ).eval()


@pytest.fixture(scope="module", params=["rope", "mrope"])  # "mrope": RoPE on the text too
def transformer(request):
    return tiny_transformer(request.param)


def inputs(items: int = 0):
    """A call on one 16 x 24 latent image (8 x 12 tokens); `items`: an edit's `(B, n, C, T, H, W)` latents instead,
    `items - 1` references then the target, as the pipeline passes them."""
    def call():
        g = torch.Generator().manual_seed(1)
        shape = (1, items, 4, 1, 16, 24) if items else (1, 4, 1, 16, 24)
        return {"hidden_states": torch.randn(*shape, generator=g), "timestep": torch.tensor([700.0]),
                "encoder_hidden_states": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)}

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("items", [0, 3])
def test_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(transformer, items, order):
    # (Without the image RoPE every case fails.)
    check_against_dense(transformer, inputs(items), block_size=16, order=order, sparse=ONE_TOKEN)


@pytest.mark.parametrize(("items", "frames"), [(0, 1), (3, 3)])
def test_the_layout_is_the_image_then_the_text_an_edit_s_items_as_frames(transformer, items, frames):
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(items), ONE_TOKEN)
    assert {layout for _, layout, _ in calls} == {VideoLayout(frames, 8, 12, text_len=TEXT_LEN, text_position="end")}


def test_each_item_of_an_edit_is_a_frame():
    # Under a one-frame window the target attends itself and the prompt only, so with one block (after it the prompt
    # carries what it read of the references) its prediction does not depend on the references.
    transformer = tiny_transformer(layers=1)
    one_frame = diffsparse.SparseConfig(pattern=Window3D(window=(1, 99, 99)), block_size=16, dense_steps=0)
    call = inputs(3)()
    other = {**call, "hidden_states": call["hidden_states"].clone()}
    other["hidden_states"][:, :2] = torch.randn_like(call["hidden_states"][:, :2])
    with torch.no_grad(), diffsparse.sparse(transformer, one_frame):
        target, target_with_other_references = (transformer(**c).sample[:, -1] for c in (call, other))
    torch.testing.assert_close(target, target_with_other_references, atol=1e-5, rtol=0)
    dense_target, dense_other = (run_transformer(transformer, lambda c=c: c)[:, -1] for c in (call, other))
    assert not torch.allclose(dense_target, dense_other, atol=1e-4)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "JoyImage", layer=1)
