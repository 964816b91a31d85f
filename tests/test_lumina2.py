"""diffsparse on diffusers' Lumina-Image 2.0 pipeline (tiny, random weights, offline): the noise refiner's image
layout, the main blocks' `[prompt, image]` layout, prompts of different lengths in one batch, grouped-query heads."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0
from transformers import Gemma2Config, Gemma2Model

import diffsparse
from diffsparse import DiffsparseWarning
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_steps_of_a_scheduler_trained_on_other_timesteps,
    first_transformer_call,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass", "<Prompt", "Start>"]
# 128 x 192 pixels -> 16 x 24 latents (the pipeline takes the VAE as x8) -> 8 x 12 patches of 2 x 2.
GRID = (1, 8, 12)


@pytest.fixture(scope="module")
def lumina2_pipe():
    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(2, 2, 0), axes_lens=(64, 32, 32),
        cap_feat_dim=8,
    )
    vae = tiny_image_vae()
    gemma = Gemma2Model(Gemma2Config(vocab_size=len(VOCABULARY), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, head_dim=4, pad_token_id=0))
    pipe = Lumina2Pipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                           text_encoder=gemma.eval(), tokenizer=word_tokenizer(VOCABULARY))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lumina2_call(**overrides):
    # With system prompt "a": "a <Prompt Start> a red circle on grass" and </s> are 9 tokens; the negative prompt
    # gets no system prompt: "blue" and </s>, 2.
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "system_prompt": "a", "height": 128,
            "width": 192, "num_inference_steps": 3, "guidance_scale": 4.0, "max_sequence_length": 16,
            "output_type": "latent"}
    return {**call, **overrides}


@pytest.mark.parametrize("case", ["prompt and negative prompt", "two prompts", "two prompts, shorter first",
                                  "tile order"])
def test_dense_identical_every_block_kept_and_the_layouts(lumina2_pipe, case):
    # (Tiling the grouped key heads instead of repeating each, or ignoring the mask of two prompts, fails it; so does
    # reading the joint sequence's text span off the first prompt, not the longest, once the first is the shorter.)
    call, order, text = lumina2_call(), None, {9, 2}
    if case.startswith("two prompts"):  # one batch call of both, the shorter padded at the end and masked
        prompts = ["a red circle on grass", "a blue square"]
        if case.endswith("shorter first"):
            prompts.reverse()
        call, text = lumina2_call(prompt=prompts, negative_prompt=None), {9, 7, 1}
    elif case == "tile order":
        order = TileOrder((1, 2, 2))
    stats, calls = check_pipeline_against_dense(lumina2_pipe, call, order=order)
    assert {layout for layer, layout, _ in calls if layer == 0} == {VideoLayout(*GRID)}
    assert {layout for layer, layout, _ in calls if layer > 0} == {
        VideoLayout(*GRID, text_len=n, text_position="start") for n in text
    }
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(lumina2_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(lumina2_pipe, lumina2_call())
    check_against_dense(lumina2_pipe.transformer, lambda: inputs, block_size=16)


def test_proportional_attention_runs_the_original_processor_counted_dense(lumina2_pipe):
    # The model's blocks never pass `base_sequence_length`; a caller's block that does scales the softmax by
    # sqrt(log(sequence, base)), which the kernel is not given: the sparse path would compute other attention.
    transformer = lumina2_pipe.transformer
    inputs = first_transformer_call(lumina2_pipe, lumina2_call())
    attn, seen = transformer.layers[0].attn, []  # layer 1, a main block: `[prompt, image]`, a sequence it could run

    def proportional(module, args, kwargs):
        return args, {**kwargs, "base_sequence_length": 16}

    def record(module, args, kwargs, out):
        seen.append((kwargs, out))

    hooks = [attn.register_forward_pre_hook(proportional, with_kwargs=True),
             attn.register_forward_hook(record, with_kwargs=True)]
    config = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    try:
        with torch.no_grad(), diffsparse.sparse(transformer, config) as handle:
            with pytest.warns(DiffsparseWarning, match="proportional attention"):
                transformer(**inputs)
            stats = handle.stats()
    finally:
        for hook in hooks:
            hook.remove()
    (kwargs, out), = seen
    assert kwargs["base_sequence_length"] == 16
    with torch.no_grad():
        assert torch.equal(out, Lumina2AttnProcessor2_0()(attn, **kwargs))
    assert [(s.layer, s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 0, 1), (1, 1, 0), (2, 0, 1)]


def test_the_steps_of_a_scheduler_trained_on_other_timesteps(lumina2_pipe):
    check_steps_of_a_scheduler_trained_on_other_timesteps(lumina2_pipe, lumina2_call())


def test_other_processors_are_refused_and_the_model_left_untouched(lumina2_pipe):
    check_other_processors_are_refused(lumina2_pipe, "Lumina2", layer=1)
