"""The frame patterns' whole-box tests (`_box_all`), which only an intersection consults, frame indices past the
layout's end, their validation, and what compositions of them ask and pass on to their parts."""

import pytest
import torch

from diffsparse.patterns import (
    Boxes,
    Dense,
    DenseQueryFrames,
    FrameCausal,
    FrameSink,
    Radial,
    TileOrder,
    VideoLayout,
    Window3D,
    reduce_token_mask,
)
from diffsparse.patterns.causal import _LaterFrameGroup


@pytest.mark.parametrize("layout", [VideoLayout(6, 1, 2), VideoLayout(9, 2, 3), VideoLayout(7, 2, 2)])
def test_frame_causal_intersections_are_the_token_reduction_with_blocks_of_several_frames(layout):
    # Blocks spanning several whole frames are where "every key frame before the query's group" differs from "the
    # first key frame before it": before, no test built them inside an intersection, so the whole-box tests of
    # FrameCausal and its complement could read the wrong end of the key box unseen (FrameCausal(2) &
    # _LaterFrameGroup(2) kept 3 blocks of a mask that has none).
    patterns = [FrameCausal(2) & _LaterFrameGroup(2), FrameCausal(2) & Window3D((3, 1, 1)),
                FrameCausal(3) & Radial(decay=0.5, min_window=2), _LaterFrameGroup(2) & Window3D((5, 1, 1)),
                _LaterFrameGroup(1) & FrameCausal(3)]
    for pattern in patterns:
        for order in (None, TileOrder((2, 1, 2))):
            token = pattern.token_mask(layout, order)
            for block_size in (2, 3, 4, 6, (6, 4), (2, 12)):
                expected = reduce_token_mask(token, block_size)
                found = pattern.block_mask(layout, block_size, order)
                assert torch.equal(found, expected), (pattern, order, block_size)
    assert not (FrameCausal(2) & _LaterFrameGroup(2)).block_mask(VideoLayout(6, 1, 2), 6).any()


@pytest.mark.parametrize("order", [None, TileOrder((2, 2, 2))])
def test_frame_indices_past_the_layout_select_nothing(order):
    # The runtime names the frames of a call still in their dense steps; one past the layout's last frame has no
    # token to select: the mask is that of the frames inside it (not an IndexError).
    layout = VideoLayout(3, 2, 4)
    inside, past = DenseQueryFrames((1,)), DenseQueryFrames((1, layout.frames, layout.frames + 4))
    assert torch.equal(past.token_mask(layout, order), inside.token_mask(layout, order))
    for block_size in (4, 8, (8, 16)):
        assert torch.equal(past.block_mask(layout, block_size, order), inside.block_mask(layout, block_size, order))
        # Inside an intersection the whole-box test counts the dense frames of each query box.
        both = past & Window3D((1, 1, 1))
        assert torch.equal(both.block_mask(layout, block_size, order),
                           reduce_token_mask(both.token_mask(layout, order), block_size))
    assert not DenseQueryFrames((layout.frames,)).token_mask(layout).any()
    # A sink longer than the video keeps every key.
    assert FrameSink(frames=layout.frames + 2).block_mask(layout, 8, order).all()


@pytest.mark.parametrize("order", [None, TileOrder((2, 2, 2))])
def test_nested_intersections_are_the_token_reduction(order):
    # An intersection inside another is asked whether it keeps every pair of a box (`_box_all`): only where both of
    # its parts do. Dense keeps every pair and the sink only some, so their AND is the sink's, not everything; an
    # OR of the parts' answers would keep blocks whose sink pairs and window pairs are disjoint.
    patterns = [(Dense() & FrameSink()) & Window3D((1, 1, 1)), Window3D((1, 1, 1)) & (FrameSink() & Dense()),
                (Window3D((9, 9, 9)) & FrameSink()) & Window3D((1, 1, 1))]
    for layout in (VideoLayout(6, 2, 3), VideoLayout(9, 2, 3)):
        for pattern in patterns:
            token = pattern.token_mask(layout, order)
            for block_size in (2, 4, (2, 4), (4, 6), (3, 5)):
                expected = reduce_token_mask(token, block_size)
                assert torch.equal(pattern.block_mask(layout, block_size, order), expected), (pattern, block_size)


