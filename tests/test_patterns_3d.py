"""3D patterns: token orders (tiles), Window3D, Radial's 2-D windows, composition, density control, plots."""

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from diffsparse.patterns import (
    PATTERNS,
    Dense,
    DenseQueryFrames,
    IdentityOrder,
    Intersection,
    Pattern,
    Radial,
    SpatialTemporal,
    TileOrder,
    Union,
    VideoLayout,
    Window3D,
    get_pattern,
    permute,
    radial,
    reduce_token_mask,
    unpermute,
)
from diffsparse.patterns.plots import density_vs_frames
from diffsparse.patterns.spatial_study import BlockedAttention, attention_error, synthetic_logits

from helpers import check_block_masks_reduce_token_masks, reordered_reference

LAYOUTS = [
    VideoLayout(3, 5, 7),  # nothing divides the tiles below
    VideoLayout(4, 6, 8, text_len=5, text_position="start"),
    VideoLayout(5, 4, 6, text_len=3, text_position="end"),
    VideoLayout(9, 2, 3),  # tiny frames: blocks span many frames and tiles
]
ORDERS = [None, TileOrder((2, 3, 4)), TileOrder((1, 2, 2)), TileOrder(3)]
BLOCK_SIZES = [1, 7, (16, 5), (8, 24), 64]
PATTERN_CASES = [
    Dense(),
    Radial(decay=0.5, min_window=4),
    Radial(decay=0.25, min_window=3, sink=True, spatial="box"),
    Radial(decay=0.7, min_window=2, spatial="disc"),
    Radial(decay=3.0, min_window=1, spatial="disc", sink=True),
    Window3D((3, 3, 3)),
    Window3D((2, 4, 5), stride=(1, 2, 3)),
    Window3D([(1, 2, 3), (3, 5, 4), (9, 9, 9)]),  # per head; the last is larger than every canvas
    Radial(decay=0.3, min_window=4, spatial="disc") | Window3D((1, 3, 3)),
    Radial(decay=0.5, min_window=2) & Window3D((3, 4, 4)),
    Window3D([(1, 3, 3), (3, 1, 5)]) & Radial(decay=1.0, min_window=2, spatial="box"),
    (Window3D((1, 2, 2)) | Radial(decay=0.2, min_window=3)) & Window3D((3, 5, 5), stride=(1, 2, 2)),
]


# Orders -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
@pytest.mark.parametrize(
    "order", [IdentityOrder(), TileOrder((2, 3, 4)), TileOrder(1), TileOrder((8, 8, 8))], ids=repr
)
def test_order_round_trip_is_exact(layout, order):
    n = layout.num_tokens
    perm, inv = order.permutation(layout), order.inverse(layout)
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))  # a permutation: no padding, nothing dropped
    assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
    text = torch.arange(layout.text_start, layout.text_start + layout.text_len)
    assert torch.equal(perm[text], text)  # text tokens stay where they are
    x = torch.randn(2, n, 3, 4)  # (B, S, H, D), sequence on dim 1
    y = permute(x, perm, dim=1)
    assert torch.equal(y, x[:, perm]) and torch.equal(unpermute(y, perm, dim=1), x)
    q = torch.randn(2, 3, n, 8, dtype=torch.bfloat16)  # (B, H, N, D), sequence on dim -2
    assert torch.equal(unpermute(permute(q, perm, dim=-2), perm, dim=-2), q)


