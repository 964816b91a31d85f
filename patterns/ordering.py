"""Token orders: frame-major (the default) or 3D tiles, so that one kernel block is one 3D neighbourhood."""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .layout import Triple, VideoLayout, as_triple


class Boxes(NamedTuple):
    r"""
    Axis-aligned boxes of video tokens: inclusive bounds `t0..t1` (frames), `h0..h1` (rows), `w0..w1`
    (columns), each an int64 tensor; all six broadcast to one shape. The unit in which block masks are
    computed: a block of any [`TileOrder`] is a short list of boxes, and patterns test pairs of boxes.

    Example:
        >>> box = Boxes(*(torch.tensor([v]) for v in (0, 1, 2, 2, 0, 3)))
        >>> box.num_tokens().tolist()
        [8]
    """

    t0: torch.Tensor
    t1: torch.Tensor
    h0: torch.Tensor
    h1: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor

    def num_tokens(self) -> torch.Tensor:
        """Tokens per box."""
        return (self.t1 - self.t0 + 1) * (self.h1 - self.h0 + 1) * (self.w1 - self.w0 + 1)

    def map(self, fn) -> Boxes:
        """The same function applied to all six bound tensors (indexing, reshaping, expanding)."""
        return Boxes(*(fn(bound) for bound in self))


