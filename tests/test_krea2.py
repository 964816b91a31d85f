"""diffsparse on diffusers' Krea 2 transformer (tiny, random weights, offline), called with the position ids and text
masks its pipeline makes: `[text, image]` single-stream blocks, grouped-query heads, a gated output, prompts padded to
one length and masked.

The pipeline itself is not run here: its prompt path needs a Qwen3-VL text model.
"""

import pytest
import torch
from diffusers import Krea2Pipeline, Krea2Transformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls

TEXT_LEN, ROWS, COLS = 8, 8, 6


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return Krea2Transformer2DModel(
        in_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=8, num_text_layers=2, text_num_attention_heads=2,
        text_num_key_value_heads=2, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def inputs(valid=(TEXT_LEN,)):
    """A call as the pipeline makes it, one prompt per `valid` text length (padded to `TEXT_LEN`, masked)."""
    generator = torch.Generator().manual_seed(0)
    batch = len(valid)
    mask = torch.arange(TEXT_LEN)[None, :] < torch.tensor(valid)[:, None]
    return {"hidden_states": torch.randn(batch, ROWS * COLS, 8, generator=generator),
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 2, 8, generator=generator),
            "timestep": torch.full((batch,), 0.5),
            "position_ids": Krea2Pipeline.prepare_position_ids(TEXT_LEN, ROWS, COLS, "cpu"),
            "encoder_attention_mask": mask}


@pytest.mark.parametrize("valid, order", [((TEXT_LEN,), None), ((TEXT_LEN,), TileOrder((1, 2, 2))), ((5, 3), None)])
def test_dense_identical_every_block_kept_and_the_layouts(transformer, valid, order):
    # (Attending the padding, tiling the grouped key heads instead of repeating each, or leaving the gate out,
    # fails it.)
    one_token = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        check_against_dense(transformer, lambda: inputs(valid), block_size=8, order=order, sparse=one_token)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, ROWS, COLS, text_len=n, text_position="start")
                                                  for n in valid}


def test_a_grid_that_is_not_row_major_is_refused(transformer):
    call = inputs()
    call["position_ids"] = call["position_ids"].flip(0)
    with pytest.raises(ValueError, match="not a row-major grid"):
        adapter_for(transformer).read_call(transformer, (), call)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "Krea 2", layer=1)
