"""diffsparse on a diffusers Helios transformer (tiny, random weights; called directly, and through tiny
`HeliosPipeline` and `HeliosPyramidPipeline` pipelines): the chunk being generated attends its multi-term memory
(short-, mid- and long-term history latents patchified at 1x, 2x and 4x), which is the layout's leading span, kept
whole; the memory's keys amplified by a learned scale where the model is configured so (not diffusers' default).
And diffusers' modular denoise blocks (text-to-video, image-to-video, pyramid, distilled pyramid) on the same tiny
transformer, fed prompt embeddings."""

import dataclasses
import inspect

import pytest
import torch
from diffusers import (
    HeliosDMDScheduler,
    HeliosPipeline,
    HeliosPyramidPipeline,
    HeliosScheduler,
    HeliosTransformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance
from diffusers.modular_pipelines.helios.modular_blocks_helios import HeliosCoreDenoiseStep, HeliosI2VCoreDenoiseStep
from diffusers.modular_pipelines.helios.modular_blocks_helios_pyramid import HeliosPyramidCoreDenoiseStep
from diffusers.modular_pipelines.helios.modular_blocks_helios_pyramid_distilled import (
    HeliosPyramidDistilledCoreDenoiseStep,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline

from helpers import (
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_video_token_positions,
    recorded_attention_calls,
    run_transformer,
)

RADIAL = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)


def make_transformer(amplified: bool):
    torch.manual_seed(0)
    model = HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4), is_amplify_history=amplified,
    ).eval()
    if amplified:
        with torch.no_grad():  # the learned amplification starts at sigmoid(0); another value, so it shows
            for block in model.blocks:
                block.attn1.history_key_scale.normal_()
    return model


@pytest.fixture(scope="module")
def transformer():
    return make_transformer(amplified=True)


@pytest.fixture(scope="module")
def unamplified_transformer():
    # diffusers' default (`is_amplify_history=False`): the memory's keys as they are, and the attention modules
    # have no `history_key_scale` to read.
    return make_transformer(amplified=False)


def inputs(memory: bool | tuple[str, ...] = True, unindexed: tuple[str, ...] = (), size=(4, 8, 12)):
    """A chunk of 4 latent frames of 8 x 12 (4 x 4 x 6 = 96 tokens) at frames 8-11; `memory` (True: all three, or
    the terms named): 2 short-term frames (2 x 4 x 6 = 48 tokens), 2 mid-term (1 x 2 x 3 = 6) and 4 long-term
    (1 x 1 x 2 = 2, padded up): 56 tokens. The terms in `unindexed` get their latents but no frame indices. `size`:
    the chunk's `(frames, height, width)` instead (the memory of the same height and width)."""
    terms = ("short", "mid", "long") if memory is True else memory or ()
    chunk_frames, height, width = size

    def call():
        g = torch.Generator().manual_seed(1)
        kwargs = {"hidden_states": torch.randn(1, 4, *size, generator=g), "timestep": torch.tensor([500]),
                  "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
                  "indices_hidden_states": torch.arange(8, 8 + chunk_frames)[None]}
        for name, frames, first in (("short", 2, 6), ("mid", 2, 4), ("long", 4, 0)):
            if name in terms:
                kwargs[f"latents_history_{name}"] = torch.randn(1, 4, frames, height, width, generator=g)
                if name not in unindexed:
                    kwargs[f"indices_latents_history_{name}"] = torch.arange(first, first + frames)[None]
        return kwargs

    return call


@pytest.mark.parametrize("memory", [False, True], ids=["first chunk", "with memory"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, memory, order):
    check_against_dense(transformer, inputs(memory), block_size=16, order=order, sparse=RADIAL)


def test_a_default_model_s_memory_is_not_amplified(unamplified_transformer):
    check_against_dense(unamplified_transformer, inputs(), block_size=16, sparse=RADIAL)



def test_the_memory_is_the_leading_span(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs()())
    assert layout == VideoLayout(4, 4, 6, text_len=56, text_position="start")
    # The same call with every argument by position (the forward's order; reading keywords only found no memory).
    call = inputs()()
    parameters = list(inspect.signature(type(transformer).forward).parameters)[1:]
    given = max(parameters.index(name) for name in call) + 1
    positional = tuple(call.get(name) for name in parameters[:given])
    assert adapter_for(transformer).read_call(transformer, positional, {})[0] == layout
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(), RADIAL)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, 56 + 96)), (1, (1, 56 + 96))]


