"""The step schedule at its edges: Wan 2.2's switch from the high-noise expert to the low-noise one, the first and
last dense steps, and what `stats()` reports of them."""

import pytest
import torch
from diffusers.hooks.hooks import CacheContext
from test_wan_pipeline import _wan22_pipeline

import diffsparse
from diffsparse.patterns import VideoLayout, Window3D
from diffsparse.runtime import SparseRuntime

from helpers import generate

# Keeps a few blocks of the tiny canvas (5 x 4 x 6 tokens at block 16), so a sparse step changes the latents.
SMALL_WINDOW = Window3D(window=(1, 1, 1))


@torch.no_grad()
def test_a_fraction_of_dense_steps_counts_the_steps_of_both_experts_and_stats_say_so():
    # The experts share one step count: 0.5 of 6 steps is steps 0-2 and dense_last_steps=1 is step 5, whichever
    # expert runs them. With the boundary at t = 500 the high-noise expert runs steps 0-3 and the low-noise one 4-5,
    # so each expert has one sparse step (3 and 4), and the latents stay the dense run's until the first of them.
    pipe = _wan22_pipeline()
    latents = {"dense": [], "sparse": []}

    def keeping(run):
        def callback(pipeline, step, timestep, tensors):
            latents[run].append(tensors["latents"].clone())
            return tensors
        return callback

    call = {"num_inference_steps": 6, "callback_on_step_end": keeping("dense")}
    generate(pipe, **call)
    handle = diffsparse.apply(pipe, diffsparse.SparseConfig(pattern=SMALL_WINDOW, block_size=16, dense_steps=0.5,
                                                            dense_last_steps=1))
    generate(pipe, **{**call, "callback_on_step_end": keeping("sparse")})
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    assert [i for i, t in enumerate(pipe.scheduler.timesteps) if t >= boundary] == [0, 1, 2, 3]
    assert handle.run_step_counts == [6]
    calls = handle.stats().calls
    assert sorted({r.step for r in calls["transformer"]}) == [0, 1, 2, 3]
    assert sorted({r.step for r in calls["transformer_2"]}) == [4, 5]
    for records in calls.values():
        assert all(r.sparse == (r.step in (3, 4)) and r.dense_step == (r.step in (0, 1, 2, 5)) for r in records)
    for step in range(3):
        torch.testing.assert_close(latents["sparse"][step], latents["dense"][step], atol=0, rtol=0)
    assert all(not torch.equal(latents["sparse"][step], latents["dense"][step]) for step in range(3, 6))
    # Per layer and expert: the dense and sparse calls (two CFG branches a step), the calls in the dense steps, and
    # the sparse calls' block density (the window's on the call's 5 x 4 x 6 tokens), which the summaries weigh
    # against the dense calls' 1.0.
    stats = handle.stats()
    density = SMALL_WINDOW.density(VideoLayout(5, 4, 6), (16, 16))
    assert 0 < density < 0.7
    counts = {}
    for s in stats.layers:
        counts.setdefault(s.transformer, set()).add((s.dense_calls, s.sparse_calls, s.dense_step_calls))
    assert counts == {"transformer": {(6, 2, 6)}, "transformer_2": {(2, 2, 2)}}
    assert all(s.mean_density == pytest.approx(density) for s in stats.layers)
    assert all(r.density == (pytest.approx(density) if r.sparse else 1.0) for log in stats.calls.values() for r in log)
    # 12 calls per block over the two experts, 4 of them sparse; outside the dense steps (3 and 4) only those 4.
    assert stats.mean_density == pytest.approx((8 + 4 * density) / 12)
    assert stats.sparse_density == stats.sparse_steps_density == pytest.approx(density)


def test_a_measuring_call_counts_dense_in_stats():
    # A correction's measuring call runs dense attention (every block, plus one sparse pass for its statistics):
    # stats() counts it at 1.0, not at the density of the plan it measured against.
    layout = VideoLayout(3, 4, 8)
    config = diffsparse.SparseConfig(pattern=SMALL_WINDOW, block_size=16, dense_steps=1, correction="residual")
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    for step in range(3):
        runtime.begin_call(layout, step, 3)
        if runtime.route(0):
            runtime.attention(0, q, k, v)
        runtime.end_call()
    density = SMALL_WINDOW.density(layout, (16, 16))
    assert density < 0.7
    assert [(r.step, r.sparse, r.measured, r.density) for r in runtime.records] == [
        (0, False, True, 1.0), (1, True, False, pytest.approx(density)), (2, True, False, pytest.approx(density))
    ]