@pytest.mark.parametrize("tile", [(2, 3, 4), (1, 2, 2), (4, 4, 4), (3, 1, 5)], ids=str)
def test_tile_order_sorts_by_tile_then_position_without_padding(tile):
    layout = VideoLayout(5, 7, 9, text_len=4, text_position="start")
    perm = TileOrder(tile).permutation(layout)
    video = perm[layout.video_start :] - layout.video_start
    t, h, w = (c[video] for c in layout.video_coordinates())
    grid = [math.ceil(g / s) for g, s in zip(layout.grid, tile)]
    tile_id = ((t // tile[0]) * grid[1] + h // tile[1]) * grid[2] + w // tile[2]
    inner = ((t % tile[0]) * tile[1] + h % tile[1]) * tile[2] + w % tile[2]
    key = tile_id * 10_000 + inner
    assert torch.all(key[1:] > key[:-1])  # sorted by (tile, position inside the tile)
    # Partial edge tiles just hold fewer tokens: the length is unchanged.
    assert len(perm) == layout.num_tokens


def test_identity_orders_and_repr():
    layout = VideoLayout(3, 4, 5, text_len=2)
    identity = torch.arange(layout.num_tokens)
    assert torch.equal(IdentityOrder().permutation(layout), identity)
    assert torch.equal(TileOrder((1, 4, 5)).permutation(layout), identity)  # a tile per frame
    assert torch.equal(TileOrder((7, 9, 9)).permutation(layout), identity)  # one tile covering the grid
    assert repr(TileOrder((2, 8, 8))) == "tiles(2,8,8)" and repr(TileOrder(4)) == "tiles(4,4,4)"
    assert repr(IdentityOrder()) == "frame_major()"
    assert (
        TileOrder(2) == TileOrder((2, 2, 2))
        and len({TileOrder(2), TileOrder((2, 2, 2)), IdentityOrder()}) == 2
    )


def test_memoised_boxes_are_the_computed_ones_and_callers_cannot_change_them():
    layout, order = VideoLayout(3, 5, 7), TileOrder((2, 4, 4))
    lo, hi = torch.tensor([0, 10, 40]), torch.tensor([10, 40, 105])
    computed, span = order._boxes(layout, lo, hi)
    first, first_span = order.boxes(layout, lo, hi)
    assert all(torch.equal(a, b) for a, b in zip(first, computed)) and torch.equal(first_span, span)
    first.t0.fill_(-1), first_span.fill_(-1)  # a caller writing into what it was given
    again, again_span = order.boxes(layout, lo, hi)
    assert all(torch.equal(a, b) for a, b in zip(again, computed)) and torch.equal(again_span, span)


@pytest.mark.parametrize("bad", [0, -1, (2, 2), (2, 0, 2), 1.5, True, "2", (2, 2, 2.0)])
def test_tile_order_validation(bad):
    with pytest.raises(ValueError, match="tile"):
        TileOrder(bad)


def test_order_argument_validation():
    with pytest.raises(ValueError, match="order"):
        Dense().block_mask(VideoLayout(2, 2, 2), 4, order=(2, 2, 2))


# Block masks against the token reduction ----------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERN_CASES, ids=repr)
@pytest.mark.parametrize("order", ORDERS, ids=repr)
def test_block_mask_is_reduced_token_mask(pattern, order):
    check_block_masks_reduce_token_masks(pattern, LAYOUTS, order, BLOCK_SIZES)


def test_block_mask_random_cases():
    gen = torch.Generator().manual_seed(1)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    def random_pattern():
        kind = draw(0, 2)
        if kind == 0:
            return Radial(
                decay=[0.05, 0.2, 0.5, 1.0, 2.5][draw(0, 4)],
                min_window=draw(1, 12),
                sink=bool(draw(0, 1)),
                spatial=radial.SPATIAL[draw(0, 2)],
            )
        window = (draw(1, 5), draw(1, 5), draw(1, 5))
        if kind == 1:
            return Window3D(window, stride=tuple(draw(1, w) for w in window))
        return Window3D([window, (draw(1, 4), draw(1, 4), draw(1, 4))])

    for _ in range(60):
        layout = VideoLayout(
            draw(1, 6),
            draw(1, 7),
            draw(1, 8),
            text_len=draw(0, 3),
            text_position=("start", "end")[draw(0, 1)],
        )
        order = [None, TileOrder((draw(1, 3), draw(1, 4), draw(1, 4)))][draw(0, 1)]
        pattern = random_pattern()
        if draw(0, 1):
            other = random_pattern()
            if pattern.num_heads > 1 and other.num_heads > 1:
                other = Radial(min_window=draw(1, 8))
            pattern = pattern | other if draw(0, 1) else pattern & other
        block_size = (draw(1, 40), draw(1, 40))
        expected = reduce_token_mask(reordered_reference(pattern, layout, order), block_size)
        assert torch.equal(pattern.block_mask(layout, block_size, order), expected), (layout, pattern, order)


# Window3D ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "window, stride",
    [
        ((3, 3, 3), 1),
        ((2, 4, 5), 1),
        ((3, 5, 4), (1, 2, 3)),
        ((9, 9, 9), 1),
        ((1, 1, 1), 1),
        ((4, 6, 6), (2, 3, 3)),
    ],
    ids=str,
)
def test_window3d_every_query_sees_the_same_number_of_keys(window, stride):
    layout = VideoLayout(5, 6, 7, text_len=3)
    mask = Window3D(window, stride=stride)._video_token_mask(layout)[0]
    expected = math.prod(min(w, g) for w, g in zip(window, layout.grid))
    assert torch.all(mask.sum(-1) == expected)  # NATTEN: border queries see as many keys as central ones


def test_window3d_clamps_the_centre_not_the_edges():
    layout = VideoLayout(6, 8, 8)
    mask = Window3D((3, 5, 5))._video_token_mask(layout)[0].reshape(6, 8, 8, 6, 8, 8)
    centre = mask[3, 4, 4]  # unclamped: frames 2..4, rows 2..6, cols 2..6
    assert centre[2:5, 2:7, 2:7].all() and centre.sum() == 75
    corner = mask[0, 0, 0]  # clamped: the box is pushed inside, frames 0..2, rows 0..4, cols 0..4
    assert corner[0:3, 0:5, 0:5].all() and corner.sum() == 75
    edge = mask[5, 7, 3]  # last frame, last row, middle column
    assert edge[3:6, 3:8, 1:6].all() and edge.sum() == 75


def _window3d_rule(window, stride, layout):
    """Window3D's token mask written pair by pair from its docstring alone: per axis, the window of the query's
    stride group, centred on the group's middle and pushed inside the axis."""
    coords = list(itertools.product(*map(range, layout.grid)))

    def kept_on_axis(p, k, n, w, s):
        w = min(w, n)
        centre = min(s * (p // s) + s // 2, n - 1)
        start = min(max(centre - w // 2, 0), n - w)
        return start <= k < start + w

    return torch.tensor([[all(map(kept_on_axis, q, k, layout.grid, window, stride)) for k in coords] for q in coords])


def test_window3d_token_and_block_masks_are_its_documented_rule():
    # The block tests compare the block mask with the token mask, and both take their windows from one
    # `_window_start`, so a change to it passed them wherever every query still saw as many keys: an odd stride
    # group centred on its position 2 rather than 1 (`(stride + 1) // 2`) passed every test. Odd strides, windows
    # and axes not multiples of them, and tiles that do not divide the axes, against a reference of its own.
    g = torch.Generator().manual_seed(4)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=g))

    for _ in range(12):
        layout = VideoLayout(draw(1, 5), draw(3, 7), draw(3, 7), text_len=draw(0, 3),
                             text_position=("start", "end")[draw(0, 1)])
        window = (draw(1, 4), draw(3, 6), draw(3, 8))
        stride = tuple(draw(1, w) for w in window)
        pattern, rule = Window3D(window, stride=stride), _window3d_rule(window, stride, layout)
        assert torch.equal(pattern._video_token_mask(layout)[0], rule), (layout, pattern)
        tokens = torch.zeros(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
        video = slice(layout.video_start, layout.video_start + layout.num_video_tokens)
        text = slice(layout.text_start, layout.text_start + layout.text_len)
        tokens[video, video], tokens[text], tokens[:, text] = rule, True, True
        order = TileOrder((draw(1, 3), draw(2, 4), draw(2, 4)))
        perm = order.permutation(layout)
        block_size = (draw(3, 20), draw(3, 20))
        expected = reduce_token_mask(tokens[perm][:, perm][None], block_size)
        assert torch.equal(pattern.block_mask(layout, block_size, order), expected), (layout, pattern, order)


def test_window3d_stride_groups_share_a_window():
    layout = VideoLayout(4, 8, 8)
    mask = Window3D((2, 4, 4), stride=(1, 4, 4))._video_token_mask(layout)[0].reshape(4, 8, 8, -1)
    group = mask[1, 4:8, 0:4].reshape(16, -1)
    assert (group == group[0]).all()
    assert not torch.equal(mask[1, 0, 0], mask[1, 4, 0])


def test_window3d_per_head_matches_single_head_masks():
    layout = VideoLayout(4, 6, 5, text_len=2)
    windows = [(3, 8, 8), (1, 16, 16), (2, 3, 1)]
    pattern = Window3D(windows)
    assert pattern.num_heads == 3
    tokens, blocks = pattern.token_mask(layout), pattern.block_mask(layout, (16, 8), TileOrder(2))
    assert tokens.shape[0] == blocks.shape[0] == 3
    for head, window in enumerate(windows):
        single = Window3D(window)
        assert torch.equal(tokens[head], single.token_mask(layout)[0])
        assert torch.equal(blocks[head], single.block_mask(layout, (16, 8), TileOrder(2))[0])


def _partial_blocks(pattern, layout, block_size, order):
    """Blocks kept at block level that are not fully kept at token level."""
    tokens = pattern.token_mask(layout, order)[0]
    n, b = layout.num_tokens, block_size
    blocks = tokens.reshape(n // b, b, n // b, b)
    kept, full = blocks.any(dim=(1, 3)), blocks.all(dim=(1, 3))
    return int((kept & ~full).sum()), int(kept.sum())


def test_window3d_aligned_with_tiles_keeps_whole_blocks():
    # Sliding Tile Attention: windows are odd multiples of the tile, queries grouped by tile (stride = tile),
    # the grid divides by the tile and one block is one tile.
    layout = VideoLayout(8, 16, 16)
    tile, order = (2, 4, 4), TileOrder((2, 4, 4))
    aligned = Window3D((6, 12, 4), stride=tile)
    partial, kept = _partial_blocks(aligned, layout, 32, order)
    assert partial == 0 and 0 < kept < (layout.num_tokens // 32) ** 2
    # Every query of a tile keeps exactly 3 * 3 * 1 tiles.
    assert torch.all(aligned.block_mask(layout, 32, order)[0].sum(-1) == 9)
    # Per-token windows (stride 1, NATTEN) or frame-major blocks cut through blocks.
    assert _partial_blocks(Window3D((6, 12, 4)), layout, 32, order)[0] > 0
    assert _partial_blocks(aligned, layout, 32, None)[0] > 0


# Nothing in tests/ constructed a bad VideoLayout: dropping the bool check (frames=True read as 1), the text_len >= 0
# check (a negative text_len shrinks num_tokens) or the text_position check (a typo such as "begin" silently read as
# "end") left every test passing.
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"frames": 0}, "frames"),
        ({"height": -1}, "height"),
        ({"width": 2.0}, "width"),
        ({"frames": True}, "frames"),
        ({"height": False}, "height"),
        ({"text_len": -1}, "text_len"),
        ({"text_len": 1.5}, "text_len"),
        ({"text_len": True}, "text_len"),
        ({"text_position": "begin"}, "text_position"),
        ({"text_position": None}, "text_position"),
    ],
)
def test_video_layout_validation(kwargs, field):
    args = {"frames": 2, "height": 3, "width": 4, "text_len": 1, **kwargs}
    with pytest.raises(ValueError, match=rf"VideoLayout\.{field} .*got {field}="):
        VideoLayout(**args)


def test_video_layout_positions():
    start, end = VideoLayout(2, 3, 4, text_len=5, text_position="start"), VideoLayout(2, 3, 4, text_len=5)
    assert (start.video_start, start.text_start, start.num_tokens) == (5, 0, 29)
    assert (end.video_start, end.text_start, end.num_tokens) == (0, 24, 29)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"window": 0}, "window"),
        ({"window": (3, 8)}, "window"),
        ({"window": (3, 8, 8.0)}, "window"),
        ({"window": [(3, 8, 8), (1, 0, 1)]}, r"window\[1\]"),
        ({"window": "3"}, "window"),
        ({"stride": 0}, "stride"),
        ({"window": (3, 8, 8), "stride": (1, 9, 1)}, "stride"),
        ({"window": [(3, 8, 8), (1, 4, 4)], "stride": 2}, "stride"),
        ({"window": (2**31, 3, 3)}, "window"),  # past int64 inside torch: a ValueError naming no field before
    ],
)
def test_window3d_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Window3D(**kwargs)


