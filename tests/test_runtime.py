"""The per-transformer runtime: plan cache reuse, invalidation and bound; the step clock."""

import warnings

import numpy as np
import pytest
import torch
from diffusers.hooks.hooks import CacheContext

from diffsparse import SparseConfig
from diffsparse import runtime as runtime_module
from diffsparse.kernels import block_sparse_attention, make_plan
from diffsparse.patterns import Dense, Radial, TileOrder, VideoLayout, Window3D
from diffsparse.runtime import _PLAN_CACHE_SIZE, SparseRuntime, StepClock, StepScheduleWarning


def test_plans_are_built_once_per_layout_and_never_reused_across_resolutions():
    runtime = SparseRuntime(SparseConfig(pattern=Radial(decay=0.5, min_window=8), block_size=16), "transformer")
    small, large = VideoLayout(5, 4, 6), VideoLayout(5, 8, 6)
    first = runtime.plan(small, heads=2, device=torch.device("cpu"))
    assert runtime.plan(small, heads=2, device=torch.device("cpu")) is first  # every later layer and step
    other = runtime.plan(large, heads=2, device=torch.device("cpu"))
    assert other is not first and other.plan.q_len == large.num_tokens != first.plan.q_len
    assert runtime.plan(small, heads=2, device=torch.device("cpu")) is first


def test_a_density_is_solved_once_per_layout_for_plans_that_differ_in_dense_frames(monkeypatch):
    # A diffusion-forcing wave gives a new set of early frames every few rows: a new plan each, on one solution.
    solved = []
    at_density = Radial.at_density
    monkeypatch.setattr(Radial, "at_density", lambda self, *args, **kwargs: solved.append(args[0]) or at_density(
        self, *args, **kwargs))
    runtime = SparseRuntime(SparseConfig(pattern="radial", density=0.5, block_size=16), "transformer")
    layout = VideoLayout(5, 4, 6)
    plans = {frames: runtime.plan(layout, 2, torch.device("cpu"), dense_frames=frames) for frames in ((), (4,), (3, 4))}
    assert len({id(p) for p in plans.values()}) == 3 and solved == [layout]
    assert plans[()].density < plans[(4,)].density < plans[(3, 4)].density
    runtime.plan(VideoLayout(5, 8, 6), 2, torch.device("cpu"))
    assert solved == [layout, VideoLayout(5, 8, 6)]


def test_plan_cache_is_bounded_least_recently_used_out_first():
    runtime = SparseRuntime(SparseConfig(block_size=16), "transformer")
    cpu = torch.device("cpu")
    layouts = [VideoLayout(2, 2, w) for w in range(1, _PLAN_CACHE_SIZE + 3)]
    built = [runtime.plan(layout, heads=1, device=cpu) for layout in layouts]
    assert len(runtime._plans) == _PLAN_CACHE_SIZE
    # The two oldest went, the others are cached; a cached plan just used outlives one used longer ago.
    assert runtime.plan(layouts[2], heads=1, device=cpu) is built[2]
    assert runtime.plan(layouts[0], heads=1, device=cpu) is not built[0]  # rebuilt: layouts[3]'s plan goes
    assert runtime.plan(layouts[2], heads=1, device=cpu) is built[2]
    assert all(runtime.plan(layout, heads=1, device=cpu) is plan for layout, plan in zip(layouts[4:], built[4:]))
    assert runtime.plan(layouts[3], heads=1, device=cpu) is not built[3]


def test_plan_cache_holds_a_plan_for_each_fit_of_the_run(monkeypatch):
    # A searched pattern fits each layer on each CFG branch's layout (a prompt and a negative prompt of different
    # lengths): a plan each, used once per step in the layers' order. A cache of a fixed size below their number
    # (64, against Qwen-Image's 60 layers x 2 layouts; 8 here, against 8 x 2) evicted each just before its next use
    # and rebuilt them all at every step.
    monkeypatch.setattr(runtime_module, "_PLAN_CACHE_SIZE", 8)
    runtime = SparseRuntime(SparseConfig(pattern="searched(budget='row')", density=0.5, block_size=16, dense_steps=0),
                            "transformer")
    built = []
    build = runtime._build_plan
    runtime._build_plan = lambda *args, **kwargs: built.append(1) or build(*args, **kwargs)
    g = torch.Generator().manual_seed(0)
    layers, per_step = 8, []
    for step in range(3):
        before = len(built)
        for branch, text in (("cond", 12), ("uncond", 3)):
            layout = VideoLayout(4, 8, 8, text_len=text, text_position="end")
            runtime.state_manager.set_context(CacheContext(branch))
            runtime.begin_call(layout, step, 3)
            for layer in range(layers):
                runtime.attention(layer, *torch.randn(3, 1, layout.num_tokens, 1, 8, generator=g).unbind(0))
        per_step.append(len(built) - before)
    assert per_step == [2 * layers, 0, 0]
    # A new run drops the fits, and with them the room their plans had.
    runtime.new_run()
    runtime.begin_call(layout, 0, 3)
    runtime.attention(0, *torch.randn(3, 1, layout.num_tokens, 1, 8, generator=g).unbind(0))
    assert len(runtime._plans) == 8 + 1


def test_tile_order_plans_carry_their_permutation():
    layout = VideoLayout(3, 5, 7)
    runtime = SparseRuntime(SparseConfig(block_size=16, order=TileOrder((1, 2, 4))), "transformer")
    cached = runtime.plan(layout, heads=1, device=torch.device("cpu"))
    n = layout.num_tokens
    assert torch.equal(cached.perm[cached.inverse], torch.arange(n))
    assert SparseRuntime(SparseConfig(block_size=16), "t").plan(layout, 1, torch.device("cpu")).perm is None


