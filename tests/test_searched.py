"""Searched blocks: exact block mass, budgets, the searched mask as a pattern, and the search in a pipeline."""

import functools
import itertools
import math
import re
import threading

import pytest
import torch
from diffusers.hooks.hooks import CacheContext

import diffsparse
from diffsparse.kernels import block_sparse_attention, make_plan
from diffsparse.patterns import (
    FrameCausal,
    FrameSink,
    HeadShard,
    Searched,
    TileOrder,
    VideoLayout,
    get_pattern,
    reduce_token_mask,
)
from diffsparse.patterns.base import as_pair
from diffsparse.patterns.searched import (
    BUDGETS,
    _row_budgets,
    _share_budget,
    block_attention_mass,
    greedy_blocks,
    pooled_block_mass,
    select_blocks,
)
from diffsparse.pipelines.base import attend_kept_tokens, attend_valid_prefixes
from diffsparse.runtime import SparseRuntime

from helpers import generate, two_prompts_keeping_as_many_text_tokens


def _qkv(layout, heads=2, dim=8, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = layout.num_tokens
    return tuple(2 * torch.randn(batch, heads, n, dim, generator=g) for _ in range(3))


@pytest.mark.parametrize("block_size", [4, (8, 4), (5, 7)])
@pytest.mark.parametrize("batch", [1, 2])
def test_block_mass_matches_the_dense_softmax_reduced_to_blocks(block_size, batch, monkeypatch):
    q, k, _ = _qkv(VideoLayout(frames=3, height=3, width=4), batch=batch)  # 36 tokens: partial last blocks
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, N, N)
    n = q.shape[2]
    expected = torch.zeros(2, math.ceil(n / bq), math.ceil(n / bk))
    for i in range(expected.shape[1]):
        for j in range(expected.shape[2]):
            block = probs[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            expected[:, i, j] = block.sum(-1).mean(-1).mean(0)  # keys summed, queries and batch averaged
    torch.testing.assert_close(block_attention_mass(q, k, block_size), expected)
    monkeypatch.setattr("diffsparse.patterns.searched._CHUNK", 1)  # one query block per chunk
    torch.testing.assert_close(block_attention_mass(q, k, block_size), expected)


def _probs(q, k, groups=None):
    """The dense softmax; under a causal group rule (`groups[s] <= groups[r]`), the masked one."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if groups is not None:
        logits = logits.masked_fill(groups[None, :] > groups[:, None], -torch.inf)
    return torch.softmax(logits, dim=-1)


def _best_next_block(q, k, v, kept: torch.Tensor, rows: slice, head: int, groups=None) -> int:
    """Brute force: the key block (of 8 tokens) whose addition to `kept` gives the least squared error of the
    renormalised sparse attention output against dense (masked by `groups`), summed over `rows` and the batch, for
    `head`; blocks the mask leaves wholly out are not candidates."""
    probs = _probs(q, k, groups)[:, head, rows]
    dense = probs @ v[:, head]
    block_of_key = torch.arange(k.shape[2]) // 8
    errors = []
    for j in range(len(kept)):
        candidate = kept.clone()
        candidate[j] = True
        masked = probs * candidate[block_of_key]
        sparse = (masked / masked.sum(-1, keepdim=True)) @ v[:, head]
        refused = probs[..., block_of_key == j].sum() == 0
        errors.append(math.inf if kept[j] or refused else float((sparse - dense).square().sum()))
    return int(torch.tensor(errors).argmin())


@pytest.mark.parametrize("batch", [1, 2])
def test_each_greedy_step_adds_the_block_with_the_least_exact_error(batch, monkeypatch):
    layout = VideoLayout(frames=3, height=3, width=4)  # 36 tokens, blocks of 8: 5 blocks, the last partial
    q, k, v = _qkv(layout, batch=batch, seed=4)
    required = torch.eye(5, dtype=torch.bool)
    one_step = greedy_blocks(q, k, v, 8, keep=0.4, required=required)  # 2 of 5 blocks: one greedy step
    two_steps = greedy_blocks(q, k, v, 8, keep=0.6, required=required)
    for head in range(2):
        for i in range(5):
            rows = slice(8 * i, 8 * i + 8)
            first = _best_next_block(q, k, v, required[i], rows, head)
            assert one_step[head, i].nonzero().flatten().tolist() == sorted({i, first})
            second = _best_next_block(q, k, v, one_step[head, i], rows, head)
            assert torch.equal(two_steps[head, i], one_step[head, i] | (torch.arange(5) == second))
    monkeypatch.setattr("diffsparse.patterns.searched._CHUNK", 1)  # one head and query block per chunk
    assert torch.equal(greedy_blocks(q, k, v, 8, keep=0.6, required=required), two_steps)


def test_under_a_causal_mask_the_search_measures_the_masked_attention():
    # SkyReels-V2's causal frame groups: 36 tokens, groups of one frame (12 tokens), blocks of 8 (block 1 straddles
    # groups 0 and 1). Query block 0 may attend key blocks 0-1 only; blocks 1-2 up to key block 2; 3-4 all five.
    layout = VideoLayout(frames=3, height=3, width=4)
    q, k, v = _qkv(layout, seed=4)
    groups = FrameCausal(1).video_groups(layout)
    allowed = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    expected = torch.zeros(2, 5, 5)
    probs = _probs(q, k, groups)
    for i in range(5):
        for j in range(5):
            expected[:, i, j] = probs[0, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].sum(-1).mean(-1)
    torch.testing.assert_close(block_attention_mass(q, k, 8, groups), expected)
    assert torch.equal(expected[0] > 0, allowed)

    required = torch.eye(5, dtype=torch.bool)
    one_step = greedy_blocks(q, k, v, 8, keep=0.4, required=required, groups=groups)  # the diagonal and one more
    for head in range(2):
        for i in range(5):
            first = _best_next_block(q, k, v, required[i], slice(8 * i, 8 * i + 8), head, groups)
            assert one_step[head, i].nonzero().flatten().tolist() == sorted({i, first}) and allowed[i, first]
    assert not torch.equal(one_step, greedy_blocks(q, k, v, 8, keep=0.4, required=required))  # the mask mattered
    # The budget, 4 of 5 key blocks, is capped at the blocks a query block may attend; none beyond them is kept.
    most = greedy_blocks(q, k, v, 8, keep=0.8, required=required, groups=groups)
    assert torch.equal(most.sum(-1), torch.tensor([[2, 3, 3, 4, 4]] * 2)) and not (most & ~allowed).any()
    with pytest.raises(ValueError, match="without text"):
        text = VideoLayout(frames=3, height=3, width=4, text_len=4)
        Searched().search(*_qkv(text), text, 8, within=FrameCausal(1))


def test_under_a_causal_mask_query_blocks_start_at_each_group():
    # Groups of one frame (12 tokens), blocks of 8: searched query blocks [0, 8), [8, 12), [12, 20), [20, 24), ...
    # as the runtime's per-group kernel calls count them, so a group's calls run its searched rows as they are.
    layout = VideoLayout(frames=3, height=3, width=4)
    q, k, v = _qkv(layout, seed=4)
    groups = FrameCausal(1).video_groups(layout)
    starts = torch.tensor([0, 8, 12, 20, 24, 32])
    searched = Searched(keep=0.4, budget="row").search(q, k, v, layout, 8, within=FrameCausal(1))
    rows = [searched.block_mask(layout, 8, q_tokens=(a, a + 12), k_tokens=(0, a + 12)) for a in (0, 12, 24)]
    assert [tuple(r.shape) for r in rows] == [(2, 2, 2), (2, 2, 3), (2, 2, 5)]
    assert [r.sum(-1).tolist() for r in rows] == [[[2, 2]] * 2] * 3  # two of five key blocks in every row
    required = Searched._required(layout, (8, 8), starts)
    assert required.nonzero().tolist() == [[0, 0], [1, 1], [2, 1], [3, 2], [4, 3], [5, 4]]  # diagonals
    kept = greedy_blocks(q, k, v, 8, keep=0.4, required=required, groups=groups, q_starts=starts)
    for group, width in enumerate((2, 3, 5)):  # the searched rows, and nothing kept past the group's keys
        assert torch.equal(rows[group], kept[:, 2 * group : 2 * group + 2, :width])
        assert not kept[:, 2 * group : 2 * group + 2, width:].any()
    for head in range(2):
        for i, (a, b) in enumerate(zip(starts.tolist(), [*starts[1:].tolist(), 36])):
            first = _best_next_block(q, k, v, required[i], slice(a, b), head, groups)
            assert kept[head, i].nonzero().flatten().tolist() == sorted({int(required[i].nonzero()), first})
    tokens = searched.token_mask(layout)
    for a in (0, 12, 24):
        assert torch.equal(rows[a // 12], reduce_token_mask(tokens[:, a : a + 12, : a + 12], 8))
    mass = block_attention_mass(q, k, 8, groups, q_starts=starts)
    probs = _probs(q, k, groups)[0]
    for i, (a, b) in enumerate(zip(starts.tolist(), [*starts[1:].tolist(), 36])):
        expected = torch.stack([probs[:, a:b, 8 * j : 8 * j + 8].sum(-1).mean(-1) for j in range(5)], -1)
        torch.testing.assert_close(mass[:, i], expected)
    assert torch.equal(pooled_block_mass(q, k, 8, groups, q_starts=starts)[0] > 0, mass > 0)  # allowed blocks only
    with pytest.raises(ValueError, match="q_starts must increase"):
        block_attention_mass(q, k, 8, q_starts=torch.tensor([0, 12]))  # a block of 12 tokens


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_searched_mask_between_token_ranges_is_its_token_mask_there_reduced(order):
    # A causal group's queries against the keys up to its end (the per-group kernel calls), blocks counted from
    # the ranges' starts: each such block keeps what the searched blocks it overlaps kept.
    layout = VideoLayout(frames=3, height=4, width=4)
    q, k, v = _qkv(layout)
    pattern = Searched(keep=0.4).search(q, k, v, layout, 8, order=order)
    tokens = pattern.token_mask(layout, order=order)
    for q_tokens, k_tokens in (((16, 32), (0, 32)), ((5, 47), (0, 47)), ((32, 48), (3, 40))):
        expected = reduce_token_mask(tokens[:, slice(*q_tokens), slice(*k_tokens)], 8)
        assert torch.equal(pattern.block_mask(layout, 8, order=order, q_tokens=q_tokens, k_tokens=k_tokens), expected)
    with pytest.raises(ValueError, match="q_tokens must be"):
        pattern.block_mask(layout, 8, order=order, q_tokens=(10, 5))


@pytest.mark.parametrize("budget", ["head", "layer"])
def test_greedy_shared_budgets_hand_the_row_budgets_blocks_to_the_sets_that_gain_most(budget, monkeypatch):
    # Head 0 attends its own frame only (the diagonal block says it all); head 1 attends every frame alike.
    layout = VideoLayout(frames=5, height=2, width=4)  # 40 tokens, blocks of 8: one frame each
    frame = torch.arange(40) // 8
    codes = 8 * torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(1)
    q = torch.stack([codes[frame], 0.1 * torch.randn(40, 16, generator=g)])[None]
    k = torch.stack([codes[frame], torch.randn(40, 16, generator=g)])[None]
    v = torch.randn(1, 2, 40, 16, generator=g)
    required = torch.eye(5, dtype=torch.bool)
    row = greedy_blocks(q, k, v, 8, keep=0.4, required=required)
    shared = greedy_blocks(q, k, v, 8, keep=0.4, required=required, budget=budget)
    if budget == "layer":
        assert shared.sum() == row.sum() and shared[1].sum() > row[1].sum()  # the diffuse head gets more
    else:
        assert torch.equal(shared.sum((1, 2)), row.sum((1, 2)))  # each head keeps its own total
    assert not torch.equal(shared, row)
    # Each set is a prefix of its greedy sequence: the row-budget set of the same size.
    sequence = [greedy_blocks(q, k, v, 8, keep=n / 5, required=required) for n in range(1, 6)]
    for head in range(2):
        for i in range(5):
            size = int(shared[head, i].sum())
            assert torch.equal(shared[head, i], sequence[size - 1][head, i])
    searched = Searched(keep=0.4, budget=budget).search(q, k, v, layout, 8)
    assert torch.equal(searched.block_mask(layout, 8), shared)
    with pytest.raises(ValueError, match="budget must be one of"):
        greedy_blocks(q, k, v, 8, keep=0.4, required=required, budget="frame")
    # Chunked (one head and query block at a time) alike, on inputs without near-tied gains (head 0's are ~0 here).
    q, k, v = _qkv(VideoLayout(frames=3, height=3, width=4), seed=4)
    whole = greedy_blocks(q, k, v, 8, keep=0.4, required=required, budget=budget)
    monkeypatch.setattr("diffsparse.patterns.searched._CHUNK", 1)
    assert torch.equal(greedy_blocks(q, k, v, 8, keep=0.4, required=required, budget=budget), whole)


@pytest.mark.parametrize("budget", ["head", "layer"])
def test_greedy_shared_budgets_go_to_the_diffuse_query_blocks_by_their_relative_gains(budget):
    # Head 0's queries of frames 0-1 attend their own frame only (the diagonal block is their whole output), those
    # of frames 2-4 every key alike; head 1 attends every key alike. Within head 0 the right allocation is known.
    frame = torch.arange(40) // 8  # 5 frames of 2 x 4 tokens, blocks of 8: one frame each
    codes = 8 * torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(1)
    local = (frame < 2)[:, None]
    q = torch.stack([torch.where(local, codes[frame], 0.1 * torch.randn(40, 16, generator=g)),
                     0.1 * torch.randn(40, 16, generator=g)])[None]
    k = torch.stack([torch.where(local, codes[frame], torch.randn(40, 16, generator=g)),
                     torch.randn(40, 16, generator=g)])[None]
    v = torch.randn(1, 2, 40, 16, generator=g)
    required = torch.eye(5, dtype=torch.bool)
    row = greedy_blocks(q, k, v, 8, keep=0.4, required=required)
    shared = greedy_blocks(q, k, v, 8, keep=0.4, required=required, budget=budget)
    assert shared.sum() == row.sum() and torch.equal(shared[0, :2], required[:2])  # a local set gains nothing
    if budget == "head":  # so head 0's diffuse sets take all of its extra blocks
        assert torch.equal(shared.sum((1, 2)), row.sum((1, 2))) and shared[0, 2:].sum() == row[0].sum() - 2
    # Gains are relative to each set's dense output energy, so scaling a head's values moves no block; absolute
    # gains would hand that head the layer's budget. A power of two keeps the relative gains bit for bit.
    for head in range(2):
        scaled = v.clone()
        scaled[:, head] *= 16
        assert torch.equal(greedy_blocks(q, k, scaled, 8, keep=0.4, required=required, budget=budget), shared)


def _in_shards(fit, heads: int, parts: int = 2) -> torch.Tensor:
    """`fit(first, count, shard)` for each of `parts` consecutive slices of the heads, each in its own thread as
    the processes of a Ulysses split run, `HeadShard.gather` being an all-gather between the threads; the results
    concatenated in head order."""
    count, barrier = heads // parts, threading.Barrier(parts, timeout=60)
    slots, results = [None] * parts, [None] * parts

    def gather(rank, x):
        slots[rank] = x
        barrier.wait()
        full = torch.cat(slots)
        barrier.wait()  # all have read before the next gather writes
        return full

    def run(rank):
        try:
            results[rank] = fit(rank * count, count, HeadShard(rank * count, heads, functools.partial(gather, rank)))
        except BaseException as error:  # noqa: BLE001  (re-raised below, in the test's thread)
            results[rank] = error
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return torch.cat(results)


@pytest.mark.parametrize("criterion", ["greedy", "mass"])
def test_a_layer_budget_split_over_processes_by_heads_is_shared_as_one_process_shares_it(criterion):
    # Heads 0-1 attend their own frame only, heads 2-3 every frame alike: the concentrated half gives blocks away.
    layout = VideoLayout(frames=5, height=2, width=4)  # 40 tokens, blocks of 8: one frame each
    frame = torch.arange(40) // 8
    codes = 8 * torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(1)
    q = torch.stack([codes[frame]] * 2 + [0.1 * torch.randn(40, 16, generator=g) for _ in range(2)])[None]
    k = torch.stack([codes[frame]] * 2 + [torch.randn(40, 16, generator=g) for _ in range(2)])[None]
    v = torch.randn(1, 4, 40, 16, generator=g)
    pattern = Searched(keep=0.4, criterion=criterion, budget="layer")
    whole = pattern.search(q, k, v, layout, 8).block_mask(layout, 8)
    assert whole[2:].sum() > whole[:2].sum()

    def fit(first, count, shard):
        heads = slice(first, first + count)
        return pattern.fit(q[:, heads], k[:, heads], v[:, heads], layout, 8, shard=shard).block_mask(layout, 8)

    assert torch.equal(_in_shards(fit, heads=4), whole)
    alone = torch.cat([fit(first, 2, None) for first in (0, 2)])  # each half shares only among its own heads
    assert alone[2:].sum() == alone[:2].sum() and not torch.equal(alone, whole)


def test_a_greedy_step_never_picks_a_block_the_mask_refuses_even_where_it_would_cost_nothing():
    # A block the causal mask leaves no pair of has no mass and pulls nothing: here it is also the one of least
    # error, so only the refusal keeps a step from spending the budget on a block every token of which is masked.
    from diffsparse.patterns.searched import _grow

    pull, mass = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 1, 3, 1), torch.ones(1, 1, 1, 3)
    kept, count = torch.zeros(1, 1, 3, dtype=torch.bool), torch.tensor([1])
    assert _grow(pull, mass, kept, count, torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[[True, False, False]]]
    assert _grow(pull, mass, kept, count, torch.tensor([[True, False, False]])).tolist() == [[[False, True, False]]]


def test_greedy_keeps_a_diffuse_heads_average_better_than_the_top_mass_blocks():
    layout = VideoLayout(frames=8, height=4, width=4)
    g = torch.Generator().manual_seed(0)
    q = 0.1 * torch.randn(1, 1, 128, 16, generator=g)  # nearly uniform attention: the output is an average
    k = torch.randn(1, 1, 128, 16, generator=g)
    v = torch.randn(1, 1, 128, 16, generator=g) + torch.linspace(-2, 2, 128)[None, None, :, None]
    dense = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v

    def error(criterion):
        mask = Searched(keep=0.25, criterion=criterion).search(q, k, v, layout, 16).block_mask(layout, 16)
        return ((block_sparse_attention(q, k, v, make_plan(mask[None], 128, 128, 16)) - dense).norm() / dense.norm())

    assert error("greedy") < 0.5 * error("mass")


def test_greedy_sampling_and_projection_keep_the_budget():
    layout = VideoLayout(frames=4, height=4, width=8)
    q, k, v = _qkv(layout, dim=64)
    required = Searched._required(layout, (32, 16))
    for rows, dims in ((32, 64), (4, 8), (1, 1)):
        kept = greedy_blocks(q, k, v, (32, 16), keep=0.5, required=required, sample_rows=rows, value_dims=dims)
        assert (kept.sum(-1) == 4).all() and kept[:, required].all()
    approximate = Searched(keep=0.5, sample_rows=8, value_dims=16)
    assert approximate.search(q, k, v, layout, (32, 16)) == approximate.search(q, k, v, layout, (32, 16))  # seeded


def test_greedy_error_sees_every_value_dim_and_each_query_of_a_short_block_once():
    # Uniform attention over four key blocks pulling +1, +1, -1, -1 along value dim 1 only: the dense output is 0,
    # so from the diagonal block 0 the set that keeps it is {0, 2}. Measured in value_dims=1 the error must still
    # see dim 1 (a projection, not the first dims, under which every set looked exact and block 1 came first).
    zeros = torch.zeros(1, 1, 16, 2)
    v = torch.zeros(1, 1, 16, 2)
    v[0, 0, :, 1] = torch.tensor([1.0, 1, -1, -1]).repeat_interleave(4)
    kept = greedy_blocks(zeros, zeros, v, 4, keep=0.5, required=torch.eye(4, dtype=torch.bool), value_dims=1,
                         budget="row")
    assert kept[0, 0].tolist() == [True, False, True, False]
    # Blocks of 5 queries, fewer than sample_rows: each query counts once, as with sample_rows=5 (before the rows were
    # drawn 32 times at uneven repeats, 7 and 6, which weighted some queries more and changed the blocks kept).
    q, k, v = torch.randn(3, 1, 4, 40, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    required = torch.eye(8, dtype=torch.bool)
    assert torch.equal(greedy_blocks(q, k, v, 5, keep=0.5, required=required, budget="layer"),
                       greedy_blocks(q, k, v, 5, keep=0.5, required=required, budget="layer", sample_rows=5))


@pytest.mark.parametrize("budget", ["row", "layer", "head"])
def test_a_budget_no_larger_than_the_required_blocks_keeps_them(budget):
    # At 10% of 4 key blocks the budget rounds to nothing beyond the diagonal: the greedy search has no step to
    # take. Before, budget="head" then divided by zero.
    layout = VideoLayout(frames=4, height=4, width=4)
    q, k, v = _qkv(layout, dim=8)
    searched = Searched(keep=0.1, budget=budget).search(q, k, v, layout, 16)
    assert searched.density(layout, 16) == 0.25


def test_budgets_keep_the_share_asked_for_and_the_most_mass():
    mass = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0))
    required = torch.eye(10, dtype=torch.bool)
    for budget in ("layer", "head", "row"):
        kept = select_blocks(mass, 0.3, budget, required)
        assert kept[:, required].all()
        assert kept.sum() == 90, budget  # 30% of 3 x 10 x 10
        free = ~required.expand_as(kept)
        if budget == "layer":  # every dropped free block has less mass than every kept free block
            assert mass[kept & free].min() >= mass[~kept].max()
        elif budget == "head":
            assert (kept.sum((1, 2)) == 30).all()
            for h in range(3):
                assert mass[h][kept[h] & free[h]].min() >= mass[h][~kept[h]].max()
        else:
            assert (kept.sum(-1) == 3).all()
    # A concentrated head gives blocks to a diffuse one under the layer budget, not under the head budget.
    skewed = torch.stack([torch.eye(10) + 1e-3, torch.full((10, 10), 0.1)])
    layer = select_blocks(skewed, 0.3, "layer", required)
    assert layer[0].sum() == 10 and layer[1].sum() == 50
    assert (select_blocks(skewed, 0.3, "head", required).sum((1, 2)) == 30).all()
    # Required blocks come first even against infinite scores.
    infinite = torch.full((1, 2, 2), math.inf)
    assert torch.equal(select_blocks(infinite, 0.5, "layer", torch.eye(2, dtype=torch.bool))[0], torch.eye(2).bool())
    # Never fewer than the required blocks, whatever the share.
    assert torch.equal(select_blocks(mass, 0.01, "row", required), required.expand(3, 10, 10))
    # A cumulative threshold: the fewest blocks, required ones first, holding top_p of the row's mass, at most keep.
    rows = torch.tensor([[[0.05, 0.6, 0.3, 0.05], [0.25, 0.25, 0.25, 0.25]]])
    diagonal = torch.tensor([[True, False, False, False], [False, True, False, False]])
    assert select_blocks(rows, 1.0, "row", diagonal, top_p=0.9).int().tolist() == [[[1, 1, 1, 0], [1, 1, 1, 1]]]
    assert select_blocks(rows, 0.5, "row", diagonal, top_p=0.9).int().tolist() == [[[1, 1, 0, 0], [1, 1, 0, 0]]]
    assert select_blocks(rows, 1.0, "row", diagonal, top_p=0.6).int().tolist() == [[[1, 1, 0, 0], [1, 1, 1, 0]]]
    # Exactly top_p reached (0.5 + 0.25) is enough: a third block would be more than the fewest.
    exact = torch.tensor([[[0.5, 0.25, 0.25]]])
    assert select_blocks(exact, 1.0, "row", torch.tensor([[True, False, False]]), top_p=0.75).sum() == 2
    # Shared over the layer: each row's candidates as above, the highest of them up to keep of all blocks.
    assert select_blocks(rows, 0.5, "layer", diagonal, top_p=0.9).int().tolist() == [[[1, 1, 1, 0], [0, 1, 0, 0]]]
    assert select_blocks(rows, 1.0, "layer", diagonal, top_p=0.9).int().tolist() == [[[1, 1, 1, 0], [1, 1, 1, 1]]]
    assert select_blocks(rows, 1.0, "head", diagonal, top_p=0.6).int().tolist() == [[[1, 1, 0, 0], [1, 1, 1, 0]]]


def test_a_row_budget_rounds_keep_to_the_nearest_block_and_breaks_ties_by_position():
    # keep=0.4 of 4 key blocks is 1.6 blocks: 2 per row (the docstring's round), not 1 (a truncated share). Equal
    # scores keep the earliest key blocks, so two searches of one tensor agree whatever the sort does with ties.
    required = torch.eye(3, 4, dtype=torch.bool)
    kept = select_blocks(torch.ones(1, 3, 4), 0.4, "row", required)
    assert kept.int().tolist() == [[[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0]]]
    assert select_blocks(torch.ones(1, 3, 4), 0.4, "layer", required).sum() == 5  # round(0.4 * 12), ties alike
    assert select_blocks(torch.ones(1, 3, 4), 0.4, "layer", required).int().tolist() == [
        [[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 0]]]
    # The greedy search's row budget rounds alike: 0.4 of 4 key blocks is 2 per row there too.
    q, k = torch.randn(1, 1, 56, 8, generator=torch.Generator().manual_seed(0)).split([24, 32], dim=2)
    assert greedy_blocks(q, k, k, 8, 0.4, required, budget="row").sum(-1).tolist() == [[2, 2, 2]]


def test_a_searched_row_that_reaches_top_p_exactly_keeps_no_more_blocks():
    # The public path of the boundary above: one query block of 12 tokens over three key blocks of 4. Queries and
    # keys are chosen so the masses are exact binary fractions: logits 0 for tokens 0-5 and 8-9, about -5000 for
    # the rest (exp underflows to 0), so key blocks hold 4, 2 and 2 of 8 equal shares: 0.5, 0.25, 0.25.
    layout, block_size = VideoLayout(1, 1, 12), (12, 4)
    q = torch.zeros(1, 1, 12, 4)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 12, 4)
    k[0, 0, [6, 7, 10, 11], 0] = -1e4
    v = torch.randn(1, 1, 12, 4, generator=torch.Generator().manual_seed(0))
    searched = Searched(keep=1.0, criterion="mass", budget="row", top_p=0.75).search(q, k, v, layout, block_size)
    assert searched.block_mask(layout, block_size).int().tolist() == [[[1, 1, 0]]]
    # Just past it, the third block is needed.
    more = Searched(keep=1.0, criterion="mass", budget="row", top_p=0.76).search(q, k, v, layout, block_size)
    assert more.block_mask(layout, block_size).int().tolist() == [[[1, 1, 1]]]


@pytest.mark.parametrize("budget", ["head", "layer"])
def test_shared_budgets_round_keep_once_over_all_blocks(budget):
    # 6 x 6 blocks per head at keep=0.3: 10.8 blocks, 11 per head (22 for the layer's 2 heads), the diagonal's 6
    # included. Before, the greedy budgets added each row's rounded share, round(0.3 * 6) = 2, 12 per head: 0.33
    # for 0.3 (0.333 for 0.25 at 2 x 16 x 24 tokens, block 128).
    layout = VideoLayout(frames=2, height=16, width=24)
    q, k, v = _qkv(layout, dim=16)
    required = torch.eye(6, dtype=torch.bool)
    for keep in (0.3, 0.25):
        greedy = greedy_blocks(q, k, v, 128, keep=keep, required=required, budget=budget)
        scores = block_attention_mass(q, k, 128)
        mass = select_blocks(scores, keep, budget, required)
        for kept in (greedy, mass):
            assert kept[:, required].all()
            if budget == "head":
                assert kept.sum((1, 2)).tolist() == [round(keep * 36)] * 2, keep
            else:
                assert kept.sum() == round(keep * 72), keep
    # The budget never goes below the required blocks: at keep=0.1 (3.6 blocks per head) just the diagonal.
    assert torch.equal(greedy_blocks(q, k, v, 128, keep=0.1, required=required, budget=budget),
                       required.expand(2, 6, 6))


@pytest.mark.parametrize("criterion", ["greedy", "mass", "pooled"])
def test_the_search_runs_in_the_kernel_s_token_order(criterion):
    # Tiles of (2, 2, 3) do not divide the 3 x 5 x 7 grid, so the permutation is not its own inverse: a search that
    # put the tensors in the inverse order would find other blocks.
    layout, order = VideoLayout(frames=3, height=5, width=7, text_len=3), TileOrder((2, 2, 3))
    perm = order.permutation(layout)
    assert not torch.equal(perm, order.inverse(layout))
    q, k, v = _qkv(layout)
    pattern = Searched(keep=0.4, criterion=criterion)
    ordered = pattern.search(q, k, v, layout, 8, order=order).searched_mask
    by_hand = pattern.search(*(x[:, :, perm] for x in (q, k, v)), layout, 8).searched_mask
    assert torch.equal(ordered, by_hand)


def test_values_may_be_narrower_or_wider_than_the_queries():
    # The projection is chosen by the values' own width. Before, by the queries': values narrower than queries wider
    # than `value_dims` could not be multiplied by a projection sized for the queries.
    layout = VideoLayout(frames=3, height=3, width=4)
    q, k, _ = _qkv(layout, dim=64)
    v = _qkv(layout, dim=16, seed=1)[2]
    required = torch.eye(5, dtype=torch.bool)
    exact = greedy_blocks(q, k, v, 8, keep=0.6, required=required, value_dims=16)  # no projection either way
    assert torch.equal(greedy_blocks(q, k, v, 8, keep=0.6, required=required, value_dims=32), exact)
    wide = _qkv(layout, dim=64, seed=2)[2]
    kept = greedy_blocks(q[..., :8], k[..., :8], wide, 8, keep=0.6, required=required, value_dims=8)
    assert (kept.sum(-1) == 3).all()


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("criterion", ["greedy", "mass", "pooled"])
def test_a_query_span_spends_keep_on_its_own_blocks_only(criterion, budget):
    # The runtime's `video_queries` calls compute the video's queries only: `keep` is the share of their blocks,
    # which are counted from the span's first token (as the call's kernel counts them). The text rows outside are
    # kept whole at no cost, and what the queries outside hold does not matter.
    layout = VideoLayout(1, 8, 10, text_len=20, text_position="start")  # the video's blocks start mid-block 2
    span, block = (20, 100), 8
    q, k, v = _qkv(layout)
    pattern = Searched(keep=0.3, criterion=criterion, budget=budget)
    searched = pattern.search(q, k, v, layout, block, q_tokens=span)
    rows = searched.block_mask(layout, block, q_tokens=span)
    assert rows.shape == (2, 10, 13) and abs(rows.float().mean().item() - 0.3) <= 0.5 / 13  # rounding
    assert rows[:, :, :3].all()  # the text's key blocks
    assert searched.block_mask(layout, block)[:, :3].all()  # the text's rows, outside the span
    # Block 0 of the span is tokens 20-27, whose diagonal key block is 2 (tokens 16-23).
    assert rows[:, torch.arange(10), (torch.arange(20, 100, 8) // 8)].all()
    noise = q.clone()
    noise[:, :, :20] = torch.randn(1, 2, 20, 8)
    assert torch.equal(pattern.search(noise, k, v, layout, block, q_tokens=span).searched_mask, searched.searched_mask)
    assert pattern.search(q, k, v, layout, block) != searched  # the whole sequence's search is another
    with pytest.raises(ValueError, match=r"q_tokens must be a \(start, stop\) pair .* got q_tokens=\(20, 101\)"):
        pattern.search(q, k, v, layout, block, q_tokens=(20, 101))
    with pytest.raises(ValueError, match="cannot be combined with within"):
        pattern.search(*_qkv(VideoLayout(2, 4, 4)), VideoLayout(2, 4, 4), 8, within=FrameCausal(1), q_tokens=(16, 32))


def test_a_shared_greedy_budget_ranks_each_set_by_its_running_least_gain():
    # Each set keeps a prefix of its greedy sequence, so a pick counts for no more than the picks before it: set 0's
    # second block (gain 0.9) cannot jump its first (0.1), and set 1's two blocks (0.5, 0.4) are taken instead.
    picks = torch.tensor([[[0, 1]], [[2, 3]]])  # (steps, heads, sets): set 0 adds block 0 then 2, set 1 1 then 3
    gains = torch.tensor([[[0.1, 0.5]], [[0.9, 0.4]]])
    for budget in ("layer", "head"):
        kept = _share_budget(torch.zeros(1, 2, 4, dtype=torch.bool), picks, gains, 2.0, budget)
        assert kept[0].int().tolist() == [[0, 0, 0, 0], [0, 1, 0, 1]], budget


def test_row_budgets_take_what_rows_must_keep_beyond_their_share_from_the_others():
    share = torch.full((6,), 4)
    # Two text rows keep all 8 key blocks: their 8 blocks over the share come off the other rows, at a common count.
    assert _row_budgets(share, torch.tensor([8, 8, 1, 2, 1, 1])).tolist() == [8, 8, 2, 2, 2, 2]
    # Where it does not divide, the earlier rows keep one more; no row goes below its own required blocks.
    uneven = _row_budgets(torch.tensor([4, 4, 4, 4, 5, 5]), torch.tensor([8, 8, 1, 1, 1, 1]))
    assert uneven.tolist() == [8, 8, 3, 3, 2, 2]
    assert _row_budgets(share, torch.tensor([8, 1, 3, 1, 1, 3])).tolist() == [8, 4, 3, 3, 3, 3]
    # The required blocks alone are more than the shares: just those.
    assert _row_budgets(share, torch.tensor([8, 8, 3, 3, 3, 1])).tolist() == [8, 8, 3, 3, 3, 1]
    # No row over its share (no text, the diagonal alone): the shares as they are, per head.
    shares = torch.tensor([[3, 3, 2], [0, 0, 0]])
    assert torch.equal(_row_budgets(shares, torch.ones(2, 3)), torch.tensor([[3, 3, 2], [1, 1, 1]]))


@pytest.mark.parametrize(
    "layout, block_size",
    [
        (VideoLayout(1, 16, 16, text_len=64, text_position="start"), 16),  # FLUX.1's layout, shrunk: 40% required
        (VideoLayout(3, 5, 10, text_len=40, text_position="end"), (16, 8)),  # a query block of text and video
    ],
)
def test_text_and_diagonal_blocks_count_toward_keep_under_every_criterion_and_budget(layout, block_size):
    # Text rows keep every key block. Before, they took that on top of their row share, and the density of a layout
    # with text exceeded keep (FLUX.1 at 1024 x 1024, block 64: 0.33 at keep=0.25) except with mass-ranked shared
    # budgets.
    q, k, v = _qkv(layout)
    required = Searched._required(layout, as_pair(block_size))
    one_row = 1 / required.shape[0]
    for keep, criterion, budget in itertools.product((0.5, 0.75, 0.2), ("greedy", "mass", "pooled"), BUDGETS):
        searched = Searched(keep=keep, criterion=criterion, budget=budget).search(q, k, v, layout, block_size)
        mask = searched.block_mask(layout, block_size)
        assert mask[:, required].all()
        if keep < required.float().mean():
            assert torch.equal(mask, required.expand_as(mask)), (keep, criterion, budget)  # just the required ones
        else:
            assert abs(mask.float().mean().item() - keep) <= one_row, (keep, criterion, budget)


def test_pooled_mass_is_the_softmax_of_block_means_and_exact_on_alike_blocks():
    layout = VideoLayout(frames=3, height=3, width=4)  # 36 tokens: blocks of 8, the last of 4
    q, k, _ = _qkv(layout, batch=2)
    mass, similarity = pooled_block_mass(q, k, 8)
    sizes = torch.tensor([8, 8, 8, 8, 4])
    block = torch.arange(36) // 8
    mean_q, mean_k = (torch.stack([x[:, :, block == j].mean(2) for j in range(5)], 2) for x in (q, k))
    logits = mean_q @ mean_k.transpose(-1, -2) / math.sqrt(8) + sizes.log()
    torch.testing.assert_close(mass, torch.softmax(logits, -1).mean(0))
    unit = torch.nn.functional.normalize(k, dim=-1)
    pairwise = torch.stack([(unit[:, :, block == j] @ unit[:, :, block == j].transpose(-1, -2)).mean((-1, -2))
                            for j in range(5)], -1)
    torch.testing.assert_close(similarity, pairwise.mean(0))
    # Blocks of alike queries and of alike keys: the estimate is the exact block mass, and similarity 1.
    alike_q, alike_k = (x[:, :, block].contiguous() for x in (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)))
    mass, similarity = pooled_block_mass(alike_q, alike_k, 8)
    torch.testing.assert_close(mass, block_attention_mass(alike_q, alike_k, 8))
    torch.testing.assert_close(similarity, torch.ones(2, 5))
    # Key blocks whose keys point every which way are kept whatever their estimate (SpargeAttn's rule).
    k[:, :, 8:16] = torch.randn(8, 8)[None, None] * torch.tensor([1.0, -1.0] * 4)[None, None, :, None]
    _, similarity = pooled_block_mass(q, k, 8)
    threshold = float(similarity[:, 1].max()) + 1e-3
    kept = Searched(keep=0.2, criterion="pooled", min_similarity=threshold).search(q, k, k, layout, 8)
    assert kept.block_mask(layout, 8)[:, :, 1].all()
    # With the default 0 ("none"), a block of zero keys (similarity exactly 0) is not forced in: its estimate decides.
    k[:, :, 8:16] = 0.0
    q = k.mean(2, keepdim=True).expand_as(q) * 10  # every other key block far likelier than the zero block
    default = Searched(keep=0.2, criterion="pooled").search(q, k, k, layout, 8).block_mask(layout, 8)
    assert not default[:, [0, 2, 3, 4], 1].any()  # each row keeps its diagonal and the likeliest, never block 1


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_searched_mask_is_its_token_mask_reduced_and_keeps_text_and_diagonal(order):
    layout = VideoLayout(frames=2, height=4, width=4, text_len=5, text_position="start")
    q, k, v = _qkv(layout)
    pattern = Searched(keep=0.6).search(q, k, v, layout, (8, 4), order=order)
    mask = pattern.block_mask(layout, (8, 4), order=order)
    assert mask.shape == (2, 5, 10) and pattern.num_heads == 2
    assert torch.equal(reduce_token_mask(pattern.token_mask(layout, order=order), (8, 4)), mask)
    assert mask[:, 0].all() and mask[:, :, :2].all()  # text rows (tokens 0-4) and text columns
    assert mask[:, torch.arange(5), torch.arange(5) * 2].all()  # each query block's diagonal key block
    # 60% of the 5 x 10 blocks per head, shared over the layer: the text row keeps all 10, on top of its 6, so the
    # video rows have 30 - 10 left, not 4 x 6.
    assert mask[:, 1:].sum() == 2 * (30 - 10) and mask.sum() == 2 * 30
    per_row = Searched(keep=0.6, budget="row").search(q, k, v, layout, (8, 4), order=order)
    assert (per_row.block_mask(layout, (8, 4), order=order)[:, 1:].sum(-1) == 5).all()
    with pytest.raises(ValueError, match="search again"):
        pattern.block_mask(layout, 16, order=order)


def test_search_keeps_the_blocks_the_model_attends_to():
    layout = VideoLayout(frames=4, height=2, width=4)  # 8 tokens per frame, blocks of one frame
    frame = torch.arange(32) // 8
    codes = 6 * torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    q = codes[frame].reshape(1, 1, 32, 16)
    k = codes[(frame + 1) % 4].reshape(1, 1, 32, 16)  # frame f's queries match frame f-1's keys
    v = torch.randn(1, 1, 32, 16, generator=torch.Generator().manual_seed(2))
    for criterion in ("mass", "greedy", "pooled"):
        searched = Searched(keep=0.5, criterion=criterion).search(q, k, v, layout, 8)
        mask = searched.block_mask(layout, 8)[0]
        for f in range(4):
            assert mask[f, f] and mask[f, (f - 1) % 4], (criterion, mask)  # the diagonal and the attended frame
        assert mask.sum() == 8


def test_searched_output_beats_a_static_pattern_of_the_same_density():
    layout = VideoLayout(frames=4, height=4, width=4)
    q, k, v = _qkv(layout, heads=2, dim=16, seed=3)
    dense = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v
    static = get_pattern("radial").at_density(layout, 0.25, 8).block_mask(layout, 8)
    searched = Searched(keep=static.float().mean().item()).search(q, k, v, layout, 8).block_mask(layout, 8)
    assert searched.sum() == 2 * static.sum()  # the same number of blocks in each of the two heads

    def error(mask):
        return (block_sparse_attention(q, k, v, make_plan(mask[None], 64, 64, 8)) - dense).norm()

    assert error(searched) < 0.8 * error(static)


def test_a_search_in_a_tile_order_gives_its_video_token_mask_in_frame_major_order():
    # `_video_token_mask` is the definition the base class reads, over the video tokens in frame-major order, whatever
    # order the search ran in: the searched blocks (in the tiled order) expanded to tokens and put back in frame-major.
    layout = VideoLayout(frames=2, height=4, width=4, text_len=3, text_position="start")
    order = TileOrder((1, 2, 2))
    searched = Searched(keep=0.5).search(*_qkv(layout), layout, (8, 4), order=order)
    n = layout.num_tokens
    tiled = searched.block_mask(layout, (8, 4), order=order)[:, torch.arange(n) // 8][:, :, torch.arange(n) // 4]
    video = torch.argsort(order.permutation(layout))[3:]  # each video token's position in the tiled order
    expected = tiled[:, video][:, :, video]
    assert not torch.equal(expected, tiled[:, 3:, 3:])  # the orders differ here
    assert torch.equal(searched._video_token_mask(layout), expected)


def test_a_group_of_videos_reuses_no_fit_made_on_other_videos(monkeypatch):
    # HunyuanVideo's true CFG: a call per branch, each attending its videos in groups of equal valid lengths
    # (`attend_valid_prefixes`). Video 1's uncond group has the layout of video 0's cond group: it searches on its
    # own tensors, so a batch of two prompts gives video 1 what it gets alone (it took video 0's fit, 3.7 off). The
    # same videos of the other branch on the same layout still share a fit (Wan's branches called apart).
    layout = VideoLayout(2, 8, 8, text_len=16, text_position="end")  # [video, text]: 128 + 16 tokens
    g = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(3, 2, layout.num_tokens, 2, 16, generator=g).unbind(0) for _ in range(2))
    uncond[0][1] *= 5  # video 1's uncond queries unlike video 0's cond ones
    config = diffsparse.SparseConfig(pattern=Searched(keep=0.3, budget="row"), block_size=16, dense_steps=0)
    searches = []
    fit = Searched.fit
    monkeypatch.setattr(Searched, "fit", lambda self, q, *args, **kwargs: searches.append(q.shape[0]) or fit(
        self, q, *args, **kwargs))

    def run(videos, cond_lengths, uncond_lengths):
        runtime, outs = SparseRuntime(config, "transformer"), []
        for branch, inputs, lengths in (("cond", cond, cond_lengths), ("uncond", uncond, uncond_lengths)):
            runtime.state_manager.set_context(CacheContext(branch))
            runtime.begin_call(layout, 0, 4)
            outs.append(attend_valid_prefixes(runtime, 0, *(x[videos] for x in inputs), lengths, padded_queries="zero"))
        return outs

    batched = run([0, 1], [140, 136], [132, 140])
    for batched_out, alone in zip(batched, run([1], [136], [140])):
        torch.testing.assert_close(batched_out[1:], alone, atol=1e-5, rtol=0)
    searches.clear()
    run([0, 1], [140, 136], [132, 140])
    assert len(searches) == 4  # a search per group of each branch
    searches.clear()
    run([0, 1], [140, 136], [140, 136])
    assert len(searches) == 2  # each group's uncond call reuses its cond call's search


@pytest.mark.parametrize("video_queries", [False, True], ids=["kept tokens", "video queries"])
def test_groups_of_prompts_on_one_layout_each_keep_their_own_fit(video_queries):
    # Two prompts whose masks keep as many text tokens: their groups are attended on the same layout
    # (`attend_kept_tokens`, or `SparseProcessor.attend_video_queries` where only the video tokens query), each with
    # the fit of its own video, so each gets what it gets alone. Without the groups' videos (or with their positions,
    # `arange(len(groups))`), video 1's group took video 0's fit, 4.4 off.
    from diffsparse.pipelines.base import SparseProcessor

    layout, q, k, v, kept = two_prompts_keeping_as_many_text_tokens()
    config = diffsparse.SparseConfig(pattern=Searched(keep=0.3, criterion="greedy", budget="row"), block_size=16,
                                     dense_steps=0)

    def run(videos):
        runtime = SparseRuntime(config, "transformer")
        runtime.state_manager.set_context(CacheContext("cond"))
        groups = [(torch.tensor([i]), kept[video]) for i, video in enumerate(videos)]
        runtime.begin_call(layout, 0, 4)
        if video_queries:
            return SparseProcessor(runtime, 0).attend_video_queries(q[videos][:, 8:], k[videos], v[videos], groups)
        return attend_kept_tokens(runtime, 0, q[videos], k[videos], v[videos], groups)

    batched = run([0, 1])
    for video in (0, 1):
        torch.testing.assert_close(batched[video : video + 1], run([video]), atol=1e-5, rtol=0)


def test_searched_masks_cannot_be_combined_with_rules():
    layout = VideoLayout(frames=2, height=4, width=4, text_len=3, text_position="start")
    searched = Searched(keep=0.5).search(*_qkv(layout), layout, 8)
    assert torch.equal(searched._video_token_mask(layout), searched.token_mask(layout)[:, 3:, 3:])
    for combined in (lambda: searched | FrameSink(), lambda: FrameSink() & Searched()):
        with pytest.raises(ValueError, match="cannot be combined: its blocks come from fitting it"):
            combined()


def test_before_a_search_it_has_no_mask_and_density_sets_keep():
    layout = VideoLayout(frames=2, height=4, width=4)
    for ask in (lambda p: p.block_mask(layout, 8), lambda p: p.token_mask(layout), lambda p: p.density(layout, 8)):
        with pytest.raises(ValueError, match="no blocks before a search"):
            ask(Searched())
    assert Searched().at_density(layout, 0.1, 8) == Searched(keep=0.1)
    searched = Searched(keep=0.5).search(*_qkv(layout), layout, 8)
    assert searched.at_density(layout, 0.5, 8) is searched
    with pytest.raises(ValueError, match="search again for density 0.3"):
        searched.at_density(layout, 0.3, 8)
    # A bad target is named as at_density's argument, as Pattern.at_density names it: before, the message named
    # `keep`, the field the target would have set, searched or not.
    for pattern, bad in itertools.product((Searched(), searched), (0, 1.5, "0.5", True)):
        with pytest.raises(ValueError, match=r"target must be a block density in \(0, 1\], got target="):
            pattern.at_density(layout, bad, 8)


def test_a_search_holds_blocks_only_for_its_layout_block_size_and_order():
    layout, order = VideoLayout(frames=2, height=4, width=4), TileOrder((1, 2, 2))
    searched = Searched(keep=0.5).search(*_qkv(layout), layout, 8, order=order)
    assert searched.block_mask(layout, 8, order).shape == (2, 4, 4)
    # The same token count in another grid, another block size, another order: other blocks, not these.
    for ask in (lambda: searched.block_mask(layout, 8), lambda: searched.token_mask(layout, TileOrder((2, 2, 2))),
                lambda: searched.block_mask(VideoLayout(frames=2, height=2, width=8), 8, order),
                lambda: searched.density(layout, (8, 4), order)):
        with pytest.raises(ValueError, match="search again"):
            ask()


def test_equal_searches_are_equal_and_hash_alike():
    layout = VideoLayout(frames=2, height=4, width=4)
    q, k, v = _qkv(layout)
    a, b = (Searched(keep=0.5).search(q, k, v, layout, 8) for _ in range(2))
    assert a == b and hash(a) == hash(b) and a != Searched(keep=0.5)
    other = Searched(keep=0.5).search(*_qkv(layout, seed=5), layout, 8)
    assert other.searched_for[-1] != a.searched_for[-1] or torch.equal(other.searched_mask, a.searched_mask)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": 0}, "Searched.keep must be a share of blocks in \\(0, 1\\], got keep=0"),
        ({"keep": 1.5}, "got keep=1.5"),
        ({"keep": True}, "got keep=True"),
        ({"criterion": "mass", "budget": "frame"},
         "Searched.budget must be one of \\('row', 'head', 'layer'\\), got budget='frame'"),
        ({"criterion": "lse"}, "Searched.criterion must be one of \\('greedy', 'mass', 'pooled'\\), got criterion='lse'"),
        ({"sample_rows": 0}, "Searched.sample_rows must be an int >= 1, got sample_rows=0"),
        ({"value_dims": 2.0}, "Searched.value_dims must be an int >= 1, got value_dims=2.0"),
        ({"refresh": -1}, "Searched.refresh must be an int >= 0, got refresh=-1"),
        ({"criterion": "pooled", "min_similarity": 1.5}, "min_similarity must be a number in \\[0, 1\\], got min_similarity=1.5"),
        ({"min_similarity": 0.5}, "min_similarity=0.5 needs criterion='pooled'"),
        ({"criterion": "mass", "top_p": 0}, "Searched.top_p must be a share of the mass in \\(0, 1\\] or None"),
        ({"top_p": 0.9}, "top_p=0.9 needs a mass criterion"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Searched(**kwargs)


def test_a_spec_lists_and_takes_the_user_s_parameters_only():
    # The mask and what it was searched for are set by the search, not parameters: a spec's unknown keyword lists
    # neither (it listed searched_mask and searched_for), and a spec giving one is refused as unknown.
    takes = "searched takes keep, criterion, budget, sample_rows, value_dims, refresh, min_similarity, top_p; got"
    for spec, field in (("searched(foo=1)", "foo"), ("searched(searched_for=(1,))", "searched_for")):
        with pytest.raises(ValueError, match=f"{re.escape(takes)} '{field}'$"):
            get_pattern(spec)


def test_search_checks_the_token_count():
    layout = VideoLayout(frames=2, height=4, width=4)
    q, k, v = _qkv(layout)
    with pytest.raises(ValueError, match="layout.num_tokens=48 tokens"):
        Searched().search(q, k, v, VideoLayout(frames=3, height=4, width=4), 8)
    with pytest.raises(ValueError, match="measures the output error of its blocks: give value, not None"):
        Searched().search(q, k, None, layout, 8)
    assert Searched(criterion="mass").search(q, k, None, layout, 8).num_heads == 2  # mass needs no values


@pytest.mark.parametrize("criterion", ["greedy", "mass", "pooled"])
@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 2, 32, 4), (1, 1, 32, 4), (1, 1, 32, 4)), "share batch and heads"),  # heads
        (((2, 1, 32, 4), (1, 1, 32, 4), (1, 1, 32, 4)), "share batch and heads"),  # batch
        (((1, 1, 32, 4), (1, 1, 32, 4), (2, 1, 32, 4)), "share batch and heads"),  # the value's batch
        (((1, 1, 32, 4), (1, 1, 32, 8), (1, 1, 32, 4)), "query and key must share their head dim"),
        (((1, 1, 32, 4), (1, 1, 32, 4), (1, 1, 16, 4)), "layout.num_tokens=32"),
        (((1, 32, 4), (1, 1, 32, 4), (1, 1, 32, 4)), r"\(B, H, N, D\) tensors"),
    ],
)
def test_search_refuses_queries_keys_and_values_that_do_not_match(criterion, shapes, match):
    # Before, "mass" broadcast 2 query heads over 1 key head and returned heads=2; the others raised RuntimeError
    # from deep inside.
    q, k, v = (torch.randn(shape) for shape in shapes)
    named = ", ".join(f"{name}={shape}" for name, shape in zip(("query", "key", "value"), shapes))
    with pytest.raises(ValueError, match=match) as error:
        Searched(criterion=criterion).search(q, k, v, VideoLayout(2, 4, 4), 8)
    assert named in str(error.value)
    if criterion != "greedy" and shapes[0][:2] != shapes[1][:2]:  # without values, query and key alone
        with pytest.raises(ValueError, match=match):
            Searched(criterion=criterion).search(q, k, None, VideoLayout(2, 4, 4), 8)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "a"])
def test_at_density_refuses_a_bad_max_iter_searched_or_not(bad):
    layout = VideoLayout(2, 4, 4)
    searched = Searched(keep=0.5).search(*_qkv(layout), layout, 8)
    for pattern in (Searched(), searched):
        with pytest.raises(ValueError, match="max_iter must be an int >= 1"):
            pattern.at_density(layout, 0.5, 8, max_iter=bad)


def test_a_search_over_a_query_span_gives_the_token_reduction_over_the_whole_layout():
    # The searched rows start at the span's first token (5), not every 8 tokens from 0: asked for the whole
    # layout's blocks, they must be reduced from the token mask, not returned as they are.
    layout = VideoLayout(2, 4, 4, text_len=5, text_position="start")
    n = layout.num_tokens
    searched = Searched(keep=0.4).search(*_qkv(layout), layout, 8, q_tokens=(5, n))
    assert torch.equal(searched.block_mask(layout, 8), reduce_token_mask(searched.token_mask(layout), 8))


def test_searched_at_full_density_gives_the_dense_video(tiny_pipe):
    reference = generate(tiny_pipe)
    with diffsparse.sparse(tiny_pipe, diffsparse.SparseConfig(pattern="searched", density=1.0, dense_steps=0)):
        torch.testing.assert_close(generate(tiny_pipe), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("refresh, searched_at", [(0, [1]), (1, [1, 2, 3]), (2, [1, 3])])
def test_refresh_searches_again_every_refresh_steps(tiny_pipe, monkeypatch, refresh, searched_at):
    steps = []
    search = Searched.search

    def counting(self, *args, **kwargs):
        steps.append(runtime._state().step)
        return search(self, *args, **kwargs)

    monkeypatch.setattr(Searched, "search", counting)
    config = diffsparse.SparseConfig(pattern=Searched(refresh=refresh), density=0.5, block_size=16, dense_steps=1)
    with diffsparse.sparse(tiny_pipe, config) as handle:
        runtime = handle.runtimes["transformer"]
        generate(tiny_pipe, num_inference_steps=4)
    assert steps == [s for s in searched_at for _layer in range(2)]  # both layers, once per search step


def test_config_density_is_the_searched_share():
    config = diffsparse.SparseConfig(pattern="searched(refresh=4)", density=0.1)
    assert config.resolved_pattern == Searched(keep=0.1, refresh=4)  # what eval tables print
    assert diffsparse.SparseConfig(pattern="searched").resolved_pattern.keep == 0.25