@pytest.mark.parametrize("bad", [(-1,), (1, -2), [1], (1.0,), (True,), 1])
def test_dense_query_frames_validation(bad):
    with pytest.raises(ValueError, match=r"DenseQueryFrames.frames must be a tuple of frame indices >= 0"):
        DenseQueryFrames(frames=bad)


def test_frame_causal_groups_in_a_tile_order_refuse_text():
    layout = VideoLayout(4, 2, 4, text_len=3)
    assert FrameCausal(2).video_groups(layout).tolist() == [0] * 16 + [1] * 16  # frame-major: text is fine
    with pytest.raises(ValueError, match="needs a layout without text"):
        FrameCausal(2).video_groups(layout, TileOrder((2, 2, 2)))


def test_a_composition_fits_its_parts_with_every_argument_and_refits_at_the_shortest_period():
    # Built-in composable patterns ignore `order` and `q_tokens` in `fit` and have no refit period, so nothing else
    # checks that a composition passes them on: a user's data-dependent part would be fitted in the wrong order, or
    # refitted at the longer period of the two.
    from dataclasses import dataclass

    seen = []

    @dataclass(frozen=True, repr=False)
    class Recording(Window3D):
        every: int = 0

        @property
        def refit_every(self):
            return self.every

        def fit(self, query, key, value, layout, block_size, order=None, generator=None, within=None, shard=None,
                q_tokens=None):
            seen.append((order, within, q_tokens))
            return self

    @dataclass(frozen=True, repr=False)
    class OldFit(Window3D):  # a fit written before `q_tokens`: the runtime passes it only when set
        def fit(self, query, key, value, layout, block_size, order=None, generator=None, within=None, shard=None):
            seen.append("old")
            return self

    assert (Recording(every=3) | Recording(every=5)).refit_every == 3
    assert (Recording() & Recording(every=5)).refit_every == 5  # 0: fitted once, not a period
    layout, order, within = VideoLayout(4, 2, 4), TileOrder((2, 2, 2)), FrameCausal(1)
    q = torch.randn(1, layout.num_tokens, 1, 4)
    (Recording() | Recording()).fit(q, q, q, layout, 8, order=order, within=within, q_tokens=(8, 32))
    assert seen == [(order, within, (8, 32))] * 2
    seen.clear()
    (OldFit() | Recording()).fit(q, q, q, layout, 8, order=order)
    assert seen == ["old", (order, None, None)]


def test_a_union_keeps_every_pair_of_a_box_where_either_part_does():
    # Only an intersection reads `_box_all`, to stop refining a box pair that one part keeps whole. Its block masks
    # cannot tell a union that answers "unsure" (an AND of its parts) from one that answers as it should: an
    # intersection with `dense | sink` would halve boxes the union keeps whole, slower but equal, unseen before.
    layout = VideoLayout(4, 2, 3)
    box = Boxes(*(torch.tensor([v]) for v in (0, 3, 0, 1, 0, 2)))  # the whole video, queries and keys
    sink_box = box._replace(t1=torch.tensor([0]))  # frame 0 only
    assert (Dense() | FrameSink())._box_all(layout, box, box).all()
    assert (FrameSink() | Window3D((1, 1, 1)))._box_all(layout, box, sink_box).all()
    assert not (FrameSink() | Window3D((1, 1, 1)))._box_all(layout, box, box).any()
    assert (Dense() & FrameSink())._box_all(layout, box, sink_box).all()
    assert not (Dense() & FrameSink())._box_all(layout, box, box).any()


def test_dense_query_frames_keeps_rows_not_columns():
    # The transpose of the sink: the frames' queries attend every key, other video queries keep nothing of it. Its
    # token mask had no test of its own; inside the intersections tested, a transposed one gave the same blocks.
    layout = VideoLayout(3, 2, 2, text_len=1)
    token = DenseQueryFrames((1,)).token_mask(layout)[0]
    assert token[4:8].all() and not token[:4, :12].any() and not token[8:12, :12].any()
    assert torch.equal(DenseQueryFrames((1,)).block_mask(layout, (3, 5)), reduce_token_mask(token[None], (3, 5)))