def test_window3d_repr_registry_and_hashing():
    assert repr(Window3D()) == "window3d(window=(3, 8, 8))"
    assert repr(Window3D(4, stride=(1, 2, 2))) == "window3d(window=(4, 4, 4), stride=(1, 2, 2))"
    assert repr(Window3D([(3, 8, 8), (1, 16, 16)])) == "window3d(window=((3, 8, 8), (1, 16, 16)))"
    assert Window3D([3, 8, 8]) == Window3D((3, 8, 8)) and Window3D(4) == Window3D((4, 4, 4))
    assert len({Window3D(), Window3D((3, 8, 8)), Window3D([(3, 8, 8), (1, 16, 16)])}) == 2
    assert PATTERNS["window3d"] is Window3D and get_pattern("window3d") == Window3D((3, 8, 8))
    assert get_pattern("window3d", window=(1, 4, 4)) == Window3D((1, 4, 4))


# Radial's spatial window -----------------------------------------------------------------------------------


def test_radial_spatial_shapes_at_token_level():
    layout = VideoLayout(3, 9, 9)  # S = 81, canvas P = 128; d = 2: width = decay * 128 / 4
    query = (0, 4, 4)
    for spatial, decay, inside, outside in [
        ("band", 0.5, [(4, 4 + 8)], [(4, 4 + 9)]),  # width 16: |s_q - s_k| <= 8 on the flattened index
        # width 32: max(|dh|, |dw|) <= isqrt(32 // 4) = 2
        ("box", 1.0, [(6, 6), (2, 2), (4, 6)], [(7, 4), (4, 1), (1, 4)]),
        # width 32: dh^2 + dw^2 <= floor(32 / pi) = 10, edge included
        ("disc", 1.0, [(4, 7), (7, 4), (6, 6), (2, 6), (5, 7), (7, 5)], [(4, 8), (7, 6), (6, 7), (7, 7)]),
        # width 24: floor(24 / pi) = 7 keeps dh^2 + dw^2 = 5 but not 8; at width 32, 32 / 3 floors to 10 too, so
        # only this row tells pi from 3
        ("disc", 0.75, [(6, 5), (5, 6), (2, 3), (4, 6)], [(6, 6), (2, 2), (6, 2), (4, 7)]),
    ]:
        mask = (
            Radial(decay=decay, min_window=1, spatial=spatial).token_mask(layout)[0].reshape(3, 9, 9, 3, 9, 9)
        )
        keys = mask[query][2]  # key frame 2, d = 2
        if spatial == "band":
            flat = keys.flatten()
            s = 4 * 9 + 4
            assert flat[s - 8 : s + 9].all() and not flat[s + 9] and not flat[s - 9]
            continue
        assert all(keys[r, c] for r, c in inside), spatial
        assert not any(keys[r, c] for r, c in outside), spatial
    # Adjacent frames stay dense whatever the shape.
    mask = Radial(decay=0.01, min_window=1, spatial="disc").token_mask(layout)[0]
    assert mask[:81, :162].all()