@pytest.mark.parametrize("pattern", [Dense(), Window3D((1, 3, 3))])
def test_a_tile_order_that_is_not_its_own_inverse_gives_the_output_back_in_the_model_s_order(pattern):
    # TileOrder((1, 2, 4)) on 4 x 8 frames, the other tests' order, is an involution (perm == inverse): there, the
    # output mapped back through perm instead of inverse passed every test. Here the two differ.
    layout = VideoLayout(3, 5, 7, text_len=3, text_position="start")
    order, n, block = TileOrder((2, 2, 3)), layout.num_tokens, 16
    inverse = order.inverse(layout)
    assert not torch.equal(order.permutation(layout), inverse)
    runtime = SparseRuntime(SparseConfig(pattern=pattern, block_size=block, dense_steps=0, order=order), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    runtime.begin_call(layout, 0, 1)
    q, k, v = torch.randn(3, 2, n, 3, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    # The kernel keeps whole blocks of the reordered sequence; inverse maps that mask to the model's order.
    kept = pattern.block_mask(layout, block, order).repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :n]
    mask = kept[:, inverse][:, :, inverse]

    def masked(q, mask):
        return torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask
        ).transpose(1, 2)

    torch.testing.assert_close(runtime.attention(0, q, k, v), masked(q, mask), atol=1e-5, rtol=0)
    if isinstance(pattern, Dense):  # queries on the video alone: their order is the video part of the keys'
        video = runtime.attention(0, q[:, 3:], k, v, video_queries=True)
        torch.testing.assert_close(video, masked(q[:, 3:], None), atol=1e-5, rtol=0)
    else:
        assert kept.float().mean() < 0.7 and (runtime.attention(0, q, k, v) - masked(q, None)).abs().max() > 1e-2


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 4))])
def test_a_token_order_attends_the_model_tokens_in_the_layouts_order(order):
    # Model tokens in a shuffled order, each one's layout index given at begin_call: the output is the layout-order
    # result permuted back, whatever SparseConfig.order adds on top; without the token order it would differ.
    layout = VideoLayout(4, 4, 8, text_len=5, text_position="start")
    runtime = SparseRuntime(SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=0,
                                         order=order), "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 2, layout.num_tokens, 3, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    runtime.begin_call(layout, 0, 1)
    in_layout_order = runtime.attention(0, q, k, v)
    token_order = torch.randperm(layout.num_tokens, generator=torch.Generator().manual_seed(1))  # model -> layout
    runtime.begin_call(layout, 0, 1, token_order)
    shuffled = runtime.attention(0, *(x[:, token_order] for x in (q, k, v)))
    torch.testing.assert_close(shuffled, in_layout_order[:, token_order], atol=1e-6, rtol=0)
    runtime.begin_call(layout, 0, 1)
    assert not torch.allclose(runtime.attention(0, *(x[:, token_order] for x in (q, k, v))), shuffled, atol=1e-3)
    with pytest.raises(ValueError, match="one layout index per token"):
        runtime.begin_call(layout, 0, 1, token_order[1:])


@pytest.mark.parametrize("video_queries", [False, True])
def test_a_layout_that_is_not_the_sequence_attended_is_said_in_the_layout_s_terms(video_queries):
    # An adapter that misreads a call (Allegro's grid once divided frames by patch_size_t) failed deep in the kernel
    # with "q and k lengths must match the plan's", naming neither the layout nor the family.
    layout = VideoLayout(2, 4, 4, text_len=3, text_position="start")
    runtime = SparseRuntime(SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=0),
                            "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    tokens = 2 * layout.num_tokens
    q, k, v = torch.randn(3, 1, tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    runtime.begin_call(layout, 0, 1)
    with pytest.raises(ValueError, match=r"transformer: the call's layout .* holds 35 tokens, but the attention got "
                                         r"\d+ queries and 70 keys"):
        runtime.attention(0, q[:, layout.video_start:] if video_queries else q, k, v, video_queries=video_queries)
    # One side wrong is said too, and a token order (which reorders to the layout's length) does not hide it: before,
    # a longer sequence came back cut to the layout, a shorter one failed in index_select.
    n = layout.num_tokens
    for queries, keys in ((n + 5, n + 5), (n - 5, n - 5), (n, n + 5), (n + 5, n)):
        runtime.begin_call(layout, 0, 1, torch.randperm(n, generator=torch.Generator().manual_seed(1)))
        with pytest.raises(ValueError, match="holds 35 tokens"):
            runtime.attention(0, q[:, :queries], k[:, :keys], v[:, :keys])
    runtime.begin_call(layout, 0, 1)
    # The right lengths run, video queries too.
    q, k, v = (x[:, :layout.num_tokens] for x in (q, k, v))
    assert runtime.attention(0, q[:, layout.video_start:] if video_queries else q, k, v,
                             video_queries=video_queries).shape[1] == q.shape[1] - (layout.video_start * video_queries)


@pytest.mark.parametrize("pattern", [Radial(min_window=4), "searched(budget='row')"])  # decay: density's
def test_a_list_of_orders_gives_the_layers_each_in_turn(pattern):
    # VMoBA's partitions cycling across layers: layer i attends as a runtime with order[i % len(order)] alone would
    # (plans, density solutions and searches per order), and the orders do differ here.
    layout = VideoLayout(4, 4, 8, text_len=5, text_position="start")
    orders = [None, TileOrder((1, 2, 4)), TileOrder((2, 2, 2))]

    def runtime(order):
        made = SparseRuntime(SparseConfig(pattern=pattern, density=0.5, block_size=16, dense_steps=0, order=order), "t")
        made.state_manager.set_context(CacheContext("cond"))
        made.begin_call(layout, 0, 1)
        return made

    cycling, alone = runtime(orders), [runtime(order) for order in orders]
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    outputs = []
    for layer in range(6):
        outputs.append(alone[layer % 3].attention(layer, q, k, v))
        torch.testing.assert_close(cycling.attention(layer, q, k, v), outputs[-1], atol=1e-6, rtol=0)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)
    assert not torch.allclose(outputs[1], outputs[2], atol=1e-3)
    assert [cycling.config.layer_order(layer) for layer in range(4)] == [*(a.config.layer_order(0) for a in alone),
                                                                        alone[0].config.layer_order(0)]


