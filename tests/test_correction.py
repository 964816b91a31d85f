"""`SparseConfig.correction="residual"` on inputs other than the measured ones, against its definition."""

import pytest
import torch
from diffusers.hooks.hooks import CacheContext

from diffsparse import SparseConfig
from diffsparse.kernels import block_sparse_attention
from diffsparse.kernels.reference import token_mask
from diffsparse.patterns import Radial, TileOrder, VideoLayout
from diffsparse.runtime import SparseRuntime

from helpers import two_prompts_keeping_as_many_text_tokens


def _masked_attention(q, k, v, mask):
    """`(out, lse)` of attention over the pairs `mask` keeps, in float64 on `(B, H, S, D)` tensors."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    return (scores - lse).exp() @ v, lse


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 4))], ids=["frame-major", "tiles"])
def test_a_sparse_call_on_new_inputs_is_the_measured_residual_plus_rho_times_its_sparse_output(order):
    # The correction is measured on one step's q, k, v and applied to a later step's other ones: rho and the
    # residual come from the measured inputs, the sparse output from the new. Calling it on the measured inputs
    # again (the runtime tests) gives the dense output whatever rho is, so `residual = out_full - out_sparse` with
    # `residual + out` passed there; here rho is not 1 and both terms are checked.
    layout = VideoLayout(8, 4, 8)
    config = SparseConfig(
        pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=1, correction="residual", order=order
    )
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    g = torch.Generator().manual_seed(0)
    measured = torch.randn(3, 2, layout.num_tokens, 3, 16, generator=g).unbind(0)
    new = (2 * torch.randn(3, 2, layout.num_tokens, 3, 16, generator=g)).unbind(0)
    steps = []
    for step, (q, k, v) in enumerate((measured, new)):
        runtime.begin_call(layout, step, 4)
        assert runtime.route(0)
        steps.append(runtime.attention(0, q, k, v, return_lse=True))
    assert [(r.step, r.sparse, r.measured) for r in runtime.records] == [(0, False, True), (1, True, False)]

    # Independently of the runtime: the plan's mask on the tokens in the plan's order, in float64.
    cached = runtime.plan(layout, 3, torch.device("cpu"))
    assert (cached.perm is None) == (order is None) and cached.plan.density < 0.7
    perm = torch.arange(layout.num_tokens) if cached.perm is None else cached.perm
    inverse = torch.argsort(perm)
    mask = token_mask(cached.plan)

    def heads_first(x):  # (B, S, H, D) in the model's order -> (B, H, S, D) in the plan's
        return x.index_select(1, perm).transpose(1, 2)

    def model_order(x):
        return x.transpose(1, 2).index_select(1, inverse)

    out_full, lse_full = _masked_attention(*map(heads_first, measured), torch.ones_like(mask))
    out_sparse, lse_sparse = _masked_attention(*map(heads_first, measured), mask)
    rho = (lse_sparse - lse_full).exp()  # the kept blocks' share of the softmax denominator
    residual = out_full - rho * out_sparse
    assert rho.max() < 1 - 1e-6 and rho.min() < 0.9  # or the test could not tell a wrong rho from a right one
    torch.testing.assert_close(steps[0][0], model_order(out_full).float(), atol=1e-5, rtol=1e-5)

    new_sparse = block_sparse_attention(*map(heads_first, new), cached.plan).double()
    expected = model_order(residual + rho * new_sparse).float()
    torch.testing.assert_close(steps[1][0], expected, atol=1e-5, rtol=1e-5)
    # The corrected output's lse: the kept scores' less log(rho), rho as measured.
    _, new_lse = _masked_attention(*map(heads_first, new), mask)
    torch.testing.assert_close(steps[1][1], model_order(new_lse - rho.log()).float(), atol=1e-5, rtol=1e-5)
    # The statistics the runtime kept are these (in the plan's order, as it applies them).
    stats = next(iter(runtime._statistics.values()))
    torch.testing.assert_close(stats.rho.double(), rho.transpose(1, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.residual.double(), residual.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_statistics_are_kept_per_layout_and_in_the_model_s_dtype():
    # Two token layouts of one length (a prompt of another valid length, the same padded count): the statistics
    # measured on one must not correct the other, whose blocks hold other tokens; it measures its own. Kept in the
    # model's dtype: one output-sized tensor per (layer, branch, layout, videos), not a float32 copy of it.
    video, texted = VideoLayout(8, 4, 8), VideoLayout(7, 4, 8, text_len=32)
    assert video.num_tokens == texted.num_tokens
    config = SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=1, correction="residual")
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    g = torch.Generator().manual_seed(0)
    dtypes = []
    for step, layout in enumerate((video, texted, video, texted)):
        q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 16, generator=g).bfloat16().unbind(0)
        runtime.begin_call(layout, step, 4)
        assert runtime.route(0)
        dtypes.append(runtime.attention(0, q, k, v).dtype)
    assert [(r.step, r.sparse, r.measured) for r in runtime.records] == [
        (0, False, True), (1, False, True), (2, True, False), (3, True, False)]
    assert {layout for _, _, layout, _ in runtime._statistics} == {video, texted}
    assert {stats.residual.dtype for stats in runtime._statistics.values()} == {torch.bfloat16}
    # The corrected sparse outputs too: residual + rho * out, computed in float32, is handed back in the model's dtype.
    assert dtypes == [torch.bfloat16] * 4


def test_groups_of_kept_tokens_on_one_layout_each_keep_their_own_statistics():
    # Two prompts whose masks keep as many text tokens (`attend_kept_tokens`, Qwen-Image's masked prompts): their
    # groups attend on the same layout in one call of a branch. Each measures its own statistics at the dense step
    # and is corrected with them at the sparse one (the second group's overwrote the first's, which then took its
    # residual: 3.4 off), so each video gets what it gets alone; a static pattern, no fit involved.
    from diffsparse.patterns import Window3D
    from diffsparse.pipelines.base import attend_kept_tokens

    layout, q, k, v, kept = two_prompts_keeping_as_many_text_tokens()
    config = SparseConfig(pattern=Window3D((1, 4, 4)), block_size=16, dense_steps=1, correction="residual")

    def run(videos):
        runtime = SparseRuntime(config, "transformer")
        runtime.state_manager.set_context(CacheContext("cond"))
        groups = [(torch.tensor([i]), kept[video]) for i, video in enumerate(videos)]
        for step in range(3):
            runtime.begin_call(layout, step, 4)
            out = attend_kept_tokens(runtime, 0, q[videos], k[videos], v[videos], groups)
        # Measured once, at the dense step: the same videos take their statistics at every later step.
        assert [(r.step, r.sparse, r.measured) for r in runtime.records] == [
            (0, False, True), (1, True, False), (2, True, False)]
        return out, runtime

    batched, runtime = run([0, 1])
    for video in (0, 1):
        torch.testing.assert_close(batched[video : video + 1], run([video])[0], atol=1e-5, rtol=0)
    assert len(runtime._statistics) == 2  # one per group


def test_training_through_corrected_calls_keeps_no_graph_in_the_statistics():
    # The statistics are constants of later calls: kept with a graph, the sparse step's backward would run into the
    # measuring step's graph, already freed by its own backward, and every step would hold on to the one before.
    layout = VideoLayout(8, 4, 8)
    config = SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=1, correction="residual")
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        q, k, v = (torch.randn(1, layout.num_tokens, 2, 16, generator=g, requires_grad=True) for _ in range(3))
        runtime.begin_call(layout, step, 4)
        assert runtime.route(0)
        runtime.attention(0, q, k, v).square().sum().backward()
        assert all(x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum() > 0 for x in (q, k, v))
        stats = list(runtime._statistics.values())
        assert len(stats) == 1 and not any(s.rho.requires_grad or s.residual.requires_grad for s in stats)
    assert [(r.step, r.sparse, r.measured) for r in runtime.records] == [(0, False, True), (1, True, False)]


def test_a_pattern_searched_again_at_every_step_measures_at_every_step():
    # Searched(refresh=1) searches again at every step, so the statistics measured at one step never fit the next
    # step's blocks: from the first measurement (the last dense step) on, every call measures again, and none applies
    # the statistics of the step before (counting the blocks kept then, not the ones kept now).
    from diffsparse.patterns import Searched

    layout = VideoLayout(4, 4, 8)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(3, 1, layout.num_tokens, 2, 16, generator=g).unbind(0)
    second = (3 * torch.randn(3, 1, layout.num_tokens, 2, 16, generator=g)).unbind(0)
    config = SparseConfig(pattern=Searched(keep=0.3, refresh=1, criterion="mass"), block_size=16, dense_steps=2,
                          correction="residual")
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    routed = []
    for step, (q, k, v) in enumerate((first, first, second, second)):
        runtime.begin_call(layout, step, 6)
        routed.append(runtime.route(0))
        if routed[-1]:
            runtime.attention(0, q, k, v)
    assert routed == [False, True, True, True]  # step 0 stays with the original processor
    assert [(r.step, r.sparse, r.measured) for r in runtime.records] == [
        (0, False, False), (1, False, True), (2, False, True), (3, False, True)]