def test_radial_spatial_validation_and_repr():
    with pytest.raises(ValueError, match="spatial"):
        Radial(spatial="circle")
    assert repr(Radial(spatial="disc")) == "radial(decay=1.0, min_window=64, sink=False, spatial='disc')"
    assert repr(Radial()) == "radial(decay=1.0, min_window=64, sink=False)"
    assert Radial(spatial="band") == Radial()
    # One repr per pattern: eval's duplicate check keys on it, and get_pattern reads it back.
    assert repr(Radial(decay=1)) == repr(Radial())
    assert repr(Radial(decay=np.float64(0.5))).startswith("radial(decay=0.5,")


def test_blocked_attention_matches_direct_masked_softmax():
    layout, order = VideoLayout(4, 6, 8), TileOrder((1, 4, 4))
    logits, values = synthetic_logits(layout, kind="rope"), torch.randn(layout.num_tokens, 8)
    pattern = Radial(decay=0.3, min_window=8, spatial="disc")
    fast = BlockedAttention(layout, 16, logits, values, order).error(pattern)
    direct = attention_error(pattern, layout, 16, logits, values, order)
    assert fast["density"] == direct["density"]
    assert math.isclose(fast["rel_l2"], direct["rel_l2"], rel_tol=1e-4)
    assert math.isclose(fast["recall"], direct["recall"], rel_tol=1e-5)


def test_the_spatial_study_refuses_patterns_with_a_mask_per_head():
    # One head's logits scored under the first of several masks would report that head's density as the pattern's.
    layout = VideoLayout(4, 4, 4)
    logits, values = synthetic_logits(layout), torch.randn(layout.num_tokens, 8)
    per_head = Window3D([(1, 1, 1), (9, 9, 9)])
    with pytest.raises(ValueError, match="one mask for every head, got window3d.* with 2 heads"):
        attention_error(per_head, layout, 16, logits, values)
    with pytest.raises(ValueError, match="one mask for every head"):
        BlockedAttention(layout, 16, logits, values).error(per_head)


# Composition ------------------------------------------------------------------------------------------------


def test_composition_semantics():
    layout = VideoLayout(6, 8, 8, text_len=4, text_position="start")
    a, b = Radial(decay=0.3, min_window=8, spatial="disc"), Window3D((3, 4, 4))
    union, inter = a | b, a & b
    assert isinstance(union, Union) and isinstance(inter, Intersection)
    assert union == Union(a, b) and inter == Intersection(a, b) and len({union, Union(a, b), inter}) == 2
    assert repr(union) == f"({a!r} | {b!r})" and repr(inter) == f"({a!r} & {b!r})"
    assert repr(a | b & a) == f"({a!r} | ({b!r} & {a!r}))"
    ta, tb = a.token_mask(layout), b.token_mask(layout)
    assert torch.equal(union.token_mask(layout), ta | tb) and torch.equal(inter.token_mask(layout), ta & tb)
    for order in (None, TileOrder((2, 4, 4))):
        ba, bb = a.block_mask(layout, 32, order), b.block_mask(layout, 32, order)
        assert torch.equal(union.block_mask(layout, 32, order), ba | bb)  # OR is exact at block level
        blocks = inter.block_mask(layout, 32, order)
        assert torch.equal(blocks, reduce_token_mask(inter.token_mask(layout, order), 32))
        assert (blocks <= (ba & bb)).all()


@dataclass(frozen=True, repr=False)
class _OffDiagonal(Pattern):
    """Every pair except a token with itself, with an exact box test (a test-only pattern)."""

    name = "off_diagonal"

    def _video_token_mask(self, layout):
        return ~torch.eye(layout.num_video_tokens, dtype=torch.bool)[None]

    def _box_any(self, layout, q, k):
        return (
            (q.num_tokens() > 1) | (k.num_tokens() > 1) | (q.t0 != k.t0) | (q.h0 != k.h0) | (q.w0 != k.w0)
        )[None]


def test_intersection_block_mask_is_not_and_of_block_masks():
    # "Only itself" and "anything but itself": both keep pairs in every diagonal block, never the same pair.
    layout = VideoLayout(2, 3, 5)
    left, right = Window3D((1, 1, 1)), _OffDiagonal()
    inter = left & right
    assert not inter.token_mask(layout).any()
    assert (left.block_mask(layout, 4) & right.block_mask(layout, 4)).diagonal(dim1=1, dim2=2).all()
    assert not inter.block_mask(layout, 4).any()
    assert not inter.block_mask(layout, 4, TileOrder((1, 2, 2))).any()


def test_composition_heads_and_validation():
    per_head = Window3D([(1, 3, 3), (3, 3, 3)])
    assert (per_head | Radial()).num_heads == 2 and (Radial() & per_head).num_heads == 2
    with pytest.raises(ValueError, match="heads"):
        per_head | Window3D([(1, 1, 1), (1, 1, 1), (1, 1, 1)])
    with pytest.raises(ValueError, match="right"):
        Union(Radial(), "radial")
    with pytest.raises(TypeError):
        Radial() | 3


def test_legacy_span_patterns_still_work_in_frame_major_order():
    @dataclass(frozen=True, repr=False)
    class SpansOnly(Pattern):
        name = "spans-only"

        def _video_token_mask(self, layout):
            v = layout.num_video_tokens
            return torch.ones(1, v, v, dtype=torch.bool)

        def _video_block_mask(self, layout, q_lo, q_hi, k_lo, k_hi):
            return torch.ones(1, len(q_lo), len(k_lo), dtype=torch.bool)

    layout = VideoLayout(2, 3, 4)
    assert SpansOnly().block_mask(layout, 8).all() and (SpansOnly() | Radial()).block_mask(layout, 8).all()
    with pytest.raises(NotImplementedError, match="frame-major order only .it implements _video_block_mask"):
        SpansOnly().block_mask(layout, 8, TileOrder(2))


def test_a_pattern_with_a_token_mask_alone_is_told_what_block_rule_to_add():
    # The default block rule is the box test: with neither it nor a span rule, no order gives a block mask, and the
    # error said the pattern implemented `_video_block_mask`, which it did not.
    @dataclass(frozen=True, repr=False)
    class TokensOnly(Pattern):
        name = "tokens-only"

        def _video_token_mask(self, layout):
            v = layout.num_video_tokens
            return torch.eye(v, dtype=torch.bool)[None]

    layout = VideoLayout(2, 4, 4)
    assert TokensOnly().token_mask(layout).shape == (1, 32, 32)
    for order in (None, TileOrder(2)):
        with pytest.raises(NotImplementedError, match="defines no block-mask rule: implement _box_any") as raised:
            TokensOnly().block_mask(layout, 8, order)
        assert "it implements _video_block_mask" not in str(raised.value)