@pytest.mark.parametrize("pattern", [Radial(min_window=4), "searched(budget='row')"])  # decay: density's
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 4))])
def test_video_queries_are_the_video_rows_of_the_whole_calls_attention(pattern, order):
    # Queries on the video tokens only (keys and values over the whole [text, video] sequence, as a model with a
    # cache of the prefix's keys and values attends): with the text filling whole blocks, a static pattern gives the
    # video rows of the whole call, in either token order. A searched one does not, rightly: the whole call's search
    # pays its text rows (every key block) out of `keep`, the video call's spends `keep` on the rows it computes
    # (before, it searched as the whole call did and its video rows ran under keep: 0.21 for 0.3). So the video call
    # is compared with masked attention under the blocks its own search kept, `keep` of its rows' blocks.
    layout = VideoLayout(4, 4, 8, text_len=16, text_position="start")
    n = layout.num_tokens
    config = SparseConfig(pattern=pattern, density=0.4, block_size=16, dense_steps=0, order=order)
    q, k, v = torch.randn(3, 2, n, 3, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    whole_runtime, video_runtime = (SparseRuntime(config, "transformer") for _ in range(2))
    for runtime in (whole_runtime, video_runtime):
        runtime.state_manager.set_context(CacheContext("cond"))
        runtime.begin_call(layout, 0, 1)
    whole = whole_runtime.attention(0, q, k, v)
    video = video_runtime.attention(0, q[:, 16:], k, v, video_queries=True)
    if isinstance(pattern, Radial):
        torch.testing.assert_close(video, whole[:, 16:], atol=1e-6, rtol=0)
    else:
        (fits,) = video_runtime._layer_patterns.values()  # one search per video of the batch
        kernel_order = video_runtime.config.layer_order(0)
        inverse = kernel_order.inverse(layout)
        for i, searched in enumerate(fits):
            # Each video row keeps round(0.4 * 9) key blocks: the text row took none of them.
            assert (searched.block_mask(layout, 16, kernel_order, q_tokens=(16, n)).sum(-1) == 4).all()
            tokens = searched.token_mask(layout, kernel_order)[:, inverse][:, :, inverse]  # in the model's order
            expected = torch.nn.functional.scaled_dot_product_attention(
                *(x[i : i + 1, :].transpose(1, 2) for x in (q[:, 16:], k, v)), attn_mask=tokens[:, 16:]
            ).transpose(1, 2)
            torch.testing.assert_close(video[i : i + 1], expected, atol=1e-5, rtol=0)
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert (video - dense[:, 16:]).abs().max() > 1e-2  # blocks were left out
    with pytest.raises(ValueError, match="video_queries needs the text span first"):
        video_runtime.attention(0, q[:, :-16], k, v, layout=VideoLayout(4, 4, 8, text_len=16), video_queries=True)


def test_a_density_is_solved_over_the_rows_a_video_queries_call_computes():
    # 256 text tokens (a third of the rows, every one kept): solved over the whole sequence, no window reaches 0.5;
    # over the video's rows, which is what the call computes and reports, it does.
    layout = VideoLayout(8, 8, 8, text_len=256, text_position="start")
    runtime = SparseRuntime(SparseConfig(pattern="window3d", density=0.5, block_size=16), "transformer")
    assert runtime.plan(layout, 1, torch.device("cpu"), queries_from=256).density == pytest.approx(0.5)
    assert runtime.plan(layout, 1, torch.device("cpu")).density > 0.55


@pytest.mark.parametrize("outside", [False, True], ids=["video queries", "text rows dense outside"])
@pytest.mark.parametrize(
    "pattern",
    ["searched", "searched(criterion='mass')", "searched(criterion='pooled')", "searched(budget='row')",
     "searched_windows"],
)
def test_a_searched_density_is_kept_over_the_rows_a_video_queries_call_computes(pattern, outside):
    # The search is told which queries the call computes: before, it paid the text rows (every key block) out of
    # `keep`, then the call left them out, and the video rows ran at 0.21 for 0.3. With the text's rows computed
    # densely outside (GLM-Image), they count once, in the call's record, as a static pattern's solution counts them.
    layout = VideoLayout(frames=1, height=32, width=32, text_len=64, text_position="start")
    n, text = layout.num_tokens, layout.text_len
    runtime = SparseRuntime(SparseConfig(pattern=pattern, density=0.3, block_size=32, dense_steps=0), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    runtime.begin_call(layout, 0, 1)
    # 4 heads: the windows' budget is shared over them, and 2 leave the mean a step below 0.3 at this size.
    q, k, v = torch.randn(3, 1, n, 4, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    runtime.attention(0, q[:, text:], k, v, video_queries=True, outside_pairs=text * n if outside else 0)
    assert runtime.records[-1].density == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("pattern", ["searched", "searched(budget='row')", "searched_windows"])
def test_calls_of_one_layer_over_other_rows_or_outside_pairs_get_fits_of_their_own(pattern):
    # The fit was kept per (layer, layout, batch): a second branch whose call left other pairs outside re-solved
    # the first's searched instance (ValueError "was searched for keep=..."), and a whole call after a
    # `video_queries` one reused its search (density 0.34 for 0.3, outputs 0.37 off the call made alone).
    layout = VideoLayout(frames=1, height=32, width=32, text_len=64, text_position="start")
    n, text = layout.num_tokens, layout.text_len
    q, k, v = torch.randn(3, 1, n, 4, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    calls = {"text rows outside": lambda rt: rt.attention(0, q[:, text:], k, v, video_queries=True,
                                                          outside_pairs=text * n),
             "video queries": lambda rt: rt.attention(0, q[:, text:], k, v, video_queries=True),
             "whole": lambda rt: rt.attention(0, q, k, v)}

    def runtime():
        made = SparseRuntime(SparseConfig(pattern=pattern, density=0.3, block_size=32, dense_steps=0), "t")
        made.state_manager.set_context(CacheContext("cond"))
        made.begin_call(layout, 0, 1)
        return made

    for first, second in [("text rows outside", "video queries"), ("video queries", "whole"),
                          ("whole", "video queries")]:
        shared = runtime()
        calls[first](shared)
        shared.state_manager.set_context(CacheContext("uncond"))
        shared.begin_call(layout, 0, 1)
        out = calls[second](shared)
        alone = runtime()
        torch.testing.assert_close(out, calls[second](alone), rtol=0, atol=0)
        assert shared.records[-1].density == alone.records[-1].density


def test_a_custom_fit_without_q_tokens_runs_on_ordinary_calls():
    # `fit` as the README documented it before `q_tokens` (a user's data-dependent pattern): the runtime passes the
    # span only to a call that has one, so such a pattern, alone or in a combination, still runs everywhere else.
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class KeepsItself(Window3D):  # overriding `fit` makes it data-dependent (`Pattern.data_dependent`)
        def fit(self, query, key, value, layout, block_size, order=None, generator=None, within=None, shard=None):
            return self

    layout = VideoLayout(2, 4, 4)
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    for pattern in (KeepsItself(window=(1, 1, 1)), KeepsItself(window=(1, 1, 1)) | Radial()):
        runtime = SparseRuntime(SparseConfig(pattern=pattern, block_size=8, dense_steps=0), "t")
        runtime.state_manager.set_context(CacheContext("cond"))
        runtime.begin_call(layout, 0, 1)
        runtime.attention(0, q, k, v)
        assert runtime.records[-1].sparse


def test_video_queries_after_a_partial_block_of_text_keep_what_their_blocks_overlap():
    # 5 text tokens: the video's query blocks, counted from its first token, straddle the whole sequence's blocks.
    # Each keeps the key blocks of the pattern's rows it overlaps (the token-level definition below), as the
    # per-group calls of a causal frame-group mask do.
    layout = VideoLayout(4, 4, 8, text_len=5, text_position="start")
    pattern = Radial(decay=0.25, min_window=4)
    runtime = SparseRuntime(SparseConfig(pattern=pattern, block_size=16, dense_steps=0), "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    runtime.begin_call(layout, 0, 1)
    q, k, v = torch.randn(3, 2, layout.num_tokens, 3, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    video = runtime.attention(0, q[:, 5:], k, v, video_queries=True)
    blocks = pattern.block_mask(layout, 16, q_tokens=(5, layout.num_tokens), k_tokens=(0, layout.num_tokens))[0]
    queries = torch.arange(layout.num_tokens - 5) // 16
    keep = blocks[queries][:, torch.arange(layout.num_tokens) // 16]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, 5:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep
    ).transpose(1, 2)
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=0)
    assert not keep.all()


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


def test_step_clock_counts_from_the_run_s_first_step():
    # Image- or video-to-video with strength < 1 runs the schedule's last steps only: step 0 is the first it runs,
    # of the steps it runs. A pass outside the steps before it (a KV cache written at timestep 0) moves nothing;
    # one on the schedule's last timestep is taken back by the first call at a higher noise level.
    scheduler = _Scheduler([999.0, 750.0, 500.0, 250.0])
    clock = StepClock(scheduler)
    assert clock.tick(torch.tensor([0.0])) == (3, 4, True)  # off the grid: no run start yet
    assert clock.tick(torch.tensor([500.0])) == (0, 2, False)
    assert clock.tick(torch.tensor([250.0])) == (1, 2, False)
    assert clock.frame_steps(torch.tensor([[500.0, 250.0, 250.0]]), 3) == (0, 1, 1)
    scheduler.timesteps = torch.tensor([999.0, 500.0, 0.0])
    assert clock.tick(torch.tensor([0.0])) == (0, 1, True)
    assert clock.tick(torch.tensor([999.0])) == (0, 3, False)
    assert clock.tick(torch.tensor([500.0])) == (1, 3, False)


def test_step_clock_counts_steps_of_a_second_order_sampler():
    # Heun gives the transformer two calls per step, `t0, t1, t1, t2, t2, ...` (2 N - 1 timesteps for N steps):
    # before, positions in that list were the steps (0, 1, 1, 3, 3, ... of 2 N - 1), so `dense_last_steps` never
    # came and fractions were taken of the wrong count.
    from diffusers import FlowMatchHeunDiscreteScheduler

    scheduler = FlowMatchHeunDiscreteScheduler()
    scheduler.set_timesteps(4)
    clock = StepClock(scheduler)
    assert [clock.tick(t[None])[:2] for t in scheduler.timesteps] == [(0, 4), (1, 4), (1, 4), (2, 4), (2, 4),
                                                                     (3, 4), (3, 4)]


def test_step_clock_leaves_out_a_terminal_timestep_the_loop_skips():
    # LTX's Euler ancestral RF sampler, given sigmas ending at 0, lists a timestep for the terminal sigma, and its
    # pipelines loop over `timesteps[:-1]`: before, that step that never runs was the one `dense_last_steps` kept.
    from diffusers import LTXEulerAncestralRFScheduler

    scheduler = LTXEulerAncestralRFScheduler()
    scheduler.set_timesteps(sigmas=[1.0, 0.9, 0.75, 0.5, 0.25, 0.0])
    clock = StepClock(scheduler)
    assert [clock.tick(t[None])[:2] for t in scheduler.timesteps[:-1]] == [(i, 5) for i in range(5)]


class _Pipeline:
    def __init__(self, scheduler):
        self.scheduler, self._current_timestep = scheduler, None

    def __call__(self, t, call, *args):
        """`call(*args)` while denoising at `t`: a pipeline's timestep is read only while it runs."""
        self._current_timestep = t
        return call(*args)


def test_step_clock_reads_half_precision_timesteps():
    # Most pipelines cast the timestep to the latents' dtype before the transformer call. With HunyuanVideo's
    # shift of 7 and 50 steps, the first timesteps are 2.9 apart and bfloat16's spacing there is 4: before, a
    # bfloat16 run warned that its timesteps were off the scheduler's grid and read step 2 as step 1. The
    # pipeline's own `_current_timestep` (full precision) tells neighbours apart; without one, the nearest.
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 51)[:-1])
    pipeline = _Pipeline(scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepScheduleWarning)
        for dtype, scale in ((torch.bfloat16, 1), (torch.float16, 1), (torch.bfloat16, 1000)):  # FLUX: t / 1000
            steps, nearest = [], []
            clock, alone = StepClock(pipeline=pipeline), StepClock(scheduler)
            for t in scheduler.timesteps:
                given = (t[None].to(dtype) / scale).to(dtype) * scale  # as the pipeline and the adapter compute
                steps.append(pipeline(t, clock.tick, given)[0])
                nearest.append(alone.tick(given)[0])
            assert steps == list(range(50)), (dtype, scale)
            assert max(abs(got - i) for i, got in enumerate(nearest)) <= 1, (dtype, scale)


def _run_call(runtime, layer, layout, step, num_steps, q, k, v):
    """One self-attention call the way a processor makes it, `None` when it would stay with the original."""
    runtime.begin_call(layout, step, num_steps)
    return runtime.attention(layer, q, k, v) if runtime.route(layer) else None


def test_a_search_again_measures_the_correction_again():
    # Searched(refresh=2) keeps other blocks from step 2 on: the statistics measured against the old blocks would
    # count some twice and miss others (before: reused, 1.07 off dense on the inputs they were measured on). The
    # refitting call measures again, so a later call on its inputs is dense again.
    from diffsparse.patterns import Searched

    layout = VideoLayout(4, 4, 8)
    g = torch.Generator().manual_seed(0)
    q1, k1, v1 = torch.randn(3, 1, layout.num_tokens, 2, 16, generator=g).unbind(0)
    q2, k2, v2 = (3 * torch.randn(3, 1, layout.num_tokens, 2, 16, generator=g)).unbind(0)
    config = SparseConfig(pattern=Searched(keep=0.3, refresh=2, criterion="mass"), block_size=16, dense_steps=1,
                          correction="residual")
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    for step, inputs in enumerate(((q1, k1, v1), (q2, k2, v2), (q2, k2, v2))):
        _run_call(runtime, 0, layout, step, 6, *inputs)
    assert [(r.step, r.measured) for r in runtime.records] == [(0, True), (1, False), (2, True)]
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q2, k2, v2))).transpose(1, 2)
    torch.testing.assert_close(_run_call(runtime, 0, layout, 3, 6, q2, k2, v2), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batched", [False, True], ids=["a call per CFG branch", "CFG batched"])
def test_a_search_is_shared_by_cfg_branches_called_apart_and_made_per_video_of_a_batched_call(batched, monkeypatch):
    # The fit is kept per (layer, layout, batch size, ...), not per branch: Wan's cond and uncond calls share one
    # search, PixArt's one call holding both halves searches each half on its own. With a correction, at the
    # measuring step.
    from diffsparse.patterns import Searched

    searches = []
    fit = Searched.fit
    monkeypatch.setattr(Searched, "fit", lambda self, q, *args, **kwargs: searches.append(q.shape[0]) or fit(
        self, q, *args, **kwargs))
    layout = VideoLayout(4, 4, 8)
    cond, uncond = torch.randn(2, 3, 1, layout.num_tokens, 2, 16, generator=torch.Generator().manual_seed(0))
    config = SparseConfig(pattern=Searched(keep=0.3, criterion="mass"), block_size=16, dense_steps=1,
                          correction="residual")
    runtime = SparseRuntime(config, "transformer")
    for step in range(3):
        for branch, inputs in ([("cond+uncond", torch.cat([cond, uncond], dim=1))] if batched else
                               [("cond", cond), ("uncond", uncond)]):
            runtime.state_manager.set_context(CacheContext(branch))
            _run_call(runtime, 0, layout, step, 3, *inputs)
    assert searches == ([1, 1] if batched else [1])  # one per video searched, at step 0 (the measuring step)
    assert runtime._fitted_at == {(0, layout, 2 if batched else 1, 0, 0, 0): 0}  # no query offset, no outside pairs
    assert [len(patterns) for patterns in runtime._layer_patterns.values()] == [2 if batched else 1]


def test_sparse_steps_foresees_the_runtime_s_rule():
    # `step_mode` is the runtime's rule and `sparse_steps` runs it over a run: a correction measures at a sparse step
    # without statistics and again every correction_refresh steps, so some configs leave nothing sparse.
    from diffsparse.runtime import sparse_steps

    def steps(num_steps, **fields):
        return sparse_steps(SparseConfig(**fields), num_steps)

    assert steps(4, dense_steps=1) == [1, 2, 3]
    assert steps(4, dense_steps=1, dense_last_steps=1) == [1, 2]
    assert steps(3, dense_steps=1, dense_last_steps=2) == []
    assert steps(5, dense_steps=1, correction="residual") == [1, 2, 3, 4]
    assert steps(5, dense_steps=1, correction="residual", correction_refresh=2) == [1, 3]
    assert steps(5, dense_steps=1, correction="residual", correction_refresh=1) == []
    assert steps(2, dense_steps=0, correction="residual") == [1]
    assert steps(1, dense_steps=0, correction="residual") == []
    assert steps(3, dense_steps=0, dense_last_steps=2, correction="residual") == []
    # The runtime agrees, call by call.
    config = SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=1,
                          correction="residual", correction_refresh=2)
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    layout = VideoLayout(4, 4, 8)
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    for step in range(5):
        _run_call(runtime, 0, layout, step, 5, q, k, v)
    assert [r.step for r in runtime.records if r.sparse] == sparse_steps(config, 5)