# Helios skips a memory term whose latents come without their frame indices (it needs both), so those tokens are
# not in front of the chunk and must not be in the leading span. (Short-term latents alone: the mid and long terms'
# RoPE reuses the short term's grid, so Helios cannot run them without an indexed short term.)
@pytest.mark.parametrize("memory, unindexed, history", [
    (("short",), ("short",), 0), (True, ("mid",), 48 + 2),
], ids=["short-term latents alone", "mid-term of three"])
def test_a_memory_term_without_frame_indices_is_not_in_the_leading_span(transformer, memory, unindexed, history):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs(memory, unindexed)())
    assert layout == VideoLayout(4, 4, 6, text_len=history, text_position="start")
    calls = check_against_dense(transformer, inputs(memory, unindexed), block_size=16)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, history + 96)), (1, (1, history + 96))]


# Helios pads the mid and long terms' latents to multiples of (2, 4, 4) and (4, 8, 8), constants that are whole
# patches only at the released (1, 2, 2) patch size; at another one the padding can pass a patch (1 x 1 x 1 patches,
# mid-term latents 6 wide: padded to 8, 4 tokens, not 3) or stop short of one, which the convolution drops (2 x 2 x 2
# patches, 6 mid-term frames: padded to 6, one 4-frame patch, not 2). Helios runs these: each term's RoPE (one
# frame per index, over the short term's grid, halved for the mid term) has as many tokens as its latents.
@pytest.mark.parametrize("patch_size, short, mid, memory", [
    ((1, 1, 1), (2, 8, 8), (2, 6, 6), 2 * 8 * 8 + 1 * 4 * 4),
    ((2, 2, 2), (2, 8, 8), (6, 8, 8), 1 * 4 * 4 + 1 * 2 * 2),
], ids=["padded past a patch", "a partial patch dropped"])
def test_the_memory_is_counted_as_helios_pads_it_at_any_patch_size(patch_size, short, mid, memory):
    torch.manual_seed(0)
    model = HeliosTransformer3DModel(
        patch_size=patch_size, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, rope_dim=(4, 4, 4),
    ).eval()

    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g), "timestep": torch.tensor([500]),
                "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
                "indices_hidden_states": torch.arange(8, 8 + 2 // patch_size[0])[None],
                "latents_history_short": torch.randn(1, 4, *short, generator=g),
                "indices_latents_history_short": torch.arange(6, 6 + 2 // patch_size[0])[None],
                "latents_history_mid": torch.randn(1, 4, *mid, generator=g),
                "indices_latents_history_mid": torch.arange(4, 6)[None]}

    layout, _ = adapter_for(model).read_call(model, (), call())
    chunk = 2 * 8 * 8 // patch_size[0] // patch_size[1] // patch_size[2]
    assert (layout.text_len, layout.num_tokens) == (memory, memory + chunk)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    with recorded_attention_calls() as calls:
        kept = run_transformer(model, call, every_block)
    assert [shape for _, _, shape in calls] == [(1, memory + chunk)]
    torch.testing.assert_close(kept, run_transformer(model, call), atol=1e-4, rtol=0)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Helios", layer=1)


def test_each_latent_pixel_moves_the_query_of_its_own_video_token(transformer):
    # A chunk of 3 x 5 x 7 tokens behind 86 memory tokens (2 x 5 x 7 short-term, 1 x 3 x 4 mid-term and 1 x 2 x 2
    # long-term, padded up): the chunk's tokens are where the layout puts them only with its axes in the model's
    # order and the leading span the memory's length.
    assert adapter_for(transformer).read_call(transformer, (), inputs(size=(3, 10, 14))())[0].text_len == 86
    check_video_token_positions(transformer, inputs(size=(3, 10, 14)), grid=(3, 5, 7), patch=(1, 2, 2))


def tiny_pipeline(pipeline_class, scheduler):
    """`pipeline_class` from the embedded Wan pipeline's T5 encoder, word tokenizer and Wan VAE, and a tiny Helios
    transformer with the current seed's weights."""
    base = tiny_wan_pipeline()
    model = HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=base.text_encoder.config.d_model, freq_dim=32, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4),
        is_amplify_history=True,
    ).eval()
    pipe = pipeline_class(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, transformer=model,
                          scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_chunks_each_follow_the_schedule():
    # A tiny `HeliosPipeline`: 8 latent frames in 4 chunks of 2, each chunk its own 3-step loop with the memory of
    # the frames before it (the pipeline pads the memory to its full size from the first chunk on: 56 tokens in
    # front of each chunk's 48).
    torch.manual_seed(0)
    pipe = tiny_pipeline(HeliosPipeline, HeliosScheduler(stages=1, stage_range=[0, 1]))
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 64, "width": 96,
            "num_frames": 17, "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "latent",
            "max_sequence_length": 16, "num_latent_frames_per_chunk": 2, "history_sizes": [4, 2, 1]}
    stats, calls = check_pipeline_against_dense(pipe, call)
    # Every chunk's first step (cond and uncond) dense, the other two sparse; `stats()` holds the last chunk's.
    assert [layer for layer, _, shape in calls if shape == (1, 56 + 48)] == [0, 1] * 4 * 2 * 2
    assert [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0] == [
        (0, False), (0, False), (1, True), (1, True), (2, True), (2, True)
    ]
    # `since_apply=True` counts every chunk: per layer 4 chunks x cond and uncond x (1 dense + 2 sparse steps).
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=1)
    with torch.no_grad(), diffsparse.sparse(pipe, config) as handle:
        pipe(**call, generator=torch.Generator().manual_seed(0))
        last, whole = handle.stats(), diffsparse.stats(pipe, since_apply=True)
    assert [(s.dense_calls, s.sparse_calls) for s in last.layers] == [(2, 4)] * 2
    assert [(s.dense_calls, s.sparse_calls) for s in whole.layers] == [(4 * 2, 4 * 4)] * 2
    assert whole.calls == last.calls  # the raw log is the last run's either way
    assert whole.mean_density == pytest.approx((8 + 16 * whole.sparse_density) / 24)


