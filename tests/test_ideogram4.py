"""diffsparse on diffusers' Ideogram 4 transformer (tiny, random weights, offline, called directly with the packing
its pipeline builds): `[left padding, text, image]` rows under a block-diagonal segment mask. And the pipeline, and
diffusers' modular denoise blocks (`Ideogram4CoreDenoiseStep`) fed text features, driving it."""

import warnings
from collections import Counter

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline, Ideogram4Transformer2DModel
from diffusers.modular_pipelines.ideogram4 import before_denoise
from diffusers.modular_pipelines.ideogram4.modular_blocks_ideogram4 import Ideogram4CoreDenoiseStep

import diffsparse
from diffsparse.api import _on_train_timesteps
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines.registry import adapter_for
from diffsparse.runtime import StepClock

from helpers import (
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_steps_of_a_scheduler_trained_on_other_timesteps,
    recorded_attention_calls,
    run_transformer,
    tiny_flux2_vae,
)

MAX_TEXT, FEATURES, CHANNELS = 6, 8, 4
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)


def tiny_transformer():
    return Ideogram4Transformer2DModel(
        in_channels=CHANNELS, num_layers=2, attention_head_dim=8, num_attention_heads=2, intermediate_size=32,
        adaln_dim=8, llm_features_dim=FEATURES, mrope_section=(2, 1, 1),
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer()


def inputs(text_lengths=(6, 6), unconditional=False):
    """Two rows of an 8 x 12 image behind prompts of `text_lengths` tokens, left-padded to `MAX_TEXT`, as the
    pipeline packs them (`unconditional`: its image-only rows)."""
    def call():
        g = torch.Generator().manual_seed(1)
        positions, segments, indicator = Ideogram4Pipeline._prepare_ids(list(text_lengths), 8, 12, MAX_TEXT, "cpu")
        if unconditional:
            positions, segments, indicator = (x[:, MAX_TEXT:] for x in (positions, segments, indicator))
        length = indicator.shape[1]
        return {"hidden_states": torch.randn(2, length, CHANNELS, generator=g), "timestep": torch.tensor([0.3, 0.3]),
                "encoder_hidden_states": torch.randn(2, length, FEATURES, generator=g), "position_ids": positions,
                "segment_ids": segments, "indicator": indicator}

    return call


KINDS = [{"text_lengths": (6, 6)}, {"text_lengths": (6, 3)}, {"text_lengths": (2, 2)}, {"unconditional": True}]


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_dense_identical_every_block_kept_and_a_one_token_window_changes_the_image(transformer, kind, order):
    # The image's rows are what the pipeline reads; the padding's outputs stay zero on the sparse path.
    check_against_dense(transformer, inputs(**kind), block_size=16, order=order, sparse=ONE_TOKEN,
                        select=lambda sample: sample[:, -96:])


@pytest.mark.parametrize(("kind", "text_lens"), [({"text_lengths": (6, 3)}, {6, 3}), ({"unconditional": True}, {0})])
def test_each_row_is_attended_over_its_text_and_image(transformer, kind, text_lens):
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(**kind), ONE_TOKEN)
    assert {layout for _, layout, _ in calls} == {
        VideoLayout(1, 8, 12, text_len=n, text_position="start") for n in text_lens
    }


@pytest.mark.parametrize("segments", ["padding in two segments", "an image token in the padding's segment"])
def test_a_segment_mask_of_another_kind_runs_the_original_counted_dense(transformer, segments):
    # The sparse path attends each row's last segment, which must hold every image token, and zeroes the rest: a
    # mask of more segments (the padding split in two), or an image token outside that segment, runs the original,
    # counted dense. Nothing failed when either check was removed.
    def call():
        kwargs = inputs(text_lengths=(3, 3))()  # [3 padding, 3 text, 96 image] in each row
        ids = kwargs["segment_ids"].clone()
        if segments == "padding in two segments":
            ids[:, 1] = ids[:, 0] - 1
        else:
            ids[:, MAX_TEXT] = ids[:, 0]  # the first image token in the padding's segment
        return kwargs | {"segment_ids": ids}

    reference = run_transformer(transformer, call)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    with torch.no_grad(), diffsparse.sparse(transformer, every_block) as handle:
        out = transformer(**call()).sample
        assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(1, 0), (1, 0)]
    assert torch.equal(out, reference)