# TileOrder((1, 4, 4)) on 4 x 8 frames is not its own inverse ((1, 2, 4) is): an output mapped back through perm
# is caught.
@pytest.mark.parametrize("order", [None, TileOrder((1, 4, 4))])
def test_residual_correction_is_exact_when_the_inputs_do_not_change(order):
    # rho * out_sparse + residual rebuilds the dense output of the measured inputs exactly: at a later sparse
    # step with the same q, k, v the corrected output is the dense one (and differs from the raw sparse one).
    layout = VideoLayout(8, 4, 8)
    config = SparseConfig(
        pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=2, correction="residual", order=order
    )
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 2, layout.num_tokens, 3, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert _run_call(runtime, 0, layout, 0, 5, q, k, v) is None  # an early dense step: the original processor
    measured = _run_call(runtime, 0, layout, 1, 5, q, k, v)  # the last dense step measures
    torch.testing.assert_close(measured, dense, atol=1e-5, rtol=1e-5)
    corrected = _run_call(runtime, 0, layout, 2, 5, q, k, v)
    torch.testing.assert_close(corrected, dense, atol=1e-5, rtol=1e-5)
    records = [(r.step, r.sparse, r.measured) for r in runtime.records]
    assert records == [(0, False, False), (1, False, True), (2, True, False)]
    cached = runtime.plan(layout, 3, torch.device("cpu"))
    assert cached.plan.density < 0.7
    raw = block_sparse_attention(
        *(x.transpose(1, 2) if cached.perm is None else x.index_select(1, cached.perm).transpose(1, 2)
          for x in (q, k, v)),
        cached.plan,
    ).transpose(1, 2)
    raw = raw if cached.perm is None else raw.index_select(1, cached.inverse)
    assert (raw - dense).abs().max() > 1e-2