# Density control --------------------------------------------------------------------------------------------


def _closest_on_grid(make, xs, layout, target, block_size, order):
    return min(abs(make(x).density(layout, block_size, order) - target) for x in xs)


@pytest.mark.parametrize(
    "pattern, order",
    [
        (Radial(min_window=16), None),
        (Radial(min_window=16, spatial="disc"), TileOrder((1, 8, 8))),
        (Radial(min_window=64, sink=True), None),
        (Window3D((3, 8, 8)), None),
        (Window3D((2, 4, 4), stride=(2, 4, 4)), TileOrder((2, 4, 4))),
        (Window3D([(3, 8, 8), (1, 16, 16)]), TileOrder((1, 8, 8))),
    ],
    ids=repr,
)
def test_at_density_hits_the_target_or_the_closest_achievable(pattern, order):
    layout, block_size = VideoLayout(16, 16, 16), 64
    one_row = 1 / (layout.num_tokens // block_size)
    for target in (0.15, 0.4, 0.55, 0.8):
        solved = pattern.at_density(layout, target, block_size, order)
        assert type(solved) is type(pattern)
        error = abs(solved.density(layout, block_size, order) - target)
        if error > one_row:  # then nothing on a fine grid of the parameter may be closer
            if isinstance(pattern, Radial):
                grid = [2.0 ** (i / 8) for i in range(-48, 48)]
                best = _closest_on_grid(
                    lambda x: Radial(x, pattern.min_window, pattern.sink, pattern.spatial),
                    grid,
                    layout,
                    target,
                    block_size,
                    order,
                )
            else:
                make = pattern._density_knob(layout)[0]
                best = _closest_on_grid(
                    make, [i / 16 for i in range(16 * 9)], layout, target, block_size, order
                )
            assert error <= best + 1e-12, (target, solved, error, best)


@pytest.mark.parametrize(
    "pattern, layout, block_size",
    [
        # Radial loses density where its k-th-distance rule steps: 0.68 was returned for 0.8 while 0.84 was reachable
        (Radial(min_window=4, sink=True, spatial="box"), VideoLayout(6, 3, 4), 16),
        (Radial(min_window=8, spatial="disc"), VideoLayout(9, 4, 5, text_len=4), (8, 16)),
        (Radial(min_window=1), VideoLayout(11, 2, 3), 4),
    ],
    ids=repr,
)
def test_at_density_on_a_small_mask_finds_the_closest_achievable(pattern, layout, block_size):
    # A mask of few blocks costs microseconds and one query-block row is a large step there: every monotone piece
    # is searched, so nothing on a fine grid of the parameter (both sides of each break included) is closer.
    make, lo, hi, breaks = pattern._density_knob(layout)
    xs = [lo + (hi - lo) * i / 400 for i in range(401)] + [b + e for b in breaks for e in (-1e-9, 1e-9)]
    reachable = {make(x).density(layout, block_size) for x in xs}
    for target in (0.1, 0.35, 0.5, 0.8):
        got = pattern.at_density(layout, target, block_size).density(layout, block_size)
        assert abs(got - target) <= min(abs(d - target) for d in reachable) + 1e-12, (target, got)


def test_at_density_edges_and_validation():
    layout = VideoLayout(8, 8, 8)
    assert Dense().at_density(layout, 0.3, 32) == Dense()
    assert Window3D().at_density(layout, 1.0, 32).density(layout, 32) == 1.0
    lowest = Window3D().at_density(layout, 1e-6, 32)
    assert lowest.window == (1, 1, 1)
    # A target halfway between two reachable densities goes to the sparser, as the docstring says: on a row of
    # four tokens, windows of 1-4 columns reach 0.25, 0.5, 0.75, 1.0, and 0.375 is 0.125 from both 0.25 and 0.5.
    row = VideoLayout(1, 1, 4)
    assert Window3D((1, 1, 1)).at_density(row, 0.375, 1).density(row, 1) == 0.25
    for bad in (0, 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="target"):
            Radial().at_density(layout, bad, 32)
    with pytest.raises(ValueError, match="at_density"):
        (Radial() | Window3D()).at_density(layout, 0.5, 32)
    # Where the parameter cannot change the density (two frames: radial is dense), the pattern comes back as
    # given: before, the knob's lower end (decay=9e-13) reached `pattern_ran`.
    two_frames = VideoLayout(2, 8, 8)
    assert Radial(decay=3.0).at_density(two_frames, 0.3, 32) == Radial(decay=3.0)
    assert SpatialTemporal(frames=2).at_density(VideoLayout(1, 8, 8), 0.3, 32) == SpatialTemporal(frames=2)
    # Also where the knob has breaks but the whole sequence is one block (three frames of one token): every decay
    # tried gives density 1.0, and the first one tried (2**-40) came back.
    for layout, block in ((VideoLayout(3, 1, 1), 64), (VideoLayout(4, 2, 2), 64)):
        assert Radial(decay=1.0).at_density(layout, 0.5, block) == Radial(decay=1.0)
    # A min_window large for the frame skips frame distances up to a larger decay than the frame alone needs:
    # before, the search stopped below it (16 frames of one token: 0.875; 8 frames, a huge window: 0.34).
    for small, block, min_window in (((16, 1, 1), 1, 64), ((16, 2, 2), 4, 4096), ((8, 4, 4), 16, 10**6)):
        solved = Radial(min_window=min_window).at_density(VideoLayout(*small), 1.0, block)
        assert solved.density(VideoLayout(*small), block) == 1.0, (small, solved)


def test_radial_at_density_reaches_both_ends_of_its_range():
    # The decay searched must span "only neighbouring frames" to "every pair": a range cut at decay 2**-4 kept
    # same-position keys two frames away at its sparsest (windows of one token still cover min_window=1), and one
    # cut at 2 * tokens_per_frame left the 3-row offsets of frames 8 apart out of a box window of 4 x 4 frames.
    layout = VideoLayout(8, 8, 8)
    frame = torch.arange(layout.num_tokens) // layout.tokens_per_frame
    neighbours = reduce_token_mask(((frame[:, None] - frame).abs() <= 1)[None], 8).double().mean().item()
    assert Radial(min_window=1).at_density(layout, 1e-6, 8).density(layout, 8) == neighbours
    small_frames = VideoLayout(9, 4, 4)
    assert Radial(min_window=1, spatial="box").at_density(small_frames, 1.0, 4).density(small_frames, 4) == 1.0


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "a"])
def test_at_density_refuses_a_max_iter_that_is_not_a_positive_int(bad):
    # Before, 0, -1 and True skipped the bisection and returned the sparsest end (window (1, 1, 1), 0.125 against
    # 0.375 for a target of 0.4) as the answer; 2.5 and "a" raised a raw TypeError.
    layout = VideoLayout(8, 4, 4)
    with pytest.raises(ValueError, match=f"max_iter must be an int >= 1.*max_iter={bad!r}"):
        Window3D().at_density(layout, 0.4, 16, max_iter=bad)
    assert Window3D().at_density(layout, 0.4, 16, max_iter=2).density(layout, 16) == 0.375  # two steps find it