def _ceil_div(a, b):
    return -(-a // b)


def _raster_boxes(lo, hi, dims):
    """Boxes covering positions `[lo, hi)` of a row-major walk over a grid `dims = (A, B, C)`; all arguments
    are int64 tensors of one shape `(n,)` (or ints). Five slots, `(n, 5)` each: head row, head rows, whole
    planes, tail rows, tail row; a span inside one row uses the first slot only. Returns the six bounds
    `(a0, a1, b0, b1, c0, c1)` and the validity of each slot."""
    _, b, c = dims
    lo_row, hi_row = _ceil_div(lo, c) * c, (hi // c) * c
    in_row = lo_row > hi_row  # the span (possibly empty) lies inside one row
    head_end = torch.where(in_row, hi, lo_row)
    row0, row1 = lo_row // c, torch.where(in_row, lo_row // c, hi_row // c)  # whole rows [row0, row1)
    lo_plane, hi_plane = _ceil_div(row0, b) * b, (row1 // b) * b
    in_plane = lo_plane > hi_plane  # the whole rows lie inside one plane
    head_rows_end = torch.where(in_plane, row1, lo_plane)
    tail_rows_start = torch.where(in_plane, row1, hi_plane)
    plane0, plane1 = lo_plane // b, torch.where(in_plane, lo_plane // b, hi_plane // b)

    def row_run(x, y):  # positions [x, y) inside one row
        row = x // c
        return row // b, row // b, row % b, row % b, x % c, (y - 1) % c, y > x

    def rows_run(x, y):  # whole rows [x, y) inside one plane
        return x // b, x // b, x % b, (y - 1) % b, 0 * x, 0 * x + c - 1, y > x

    def planes_run(x, y):  # whole planes [x, y)
        return x, y - 1, 0 * x, 0 * x + b - 1, 0 * x, 0 * x + c - 1, y > x

    slots = [
        row_run(lo, head_end),
        rows_run(row0, head_rows_end),
        planes_run(plane0, plane1),
        rows_run(tail_rows_start, row1),
        row_run(torch.where(in_row, hi, hi_row), hi),
    ]
    shape = torch.broadcast_shapes(*(torch.as_tensor(v).shape for slot in slots for v in slot))
    return [torch.stack([torch.as_tensor(s[i]).expand(shape) for s in slots], dim=-1) for i in range(7)]


class TokenOrder(abc.ABC):
    r"""
    The order interface: an order is a tiling of the video grid; tokens are sorted by tile, then by position
    inside the tile (both in `(t, h, w)` raster order). Subclasses say which tile a layout gets, and are hashable
    and immutable (`@dataclass(frozen=True)`): plans and configs are cached by their order.
    """

    @abc.abstractmethod
    def _tile(self, layout: VideoLayout) -> tuple[int, int, int]:
        """The tile extent `(t, h, w)` this order uses on `layout`."""

    def _tiling(self, layout: VideoLayout):
        """Tile extent, tile-grid shape, per-axis tile sizes (edge tiles partial), tile volumes and the token
        offset of each tile."""
        tile = self._tile(layout)
        counts = tuple(_ceil_div(g, t) for g, t in zip(layout.grid, tile))
        sizes = [(g - torch.arange(n) * t).clamp(max=t) for g, t, n in zip(layout.grid, tile, counts)]
        volume = (sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]).flatten()
        offsets = torch.zeros(len(volume) + 1, dtype=torch.int64)
        offsets[1:] = volume.cumsum(0)
        return tile, counts, sizes, volume, offsets

    def permutation(self, layout: VideoLayout) -> torch.Tensor:
        r"""
        For each position of the reordered sequence, the index of the token in the original sequence.

        Args:
            layout ([`VideoLayout`]): the sequence layout; text tokens map to themselves.

        Returns:
            `torch.LongTensor` of shape `(N,)`: `x_reordered = x[perm]`.

        Example:
            >>> perm = TileOrder(2).permutation(VideoLayout(frames=1, height=3, width=3, text_len=1))
            >>> perm.tolist()
            [0, 1, 3, 4, 2, 5, 6, 7, 8, 9]
        """
        tile, counts, sizes, _, offsets = self._tiling(layout)
        coords = layout.video_coordinates()
        index = [c // t for c, t in zip(coords, tile)]
        inner = [c - i * t for c, i, t in zip(coords, index, tile)]
        tile_id = (index[0] * counts[1] + index[1]) * counts[2] + index[2]
        local = (inner[0] * sizes[1][index[1]] + inner[1]) * sizes[2][index[2]] + inner[2]
        video = torch.empty(layout.num_video_tokens, dtype=torch.int64)
        video[offsets[tile_id] + local] = torch.arange(layout.num_video_tokens)
        perm = torch.arange(layout.num_tokens)
        perm[layout.video_start : layout.video_start + layout.num_video_tokens] = video + layout.video_start
        return perm

    def inverse(self, layout: VideoLayout) -> torch.Tensor:
        r"""
        For each original token, its position in the reordered sequence: `x == x_reordered[inv]`.

        Example:
            >>> layout = VideoLayout(frames=3, height=5, width=7)
            >>> order = TileOrder((2, 4, 4))
            >>> torch.equal(order.permutation(layout)[order.inverse(layout)], torch.arange(105))
            True
        """
        perm = self.permutation(layout)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm))
        return inv

    def boxes(self, layout: VideoLayout, lo: torch.Tensor, hi: torch.Tensor) -> tuple[Boxes, torch.Tensor]:
        r"""
        Describe spans of the reordered video tokens as boxes: each span `[lo, hi)` (positions among the
        reordered video tokens) is the union of at most 15 disjoint boxes: up to 5 for the tail of its first
        tile, 5 for the whole tiles in between (a run over the tile grid), 5 for the head of its last tile.

        Args:
            layout ([`VideoLayout`]): the sequence layout.
            lo (`torch.LongTensor` of shape `(n,)`): first position of each span.
            hi (`torch.LongTensor` of shape `(n,)`): one past the last position; `lo == hi` is an empty span.

        Returns:
            `(boxes, span)`: [`Boxes`] with bounds of shape `(M,)` and `torch.LongTensor` `(M,)` giving each
            box's span, non-decreasing (boxes of one span are consecutive).

        Example:
            >>> order = TileOrder((1, 2, 2))  # 2 x 2 tiles of a 4 x 4 frame: a span [2, 9) ends in tile 2
            >>> boxes, span = order.boxes(VideoLayout(1, 4, 4), torch.tensor([0, 2]), torch.tensor([2, 9]))
            >>> span.tolist()
            [0, 1, 1, 1]
            >>> torch.stack(list(boxes), dim=1).tolist()  # (t0, t1, h0, h1, w0, w1) per box
            [[0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 2, 3], [0, 0, 2, 2, 0, 0]]
        """
        # Memoised: solving a pattern for a density (`Pattern.at_density`) builds a hundred block masks of one
        # layout and block size, and the boxes of their blocks were most of that time (0.4 of 0.5 s for radial
        # on the testbed's 2,448 tokens). Copies, so no caller can change the memo.
        boxes, span = _memo_boxes(self, layout, tuple(lo.tolist()), tuple(hi.tolist()))
        return boxes.map(torch.clone), span.clone()

    def _boxes(self, layout: VideoLayout, lo: torch.Tensor, hi: torch.Tensor) -> tuple[Boxes, torch.Tensor]:
        """[`TokenOrder.boxes`], computed."""
        tile, counts, sizes, volume, offsets = self._tiling(layout)
        grid = torch.tensor(layout.grid)
        lo, hi = lo.to(torch.int64), hi.to(torch.int64)
        nonempty = hi > lo
        last_tile = len(volume) - 1
        first = (torch.searchsorted(offsets, lo, right=True) - 1).clamp(0, last_tile)
        last = (torch.searchsorted(offsets, (hi - 1).clamp(min=0), right=True) - 1).clamp(0, last_tile)

        def tile_coords(tile_id):
            idx = (
                tile_id // (counts[1] * counts[2]),
                (tile_id // counts[2]) % counts[1],
                tile_id % counts[2],
            )
            return [i * t for i, t in zip(idx, tile)], [s[i] for s, i in zip(sizes, idx)]

        def partial(tile_id, a, b, valid):  # positions [a, b) inside one tile, in token coordinates
            origin, dims = tile_coords(tile_id)
            *bounds, ok = _raster_boxes(a, b, dims)
            shifted = [bound + origin[axis // 2][:, None] for axis, bound in enumerate(bounds)]
            return shifted, ok & valid[:, None]

        head_end = torch.where(first == last, hi, offsets[first + 1])
        head = partial(first, lo - offsets[first], head_end - offsets[first], nonempty)
        tail = partial(last, torch.zeros_like(lo), hi - offsets[last], nonempty & (last > first))
        # Whole tiles strictly between the first and the last: a raster run over the tile grid, mapped to
        # token coordinates (edge tiles are clipped to the grid).
        *tile_bounds, ok = _raster_boxes(first + 1, torch.maximum(last, first + 1), counts)
        middle = []
        for axis, bound in enumerate(tile_bounds):
            t = tile[axis // 2]
            middle.append(bound * t if axis % 2 == 0 else torch.minimum((bound + 1) * t, grid[axis // 2]) - 1)
        middle = (middle, ok & nonempty[:, None])

        parts = (head, middle, tail)
        bounds = [torch.cat([p[0][i] for p in parts], dim=1) for i in range(6)]
        valid = torch.cat([p[1] for p in parts], dim=1)
        span, slot = valid.nonzero(as_tuple=True)
        return Boxes(*(b[span, slot] for b in bounds)), span


@functools.lru_cache(maxsize=256)
def _memo_boxes(order: TokenOrder, layout: VideoLayout, lo: tuple[int, ...], hi: tuple[int, ...]):
    return order._boxes(layout, torch.tensor(lo, dtype=torch.int64), torch.tensor(hi, dtype=torch.int64))


@dataclass(frozen=True)
class TileOrder(TokenOrder):
    r"""
    Reorder video tokens into 3D tiles, as Sliding Tile Attention ([Zhang et al.,
    2025](https://arxiv.org/abs/2502.04507)) and NATTEN do, so that a block of consecutive tokens is a 3D
    neighbourhood instead of a stripe of rows.

    Video tokens are sorted by (tile index in `(t, h, w)` raster order over the tile grid, then position
    inside the tile in `(t, h, w)` raster order). **No padding tokens**: when `tile` does not divide the grid,
    the edge tiles are partial and simply hold fewer tokens. Every position of the reordered sequence is a
    real token, so nothing needs masking, sequence lengths stay `N`, and any resolution and frame count works.
    The cost is that kernel blocks and tiles align only where the grid divides by the tile (and the tile
    volume by the block size); elsewhere a block may hold parts of two tiles, which the exact block masks
    account for. Text tokens stay where they are (start or end of the sequence).

    Args:
        tile (`int` or `tuple[int, int, int]`): tile extent `(t, h, w)` in tokens; one int for a cube. A tile
            larger than the grid along an axis covers that axis.

    Example:
        >>> order = TileOrder((1, 2, 2))
        >>> order
        tiles(1,2,2)
        >>> order.permutation(VideoLayout(frames=1, height=2, width=4)).tolist()
        [0, 1, 4, 5, 2, 3, 6, 7]
    """

    tile: Triple

    def __post_init__(self):
        object.__setattr__(self, "tile", as_triple(self.tile, "tile"))

    def __repr__(self) -> str:
        return "tiles({},{},{})".format(*self.tile)

    def _tile(self, layout: VideoLayout) -> tuple[int, int, int]:
        return tuple(min(t, g) for t, g in zip(self.tile, layout.grid))


@dataclass(frozen=True)
class IdentityOrder(TokenOrder):
    r"""
    The frame-major order of the model's sequence (no reordering), the default wherever an order is accepted.
    Equivalent to one tile covering the whole grid.

    Example:
        >>> IdentityOrder()
        frame_major()
        >>> IdentityOrder().permutation(VideoLayout(frames=2, height=1, width=2)).tolist()
        [0, 1, 2, 3]
    """

    def __repr__(self) -> str:
        return "frame_major()"

    def _tile(self, layout: VideoLayout) -> tuple[int, int, int]:
        return layout.grid

    def permutation(self, layout: VideoLayout) -> torch.Tensor:
        return torch.arange(layout.num_tokens)


def as_order(order: TokenOrder | None) -> TokenOrder:
    r"""
    Resolve an `order` argument: `None` is [`IdentityOrder`], an order passes through, anything else is a
    `ValueError`.

    Example:
        >>> as_order(None), as_order(TileOrder(2))
        (frame_major(), tiles(2,2,2))
    """
    if order is None:
        return IdentityOrder()
    if not isinstance(order, TokenOrder):
        raise ValueError(f"order must be None, IdentityOrder() or TileOrder(tile), got {order=}")
    try:
        hash(order)
    except TypeError:
        # Plans, boxes and configs are cached by their order: an unhashable one (a plain `@dataclass` subclass)
        # failed later in a cache with a bare TypeError, after a config had accepted it.
        raise ValueError(
            f"order must be hashable (a custom TokenOrder as a @dataclass(frozen=True)), got {order=}"
        ) from None
    return order


def permute(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    r"""
    Put a sequence into the order given by `perm` (from [`TileOrder.permutation`]): `x_reordered = x[perm]`
    along `dim`. Exact (an index copy); lengths are unchanged.

    Args:
        x (`torch.Tensor`): any tensor with the sequence along `dim`, e.g. `(B, S, H, D)` with `dim=1`.
        perm (`torch.LongTensor` of shape `(N,)`): the permutation.
        dim (`int`): the sequence dimension.

    Example:
        >>> permute(torch.tensor([10, 11, 12]), torch.tensor([2, 0, 1]), dim=0).tolist()
        [12, 10, 11]
    """
    return x.index_select(dim, perm.to(x.device))


def unpermute(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    r"""
    Undo [`permute`]: `unpermute(permute(x, perm, dim), perm, dim)` equals `x` exactly.

    Args:
        x (`torch.Tensor`): the reordered tensor.
        perm (`torch.LongTensor` of shape `(N,)`): the permutation that was applied.
        dim (`int`): the sequence dimension.

    Example:
        >>> unpermute(torch.tensor([12, 10, 11]), torch.tensor([2, 0, 1]), dim=0).tolist()
        [10, 11, 12]
    """
    return torch.empty_like(x).index_copy_(dim, perm.to(x.device), x)