def test_correction_measures_where_no_statistics_exist_and_refreshes():
    layout = VideoLayout(3, 4, 4)
    config = SparseConfig(
        pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=0, correction="residual",
        correction_refresh=2,
    )
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(1)).unbind(0)
    for step in range(5):
        _run_call(runtime, 0, layout, step, 5, q, k, v)
    # No dense step precedes the sparse ones, so the first call measures; then every second step again.
    assert [(r.sparse, r.measured) for r in runtime.records] == [
        (False, True), (True, False), (False, True), (True, False), (False, True)
    ]
    runtime.state_manager.set_context(CacheContext("uncond"))  # statistics are per CFG branch
    _run_call(runtime, 0, layout, 1, 5, q, k, v)
    assert runtime.records[-1].measured
    runtime.new_run()
    runtime.state_manager.set_context(CacheContext("cond"))
    # A new generation measures again on the same shape: the last one's statistics are of other latents (and
    # would pass for this step's, the step counter having started over).
    _run_call(runtime, 0, layout, 1, 5, q, k, v)
    assert runtime.records[-1].measured
    _run_call(runtime, 0, VideoLayout(3, 4, 8), 1, 5, *(torch.cat([x, x], 1) for x in (q, k, v)))
    assert runtime.records[-1].measured  # so does a new shape