def test_window3d_at_density_reaches_every_block_when_the_stride_does_not_divide_the_axis():
    # The scale's cap is the axis rounded up to the stride: capped at the axis (6), a window of 4 rounded to the
    # stride's multiple below it and never covered the frame.
    layout = VideoLayout(1, 6, 6)
    solved = Window3D((2, 4, 4), stride=(2, 4, 4)).at_density(layout, 1.0, 4)
    assert solved.density(layout, 4) == 1.0, solved


def test_at_density_measures_each_distinct_window_once(monkeypatch):
    # Window3D's scale rounds to integer windows, so most bisection steps land on a window already measured;
    # each block mask costs seconds at real models' shapes.
    measured = []
    original = Window3D.density

    def counting(self, *args, **kwargs):
        measured.append(self.window)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Window3D, "density", counting)
    Window3D().at_density(VideoLayout(16, 16, 16), 0.3, 64)
    assert len(measured) == len(set(measured)) and len(measured) < 20


# Plots and scaling ------------------------------------------------------------------------------------------


def test_radial_density_falls_like_log_n_over_n(tmp_path):
    path = tmp_path / "density.png"
    frames = [8, 16, 32, 64]
    rows = density_vs_frames([Radial(min_window=64), Window3D((3, 8, 8))], frames, 16, 16, 64, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["frames"] for r in rows] == frames * 2
    assert [r["tokens"] for r in rows] == [f * 16 * 16 for f in frames] * 2
    names = [repr(Radial(min_window=64)), repr(Window3D((3, 8, 8)))]
    assert [r["pattern"] for r in rows] == [name for name in names for _ in frames]
    radial_rows = rows[: len(frames)]
    ratio = [r["density_n_over_log_n"] for r in radial_rows]
    # density ~ c log(n) / n: the ratio stays within a narrow band while n grows 8x (density falls 3.5x).
    assert max(ratio) / min(ratio) < 1.3, ratio
    assert radial_rows[0]["density"] / radial_rows[-1]["density"] > 3
    # A fixed window: density ~ c / n, so density * n / log(n) keeps falling.
    window_ratio = [r["density_n_over_log_n"] for r in rows[len(frames) :]]
    assert window_ratio[0] / window_ratio[-1] > 1.9


def test_large_shapes_are_fast_and_block_level():
    resource = pytest.importorskip("resource")  # ru_maxrss: POSIX only
    layout = VideoLayout(frames=21, height=45, width=80)  # Wan 720p: 75,600 tokens
    patterns = [
        (Radial(spatial="disc"), TileOrder((1, 8, 8))),
        (Window3D((3, 8, 8)), TileOrder((3, 8, 8))),
        (Radial(decay=0.5) | Window3D((3, 8, 8)), TileOrder((3, 8, 8))),
    ]
    Window3D().block_mask(VideoLayout(3, 4, 4), 16, TileOrder(2))  # first-call overheads out of the timing
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for pattern, order in patterns:
        start = time.perf_counter()
        mask = pattern.block_mask(layout, 128, order)
        elapsed = time.perf_counter() - start
        assert mask.shape == (1, 591, 591) and mask.diagonal(dim1=1, dim2=2).all()
        assert elapsed < 5.0, f"{pattern!r}: {elapsed=:.2f}s"
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 256


def test_intersection_at_scale_stays_block_level():
    layout = VideoLayout(frames=9, height=30, width=52)
    pattern = Radial(decay=0.3, spatial="disc") & Window3D((5, 16, 16))
    start = time.perf_counter()
    mask = pattern.block_mask(layout, 128, TileOrder((1, 8, 16)))
    assert time.perf_counter() - start < 10.0
    assert mask.diagonal(dim1=1, dim2=2).all()
    assert (mask <= Window3D((5, 16, 16)).block_mask(layout, 128, TileOrder((1, 8, 16)))).all()


def test_render_with_order_and_heads(tmp_path):
    path = tmp_path / "window.png"
    layout = VideoLayout(4, 6, 8, text_len=5)
    pattern = Window3D([(1, 3, 3), (3, 5, 5)]) | Radial(decay=0.3, min_window=8, spatial="disc")
    assert pattern.render(layout, 16, path, head=1, order=TileOrder((1, 3, 4))) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 3)), TileOrder((2, 2, 2))])