# The pyramid: each chunk is denoised in 3 stages at 1/4, 1/2 and full resolution (a chunk of 2 latent frames of
# 8 x 16 is upsampled 2 x 4 -> 4 x 8 -> 8 x 16), each stage with its own `set_timesteps(steps, stage_index)`.
# Unequal step counts, so a count resolved per stage shows apart from one resolved per chunk.
PYRAMID_STEPS = [2, 3, 2]
PYRAMID_CHUNKS = 2  # 9 frames in chunks of 2 latent frames (5 frames each)
# The memory stays at full resolution in every stage: the zero first frame and 1 frame at 1x (2 x 4 x 8 = 64
# tokens), 2 frames at 2x (1 x 2 x 4 = 8) and 4 frames at 4x (1 x 1 x 2 = 2, padded up).
PYRAMID_MEMORY = 64 + 8 + 2
# The chunk's token grid at each stage (patch 1 x 2 x 2).
PYRAMID_GRIDS = [(2, 1, 2), (2, 2, 4), (2, 4, 8)]


@pytest.fixture(scope="module")
def pyramid():
    torch.manual_seed(0)
    # The scheduler as the pyramid pipeline expects it: its default 3 stages over thirds of the noise range. Its
    # default gamma, 1/3, makes the covariance of the noise the pipeline adds between stages singular (over 2 x 2
    # patches: eigenvalue 1 - 3 gamma), and its float32 Cholesky fails on some CPUs (an AMD EPYC here): 0.3.
    pipe = tiny_pipeline(HeliosPyramidPipeline, HeliosScheduler(gamma=0.3))
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 64, "width": 128,
            "num_frames": 9, "guidance_scale": 5.0, "output_type": "latent", "max_sequence_length": 16,
            "num_latent_frames_per_chunk": 2, "history_sizes": [4, 2, 1],
            "pyramid_num_inference_steps_list": PYRAMID_STEPS}
    return pipe, call


def test_pyramid_stages_each_attend_their_grid_behind_the_whole_memory(pyramid):
    # Blocks of 8: at 16 the sparse calls drop blocks only in the full-resolution stage, whose one sparse step is
    # the chunk's last (sigma 0.001 to 0), too little to show in the output.
    _, calls = check_pipeline_against_dense(*pyramid, block_size=8)
    # `dense_steps=1` leaves every stage's first step dense (the clock restarts with each stage: see below), so the
    # sparse calls are the other steps of each stage, cond and uncond, both layers, on that stage's grid.
    expected = [
        (layer, VideoLayout(*grid, text_len=PYRAMID_MEMORY, text_position="start"),
         (1, PYRAMID_MEMORY + grid[0] * grid[1] * grid[2]))
        for grid, steps in zip(PYRAMID_GRIDS, PYRAMID_STEPS) for _ in range(steps - 1) for _ in ("cond", "uncond")
        for layer in (0, 1)
    ]
    assert calls == expected * PYRAMID_CHUNKS


