"""diffsparse on diffusers' GLM-Image (tiny, random weights, offline): the transformer called directly as its
pipeline calls it (joint `[text, image]` attention; an edit's condition images cached as keys and values), and a
tiny `GlmImagePipeline` generating and editing with CFG from prompt embeddings and prior tokens (its glyph encoder
and the vision-language model that writes the prior tokens not built)."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.runtime import SparseRuntime

from helpers import (
    assert_two_calls_per_step_first_dense,
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
    run_pipeline,
    tiny_image_vae,
)

TEXT_LEN, TEXT_DIM, CODEBOOK = 5, 8, 32
EVERY_BLOCK = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=TEXT_DIM, time_embed_dim=8, condition_dim=4, prior_vq_quantizer_codebook_size=CODEBOOK,
    ).eval()


def call(latents, text, timestep, kv_caches=None, drop=False, seed=2):
    """The keyword arguments of one transformer call as the pipeline makes it (`drop`: the unconditional call)."""
    g = torch.Generator().manual_seed(seed)
    tokens = latents.shape[-2] * latents.shape[-1] // 4
    prior = torch.randint(0, CODEBOOK, (latents.shape[0], tokens), generator=g)
    return {"hidden_states": latents, "encoder_hidden_states": text, "prior_token_id": prior,
            "prior_token_drop": torch.full_like(prior, drop, dtype=torch.bool), "timestep": torch.tensor([timestep]),
            "target_size": torch.tensor([[latents.shape[-2] * 8, latents.shape[-1] * 8]]),
            "crop_coords": torch.zeros(1, 2), "kv_caches": kv_caches}


def inputs():
    """Text to image: one 16 x 24 latent image (8 x 12 tokens) behind a prompt of `TEXT_LEN` tokens."""
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 4, 16, 24, generator=g), torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    return lambda: call(latents, text, 699.0)


def edit(transformer, config=None):
    """An edit as the pipeline runs it: the condition image's pass writes the cache, then a conditional call reads
    it and an unconditional one skips it. Both predictions, under `config` when given."""
    g = torch.Generator().manual_seed(3)
    condition, latents = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 24, generator=g)
    text = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)

    def run():
        caches = GlmImageKVCache(num_layers=len(transformer.transformer_blocks))
        caches.set_mode("write")
        transformer(**call(condition, text[:, :0], 0.0, caches, seed=4))
        caches.next_sample()
        predictions = []
        for mode, drop in (("read", False), ("skip", True)):
            caches.set_mode(mode)
            predictions.append(transformer(**call(latents, text, 699.0, caches, drop=drop)).sample)
        return torch.cat(predictions)

    with torch.no_grad():
        if config is None:
            return run()
        with diffsparse.sparse(transformer, config):
            return run()


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_text_to_image_dense_identical_every_block_kept_and_a_one_token_window_changes_it(transformer, order):
    # (Without the image RoPE every block kept fails.)
    check_against_dense(transformer, inputs(), block_size=16, order=order, sparse=ONE_TOKEN)


def test_an_edit_reads_the_condition_image_as_part_of_the_leading_span(transformer):
    reference = edit(transformer)
    assert torch.equal(edit(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)), reference)
    torch.testing.assert_close(edit(transformer, EVERY_BLOCK), reference, atol=1e-4, rtol=0)
    assert not torch.allclose(edit(transformer, ONE_TOKEN), reference, atol=1e-4)
    with recorded_attention_calls() as calls:
        edit(transformer, ONE_TOKEN)
    # The read call: the condition image's 64 tokens and the text lead; the skip call: the text alone. The write
    # pass runs the original.
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(1, 8, 12, text_len=64 + TEXT_LEN, text_position="start"), (1, 96)),
        (VideoLayout(1, 8, 12, text_len=TEXT_LEN, text_position="start"), (1, TEXT_LEN + 96)),
    }


def test_an_edit_s_density_counts_the_text_rows_computed_densely(transformer):
    # The read call: the image's 96 rows attend the condition image's 64 cached keys, the text's and their own on a
    # layout of those 165; the text's 5 rows attend all 165 densely. Its density is the share of these pairs
    # computed, the text rows' included. The skip call attends `[text, image]` on its own layout.
    with warnings.catch_warnings(record=True) as record, diffsparse.sparse(transformer, ONE_TOKEN) as handle:
        warnings.simplefilter("always")
        edit(transformer)
    # The write pass runs the original in every edit by design: nothing a caller could change, so nothing said.
    assert not [w for w in record if "self-attention calls with" in str(w.message)]
    runtime, cpu = SparseRuntime(ONE_TOKEN, "transformer"), torch.device("cpu")
    read = VideoLayout(1, 8, 12, text_len=64 + TEXT_LEN, text_position="start")
    kept = runtime.plan(read, 2, cpu, queries_from=read.text_len).density
    keys = read.num_tokens
    assert kept < 0.9
    read_density = (kept * 96 * keys + TEXT_LEN * keys) / ((96 + TEXT_LEN) * keys)
    skip_density = runtime.plan(VideoLayout(1, 8, 12, text_len=TEXT_LEN, text_position="start"), 2, cpu).density
    # The write pass, at timestep 0, is no step of the run: not in its log, nor in the run's `stats()`; counted dense
    # among each layer's calls since `apply`.
    records = handle.stats().calls["transformer"]
    assert [(r.layer, r.sparse) for r in records] == [(0, True), (1, True)] * 2
    assert [r.density for r in records] == pytest.approx([read_density] * 2 + [skip_density] * 2)
    since_apply = handle.stats(since_apply=True).layers
    assert [(s.layer, s.dense_calls, s.sparse_calls) for s in since_apply] == [(0, 1, 2), (1, 1, 2)]


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "GLM-Image", layer=1)


@pytest.fixture(scope="module")
def glm_pipe(transformer):
    """The tiny transformer and an x8 VAE; no tokenizer, glyph text encoder, processor or vision-language model."""
    vae = tiny_image_vae(blocks=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = GlmImagePipeline(tokenizer=None, processor=None, text_encoder=None, vision_language_encoder=None, vae=vae,
                            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def glm_call(edit: bool) -> dict:
    """128 x 192 pixels -> 16 x 24 latents -> 8 x 12 tokens, with the prompt's and the negative prompt's embeddings
    and the image's prior tokens (the vision-language model's output); `edit`: a 64 x 64 condition image (4 x 4
    tokens) and its prior tokens."""
    g = torch.Generator().manual_seed(5)
    call = {"prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g),
            "prior_token_ids": torch.randint(0, CODEBOOK, (1, 96), generator=g), "height": 128, "width": 192,
            "num_inference_steps": 3, "guidance_scale": 1.5, "output_type": "pt"}
    if edit:
        pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        call.update(image=[PIL.Image.fromarray(pixels)], prior_token_image_ids=[torch.randint(0, CODEBOOK, (16,))],
                    source_image_grid_thw=[torch.tensor([[1, 4, 4]])])
    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("edit", [False, True], ids=["text to image", "edit"])
def test_pipeline_with_cfg(glm_pipe, edit, order):
    stats, calls = check_pipeline_against_dense(glm_pipe, glm_call(edit), order=order)
    # Each step's cond and uncond calls (at `t - 1`) on their step, the first step dense. (An edit's condition pass,
    # at timestep 0, writes the cache through the original processor and is no step.)
    assert_two_calls_per_step_first_dense(stats)
    # The conditional call reads the condition image's 16 cached tokens as part of its leading span; the
    # unconditional one skips the cache.
    spans = {TEXT_LEN + 16, TEXT_LEN} if edit else {TEXT_LEN}
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 8, 12, text_len=n, text_position="start") for n in spans}


def test_read_call_gives_the_scheduler_s_timestep(glm_pipe):
    # The pipeline passes `t - 1`: the step clock matches the scheduler's `t`.
    timesteps = []

    def read(module, args, kwargs):
        timesteps.append(float(adapter_for(module).read_call(module, args, kwargs)[1]))

    hook = glm_pipe.transformer.register_forward_pre_hook(read, with_kwargs=True)
    try:
        run_pipeline(glm_pipe, glm_call(edit=False))
    finally:
        hook.remove()
    expected = [float(t) for t in glm_pipe.scheduler.timesteps for _ in range(2)]  # CFG: cond, then uncond
    assert timesteps == pytest.approx(expected, abs=1e-3)