def test_statistics_of_another_batch_size_are_measured_again():
    # The statistics are kept per (layer, branch, layout, videos): a call of that layout with another batch (one
    # prompt after two) cannot take them, whose rho and residual would broadcast its output to the measured batch's
    # size.
    layout = VideoLayout(3, 4, 4)
    config = SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=1, correction="residual")
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 2, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(1)).unbind(0)
    _run_call(runtime, 0, layout, 0, 4, q, k, v)
    alone = [x[:1] for x in (q, k, v)]
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in alone)).transpose(1, 2)
    torch.testing.assert_close(_run_call(runtime, 0, layout, 1, 4, *alone), dense, atol=1e-5, rtol=1e-5)
    assert _run_call(runtime, 0, layout, 2, 4, *alone).shape == alone[0].shape
    assert [(r.step, r.sparse, r.measured) for r in runtime.records] == [
        (0, False, True), (1, False, True), (2, True, False)
    ]


@pytest.mark.parametrize("config", [
    SparseConfig(pattern="searched(refresh=2)", density=0.5, block_size=16, dense_steps=0),
    SparseConfig(pattern="searched", density=0.5, block_size=16, dense_steps=0),
    SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=0, correction="residual",
                 correction_refresh=2),
    SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=0, correction="residual"),
], ids=["search every 2 steps", "search once", "measure every 2 steps", "measure once"])
def test_steps_starting_over_within_a_run_search_and_measure_anew(config):
    # A SkyReels-V2 long video steps each chunk on copies of one scheduler run: the steps start over at 0 on new
    # content, with no new run. Before, a chunk of the last one's layout took its fits and statistics, made at
    # later steps, so no refresh came (`step - fitted_at` < 0) and every call ran on the other content's blocks.
    # Now the chunk is computed as if alone.
    layout = VideoLayout(4, 4, 4)
    g = torch.Generator().manual_seed(0)
    chunks = [[torch.randn(3, 1, layout.num_tokens, 2, 8, generator=g).unbind(0) for _ in range(4)] for _ in range(2)]

    def run(runtime, chunk):
        outputs = []
        for step, inputs in enumerate(chunk):
            runtime.begin_call(layout, step, 4)
            assert runtime.route(0)
            outputs.append(runtime.attention(0, *inputs))
            runtime.end_call()
        return outputs

    runtime, alone = SparseRuntime(config, "transformer"), SparseRuntime(config, "transformer")
    for each in (runtime, alone):
        each.state_manager.set_context(CacheContext("cond"))
    run(runtime, chunks[0])
    second = run(runtime, chunks[1])
    for got, expected in zip(second, run(alone, chunks[1])):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    if config.correction is not None:
        measured = [r.step for r in runtime.records if r.measured]
        assert measured == 2 * ([0, 2] if config.correction_refresh else [0])


def test_with_a_correction_the_call_s_step_decides_for_all_its_frames():
    # Diffusion forcing gives each frame its own step (`frame_steps`): without a correction the frames past the dense
    # steps run sparse, the others' queries dense. A correction's statistics are per call: its calls follow the
    # call's own step (its noisiest frame's) as a whole, dense while that one is a dense step.
    layout = VideoLayout(4, 4, 4)
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    records = {}
    for correction in (None, "residual"):
        config = SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=2,
                              correction=correction)
        runtime = SparseRuntime(config, "transformer")
        runtime.state_manager.set_context(CacheContext("cond"))
        runtime.begin_call(layout, 0, 5, frame_steps=(3, 2, 1, 0))  # frames 2 and 3 in the dense steps
        if runtime.route(0):
            runtime.attention(0, q, k, v)
        records[correction] = [(r.sparse, r.measured, r.dense_step) for r in runtime.records]
    assert records == {None: [(True, False, False)], "residual": [(False, False, True)]}


