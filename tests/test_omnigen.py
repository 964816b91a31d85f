"""diffsparse on diffusers' OmniGen pipeline (tiny, random weights, offline): the output image's rows over
`[valid prompt, time token, image]`, the prompt's causal rows as the original computes them."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines.text import word_tokenizer
from diffsparse.runtime import SparseRuntime

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    first_transformer_call,
    tiny_image_vae,
)

# The pipeline wraps each prompt in a chat template whose words are unknown here (`<unk>`): prompts of different
# lengths still pad differently.
VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass", "ugly"]


@pytest.fixture(scope="module")
def omnigen_pipe():
    torch.manual_seed(0)
    transformer = OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, num_layers=2, pad_token_id=0, vocab_size=len(VOCABULARY), pos_embed_max_size=32,
        time_step_dim=8, rope_scaling={"short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
    )
    pipe = OmniGenPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=tiny_image_vae(blocks=4), tokenizer=word_tokenizer(VOCABULARY))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 128 x 192 pixels -> 16 x 24 latents (x8 VAE, as the pipeline counts tokens) -> 8 x 12 patches; the prompt and the
# negative prompt pad to one length (the negative one, the pipeline's own, is the longer).
CALL = {"prompt": "a red circle on grass", "height": 128, "width": 192,
        "num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "latent", "max_input_image_size": 32}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_each_prompt_over_its_valid_tokens(omnigen_pipe, order):
    # (Attending the padding, or leaving out the RoPE, fails every block kept.)
    stats, calls = check_pipeline_against_dense(omnigen_pipe, CALL, order=order)
    spans = {layout.text_len for _, layout, _ in calls}
    assert len(spans) == 2 and {layout.grid for _, layout, _ in calls} == {(1, 8, 12)}
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(omnigen_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(omnigen_pipe, CALL)
    check_against_dense(omnigen_pipe.transformer, lambda: inputs, block_size=16)


def test_a_call_s_density_counts_the_prompt_rows_computed_densely(omnigen_pipe):
    # The prompt's and time token's 61 rows run the original's dense attention over all 157 keys of each row; the
    # image's 96 rows attend their prompt's valid keys (114 for the padded prompt, 157 for the negative one) on a
    # layout of those. A call's density is the share of all these pairs computed, the prompt rows' included.
    inputs = first_transformer_call(omnigen_pipe, CALL)
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    with torch.no_grad(), diffsparse.sparse(omnigen_pipe.transformer, config) as handle:
        omnigen_pipe.transformer(**inputs)
    image, length = 96, inputs["attention_mask"].shape[-1]
    prefix, valid = length - image, inputs["attention_mask"][:, -1].sum(-1).int().tolist()  # the image rows' keys
    assert (prefix, valid) == (61, [114, 157])
    computed = total = 0
    for keys in valid:
        layout = VideoLayout(1, 8, 12, text_len=keys - image, text_position="start")
        kept = SparseRuntime(config, "transformer").plan(layout, 2, torch.device("cpu"), queries_from=layout.text_len)
        assert kept.density < 0.9
        computed += kept.density * image * keys + prefix * length
        total += image * keys + prefix * length
    records = handle.stats().calls["transformer"]
    assert [r.layer for r in records] == [0, 1] and all(r.sparse for r in records)
    assert [r.density for r in records] == pytest.approx([computed / total] * 2)


def test_latents_of_odd_size_are_read_without_their_partial_patches(omnigen_pipe):
    # The patch embedding is a strided convolution: 17 x 25 latents are 8 x 12 patches, the last latent row and
    # column dropped (the model's output is 16 x 24). Rounding up read 9 x 13, a layout of the wrong length.
    from diffsparse.pipelines import adapter_for

    transformer = omnigen_pipe.transformer
    call = {"hidden_states": torch.zeros(1, 4, 17, 25), "timestep": torch.tensor([0.5]),
            "input_ids": torch.zeros(1, 7, dtype=torch.long)}
    layout, _ = adapter_for(transformer).read_call(transformer, (), call)
    assert layout == VideoLayout(1, 8, 12, text_len=7 + 1, text_position="start")  # the prompt and the time token


def check_runs_the_original(transformer, inputs, why):
    """Under a sparse config, both layers of the call `transformer(**inputs)` run the original processor (its output
    bit for bit), counted dense, and a warning says `why`."""
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    with torch.no_grad():
        reference = transformer(**inputs).sample
        with pytest.warns(diffsparse.DiffsparseWarning, match=why), diffsparse.sparse(transformer, config) as handle:
            out = transformer(**inputs).sample
    assert torch.equal(out, reference)
    assert [(r.layer, r.sparse) for r in handle.stats().calls["transformer"]] == [(0, False), (1, False)]


def image_rows_causal(mask):
    mask[:, -96:, -96:] = torch.tril(torch.ones(96, 96))  # the last row still attends every image token


def image_token_masked(mask):
    mask[:, -96:, -90] = 0  # every image row alike, without one image key


@pytest.mark.parametrize("edit", [image_rows_causal, image_token_masked])
def test_a_mask_whose_image_rows_differ_or_leave_out_an_image_token_runs_the_original(omnigen_pipe, edit):
    # The pipeline's mask lets every output image row attend the same keys, every image token among them (the
    # sparse path reads the keys from the last row); any other runs the original.
    inputs = first_transformer_call(omnigen_pipe, CALL)
    mask = inputs["attention_mask"].clone()
    edit(mask)
    check_runs_the_original(omnigen_pipe.transformer, {**inputs, "attention_mask": mask},
                            "attention_mask under which the output image's rows do not all attend the same keys")


def test_a_mask_not_of_shape_b_1_s_s_runs_the_original(omnigen_pipe):
    # A caller's additive 2D mask, one bias per query row that SDPA broadcasts over the keys (the transformer
    # converts only 3D masks, to `(B, 1, S, S)`).
    inputs = first_transformer_call(omnigen_pipe, CALL)
    mask = torch.zeros(inputs["attention_mask"].shape[-1], 1)
    check_runs_the_original(omnigen_pipe.transformer, {**inputs, "attention_mask": mask}, "attention_mask under")


def test_grouped_key_value_heads_run_the_original(omnigen_pipe):
    torch.manual_seed(0)
    grouped = OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, num_layers=2, pad_token_id=0, vocab_size=len(VOCABULARY), pos_embed_max_size=32,
        time_step_dim=8, rope_scaling={"short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
    ).eval()
    inputs = first_transformer_call(omnigen_pipe, CALL)
    check_runs_the_original(grouped, inputs, "fewer key and value heads than query heads")


def test_other_processors_are_refused_and_the_model_left_untouched(omnigen_pipe):
    check_other_processors_are_refused(omnigen_pipe, "OmniGen", layer=1)