@pytest.mark.parametrize("text", [0, 5])
def test_frame_sink_block_mask_is_the_token_reduction_and_composes(order, text):
    from diffsparse.patterns import FrameSink

    layout = VideoLayout(4, 5, 7, text_len=text, text_position="start")
    # Inside an intersection the frame patterns' whole-box tests decide: a block reaching past the sink's last frame
    # is not wholly in the sink, nor is one holding a dense query frame and another wholly dense.
    for pattern in (FrameSink(), FrameSink(frames=2), Window3D((1, 2, 2)) | FrameSink(),
                    Window3D((3, 3, 3)) & FrameSink(), Window3D((1, 3, 3)) & DenseQueryFrames((1, 3))):
        expected = reduce_token_mask(pattern.token_mask(layout, order), (16, 8))
        assert torch.equal(pattern.block_mask(layout, (16, 8), order), expected), pattern
    token = FrameSink().token_mask(layout)
    video = slice(text, None)
    frame0 = slice(text, text + 35)
    assert token[0, video, frame0].all() and not token[0, video, text + 35 :].any()
    with pytest.raises(ValueError, match="frames"):
        FrameSink(frames=0)


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize(
    "layout", [VideoLayout(6, 4, 6), VideoLayout(5, 3, 5, text_len=7), VideoLayout(4, 4, 4, text_len=5, text_position="start")]
)
def test_block_masks_between_token_ranges_are_the_token_reduction_of_those_ranges(layout, order):
    # A causal group's queries against the keys up to its end: the same rule on a part of the sequence, blocks
    # counted from the part's start.
    from diffsparse.patterns import FrameSink, SpatialTemporal

    n = layout.num_tokens
    patterns = [Radial(decay=0.3, min_window=8), Window3D((1, 3, 3)), SpatialTemporal(),
                Window3D((1, 2, 2)) | FrameSink(), Radial(decay=0.5, min_window=8) & Window3D((3, 5, 5)), Dense()]
    ranges = [((48, n), (0, n)), ((20, n), (0, n)), ((0, 40), (0, 40)), ((33, 60), (5, n - 3))]
    if layout.text_len:  # the text tokens alone, as queries or as keys (Radial raised with text queries alone)
        text = (0, layout.text_len) if layout.text_position == "start" else (n - layout.text_len, n)
        ranges += [(text, (0, n)), ((0, n), text)]
    for pattern in patterns:
        token = pattern.token_mask(layout, order)
        for q_tokens, k_tokens in ranges:
            for block_size in (8, 16, (8, 24)):
                found = pattern.block_mask(layout, block_size, order, q_tokens=q_tokens, k_tokens=k_tokens)
                expected = reduce_token_mask(token[:, slice(*q_tokens), slice(*k_tokens)], block_size)
                assert torch.equal(found, expected), (pattern, q_tokens, k_tokens, block_size)
    for bad in ((0, n + 1), (5, 5), (-1, 4), [0, 4], (0.0, 4)):
        with pytest.raises(ValueError, match="q_tokens must be a"):
            Dense().block_mask(layout, 16, q_tokens=bad)


# FrameCausal.group_bounds (the per-group key prefixes the runtime uses for SkyReels-V2) had no test at all.
def test_frame_causal_group_bounds():
    from diffsparse.patterns import FrameCausal

    layout = VideoLayout(5, 2, 3)  # 6 tokens per frame
    assert FrameCausal(2).group_bounds(layout) == (0, 12, 24, 30)
    assert FrameCausal(1).group_bounds(layout) == (0, 6, 12, 18, 24, 30)
    assert FrameCausal(5).group_bounds(layout) == (0, 30)
    # Tiles two frames deep keep groups of two frames together; tiles of one frame inside groups of two too.
    assert FrameCausal(2).group_bounds(layout, TileOrder((2, 1, 2))) == (0, 12, 24, 30)
    assert FrameCausal(2).group_bounds(layout, TileOrder((1, 2, 2))) == (0, 12, 24, 30)
    # Tiles three frames deep interleave groups of two: no prefix structure.
    assert FrameCausal(2).group_bounds(layout, TileOrder((3, 1, 2))) is None
    assert FrameCausal(2).group_bounds(VideoLayout(5, 2, 3, text_len=4)) is None


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2)), TileOrder((2, 2, 3))])
@pytest.mark.parametrize("block_size", [8, 12, (8, 24), 16])
def test_frame_causal_block_mask_and_whole_blocks_follow_the_token_mask(order, block_size):
    from diffsparse.patterns import FrameCausal

    for layout in (VideoLayout(5, 3, 4), VideoLayout(6, 4, 4)):
        for frames in (1, 2, 3):
            pattern = FrameCausal(frames)
            token = pattern.token_mask(layout, order)
            frame = torch.arange(layout.num_tokens) // (layout.height * layout.width)
            if order is None:
                assert torch.equal(token[0], frame[None, :] // frames <= frame[:, None] // frames)
            allowed = reduce_token_mask(token, block_size)
            assert torch.equal(pattern.block_mask(layout, block_size, order), allowed)
            # Whole blocks: no block pair holds both an allowed and a masked pair.
            mixed = allowed & reduce_token_mask(~token, block_size)
            whole = pattern.whole_blocks(layout, block_size, order)
            assert (whole is None) == bool(mixed.any()), (layout, frames)
            if whole is not None:
                assert torch.equal(whole, allowed)
    assert FrameCausal(2).whole_blocks(VideoLayout(4, 2, 4, text_len=3), 8) is None
    with pytest.raises(ValueError, match="frames"):
        FrameCausal(frames=0)


@pytest.mark.parametrize("seed", range(4))
def test_radial_frame_major_masks_from_cached_geometry_equal_the_box_test(seed):
    # Radial's frame-major block masks come from a per-layout cache of box-pair geometry (what `at_density`'s
    # hundred masks share); the generic box test of every other pattern and order is the reference.
    from diffsparse.patterns.base import Pattern, _block_spans

    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for _ in range(8):
        layout = VideoLayout(draw(1, 10), draw(1, 16), draw(1, 20), text_len=[0, 7, 70][draw(0, 2)],
                             text_position=["start", "end"][draw(0, 1)])
        block_q, block_k = [16, 32, 64][draw(0, 2)], [16, 48, 64][draw(0, 2)]
        pattern = Radial(decay=2.0 ** (draw(-80, 40) / 10), min_window=[1, 4, 64][draw(0, 2)], sink=bool(draw(0, 1)),
                         spatial=["band", "box", "disc"][draw(0, 2)])
        q_lo, q_hi, _ = _block_spans(layout, block_q)
        k_lo, k_hi, _ = _block_spans(layout, block_k)
        cached = pattern._video_block_mask(layout, q_lo, q_hi, k_lo, k_hi)
        generic = Pattern._video_block_mask(pattern, layout, q_lo, q_hi, k_lo, k_hi)
        nonempty = (q_hi > q_lo)[:, None] & (k_hi > k_lo)[None, :]
        assert torch.equal(cached & nonempty, generic & nonempty), (layout, block_q, block_k, pattern)


def test_radial_sink_keeps_key_frame_zero_in_an_intersection():
    # Radial's _box_all keeps a key box whose frames end at the sink (frame 0) whatever the distance; a box that
    # only starts there still holds later frames the radial test must pass.
    layout, block = VideoLayout(6, 2, 1), (4, 6)
    pattern = Radial(decay=0.2, min_window=4, sink=True) & Window3D((4, 1, 1))
    assert torch.equal(pattern.block_mask(layout, block), reduce_token_mask(pattern.token_mask(layout), block))


@pytest.mark.parametrize("sink", [False, True])
def test_radial_boxes_of_column_strips_are_the_token_reduction(sink):
    # A tile of 2 rows x 1 column: its best band distance to a box at the far column is across a row (row 1, col 0
    # to row 0, col 3 is 1 on the flattened index), not within one. Testing only dh = 0, or one of dh = +-1, dropped
    # kept blocks; so did the largest distance taken as the smallest in an intersection, and a sink read from the
    # box's last frame rather than its first (tiles of 2 frames). Every block mask passed the tests without them.
    layouts = [VideoLayout(3, 2, 4), VideoLayout(5, 2, 4, text_len=3)]
    radial = Radial(decay=1.0, min_window=1, sink=sink)
    for pattern in (radial, radial & Window3D((9, 9, 9)), Radial(decay=1.0, min_window=1, spatial="box", sink=sink)
                    & Window3D((9, 9, 9))):
        for order in (TileOrder((1, 2, 1)), TileOrder((2, 2, 1))):
            check_block_masks_reduce_token_masks(pattern, layouts, order, [1, 2, (2, 4), (4, 2)])


def test_radial_geometry_chunked_one_row_at_a_time_reduces_across_chunks(monkeypatch):
    # With one query block row per chunk, one block pair's box pairs come from several chunks: their smallest
    # spatial distance must be the least over all of them (a re-reduction keeping the largest dropped blocks).
    monkeypatch.setattr(radial, "_CHUNK_PAIRS", 1)
    radial._block_pair_geometry.cache_clear()  # else masks computed with the real chunks are reused
    try:
        g = torch.Generator().manual_seed(0)

        def draw(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=g))

        for _ in range(60):
            layout = VideoLayout(draw(1, 6), draw(1, 6), draw(1, 7), text_len=[0, 3][draw(0, 1)],
                                 text_position=["start", "end"][draw(0, 1)])
            block = (draw(1, 20), draw(1, 20))
            pattern = Radial(decay=2.0 ** (draw(-60, 30) / 10), min_window=[1, 3, 8][draw(0, 2)],
                             sink=bool(draw(0, 1)), spatial=["band", "box", "disc"][draw(0, 2)])
            expected = reduce_token_mask(pattern.token_mask(layout), block)
            assert torch.equal(pattern.block_mask(layout, block), expected), (layout, block, pattern)
    finally:
        radial._block_pair_geometry.cache_clear()  # drop the one-row chunks' geometry before other tests