def stage_logs(pipe, call, dense_steps):
    """The call log `stats()` holds at the end of each stage (its last step's `callback_on_step_end`), in the
    order the stages ran, and the one it holds after the pipeline call."""
    logs = []

    def at_step_end(pipe, i, t, tensors):
        if i == len(pipe.scheduler.timesteps) - 1:
            logs.append(handle.stats().calls["transformer"])
        return {}

    with torch.no_grad(), diffsparse.sparse(pipe, dataclasses.replace(RADIAL, dense_steps=dense_steps)) as handle:
        pipe(**call, generator=torch.Generator().manual_seed(0), callback_on_step_end=at_step_end)
        return logs, handle.stats().calls["transformer"]


def test_pyramid_stages_each_follow_their_own_schedule(pyramid):
    # Each stage's `set_timesteps` makes a new `scheduler.timesteps`: a new run for the step clock. So a stage's
    # steps count from 0 within it, `dense_steps` (and `dense_last_steps`) apply per stage of each chunk, a
    # fraction resolves against the stage's own step count, and `stats()` after the call holds only the last
    # (full-resolution) stage of the last chunk.
    calls_per_step = 2 * 2  # cond and uncond, 2 layers

    def schedule(log):
        return [(r.step, r.sparse) for r in log if r.layer == 0 and r.branch == "cond"]

    def dense_calls(logs):
        return sum(not r.sparse for log in logs for r in log)

    logs, last = stage_logs(*pyramid, dense_steps=1)
    assert len(logs) == len(PYRAMID_STEPS) * PYRAMID_CHUNKS and last == logs[-1]
    # Every stage's first step is dense, the low-resolution first stage's and the full-resolution last stage's
    # alike: 3 dense steps per chunk where a clock over the whole chunk would give 1.
    assert [schedule(log) for log in logs] == [[(s, s > 0) for s in range(n)] for n in PYRAMID_STEPS] * PYRAMID_CHUNKS
    assert sum(len(log) for log in logs) == sum(PYRAMID_STEPS) * PYRAMID_CHUNKS * calls_per_step
    assert dense_calls(logs) == len(PYRAMID_STEPS) * PYRAMID_CHUNKS * calls_per_step

    # 0.2 of each stage, rounded half up: none of 2 steps (0.4), 1 of 3 (0.6). So only the middle stage starts
    # dense; a fraction of the chunk's 7 steps (1.4) would have kept the chunk's first step dense instead.
    logs, _ = stage_logs(*pyramid, dense_steps=0.2)
    assert [schedule(log) for log in logs] == [
        [(0, True), (1, True)], [(0, False), (1, True), (2, True)], [(0, True), (1, True)]
    ] * PYRAMID_CHUNKS
    assert dense_calls(logs) == PYRAMID_CHUNKS * calls_per_step
    # Each call is flagged by the schedule of its own stage, so the whole generation's sparse-step density (what
    # `diffsparse eval` reports) is that of the sparse calls alone: nothing else is dense here.
    assert all(r.dense_step == (not r.sparse) for log in logs for r in log)


def test_sparse_steps_density_counts_every_stage_of_the_generation(pyramid):
    pipe, call = pyramid
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=1)
    with torch.no_grad(), diffsparse.sparse(pipe, config) as handle:
        pipe(**call, generator=torch.Generator().manual_seed(0))
        whole = handle.stats(since_apply=True)
    # Per layer: 7 steps of 2 chunks x cond and uncond, 3 of each chunk's steps dense (each stage's first).
    assert [(s.dense_calls, s.sparse_calls, s.dense_step_calls) for s in whole.layers] == [(12, 16, 12)] * 2
    assert whole.sparse_density < 1
    assert whole.sparse_steps_density == pytest.approx(whole.sparse_density)
    assert whole.mean_density == pytest.approx((24 + 32 * whole.sparse_density) / 56)