def test_a_pass_at_a_late_step_before_each_step_keeps_the_fits():
    # A pass outside the steps (a KV cache written at timestep 0, which the clock reads as the last step) before the
    # step it serves is no new denoising pass: dropping the fits there would search again at every step.
    layout = VideoLayout(4, 4, 4)
    runtime = SparseRuntime(SparseConfig(pattern="searched", density=0.5, block_size=16, dense_steps=0), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    fitted = []
    for step in range(3):
        for at in (3, step):  # the side pass, then the step
            runtime.begin_call(layout, at, 4)
            runtime.attention(0, q, k, v)
            runtime.end_call()
        fitted.append(dict(runtime._fitted_at))
    assert fitted[0] == fitted[1] == fitted[2] and len(fitted[0]) == 1


def test_dense_plan_keeps_every_block():
    runtime = SparseRuntime(SparseConfig(block_size=16), "transformer")
    sparse = make_plan(torch.eye(3, dtype=torch.bool)[None, None], 40, 40, 16)
    dense = runtime._dense_plan(sparse, torch.device("cpu"))
    assert dense.density == 1.0 and (dense.q_len, dense.block_q) == (40, 16)
    assert runtime._dense_plan(sparse, torch.device("cpu")) is dense


def test_once_per_call_reads_each_mask_once_also_through_new_views():
    # Under context parallelism diffusers hands every block a new view of the same slice of the mask: one read.
    runtime = SparseRuntime(SparseConfig(block_size=16), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    runtime.begin_call(VideoLayout(2, 4, 4), 0, 1)
    mask, reads = torch.ones(2, 8, dtype=torch.bool), []

    def read(source):
        reads.append(source.shape)
        return int(source.sum())

    assert [runtime.once_per_call(mask.chunk(2, dim=1)[1], read) for _ in range(3)] == [8, 8, 8] and len(reads) == 1
    assert runtime.once_per_call(mask.chunk(2, dim=1)[0], read) == 8 and len(reads) == 2  # another slice
    assert runtime.once_per_call(mask[:1], read) == 8 and len(reads) == 3  # another shape (one row of 8)
    # A new call reads again, also the same buffer (a pipeline refilling its mask in place between calls): the
    # answer of the last read, for the old contents, was kept when the key matched.
    mask[0, 0] = False
    runtime.begin_call(VideoLayout(2, 4, 4), 1, 1)
    assert runtime.once_per_call(mask[:1], read) == 7 and len(reads) == 4


def _scores(q, k):
    """`(B, S, H, S)` scaled scores of `(B, S, H, D)` tensors, as `attention`'s lse is laid out before its last dim."""
    return torch.einsum("bqhd,bkhd->bqhk", q, k) / q.shape[-1] ** 0.5


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 4))])
def test_return_lse_is_the_logsumexp_of_the_scores_in_the_models_order(order):
    # Through a token order and a tile order: each query's lse stays with it. A FrameCausal call (per-group kernel
    # calls) gives each query the lse of the keys up to its group's end.
    from diffsparse.patterns import FrameCausal, Window3D

    layout = VideoLayout(4, 4, 3)
    runtime = SparseRuntime(SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0,
                                         order=order), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 2, layout.num_tokens, 3, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    token_order = torch.randperm(layout.num_tokens, generator=torch.Generator().manual_seed(1))
    runtime.begin_call(layout, 0, 1, token_order)
    out, lse = runtime.attention(0, q, k, v, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, layout.num_tokens, 3, 1)
    torch.testing.assert_close(lse[..., 0], _scores(q, k).logsumexp(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, runtime.attention(0, q, k, v), atol=0, rtol=0)
    runtime.begin_call(layout, 0, 1)
    assert runtime.route(0) and runtime.allow_frame_causal(0, 2) and runtime._state().frame_causal == 2
    _, lse = runtime.attention(0, q, k, v, return_lse=True)
    allowed = FrameCausal(2).token_mask(layout).reshape(layout.num_tokens, 1, -1)  # over (query, head, key)
    torch.testing.assert_close(lse[..., 0], _scores(q, k).masked_fill(~allowed, float("-inf")).logsumexp(-1),
                               atol=1e-5, rtol=0)


def test_return_lse_of_a_corrected_call_estimates_the_dense_one():
    # At the measured inputs the corrected output is the dense one, and so is its lse (kept scores' less log rho).
    layout = VideoLayout(8, 4, 8)
    config = SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=1, correction="residual")
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 2, layout.num_tokens, 3, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    dense_lse = _scores(q, k).logsumexp(-1)
    for step in (0, 1):
        runtime.begin_call(layout, step, 3)
        assert runtime.route(0)
        _, lse = runtime.attention(0, q, k, v, return_lse=True)
        torch.testing.assert_close(lse[..., 0], dense_lse, atol=1e-5, rtol=0)
    assert [(r.sparse, r.measured) for r in runtime.records] == [(False, True), (True, False)]
    runtime.begin_call(layout, 1, 3)
    kept = runtime.plan(layout, 3, torch.device("cpu"))
    raw_lse = block_sparse_attention(*(x.transpose(1, 2) for x in (q, k, v)), kept.plan, return_lse=True)[1]
    assert (raw_lse.transpose(1, 2) - dense_lse).abs().max() > 0.1  # the raw kept scores' lse is not the dense one


def test_outside_pairs_count_into_the_calls_density_and_dense_attention_logs_nothing():
    layout = VideoLayout(8, 4, 8)
    runtime = SparseRuntime(SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=0), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    runtime.begin_call(layout, 0, 1)
    runtime.attention(0, q, k, v)
    runtime.attention(0, q, k, v, outside_pairs=1000)
    alone, counted = (r.density for r in runtime.records)
    pairs = layout.num_tokens**2
    assert alone < 1 and counted == pytest.approx((alone * pairs + 1000) / (pairs + 1000))
    # Queries and keys of different lengths (any, not whole blocks): SDPA's output, the scores' lse, no record.
    out, lse = runtime.dense_attention(q[:, :37], k[:, 5:], v[:, 5:])
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q[:, :37], k[:, 5:], v[:, 5:]))
    )
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[..., 0], _scores(q[:, :37], k[:, 5:]).logsumexp(-1), atol=1e-5, rtol=0)
    assert len(runtime.records) == 2


