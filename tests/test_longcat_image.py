"""diffsparse on diffusers' LongCat-Image transformer (tiny, random weights, offline), called with the position ids
its pipelines make (`prepare_pos_ids`: modality first, images after the prompt): text-to-image and edits.

The pipelines cannot be run here without their Qwen2.5-VL prompt rewriter and tokenizer, and given `prompt_embeds`
they fail in diffusers itself (`encode_prompt` takes the batch size from the prompt, `check_inputs` refuses both).
"""

import pytest
import torch
from diffusers import LongCatImageTransformer2DModel
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import check_other_processors_are_refused, recorded_attention_calls

ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN = 10


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return LongCatImageTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6],
    ).eval()


def inputs(reference=None):
    """A call as the pipelines make it: an 8 x 6 image of packed latents (modality 1) after the prompt's positions,
    with an edited image (modality 2) of `reference` `(rows, cols)` when given."""
    generator = torch.Generator().manual_seed(0)
    img_ids = prepare_pos_ids(modality_id=1, type="image", start=(TEXT_LEN, TEXT_LEN), height=8, width=6)
    tokens = 48
    if reference is not None:
        reference_ids = prepare_pos_ids(modality_id=2, type="image", start=(TEXT_LEN, TEXT_LEN), height=reference[0],
                                        width=reference[1])
        img_ids, tokens = torch.cat([img_ids, reference_ids]), tokens + reference[0] * reference[1]
    return {"hidden_states": torch.randn(1, tokens, 16, generator=generator),
            "encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=generator),
            "timestep": torch.tensor([0.5]), "img_ids": img_ids,
            "txt_ids": prepare_pos_ids(modality_id=0, type="text", start=(0, 0), num_token=TEXT_LEN)}


def run(transformer, call, config=None):
    with torch.no_grad():
        if config is None:
            return transformer(**call).sample, None
        with diffsparse.sparse(transformer, config), recorded_attention_calls() as calls:
            return transformer(**call).sample, calls


@pytest.mark.parametrize("reference, layout, order", [
    (None, VideoLayout(1, 8, 6, text_len=TEXT_LEN, text_position="start"), None),
    (None, VideoLayout(1, 8, 6, text_len=TEXT_LEN, text_position="start"), TileOrder((1, 2, 2))),
    ((8, 6), VideoLayout(2, 8, 6, text_len=TEXT_LEN, text_position="start"), None),  # an edit: two frames
    ((2, 5), VideoLayout(1, 8, 6, text_len=TEXT_LEN + 10, text_position="start"), None),  # another size: text span
])
def test_dense_identical_every_block_kept_and_the_layout(transformer, reference, layout, order):
    call = inputs(reference)
    expected, _ = run(transformer, call)
    dense, _ = run(transformer, call, diffsparse.SparseConfig(pattern="dense", dense_steps=0))
    assert torch.equal(dense, expected)
    kept, calls = run(transformer, call, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0,
                                                                order=order))
    torch.testing.assert_close(kept, expected, atol=1e-4, rtol=0)
    assert {called for _, called, _ in calls} == {layout}
    sparse, _ = run(transformer, call, diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8,
                                                              dense_steps=0))
    assert not torch.allclose(sparse, expected, atol=1e-4)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "LongCat-Image", layer=1)
