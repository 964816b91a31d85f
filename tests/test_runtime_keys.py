"""The runtime's cache keys and per-call state: what one call leaves must not reach a call that differs from it.

Each test runs two kinds of call on one runtime and checks the second against a fresh runtime (or the reference):
a cache key missing an item, or per-call state not reset in `begin_call`, hands the second call the first's.
"""

import pytest
import torch
from diffusers.hooks.hooks import CacheContext

from diffsparse import SparseConfig
from diffsparse.patterns import Radial, VideoLayout, Window3D
from diffsparse.runtime import SparseRuntime

from helpers import two_prompts_keeping_as_many_text_tokens

CPU = torch.device("cpu")


def _sdpa(query, key, value):
    return torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (query, key, value))
    ).transpose(1, 2)


def _runtime(config: SparseConfig) -> SparseRuntime:
    runtime = SparseRuntime(config, "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    return runtime


def test_dense_attention_plans_are_kept_per_key_length():
    # Chroma merges attention over its masked prompt padding: one query length against keys of several lengths.
    runtime = SparseRuntime(SparseConfig(block_size=16), "transformer")
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 40, 2, 8, generator=g)
    for keys in (40, 72):
        key, value = torch.randn(2, 1, keys, 2, 8, generator=g).unbind(0)
        out, lse = runtime.dense_attention(query, key, value)
        torch.testing.assert_close(out, _sdpa(query, key, value), atol=1e-5, rtol=0)
        scores = torch.einsum("bqhd,bkhd->bhqk", query, key) / 8**0.5
        torch.testing.assert_close(lse[..., 0], scores.logsumexp(-1).transpose(1, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("first", [0, 20000])
def test_a_plan_for_other_outside_pairs_is_solved_for_them(first):
    # The pairs a call computes outside the layout lower what the layout is solved for (`_density_target`): a plan
    # cached or a density solved for other outside pairs gives the call the wrong density.
    config = SparseConfig(pattern="window3d", density=0.4, block_size=16)
    layout = VideoLayout(4, 8, 8, text_len=16, text_position="start")
    fresh = {o: SparseRuntime(config, "t").plan(layout, 2, CPU, outside_pairs=o).density for o in (0, 20000)}
    assert fresh[20000] < fresh[0] - 0.05
    runtime = SparseRuntime(config, "t")
    for outside in (first, 20000 - first, first):
        assert runtime.plan(layout, 2, CPU, outside_pairs=outside).density == fresh[outside]


@pytest.mark.parametrize("first", [0, 16])
def test_a_density_solved_over_other_query_rows_is_solved_again(first):
    # A `video_queries` call's density is over the video rows it computes (`queries_from`), not the text's kept whole.
    config = SparseConfig(pattern="window3d", density=0.4, block_size=16)
    layout = VideoLayout(4, 8, 8, text_len=16, text_position="start")
    fresh = {
        rows: SparseRuntime(config, "t").plan(layout, 2, CPU, queries_from=rows).density for rows in (0, 16)
    }
    runtime = SparseRuntime(config, "t")
    for rows in (first, 16 - first, first):
        assert runtime.plan(layout, 2, CPU, queries_from=rows).density == fresh[rows]
    assert len(set(runtime.solved_patterns())) == 2  # one solution per query range, each solved once


def test_a_plain_call_after_a_call_with_frame_steps_has_no_dense_frames():
    # Diffusion forcing's frames in their dense steps keep every key (`frame_steps`); the next call without them
    # follows its own step.
    layout = VideoLayout(4, 4, 4)
    config = SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=2)
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    fresh = _runtime(config)
    fresh.begin_call(layout, 3, 5)
    fresh.attention(0, q, k, v)
    runtime = _runtime(config)
    runtime.begin_call(layout, 3, 5, frame_steps=(3, 2, 1, 0))  # frames 2 and 3 in the dense steps
    assert runtime.route(0)
    runtime.attention(0, q, k, v)
    runtime.begin_call(layout, 3, 5)
    assert runtime.route(0)
    torch.testing.assert_close(runtime.attention(0, q, k, v), fresh.attention(0, q, k, v), atol=0, rtol=0)
    assert runtime.records[0].density > fresh.records[0].density
    assert runtime.records[1].sparse and runtime.records[1].density == fresh.records[0].density


def test_a_call_without_a_causal_mask_after_one_with_it_is_not_masked():
    # SkyReels-V2's causal frame groups (`allow_frame_causal`) are the call's own: the next call attends every frame.
    layout = VideoLayout(4, 4, 4)
    config = SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=0)
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    fresh = _runtime(config)
    fresh.begin_call(layout, 0, 5)
    expected = fresh.attention(0, q, k, v)
    runtime = _runtime(config)
    runtime.begin_call(layout, 0, 5)
    assert runtime.route(0) and runtime.allow_frame_causal(0, 2)
    runtime.attention(0, q, k, v)
    runtime.begin_call(layout, 0, 5)
    assert runtime.route(0)
    torch.testing.assert_close(runtime.attention(0, q, k, v), expected, atol=0, rtol=0)
    assert runtime.records[0].density < fresh.records[0].density == runtime.records[1].density


