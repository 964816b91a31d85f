"""The frame patterns' whole-box tests (`_box_all`), which only an intersection consults, and frame indices past the
layout's end."""

import pytest
import torch

from diffsparse.patterns import (
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