def _random_boxes(layout, count, generator):
    """`count` random boxes inside the layout's grid (inclusive bounds, as `TokenOrder.boxes` gives them)."""
    from diffsparse.patterns import Boxes

    bounds = []
    for size in layout.grid:
        a, b = (torch.randint(0, size, (count,), generator=generator) for _ in range(2))
        bounds += [torch.minimum(a, b), torch.maximum(a, b)]
    return Boxes(*bounds)


def _kept_pairs_between_boxes(pattern, layout, q, k):
    """Per box pair `(q[i], k[i])`, how many of its (query, key) token pairs the token mask keeps."""
    count = pattern._video_token_mask(layout)[0].view(*layout.grid, *layout.grid).float()
    for axis, (lo, hi) in enumerate(zip((*q, *k)[::2], (*q, *k)[1::2])):
        position = torch.arange(layout.grid[axis % 3])
        inside = (position >= lo[:, None]) & (position <= hi[:, None])
        count = torch.einsum("ma,a...->m..." if axis == 0 else "ma,ma...->m...", inside.float(), count)
    return count


def test_radial_box_tests_are_exact_so_intersections_follow_the_token_mask():
    # An intersection keeps a box pair without refining it when one part keeps every pair of it (`_box_all`) and
    # the other keeps some: a largest spatial distance taken as the smallest of the two corners (band or box
    # metric) kept blocks whose only pairs kept by the window are the ones radial drops. A whole-box test that is
    # sound but not exact (a sink's frame 0 not left out of the box's frame range, `<` for `<=`) refines more, down
    # to single tokens, which intersections at scale cannot afford: both box tests are checked against the tokens.
    layout, g = VideoLayout(6, 3, 4), torch.Generator().manual_seed(0)
    radials = [Radial(decay=0.6, min_window=2, sink=True), Radial(decay=1.3, min_window=1, spatial="box"),
               Radial(decay=2.5, min_window=2, spatial="disc", sink=True)]
    for pattern in radials:
        q, k = _random_boxes(layout, 300, g), _random_boxes(layout, 300, g)
        kept = _kept_pairs_between_boxes(pattern, layout, q, k)
        every, some = kept == q.num_tokens() * k.num_tokens(), kept > 0
        assert every.any() and (some & ~every).any()  # both answers, and boxes on the pattern's edge
        assert torch.equal(pattern._box_all(layout, q, k)[0], every), pattern
        assert torch.equal(pattern._box_any(layout, q, k)[0], some), pattern
    order = TileOrder((1, 2, 2))
    for pattern in (radials[0] & Window3D((3, 2, 2)), Window3D((3, 2, 2)) & radials[1]):
        expected = reduce_token_mask(pattern.token_mask(layout, order), (2, 6))
        assert torch.equal(pattern.block_mask(layout, (2, 6), order), expected), pattern


def test_window3d_box_tests_are_exact():
    # As radial's: a whole-box test that answers "no" for a box whose last query window starts exactly at the key
    # box (`<` for `<=`) is sound but sends every such pair of an intersection down to single tokens.
    layout, g = VideoLayout(6, 3, 4), torch.Generator().manual_seed(1)
    for pattern in (Window3D((5, 2, 3)), Window3D((4, 3, 2), stride=(2, 1, 2))):
        q, k = _random_boxes(layout, 300, g), _random_boxes(layout, 300, g)
        kept = _kept_pairs_between_boxes(pattern, layout, q, k)
        every, some = kept == q.num_tokens() * k.num_tokens(), kept > 0
        assert every.any() and (some & ~every).any()
        assert torch.equal(pattern._box_all(layout, q, k)[0], every), pattern
        assert torch.equal(pattern._box_any(layout, q, k)[0], some), pattern


@pytest.mark.parametrize("block_size, tile", [(128, (1, 8, 16)), (32, (1, 4, 8)), (64, (1, 8, 8))])
def test_the_spatial_study_s_tiles_hold_one_block(block_size, tile, capsys):
    # isqrt alone gave 11 x 11 = 121-token tiles for 128-token blocks (and 5 x 6 for 32): blocks straddled tiles.
    from diffsparse.patterns import spatial_study

    spatial_study.main(["--frames", "2", "--height", "16", "--width", "16", "--block-size", str(block_size),
                        "--budgets", "0.9", "--min-window", "8"])
    assert f"tiles({','.join(map(str, tile))})" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        spatial_study.main(["--block-size", "0"])