def test_timesteps_on_another_scale_than_the_scheduler_s_warn():
    # A pipeline that hands the transformer `t / 1000` where its adapter expects `t` would put every call on the
    # nearest step (the last) without a word: a second timestep off the scheduler's grid in one run warns. One alone
    # is a pass outside the steps (a KV cache written at timestep 0), and stays silent.
    import types
    import warnings

    scheduler = types.SimpleNamespace(timesteps=torch.tensor([1000.0, 666.7, 333.3]))
    clock = StepClock(scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepScheduleWarning)
        assert clock.tick(torch.tensor(1000.0))[:2] == (0, 3)
        clock.tick(torch.tensor(0.0))
        assert clock.tick(torch.tensor(666.7))[0] == 1
    with pytest.warns(StepScheduleWarning, match="another scale"):
        clock.tick(torch.tensor(0.3333))
    scheduler.timesteps = torch.tensor([1000.0, 500.0])  # a new run starts clean, here at the schedule's step 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepScheduleWarning)
        assert clock.tick(torch.tensor(500.0))[:2] == (0, 1)


def test_forward_inputs_are_read_by_keyword_or_by_position_but_not_past_star_args():
    from diffsparse.pipelines.base import forward_input

    class Model(torch.nn.Module):
        def forward(self, hidden_states, timestep=None, *extra, encoder_hidden_states=None):
            pass

    model, args = Model(), ("h", "t", "e1", "e2", "e3")
    assert forward_input(model, args, {}, "timestep") == "t"
    # A keyword-only parameter is never positional: args[2] is one of *extra.
    assert forward_input(model, args, {}, "encoder_hidden_states") is None
    assert forward_input(model, args, {"encoder_hidden_states": "k"}, "encoder_hidden_states") == "k"
    assert forward_input(model, ("h",), {}, "timestep") is None
    # A name the forward does not take (renamed in another diffusers) is absent, not the first positional input.
    assert forward_input(model, args, {}, "not_a_parameter") is None


def test_a_density_out_of_the_pattern_s_reach_warns_once_per_layout():
    # Radial keeps neighbouring frames whole, so one frame (every image model) stays dense whatever the target:
    # before, SparseConfig(density=0.25) ran such calls at density 1.0 without a word.
    runtime = SparseRuntime(SparseConfig(pattern="radial", density=0.25, block_size=16), "transformer")
    image, cpu = VideoLayout(1, 8, 8), torch.device("cpu")
    with pytest.warns(UserWarning, match=r"density=0\.25 is out of reach of radial.*\(frames=1, height=8, width=8.* "
                                         r"reaches there is 1\.000, so this layout runs denser than asked\. "
                                         r'"window3d" .* or "searched"'):
        assert runtime.plan(image, 1, cpu).density == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.plan(image, 1, cpu, dense_frames=(0,))  # the same layout: said once
        # 12 frames reach 0.236: a step of the solution, not a target out of reach.
        assert runtime.plan(VideoLayout(12, 8, 8), 1, cpu).density == pytest.approx(0.236, abs=1e-3)
        SparseRuntime(SparseConfig(pattern="window3d", density=0.25, block_size=16), "transformer").plan(
            VideoLayout(1, 16, 16), 1, cpu)
    with pytest.warns(UserWarning, match=r"density=0\.25 is out of reach of window3d.*\. \"searched\" .* may come"):
        SparseRuntime(SparseConfig(pattern="window3d", density=0.25, block_size=16), "transformer").plan(
            VideoLayout(1, 2, 2), 1, cpu)


@pytest.mark.parametrize("pattern", ["searched(criterion='mass')", "searched_windows"])
def test_a_fitted_pattern_s_density_out_of_reach_warns_once_per_layout(pattern):
    # A third of the rows and columns text (kept whole) alone hold half the blocks: a search for 0.25 keeps those,
    # 0.50. Before, a fitted pattern skipped the check a solved one gets, and ran so without a word.
    layout = VideoLayout(1, 32, 32, text_len=333, text_position="end")
    runtime = SparseRuntime(SparseConfig(pattern=pattern, density=0.25, block_size=64, dense_steps=0), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    runtime.begin_call(layout, 0, 1)
    q, k, v = torch.randn(3, 1, layout.num_tokens, 1, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in range(2):  # each layer fits its own: said once for the layout
            runtime.attention(layer, q, k, v)
    said = [str(w.message) for w in caught]
    assert len(said) == 1
    assert said[0].startswith(f"diffsparse: t: SparseConfig.density=0.25 is out of reach of {runtime.pattern!r} on")
    assert "text rows and columns, each query block's diagonal" in said[0] and "comes to 0.504" in said[0]
    assert "so the first layer fitted on this layout runs denser than asked" in said[0]  # the one judged
    assert "smaller SparseConfig.block_size" in said[0]
    # A cumulative threshold keeps at most the budget by design: sparser than asked is no news.
    runtime = SparseRuntime(SparseConfig(pattern="searched(criterion='mass', top_p=0.01)", density=0.5, block_size=16,
                                         dense_steps=0), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    runtime.begin_call(VideoLayout(4, 8, 8), 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.attention(0, *torch.randn(3, 1, 256, 1, 16, generator=torch.Generator().manual_seed(1)).unbind(0))
    assert runtime.records[-1].density < 0.3


def test_the_causal_mask_warning_is_diffsparse_s():
    # `diffsparse compare` and the demo keep diffsparse's warnings; this one alone began with the component's name.
    layout = VideoLayout(4, 4, 4)
    runtime = SparseRuntime(SparseConfig(block_size=16, dense_steps=0, correction="residual"), "t")
    runtime.state_manager.set_context(CacheContext("cond"))
    runtime.begin_call(layout, 0, 1)
    with pytest.warns(UserWarning) as caught:
        assert not runtime.allow_frame_causal(0, 2)
    assert str(caught[0].message).startswith("diffsparse: t: self-attention with a causal mask over groups of 2 frames")
