"""The per-transformer runtime: plan cache reuse, invalidation and bound; the step clock."""

import torch

from diffsparse import SparseConfig
from diffsparse.patterns import Radial, TileOrder, VideoLayout
from diffsparse.runtime import _PLAN_CACHE_SIZE, SparseRuntime, StepClock


def test_plans_are_built_once_per_layout_and_never_reused_across_resolutions():
    runtime = SparseRuntime(SparseConfig(pattern=Radial(decay=0.5, min_window=8), block_size=16), "transformer")
    small, large = VideoLayout(5, 4, 6), VideoLayout(5, 8, 6)
    first = runtime.plan(small, heads=2, device=torch.device("cpu"))
    assert runtime.plan(small, heads=2, device=torch.device("cpu")) is first  # every later layer and step
    other = runtime.plan(large, heads=2, device=torch.device("cpu"))
    assert other is not first and other.plan.q_len == large.num_tokens != first.plan.q_len
    assert runtime.plan(small, heads=2, device=torch.device("cpu")) is first


def test_plan_cache_is_bounded():
    runtime = SparseRuntime(SparseConfig(block_size=16), "transformer")
    layouts = [VideoLayout(2, 2, w) for w in range(1, _PLAN_CACHE_SIZE + 3)]
    for layout in layouts:
        runtime.plan(layout, heads=1, device=torch.device("cpu"))
    assert len(runtime._plans) == _PLAN_CACHE_SIZE
    # The oldest entries went first; the newest are still cached.
    newest = runtime.plan(layouts[-1], heads=1, device=torch.device("cpu"))
    assert runtime.plan(layouts[-1], heads=1, device=torch.device("cpu")) is newest


def test_tile_order_plans_carry_their_permutation():
    layout = VideoLayout(3, 5, 7)
    runtime = SparseRuntime(SparseConfig(block_size=16, order=TileOrder((1, 2, 4))), "transformer")
    cached = runtime.plan(layout, heads=1, device=torch.device("cpu"))
    n = layout.num_tokens
    assert torch.equal(cached.perm[cached.inverse], torch.arange(n))
    assert SparseRuntime(SparseConfig(block_size=16), "t").plan(layout, 1, torch.device("cpu")).perm is None


class _Scheduler:
    def __init__(self, timesteps):
        self.timesteps = torch.tensor(timesteps)


def test_step_clock_follows_the_scheduler_and_notices_new_calls():
    scheduler = _Scheduler([999.0, 750.0, 500.0, 250.0])
    clock = StepClock(scheduler)
    assert clock.tick(torch.tensor([999.0, 999.0])) == (0, 4, True)
    assert clock.tick(torch.tensor([999.0])) == (0, 4, False)  # the uncond call of the same step
    assert clock.tick(torch.tensor([500.0])) == (2, 4, False)
    # Wan 2.2 TI2V passes per-token timesteps (0 on the conditioning frame): the step is the largest.
    assert clock.tick(torch.tensor([[0.0, 250.0, 250.0]])) == (3, 4, False)
    scheduler.timesteps = torch.tensor([999.0, 500.0])  # `set_timesteps` of the next pipeline call
    assert clock.tick(torch.tensor([999.0])) == (0, 2, True)