def test_image_tokens_not_last_or_not_row_major_are_refused(transformer):
    # Another packing would be read as the wrong grid, sparse over the wrong neighbours.
    call = inputs()()
    call["indicator"] = call["indicator"].roll(1, dims=1)  # an image token first, a text token last
    with pytest.raises(ValueError, match="each row's image tokens last; got image tokens elsewhere"):
        adapter_for(transformer).read_call(transformer, (), call)
    call = inputs()()
    call["position_ids"] = call["position_ids"].clone()
    call["position_ids"][:, MAX_TEXT:, 1:] = call["position_ids"][:, MAX_TEXT:, 1:].flip(1)  # the image's rows reversed
    with pytest.raises(ValueError, match="row-major image grid"):
        adapter_for(transformer).read_call(transformer, (), call)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "Ideogram 4", layer=1)


def test_the_pipeline_runs_both_transformers_sparse():
    # The prompts' encoding (a multimodal LLM's hidden states) is replaced by random features of one token per word,
    # packed by the pipeline's own `_prepare_ids`; the denoising loop, both transformers and CFG are the pipeline's.
    torch.manual_seed(0)
    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flux2_vae(), text_encoder=None,
                             tokenizer=None, transformer=tiny_transformer(),
                             unconditional_transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)

    def encode_prompt(prompt, grid_h, grid_w, max_sequence_length, device):
        lengths = [len(p.split()) for p in prompt]
        features = torch.randn(len(prompt), max_sequence_length, FEATURES, generator=torch.Generator().manual_seed(2))
        padding = torch.arange(max_sequence_length) < max_sequence_length - torch.tensor(lengths)[:, None]
        features *= ~padding[..., None]
        image = torch.zeros(len(prompt), grid_h * grid_w, FEATURES)
        ids = Ideogram4Pipeline._prepare_ids(lengths, grid_h, grid_w, max_sequence_length, device)
        return torch.cat([features, image], dim=1), *ids

    pipe.encode_prompt = encode_prompt
    # 64 x 96 pixels -> 16 x 24 latents (x4 VAE) -> 8 x 12 tokens of 2 x 2; prompts of 5 and 2 words of 6 tokens.
    call = {"prompt": ["a red circle on grass", "blue square"], "height": 64, "width": 96, "num_inference_steps": 3,
            "guidance_scale": None, "guidance_schedule": [4.0] * 3, "output_type": "latent",
            "max_sequence_length": MAX_TEXT}
    stats, calls = check_pipeline_against_dense(pipe, call)
    assert set(stats.calls) == {"transformer", "unconditional_transformer"}
    assert {r.step for log in stats.calls.values() for r in log} == {0, 1, 2}
    assert {layout for _, layout, _ in calls} == {
        VideoLayout(1, 8, 12, text_len=n, text_position="start") for n in (5, 2, 0)
    }


def modular_pipeline(dtype=torch.float32):
    """diffusers' modular core denoise blocks on two tiny transformers of `dtype`, and the text of their call:
    prompts of 5 and 2 tokens, left-padded and zeroed as its text encoder step leaves them."""
    torch.manual_seed(0)
    pipe = Ideogram4CoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=tiny_transformer().to(dtype),
                           unconditional_transformer=tiny_transformer().to(dtype),
                           scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    lengths = torch.tensor([5, 2])
    features = torch.randn(2, MAX_TEXT, FEATURES, generator=torch.Generator().manual_seed(1))
    features *= (torch.arange(MAX_TEXT) >= MAX_TEXT - lengths[:, None])[..., None]
    return pipe, {"text_features": features.to(dtype), "text_lengths": lengths.tolist(), "output": "latents"}