def test_statistics_of_the_whole_sequence_are_not_applied_to_a_video_queries_call():
    # A correction measured on the whole sequence's rows has a residual per row of it: a later `video_queries` call
    # of the same layer computes the video rows only, and measures again rather than correct with another shape.
    layout = VideoLayout(4, 4, 4, text_len=16, text_position="start")
    config = SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=1,
                          correction="residual")
    runtime = _runtime(config)
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    runtime.begin_call(layout, 0, 3)
    assert runtime.route(0)
    torch.testing.assert_close(runtime.attention(0, q, k, v), _sdpa(q, k, v), atol=1e-5, rtol=0)
    runtime.begin_call(layout, 1, 3)
    assert runtime.route(0)
    video = runtime.attention(0, q[:, 16:], k, v, video_queries=True)
    torch.testing.assert_close(video, _sdpa(q, k, v)[:, 16:], atol=1e-5, rtol=0)
    assert [(r.step, r.sparse, r.measured) for r in runtime.records] == [(0, False, True), (1, False, True)]


def test_a_search_without_the_causal_mask_is_not_reused_under_it():
    # A data-dependent pattern under a causal frame-group mask is fitted on the masked attention (`Pattern.fit`'s
    # `within`): the other branch's unmasked call of the same layer, layout and batch must search again, not take a
    # search that spent its blocks where the mask leaves none.
    layout = VideoLayout(4, 4, 4)
    config = SparseConfig(pattern="searched(budget='row')", density=0.4, block_size=16, dense_steps=0)
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    fresh = _runtime(config)
    fresh.begin_call(layout, 0, 5)
    assert fresh.route(0) and fresh.allow_frame_causal(0, 2)
    expected = fresh.attention(0, q, k, v)
    runtime = _runtime(config)
    runtime.begin_call(layout, 0, 5)
    assert runtime.route(0)
    runtime.attention(0, q, k, v)
    runtime.state_manager.set_context(CacheContext("uncond"))
    runtime.begin_call(layout, 0, 5)
    assert runtime.route(0) and runtime.allow_frame_causal(0, 2)
    torch.testing.assert_close(runtime.attention(0, q, k, v), expected, atol=0, rtol=0)
    assert runtime.records[1].density == fresh.records[0].density


def test_groups_of_kept_tokens_on_one_layout_each_get_a_search_of_their_own():
    # Two prompts keeping as many text tokens attend on one layout in groups of a batch of one each
    # (`attend_kept_tokens`): each group's videos are searched on their own tensors, not the first group's.
    from diffsparse.pipelines.base import attend_kept_tokens

    layout, q, k, v, kept = two_prompts_keeping_as_many_text_tokens()
    config = SparseConfig(pattern="searched(budget='row')", density=0.3, block_size=16, dense_steps=0)

    def run(videos):
        runtime = _runtime(config)
        runtime.begin_call(layout, 0, 3)
        groups = [(torch.tensor([i]), kept[video]) for i, video in enumerate(videos)]
        return attend_kept_tokens(runtime, 0, q[videos], k[videos], v[videos], groups)

    batched = run([0, 1])
    for video in (0, 1):
        torch.testing.assert_close(batched[video : video + 1], run([video]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("first", [2, 4])
def test_a_plan_for_other_heads_has_a_mask_per_head_of_theirs(first):
    # Patterns of each video of a batch (`_layer_pattern`'s fits) stack one mask per head: a plan cached for another
    # head count handed the kernel masks for the wrong number of heads.
    layout = VideoLayout(4, 4, 4)
    patterns = (Window3D((1, 1, 1)), Window3D((3, 1, 1)))
    runtime = SparseRuntime(SparseConfig(block_size=16), "t")
    for heads in (first, 6 - first, first):
        plan = runtime.plan(layout, heads, CPU, pattern=patterns).plan
        fresh = SparseRuntime(SparseConfig(block_size=16), "t").plan(layout, heads, CPU, pattern=patterns).plan
        assert plan.block_mask.shape[:2] == (2, heads)
        assert torch.equal(plan.block_mask, fresh.block_mask)
