"""Searched per-head windows (Sliding Tile Attention's window search, at each layer's first sparse call): the
candidate sizes, the losses against their token-level definition, the budget, sharded heads, the runtime."""

import dataclasses
import itertools
import math

import pytest
import torch

import diffsparse
from diffsparse.patterns import (
    FrameCausal,
    FrameSink,
    HeadShard,
    SearchedWindows,
    TileOrder,
    VideoLayout,
    Window3D,
    get_pattern,
    window_search,
)
from diffsparse.patterns.window_search import _candidate_densities, allocate, axis_sizes

from helpers import generate


def test_axis_sizes_are_odd_stride_multiples_that_about_double_up_to_the_axis():
    assert axis_sizes(17, 1) == (1, 3, 5, 9, 17)
    assert axis_sizes(12, 1) == (1, 3, 5, 9, 12)
    assert axis_sizes(12, 4) == (4, 12) and axis_sizes(40, 4) == (4, 12, 20, 36, 40)
    assert axis_sizes(1, 1) == (1,) and axis_sizes(2, 1) == (1, 2)
    # Where the stride does not divide the axis the last is still a multiple of it: a window no narrower than its
    # stride (Window3D refuses stride > window, so a 3-token axis under stride 4 could not be searched).
    assert axis_sizes(10, 4) == (4, 12) and axis_sizes(3, 4) == (4,)


def _reference_errors(query, key, value, layout, windows, rows, within=None, stride=1):
    """Per head and window: the squared output error of `rows` (video token indices) attending their window's video
    keys and every text key, against all keys, from the token masks (the definition)."""
    start = layout.video_start
    tokens = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    if within is not None:
        tokens[start:, start:] = within.token_mask(layout)[0]
    scores = (query @ key.transpose(-1, -2)) / math.sqrt(query.shape[-1])  # (1, H, N, N)
    full = torch.softmax(scores.masked_fill(~tokens, -math.inf), -1) @ value
    errors = torch.empty(query.shape[1], len(windows))
    for c, window in enumerate(windows):
        kept = Window3D(window, stride).token_mask(layout)[0] & tokens
        out = torch.softmax(scores.masked_fill(~kept, -math.inf), -1) @ value
        errors[:, c] = ((out - full)[0, :, start + rows] ** 2).sum(-1).mean(-1)
    return errors


