"""diffsparse on diffusers' Krea 2 transformer (tiny, random weights, offline), called with the position ids and text
masks its pipeline makes: `[text, image]` single-stream blocks, grouped-query heads, a gated output, prompts padded to
one length and masked. And diffusers' modular denoise blocks (`Krea2CoreDenoiseStep` with a CFG guider,
`Krea2TurboCoreDenoiseStep` without) fed prompt embeddings, driving it.

`Krea2Pipeline` itself is not run here: its prompt path needs a Qwen3-VL text model.
"""

from collections import Counter

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.krea2.modular_blocks_krea2 import Krea2CoreDenoiseStep
from diffusers.modular_pipelines.krea2.modular_blocks_krea2_turbo import Krea2TurboCoreDenoiseStep

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    recorded_attention_calls,
)

TEXT_LEN, ROWS, COLS = 8, 8, 6
# The pipelines pad inside their template, `[prompt | padding | suffix]`: the suffix's tokens are valid.
SUFFIX = 2


def template_mask(valid) -> torch.Tensor:
    """The text mask the pipeline makes for prompts of `valid` tokens each (their suffix's included)."""
    position = torch.arange(TEXT_LEN)[None, :]
    return (position < torch.tensor(valid)[:, None] - SUFFIX) | (position >= TEXT_LEN - SUFFIX)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = Krea2Transformer2DModel(
        in_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=8, num_text_layers=2, text_num_attention_heads=2,
        text_num_key_value_heads=2, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    # Ones at initialisation, which would make the query and key norms interchangeable.
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                weight.normal_()
    return model


def inputs(valid=(TEXT_LEN,)):
    """A call as the pipeline makes it, one prompt per `valid` text length (padded to `TEXT_LEN`, masked)."""
    generator = torch.Generator().manual_seed(0)
    batch = len(valid)
    mask = template_mask(valid)
    return {"hidden_states": torch.randn(batch, ROWS * COLS, 8, generator=generator),
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 2, 8, generator=generator),
            "timestep": torch.full((batch,), 0.5),
            "position_ids": Krea2Pipeline.prepare_position_ids(TEXT_LEN, ROWS, COLS, "cpu"),
            "encoder_attention_mask": mask}


@pytest.mark.parametrize("valid, order", [((TEXT_LEN,), None), ((TEXT_LEN,), TileOrder((1, 2, 2))), ((5, 3), None)])
def test_dense_identical_every_block_kept_and_the_layouts(transformer, valid, order):
    # (Attending the padding, running a padded call dense (its valid tokens are not a prefix), tiling the grouped
    # key heads instead of repeating each, or leaving the gate out, fails it.)
    one_token = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        check_against_dense(transformer, lambda: inputs(valid), block_size=8, order=order, sparse=one_token)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, ROWS, COLS, text_len=n, text_position="start")
                                                  for n in valid}


def test_a_float_mask_runs_the_original_counted_dense(transformer):
    # The sparse path reads a boolean mask of the prompts' padding; an additive float one (0 / -inf), which the
    # transformer passes on as it is, runs the original. Nothing tested the fallback: without it the mask was lost.
    call = inputs((5, 3))
    call["encoder_attention_mask"] = torch.zeros(call["encoder_attention_mask"].shape).masked_fill(
        ~call["encoder_attention_mask"], float("-inf"))
    one_token = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    with torch.no_grad():
        reference = transformer(**call).sample
        with diffsparse.sparse(transformer, one_token) as handle:
            with pytest.warns(diffsparse.DiffsparseWarning, match="other than a boolean key mask"):
                out = transformer(**call).sample
            stats = handle.stats()
    assert torch.equal(out, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 0)] * 2


def test_a_grid_that_is_not_row_major_is_refused(transformer):
    call = inputs()
    call["position_ids"] = call["position_ids"].flip(0)
    with pytest.raises(ValueError, match="not a row-major grid"):
        adapter_for(transformer).read_call(transformer, (), call)


def test_a_reference_below_the_output_is_not_read_as_one_image(transformer):
    # Rows and columns of one 8 x 6 grid, but its lower half on another t (a 4 x 6 reference image placed below the
    # output): two images, which a layout of one would attend as the output's lower half.
    call = inputs()
    image = call["position_ids"][TEXT_LEN:]
    image[image[:, 1] >= ROWS // 2, 0] = 1
    with pytest.raises(ValueError, match="not a row-major grid"):
        adapter_for(transformer).read_call(transformer, (), call)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "Krea 2", layer=1)


@pytest.mark.parametrize("turbo", [False, True], ids=["text2image", "turbo"])
def test_modular_pipeline_dense_every_block_kept_and_sparse_after_the_dense_step(transformer, turbo):
    # The blocks pass `t / num_train_timesteps` (the schedule shifted by `mu`; a scheduler of 500 here: a fixed 1000
    # put every call off its grid, all at step 0, nothing sparse); with CFG the guider calls the prompt (5 and 8 valid
    # tokens of `TEXT_LEN`) and the negative (3 and 3) one after another, sharing the position ids.
    pipe = (Krea2TurboCoreDenoiseStep if turbo else Krea2CoreDenoiseStep)().init_pipeline()
    guider = {} if turbo else {"guider": ClassifierFreeGuidance(guidance_scale=4.5, use_original_formulation=True)}
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=500)
    pipe.update_components(transformer=transformer, scheduler=scheduler, **guider)
    g = torch.Generator().manual_seed(1)
    prompts = {"prompt_embeds": (5, 8)} if turbo else {"prompt_embeds": (5, 8), "negative_prompt_embeds": (3, 3)}
    # 64 x 96 pixels -> 8 x 12 latents (x8 without a VAE) -> 4 x 6 tokens of 2 x 2.
    call = {"height": 64, "width": 96, "num_inference_steps": 3, "output": "latents"}
    for name, valid in prompts.items():
        call[name] = torch.randn(2, TEXT_LEN, 2, 8, generator=g)
        call[f"{name}_mask"] = template_mask(valid)
    stats, calls = check_modular_against_dense(pipe, call)
    # Every call on its own scheduler step, the first dense; a sparse call runs one attention per prompt length
    # in its batch (the layouts below), logged as one call of its layer.
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {
        (step, f"call {i}"): 2 for step in range(3) for i in range(len(prompts))
    }
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    assert {layout for _, layout, _ in calls} == {
        VideoLayout(1, 4, 6, text_len=n, text_position="start") for n in (5, 8, *(() if turbo else (3,)))
    }
