"""diffsparse on diffusers' JoyImage Edit and Edit Plus transformers (tiny, random weights, offline, called directly
as their pipelines call them): `[image, text]` joint attention, an edit's references as further frames after the
target (Edit Plus: or, of another size, in the trailing span)."""

import math

import pytest
import torch
from diffusers import JoyImageEditPlusTransformer3DModel, JoyImageEditTransformer3DModel

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


# JoyImage Edit Plus: rows of patches as its pipeline builds them, `[target, references, padding, text]`.
TARGET = (1, 8, 12)


@pytest.fixture(scope="module")
def plus_transformer():
    torch.manual_seed(0)
    return JoyImageEditPlusTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=16, num_attention_heads=2, text_dim=TEXT_DIM, num_layers=2,
        rope_dim_list=[2, 2, 4],
    ).eval()


def plus_inputs(references=(), valid=(TEXT_LEN, TEXT_LEN)):
    """Two rows (CFG's prompt and negative prompt, `valid` text tokens each) of a 16 x 24 latent target (8 x 12
    patches) and `references` of the given patch grids, one spare padding patch at the end of each row."""
    def call():
        g = torch.Generator().manual_seed(1)
        shapes = [TARGET, *references]
        patches = sum(math.prod(shape) for shape in shapes) + 1
        return {"hidden_states": torch.randn(2, patches, 4, 1, 2, 2, generator=g), "timestep": torch.tensor([700.0] * 2),
                "encoder_hidden_states": torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g),
                "encoder_hidden_states_mask": torch.arange(TEXT_LEN)[None] < torch.tensor(valid)[:, None],
                "shape_list": [shapes, shapes]}

    return call


PLUS_CASES = {
    "no reference": ((), VideoLayout(*TARGET, text_len=1 + TEXT_LEN, text_position="end")),
    "a reference of the target's size": ((TARGET,), VideoLayout(2, 8, 12, text_len=1 + TEXT_LEN, text_position="end")),
    "a reference of another size": (((1, 4, 6),), VideoLayout(*TARGET, text_len=24 + 1 + TEXT_LEN, text_position="end")),
}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("case", PLUS_CASES)
def test_edit_plus_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(plus_transformer, case,
                                                                                              order):
    # The padding patch's output, which the pipeline never reads, stays zero on the sparse path: compared without it.
    # (Attending the masked padding, or leaving out the RoPE, fails every block kept.)
    references, _ = PLUS_CASES[case]
    inputs = plus_inputs(references, valid=(5, 2))
    reference = run_transformer(plus_transformer, inputs)
    assert torch.equal(run_transformer(plus_transformer, inputs, diffsparse.SparseConfig(pattern="dense", dense_steps=0)),
                       reference)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0,
                                          order=order)
    torch.testing.assert_close(run_transformer(plus_transformer, inputs, every_block)[:, :-1], reference[:, :-1],
                               atol=1e-4, rtol=0)
    assert not torch.allclose(run_transformer(plus_transformer, inputs, ONE_TOKEN)[:, :-1], reference[:, :-1],
                              atol=1e-4)


@pytest.mark.parametrize("case", PLUS_CASES)
def test_edit_plus_layouts_and_one_call_per_row_mask(plus_transformer, case):
    references, layout = PLUS_CASES[case]
    with recorded_attention_calls() as calls:
        run_transformer(plus_transformer, plus_inputs(references, valid=(5, 2)), ONE_TOKEN)
    # Each row without its padding patch and its prompt's padding: the span cut to its valid text.
    spans = {layout.text_len - 1 - TEXT_LEN + n for n in (5, 2)}
    assert {(call_layout.grid, call_layout.text_len) for _, call_layout, _ in calls} == {(layout.grid, n) for n in spans}


def test_edit_plus_refuses_a_batch_of_different_sizes(plus_transformer):
    call = plus_inputs(((1, 4, 6),))()
    call["shape_list"] = [[TARGET, (1, 4, 6)], [TARGET, (1, 6, 4)]]
    with pytest.raises(ValueError, match="every sample needs the same target and reference sizes"), torch.no_grad(), \
            diffsparse.sparse(plus_transformer, ONE_TOKEN):
        plus_transformer(**call)


def test_edit_plus_other_processors_are_refused(plus_transformer):
    check_other_processors_are_refused(plus_transformer, "JoyImage Edit Plus", layer=1)