@pytest.mark.parametrize("name", ["text2video", "image2video", "pyramid", "pyramid distilled"])
def test_modular_pipeline_dense_every_block_kept_and_each_stage_sparse_after_its_dense_step(transformer, name):
    # diffusers' modular Helios blocks, fed prompt embeddings, with the scheduler and guider each expects (both
    # guider branches in their own cache contexts; the distilled blocks run the conditional one alone). Without a
    # VAE the latents have the transformer's 4 channels at 1/8 the size: 9 frames of 64 x 128 make 2 chunks of 2
    # latent frames of 8 x 16 behind the pyramid's 74 memory tokens. Each chunk, and each pyramid stage, sets the
    # scheduler's timesteps anew, so `dense_steps` counts within each, as in the pipelines above.
    single = HeliosScheduler(stages=1, stage_range=[0, 1])
    blocks, scheduler, guider, call = {
        "text2video": (HeliosCoreDenoiseStep, single, ClassifierFreeGuidance(5.0), {"num_inference_steps": 3}),
        "image2video": (HeliosI2VCoreDenoiseStep, single, ClassifierFreeGuidance(5.0), {"num_inference_steps": 3}),
        "pyramid": (HeliosPyramidCoreDenoiseStep, HeliosScheduler(gamma=0.3), ClassifierFreeZeroStarGuidance(5.0),
                    {"pyramid_num_inference_steps_list": PYRAMID_STEPS}),
        # The distilled blocks' scheduler steps take DMD arguments: `HeliosDMDScheduler`'s (not `HeliosScheduler`'s).
        "pyramid distilled": (HeliosPyramidDistilledCoreDenoiseStep, HeliosDMDScheduler(gamma=0.3),
                              ClassifierFreeGuidance(1.0), {"pyramid_num_inference_steps_list": [1, 2, 1]}),
    }[name]
    # Per chunk, per stage: (steps, the chunk's token grid). The distilled blocks double the first chunk's steps.
    chunks = {"pyramid": [list(zip(PYRAMID_STEPS, PYRAMID_GRIDS))] * 2,
              "pyramid distilled": [list(zip(steps, PYRAMID_GRIDS)) for steps in ([2, 4, 2], [1, 2, 1])]
              }.get(name, [[(3, PYRAMID_GRIDS[-1])]] * 2)
    branches = ["pred_cond"] if name == "pyramid distilled" else ["pred_cond", "pred_uncond"]
    pipe = blocks().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=scheduler, guider=guider)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    prompt, negative = torch.randn(2, 1, 6, 16, generator=g)
    call.update(prompt_embeds=prompt, negative_prompt_embeds=negative,
                num_frames=9, num_latent_frames_per_chunk=2, history_sizes=[4, 2, 1], output="latent_chunks")
    if name == "image2video":  # the image's latents set the size
        call.update(image_latents=torch.randn(1, 4, 1, 8, 16, generator=g),
                    fake_image_latents=torch.randn(1, 4, 1, 8, 16, generator=g))
    else:
        call.update(height=64, width=128)

    (last, whole), calls = check_modular_against_dense(
        pipe, call, output=lambda out: torch.cat(out, dim=2),
        stats=lambda handle: (handle.stats(), handle.stats(since_apply=True)))
    runs = [run for chunk in chunks for run in chunk]
    # Per layer: the first step of every chunk's every stage dense, per branch; the rest sparse.
    dense = len(runs) * len(branches)
    assert [(s.dense_calls, s.sparse_calls, s.dense_step_calls) for s in whole.layers] == [
        (dense, sum(steps - 1 for steps, _ in runs) * len(branches), dense)
    ] * 2
    # `stats()` holds the last stage of the last chunk, each call on its own step.
    assert [(r.step, r.branch, r.layer, r.sparse) for r in last.calls["transformer"]] == [
        (step, branch, layer, step > 0) for step in range(runs[-1][0]) for branch in branches for layer in range(2)
    ]
    # The sparse calls: the stage's grid behind the whole memory.
    layouts = [VideoLayout(*grid, text_len=PYRAMID_MEMORY, text_position="start") for _, grid in runs]
    assert calls == [(layer, layout, (1, layout.num_tokens)) for (steps, _), layout in zip(runs, layouts)
                     for _ in range(steps - 1) for _ in branches for layer in range(2)]
