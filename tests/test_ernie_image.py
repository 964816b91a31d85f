"""diffsparse on diffusers' ERNIE-Image pipeline (tiny, random weights, offline): one-frame layouts with the
prompts, padded to the longest, after the image; and diffusers' modular `ErnieImageCoreDenoiseStep` fed prompt
embeddings."""

import pytest
import torch
from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.ernie_image.modular_blocks_ernie_image import ErnieImageCoreDenoiseStep

from diffsparse.patterns import TileOrder, VideoLayout

from helpers import (
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    first_transformer_call,
    tiny_flux2_vae,
)

TEXT_DIM = 8


@pytest.fixture(scope="module")
def ernie_pipe():
    torch.manual_seed(0)
    transformer = ErnieImageTransformer2DModel(
        hidden_size=16, num_attention_heads=2, num_layers=2, ffn_hidden_size=32, in_channels=4, out_channels=4,
        text_in_dim=TEXT_DIM, rope_axes_dim=(2, 2, 4),
    )
    # The modulation and the output projection start at zero (every gate closed, a zero prediction): open them.
    for layer in (transformer.adaLN_modulation[-1], transformer.final_linear):
        torch.nn.init.normal_(layer.weight, std=0.5)
        torch.nn.init.normal_(layer.bias, std=0.5)
    # No text encoder (a Mistral 3 model): the calls pass each prompt's embeddings, as lists of any lengths.
    pipe = ErnieImagePipeline(transformer=transformer.eval(), vae=tiny_flux2_vae(), text_encoder=None, tokenizer=None,
                              scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ernie_call(lengths=(6, 2), **overrides):
    # 64 x 96 pixels -> 8 x 12 latents (x8 VAE) -> 8 x 12 patches of 1 x 1; the prompt and the negative prompt of
    # `lengths` tokens, padded to the longer.
    generator = torch.Generator().manual_seed(1)
    prompt, negative = (torch.randn(n, TEXT_DIM, generator=generator) for n in lengths)
    call = {"prompt_embeds": [prompt], "negative_prompt_embeds": [negative], "height": 64, "width": 96,
            "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent"}
    return {**call, **overrides}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("lengths", [(6, 2), (4, 4)])
def test_dense_identical_every_block_kept_and_each_prompt_over_its_valid_tokens(ernie_pipe, order, lengths):
    # (Attending the padding fails every block kept with prompts of two lengths.)
    stats, calls = check_pipeline_against_dense(ernie_pipe, ernie_call(lengths), order=order)
    # One runtime call per prompt length, each on the layout with its own text span after the image.
    assert {(layout, shape[0]) for _, layout, shape in calls} == {
        (VideoLayout(1, 8, 12, text_len=n, text_position="end"), 2 if lengths[0] == lengths[1] else 1) for n in lengths
    }
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(ernie_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(ernie_pipe, ernie_call())
    check_against_dense(ernie_pipe.transformer, lambda: inputs, block_size=16)


def test_other_processors_are_refused_and_the_model_left_untouched(ernie_pipe):
    check_other_processors_are_refused(ernie_pipe, "ERNIE-Image", layer=1)


@pytest.mark.parametrize("lengths, negative_lengths", [((6,), (2,)), ((6, 2), (3, 3))])
def test_modular_denoise_step_dense_every_block_kept_and_sparse_after_the_dense_step(ernie_pipe, lengths,
                                                                                    negative_lengths):
    # diffusers' modular denoise blocks with a CFG guider: the prompts and the negative prompts (of `lengths` and
    # `negative_lengths` tokens) are two calls per step at the scheduler's `t`, each batch padded to its longest
    # (attending the padding fails every block kept with prompts (6, 2)). 128 x 192 pixels -> 8 x 12 latents (x16,
    # no VAE) -> 8 x 12 patches of 1 x 1.
    pipe = ErnieImageCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=ernie_pipe.transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           guider=ClassifierFreeGuidance(guidance_scale=4.0))
    g = torch.Generator().manual_seed(1)
    call = {"prompt_embeds": [torch.randn(n, TEXT_DIM, generator=g) for n in lengths],
            "negative_prompt_embeds": [torch.randn(n, TEXT_DIM, generator=g) for n in negative_lengths],
            "height": 128, "width": 192, "num_inference_steps": 3, "output": "latents"}
    stats, calls = check_modular_against_dense(pipe, call)
    records = stats.calls["transformer"]
    assert {(r.step, r.branch) for r in records} == {(step, f"call {i}") for step in range(3) for i in (0, 1)}
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    # One runtime call per prompt length, each on the layout with its own text span after the image.
    assert {(layout, batch) for _, layout, (batch, _) in calls} == {
        (VideoLayout(1, 8, 12, text_len=n, text_position="end"), prompts.count(n))
        for prompts in (lengths, negative_lengths) for n in prompts
    }