# The mask is video only. A stride centres each query's window on its group, so some rows keep other keys than
# under stride 1: the losses must follow the pattern's stride.
@pytest.mark.parametrize(
    "text, within, stride", [(0, None, 1), (5, None, 1), (0, FrameCausal(2), 1), (5, None, (1, 2, 2))]
)
def test_losses_are_the_output_errors_of_the_windows_token_masks(text, within, stride):
    layout = VideoLayout(4, 3, 5, text_len=text, text_position="end")
    q, k, v = torch.randn(3, 1, 2, layout.num_tokens, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    pattern = SearchedWindows(stride=stride, num_samples=16, value_dims=8)  # no projection: the exact error
    windows, _, _ = _candidate_densities(pattern.stride, layout, (16, 16), TileOrder((1, 1, 1)))
    generator = torch.Generator().manual_seed(3)
    rows = torch.randperm(layout.num_video_tokens, generator=torch.Generator().manual_seed(3))[:16].sort().values
    if stride != 1:  # else the case could not tell the stride from 1 (it moves the windows of few positions)
        moved = Window3D(windows[0], stride).token_mask(layout)[0] != Window3D(windows[0]).token_mask(layout)[0]
        assert moved[layout.video_start + rows].any()
    errors = pattern._errors(q, k, v, layout, windows, generator, within)
    expected = _reference_errors(q, k, v, layout, windows, rows, within, stride)
    torch.testing.assert_close(errors, expected, atol=1e-5, rtol=1e-4)
    full = len(windows) - 1  # the last candidate covers every axis
    assert all(w >= n for w, n in zip(windows[full], layout.grid))
    assert errors[:, full].abs().max() < 1e-10 and (errors > 1e-4).any()


def test_losses_in_fewer_value_dims_still_see_every_value_dim():
    # Uniform attention; the values differ along dim 1 only. Measured in value_dims=1 a window that leaves keys out
    # must still have an error (a projection of all dims: the first dim alone made every window look exact).
    layout = VideoLayout(1, 1, 4)
    zeros = torch.zeros(1, 1, 4, 2)
    value = torch.zeros(1, 1, 4, 2)
    value[0, 0, :, 1] = torch.tensor([1.0, -1.0, 2.0, -2.0])
    windows = ((1, 1, 1), (1, 1, 4))
    errors = SearchedWindows(value_dims=1)._errors(zeros, zeros, value, layout, windows, None, None)
    assert errors[0, 0] > 1e-3 and errors[0, 1].abs() < 1e-10


def test_allocate_keeps_the_budget_and_gives_local_heads_small_windows():
    densities = torch.tensor([0.1, 0.2, 0.4, 1.0])
    # Head 0 is local (a small window is almost exact), head 1 looks far.
    losses = torch.tensor([[0.01, 0.0, 0.0, 0.0], [1.0, 0.8, 0.3, 0.0]])
    choice = allocate(losses, densities, budget=0.26)
    assert choice.tolist() == [0, 2] and float(densities[choice].mean()) <= 0.26
    assert allocate(losses, densities, budget=1.0).tolist() == [1, 3]  # everything affordable: the least loss
    assert allocate(losses, densities, budget=0.05).tolist() == [0, 0]  # nothing affordable: the sparsest


def test_allocate_gives_every_head_a_candidate_of_exactly_the_budget():
    # Each head's share of the grid is whole: before, 3 heads cut 2048 units into shares of 682.7, a candidate of
    # exactly the budget's density cost 683, and one head of three got the smaller one (keep=1.0 gave 0.934).
    wants_the_larger = torch.tensor([[1.0, 0.0]])  # its loss is 0: with the budget for it, every head takes it
    assert allocate(wants_the_larger.expand(3, 2), torch.tensor([0.5, 1.0]), 1.0).tolist() == [1, 1, 1]
    for heads in (3, 5, 7, 24, 40):
        choice = allocate(wants_the_larger.expand(heads, 2), torch.tensor([0.25, 0.5]), 0.5)
        assert choice.tolist() == [1] * heads, heads


def test_allocate_affords_candidates_that_cost_the_whole_budget():
    # Candidates 0 and 1 are exactly the budget, 2 over it: the least loss among 0 and 1, not the sparsest as when
    # nothing fits.
    assert allocate(torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([0.5, 0.5, 1.0]), 0.5).tolist() == [1]
    # 0.21 * 683 / 0.21 is 683.0000000000001 in floating point: without a tolerance the candidate of exactly the
    # budget cost a step over a head's share, and one head of three lost it.
    densities = torch.tensor([0.1, 0.21], dtype=torch.float64)
    assert allocate(torch.tensor([[1.0, 0.0]]).expand(3, 2), densities, 0.21).tolist() == [1, 1, 1]


def test_allocate_never_spends_more_than_the_budget():
    # Each candidate's cost is its density rounded up to whole units of the budget, so coarse units never let the
    # heads' mean density past the budget (rounding to the nearest unit did).
    generator = torch.Generator().manual_seed(0)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    for _ in range(100):
        heads, count, units = draw(1, 6), draw(1, 8), draw(4, 64)
        densities, losses = torch.rand(count, generator=generator), torch.rand(heads, count, generator=generator)
        budget = 0.05 + 0.9 * float(torch.rand((), generator=generator))
        choice = allocate(losses, densities, budget, units)
        sparsest = bool((choice == densities.argmin()).all())  # when nothing fits
        assert sparsest or float(densities[choice].mean()) <= budget, (densities, budget, units, choice)


@pytest.mark.parametrize("seed", range(5))
def test_allocate_is_at_least_as_good_as_any_choice_within_a_slightly_smaller_budget(seed):
    generator = torch.Generator().manual_seed(seed)
    densities = torch.rand(5, generator=generator).sort().values
    losses = torch.rand(3, 5, generator=generator).sort(dim=1, descending=True).values  # larger windows: less loss
    budget = float(densities.mean())
    choice = allocate(losses, densities, budget)
    # The budget is cut into steps, each density rounded up: anything 1% under it is within reach.
    best = min(
        float(losses[range(3), list(c)].sum())
        for c in itertools.product(range(5), repeat=3) if float(densities[list(c)].mean()) <= 0.99 * budget
    )
    assert float(densities[choice].mean()) <= budget + 1e-9
    assert float(losses[range(3), choice].sum()) <= best + 1e-6


def test_allocate_over_block_counts_affords_a_mix_of_exactly_the_budget():
    # 2 and 4 blocks of 8 average 3 of 8, exactly the budget: the grid rounds each up and misses the mix.
    losses, densities = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0.25, 0.5])
    assert allocate(losses, densities, 0.375).tolist() == [0, 0]
    assert allocate(losses, densities, 0.375, blocks=8).tolist() == [0, 1]
    # Up to `_EXACT_UNITS` blocks over all heads the count decides; past them the grid, as without a count.
    assert allocate(losses, densities, 0.375, blocks=window_search._EXACT_UNITS // 2).tolist() == [0, 1]
    many = window_search._EXACT_UNITS // 2 + 8
    assert allocate(losses, densities, 0.375, blocks=many).tolist() == [0, 0]


@pytest.mark.parametrize("seed", range(4))
def test_allocate_over_block_counts_is_the_best_choice_within_the_budget(seed):
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    for _ in range(40):
        heads, count, blocks = draw(1, 3), draw(2, 5), draw(4, 40)
        counts = torch.randint(1, blocks + 1, (count,), generator=generator)
        densities, losses = counts.double() / blocks, torch.rand(heads, count, generator=generator)
        # Often exactly the mean of some choice, where rounding would miss it.
        pick = torch.randint(0, count, (heads,), generator=generator)
        anywhere = 0.05 + 0.9 * float(torch.rand((), generator=generator))
        budget = float(densities[pick].mean()) if draw(0, 1) else anywhere
        choice, allowed = allocate(losses, densities, budget, blocks=blocks), budget * heads * blocks + 1e-9
        choices = itertools.product(range(count), repeat=heads)
        within = [c for c in choices if int(counts[list(c)].sum()) <= allowed]
        if not within:
            assert (choice == densities.argmin()).all()
            continue
        best = min(float(losses[range(heads), list(c)].sum()) for c in within)
        assert int(counts[choice].sum()) <= allowed, (counts, budget, choice)
        assert float(losses[range(heads), choice].sum()) <= best + 1e-9, (counts, budget, choice)


def test_search_shares_the_budget_over_whole_blocks(monkeypatch):
    # On this layout (25 blocks of 16) the windows (1, 1, 1) and (1, 1, 3) keep 5 and 13 blocks: a mean of 9 of 25
    # is exactly keep=0.36, which the 2048-step grid could not afford (both heads got the smallest window).
    layout = VideoLayout(3, 5, 5)
    windows, densities, blocks = _candidate_densities((1, 1, 1), layout, (16, 16), TileOrder((1, 1, 1)))
    assert blocks == 25 and [float(densities[windows.index(w)]) * 25 for w in ((1, 1, 1), (1, 1, 3))] == [5, 13]
    losses = torch.ones(2, len(windows))
    losses[0, windows.index((1, 1, 1))] = losses[1, windows.index((1, 1, 3))] = 0
    monkeypatch.setattr(SearchedWindows, "_errors", lambda *args: losses)
    q = torch.randn(1, 2, layout.num_tokens, 8)
    searched = SearchedWindows(keep=0.36).search(q, q, q, layout, 16, order=TileOrder((1, 1, 1)))
    assert searched.window == ((1, 1, 1), (1, 1, 3))
    assert searched.density(layout, 16, TileOrder((1, 1, 1))) == pytest.approx(0.36)


def test_search_gives_per_head_windows_under_the_budget_and_needs_a_search_first():
    layout = VideoLayout(6, 8, 8)
    generator = torch.Generator().manual_seed(0)
    frame_code = 4 * torch.randn(6, 1, 16, generator=generator)
    local = frame_code.expand(6, 64, 16).reshape(1, 1, 384, 16)  # alike within a frame: one frame is enough
    broad = torch.randn(1, 1, 384, 16, generator=generator) * 0.1  # nearly uniform: wants wide windows
    q = torch.cat([local, broad], dim=1)
    v = torch.randn(1, 2, 384, 16, generator=generator)
    unsearched = SearchedWindows(keep=0.5)
    with pytest.raises(ValueError, match="no windows before a search"):
        unsearched.block_mask(layout, 64)
    searched = unsearched.fit(q, q, v, layout, 64)
    assert searched.num_heads == 2 and searched.windows[0][0] == 1 and searched.windows[1][0] > 1
    assert searched.density(layout, 64) <= 0.5
    assert torch.equal(searched.block_mask(layout, 64), Window3D(list(searched.windows)).block_mask(layout, 64))
    assert searched.at_density(layout, 0.5, 64) is searched and unsearched.at_density(None, 0.3, 64).keep == 0.3
    with pytest.raises(ValueError, match="search again"):
        searched.at_density(layout, 0.3, 64)
    # A bad target is named as at_density's argument, as Pattern.at_density names it: before, the message named
    # `keep` (unsearched) or asked to search again (searched).
    for pattern, bad in itertools.product((unsearched, searched), (0, 1.5, "0.5", True)):
        with pytest.raises(ValueError, match=r"target must be a block density in \(0, 1\], got target="):
            pattern.at_density(layout, bad, 64)
    for bad in ({"keep": 0}, {"keep": 1.5}, {"num_samples": 0}, {"value_dims": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SearchedWindows(**bad)


def test_under_a_tile_order_the_budget_holds_for_the_blocks_of_that_order():
    # A window's block density depends on the order the kernel sees (tiles gather a window into fewer blocks, or
    # spread it over more): the candidates are priced in the order searched for.
    layout, order = VideoLayout(4, 6, 6), TileOrder((2, 2, 2))
    q, k, v = (torch.randn(1, 4, 144, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    for keep in (0.2, 0.3, 0.5):
        searched = SearchedWindows(keep=keep).search(q, k, v, layout, 8, order)
        assert searched.density(layout, 8, order) <= keep


def test_with_a_query_span_the_budget_holds_for_the_blocks_of_those_queries():
    # The runtime's `video_queries` calls compute the video's rows only: the candidates are priced over those rows'
    # blocks. Priced over the whole layout, the text rows (every key block) took budget the call never spends: the
    # video's rows ran at 0.21 for 0.3 with a fifth of the rows text.
    layout = VideoLayout(1, 32, 32, text_len=128, text_position="start")
    span = (128, layout.num_tokens)
    q, k, v = (torch.randn(1, 4, layout.num_tokens, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    windows, densities, _ = _candidate_densities((1, 1, 1), layout, (16, 16), TileOrder((1, 1, 1)), span)
    assert torch.equal(densities, torch.tensor([Window3D(w).density(layout, 16, q_tokens=span) for w in windows],
                                               dtype=torch.float64))
    for keep in (0.3, 0.5):
        searched = SearchedWindows(keep=keep).search(q, k, v, layout, 16, q_tokens=span)
        assert keep - 0.05 <= searched.density(layout, 16, q_tokens=span) <= keep
        whole = SearchedWindows(keep=keep).search(q, k, v, layout, 16)
        assert whole.density(layout, 16, q_tokens=span) < keep - 0.05  # what the runtime ran before
    with pytest.raises(ValueError, match=r"q_tokens must be a \(start, stop\) pair"):
        SearchedWindows().search(q, k, v, layout, 16, q_tokens=(128, 2000))


def test_a_candidate_of_exactly_the_budget_s_density_is_affordable_for_every_head():
    # Densities kept in float32 put this (1, 5, 1) window's 0.6 at 0.6000000238, one grid step over a head's share
    # of a 0.6 budget: two heads of three got it, the third the sparsest window.
    layout = VideoLayout(3, 5, 5)
    windows, densities, _ = _candidate_densities((1, 1, 1), layout, (16, 16), TileOrder((1, 1, 1)))
    best = windows.index((1, 5, 1))
    assert Window3D((1, 5, 1)).density(layout, 16) == 0.6 and densities[best] == 0.6
    losses = torch.ones(3, len(windows))
    losses[:, best] = 0
    assert allocate(losses, densities, 0.6).tolist() == [best] * 3


def test_keep_one_keeps_every_block_whatever_the_head_count():
    layout = VideoLayout(4, 6, 6)
    q, k, v = torch.randn(3, 1, 3, layout.num_tokens, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    searched = SearchedWindows(keep=1.0).search(q, k, v, layout, 16)
    assert searched.density(layout, 16) == 1.0, searched.windows


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 2, 64, 4), (1, 1, 64, 4), (1, 1, 64, 4)), "share batch and heads"),  # heads
        (((2, 1, 64, 4), (1, 1, 64, 4), (1, 1, 64, 4)), "share batch and heads"),  # batch
        (((1, 1, 64, 4), (1, 1, 64, 4), (1, 2, 64, 4)), "share batch and heads"),  # the value's heads
        (((1, 1, 64, 4), (1, 1, 64, 8), (1, 1, 64, 4)), "query and key must share their head dim"),
        (((1, 1, 64, 4), (1, 1, 64, 4), (1, 1, 48, 4)), "layout.num_tokens=64"),
        (((1, 64, 4), (1, 1, 64, 4), (1, 1, 64, 4)), r"\(B, H, N, D\) tensors"),
    ],
)
def test_search_refuses_queries_keys_and_values_that_do_not_match(shapes, match):
    # Before, a query batch of 2 over a key batch of 1 broadcast and returned windows; the others raised
    # IndexError or RuntimeError from deep inside.
    q, k, v = (torch.randn(shape) for shape in shapes)
    named = ", ".join(f"{name}={shape}" for name, shape in zip(("query", "key", "value"), shapes))
    with pytest.raises(ValueError, match=match) as error:
        SearchedWindows().search(q, k, v, VideoLayout(4, 4, 4), 16)
    assert named in str(error.value)
    with pytest.raises(ValueError, match="give value, not None"):
        SearchedWindows().search(q, k, None, VideoLayout(4, 4, 4), 16)
    v_wide = torch.randn(1, 1, 64, 12)  # only the values' head dim may differ
    assert SearchedWindows().search(torch.randn(1, 1, 64, 4), torch.randn(1, 1, 64, 4), v_wide,
                                    VideoLayout(4, 4, 4), 16).num_heads == 1


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "a"])
def test_at_density_refuses_a_bad_max_iter_searched_or_not(bad):
    layout = VideoLayout(4, 4, 4)
    searched = SearchedWindows(keep=0.5).search(*(torch.randn(1, 1, 64, 4) for _ in range(3)), layout, 16)
    for pattern in (SearchedWindows(), searched):
        with pytest.raises(ValueError, match="max_iter must be an int >= 1"):
            pattern.at_density(layout, 0.5, 16, max_iter=bad)


def test_positional_arguments_are_keep_then_stride_and_the_window_is_the_searchs():
    # Before, the fields came in Window3D's order: SearchedWindows(0.5) was a window of 0.5, SearchedWindows(3) a
    # pattern with window=3 that looked searched.
    assert SearchedWindows(0.5) == SearchedWindows(keep=0.5) and SearchedWindows(0.5).window is None
    assert SearchedWindows(0.5, 2) == SearchedWindows(keep=0.5, stride=(2, 2, 2))
    with pytest.raises(ValueError, match="keep must be a block density"):
        SearchedWindows(3)
    with pytest.raises(TypeError):
        SearchedWindows(0.5, 1, 32, 32, 0, (1, 2, 2))  # the window is keyword-only: the search sets it
    assert get_pattern("searched_windows(keep=0.3, stride=(1, 2, 2))") == SearchedWindows(0.3, (1, 2, 2))
    # A window given in a spec would be replaced by the search without a word; the error lists what a spec takes.
    for spec, params in (("searched_windows(window=(3, 3, 3))", {}), ("searched_windows", {"window": 3})):
        with pytest.raises(ValueError, match=r"window=.* is set by searched_windows's search.*leave it out"):
            get_pattern(spec, **params)
    with pytest.raises(ValueError, match=r"takes keep, stride, num_samples, value_dims, refresh; got 'windows'$"):
        get_pattern("searched_windows(windows=3)")
    searched = SearchedWindows(0.5).search(*(torch.randn(1, 2, 32, 4) for _ in range(3)), VideoLayout(2, 4, 4), 8)
    assert searched.num_heads == 2 and dataclasses.replace(searched, keep=0.5) == searched


def test_searched_windows_cannot_be_combined_with_rules():
    # The runtime fits the pattern it is given, not a composition's parts: the windows would never be searched.
    with pytest.raises(ValueError, match="cannot be combined: its blocks come from fitting it"):
        SearchedWindows() | FrameSink()
    with pytest.raises(ValueError, match="cannot be combined: its blocks come from fitting it"):
        FrameSink() & SearchedWindows()


def test_sharded_heads_choose_as_one_process():
    # Two processes holding two heads each: the budget is shared over all four, as one process shares it.
    layout = VideoLayout(4, 6, 6)
    q, k, v = torch.randn(3, 1, 4, layout.num_tokens, 8, generator=torch.Generator().manual_seed(1)).unbind(0)
    q[:, 2:] *= 4  # two diffuse heads, two sharp ones
    pattern = SearchedWindows(keep=0.4)
    whole = pattern.search(q, k, v, layout, 16)
    # The processes' heads get different windows: else a shard that took the first heads' windows, not its own,
    # would pass (with the sharp heads first, both halves were ((1, 6, 6), (1, 5, 6))).
    assert whole.windows[:2] != whole.windows[2:]
    losses = {}

    def gather(first):
        def all_heads(local):
            losses[first] = local
            other = pattern._errors(*(x[:, 2 - first : 4 - first] for x in (q, k, v)), layout,
                                    _candidate_densities(pattern.stride, layout, (16, 16), TileOrder((1, 1, 1)))[0],
                                    torch.Generator().manual_seed(0), None)
            return torch.cat([local, other] if first == 0 else [other, local])
        return all_heads

    for first in (0, 2):
        shard = HeadShard(first, 4, gather(first))
        part = pattern.search(*(x[:, first : first + 2] for x in (q, k, v)), layout, 16, shard=shard)
        assert part.windows == whole.windows[first : first + 2]


def test_the_runtime_searches_each_layer_once_per_generation(tiny_pipe, monkeypatch):
    searched = []
    search = SearchedWindows.search

    def counted(self, *args, **kwargs):
        found = search(self, *args, **kwargs)
        searched.append(found)
        return found

    monkeypatch.setattr(SearchedWindows, "search", counted)
    reference = generate(tiny_pipe)
    config = diffsparse.SparseConfig(pattern="searched_windows", density=0.3, block_size=16, dense_steps=1)
    assert config.resolved_pattern == SearchedWindows(keep=0.3)
    with diffsparse.sparse(tiny_pipe, config) as handle:
        out = generate(tiny_pipe)
        stats = handle.stats()
    assert not torch.allclose(out, reference, atol=1e-4)
    # One search per layer at its first sparse call, shared by both CFG branches and the later steps.
    assert len(searched) == len(stats.layers) and all(s.num_heads > 1 for s in searched)
    assert all(0 < layer.mean_density <= 0.3 for layer in stats.layers)
    with diffsparse.sparse(tiny_pipe, diffsparse.SparseConfig(pattern="searched_windows", density=1.0, dense_steps=0)):
        torch.testing.assert_close(generate(tiny_pipe), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("refresh, searched_at", [(0, [1]), (2, [1, 3])])
def test_refresh_searches_again_every_refresh_steps(tiny_pipe, monkeypatch, refresh, searched_at):
    steps = []
    search = SearchedWindows.search

    def counting(self, *args, **kwargs):
        steps.append(runtime._state().step)
        return search(self, *args, **kwargs)

    monkeypatch.setattr(SearchedWindows, "search", counting)
    config = diffsparse.SparseConfig(pattern=f"searched_windows(refresh={refresh})", density=0.5, block_size=16,
                                     dense_steps=1)
    assert config.resolved_pattern == SearchedWindows(keep=0.5, refresh=refresh)
    with diffsparse.sparse(tiny_pipe, config) as handle:
        runtime = handle.runtimes["transformer"]
        generate(tiny_pipe, num_inference_steps=4)
    assert steps == [s for s in searched_at for _layer in range(2)]  # both layers, once per search step
    with pytest.raises(ValueError, match="refresh"):
        SearchedWindows(refresh=-1)


def test_search_refuses_a_model_mask_that_is_not_frame_causal():
    layout = VideoLayout(2, 2, 2)
    q = torch.randn(1, 1, layout.num_tokens, 4)
    with pytest.raises(ValueError, match=r"within must be a FrameCausal mask or None, got within=window3d"):
        SearchedWindows().search(q, q, q, layout, 4, within=Window3D((1, 1, 1)))