def test_modular_pipeline_dense_every_block_kept_and_both_transformers_sparse_after_the_dense_step():
    # diffusers' modular core denoise blocks pack the text features themselves, pass `1 - t / 1000` and blend the
    # two transformers' velocities (no guider).
    pipe, call = modular_pipeline()
    # 64 x 96 pixels -> 8 x 12 latents (x8 without a VAE) -> 4 x 6 tokens of 2 x 2.
    call |= {"height": 64, "width": 96, "num_inference_steps": 3, "guidance_schedule": [4.0] * 3}
    stats, calls = check_modular_against_dense(pipe, call)
    # Each transformer's calls land on the scheduler's 3 steps, the first dense; a sparse conditional call runs one
    # attention per text length (the layouts below), logged as one call of its layer.
    for name in ("transformer", "unconditional_transformer"):
        records = stats.calls[name]
        assert Counter(r.step for r in records) == {0: 2, 1: 2, 2: 2}
        assert all(r.branch == "call 0" and r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    assert {layout for _, layout, _ in calls} == {
        VideoLayout(1, 4, 6, text_len=n, text_position="start") for n in (5, 2, 0)
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_steps_of_a_scheduler_trained_on_500_timesteps(dtype):
    # The blocks pass `1 - t / scheduler.config.num_train_timesteps`: read back as `t / 1000`, every step after the
    # first was off the grid (StepScheduleWarning) and put on another step.
    pipe, call = modular_pipeline(dtype)
    check_steps_of_a_scheduler_trained_on_other_timesteps(
        pipe, call | {"height": 64, "width": 96, "guidance_schedule": [4.0] * 4})


def test_a_bfloat16_modular_run_is_on_every_step_of_the_default_size_s_schedule(monkeypatch):
    # The modular blocks pass `1 - t / 1000` in the transformer's dtype. Read back in bfloat16, `t` was 4 apart near
    # 1000, where 48 steps of the default 2048 x 2048 size's schedule are ~6 apart: step 11 ran as step 12. Read in
    # float32 but matched as if unrounded, two of its timesteps (414.06, 453.13) warned as none of the scheduler's.
    resolution_aware_mu = before_denoise._resolution_aware_mu
    monkeypatch.setattr(before_denoise, "_resolution_aware_mu",
                        lambda height, width, **kwargs: resolution_aware_mu(height=2048, width=2048, **kwargs))
    pipe, call = modular_pipeline(torch.bfloat16)
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    with warnings.catch_warnings(), torch.no_grad(), diffsparse.sparse(pipe, config) as handle:
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        pipe(**call, height=64, width=96, num_inference_steps=48, generator=torch.Generator().manual_seed(0))
        stats = handle.stats()
    for name in ("transformer", "unconditional_transformer"):
        assert Counter(r.step for r in stats.calls[name] if r.layer == 0) == {step: 1 for step in range(48)}, name


def test_a_bfloat16_timestep_is_read_on_its_step_where_the_scheduler_counts_no_steps(transformer):
    # The test above with a scheduler that tells no step apart (never stepped: a loop stepping a copy of it), 100 steps:
    # the rounded `1 - t / 1000` alone gives each call its step (before, 22 of them another's), on the scheduler's
    # timesteps (StepScheduleWarning is an error in the tests).
    mu = before_denoise._resolution_aware_mu(height=2048, width=2048, base_mu=0.0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=before_denoise._logit_normal_sigmas(100, mu, std=1.5, device="cpu").tolist())
    clock, call, steps = StepClock(scheduler), inputs()(), []
    read_call = _on_train_timesteps(adapter_for(transformer).read_call, clock)  # as `apply` installs it
    for t in scheduler.timesteps:
        call["timestep"] = (1 - t.float() / 1000).to(torch.bfloat16).expand(2)  # as the modular blocks pass it
        steps.append(clock.tick(read_call(transformer, (), call)[1])[0])
    assert steps == list(range(100))
