"""A 3D neighbourhood: each query attends to a t x h x w box of keys clamped inside the canvas."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .base import Pattern
from .layout import Triple, as_triple

# Elements per vectorised chunk of the token-level reference.
_CHUNK_ELEMENTS = 1 << 18


def _window_start(pos, size: int, window, stride: int):
    """First key of the window along one axis for query positions `pos`: the window is centred on the middle
    of the query's stride group and clamped inside `[0, size)`, so it always holds `min(window, size)` keys.
    Non-decreasing in `pos`, and it moves by at most `stride <= window` from one query to the next, so the
    windows of a run of queries cover one contiguous run of keys."""
    window = window.clamp(max=size)
    centre = ((pos // stride) * stride + stride // 2).clamp(max=size - 1)
    return torch.minimum((centre - window // 2).clamp(min=0), size - window)


def _as_windows(window) -> tuple[int, int, int] | tuple[tuple[int, int, int], ...]:
    """One triple (shared by all heads) or a tuple of triples (one per head)."""
    if isinstance(window, (list, tuple)) and any(isinstance(w, (list, tuple)) for w in window):
        return tuple(as_triple(w, f"window[{i}]") for i, w in enumerate(window))
    return as_triple(window, "window")


@dataclass(frozen=True, repr=False)
class Window3D(Pattern):
    r"""
    3D neighbourhood attention (NATTEN, [Hassani et al., 2023](https://arxiv.org/abs/2204.07143); Sliding Tile
    Attention, [Zhang et al., 2025](https://arxiv.org/abs/2502.04507)), name `"window3d"`.

    Along each axis (frames, rows, columns) of size `n`, a query at position `p` keeps the keys
    `start(p) <= k < start(p) + w` with `w = min(window, n)` and

        start(p) = clamp(c(p) - w // 2, 0, n - w),   c(p) = min(stride * (p // stride) + stride // 2, n - 1)

    and a key is kept iff it is kept along all three axes. The window's centre is clamped, not its edges, so
    every query sees exactly the same number of keys, `prod(min(window, grid))`, at the border as in the
    centre (NATTEN's rule); a window larger than the canvas is clipped to it.

    `stride` groups queries (generalized neighbourhood attention): queries in one group of `stride` positions
    share one window, centred on the group's middle. With `stride = tile` of a [`TileOrder`], a window that is
    an odd multiple of the tile, a grid divisible by the tile and `block_size` equal to the tile volume, every
    block is fully kept or empty (Sliding Tile Attention): no block needs an element mask. With `stride=1`
    (the default), each query has its own window and blocks at the window's edge are partially kept.

    Text tokens follow the shared rule of [`Pattern`]. Block masks are exact: along one axis, the keys of a
    run of queries form one run, so a pair of token boxes is tested axis by axis.

    Args:
        window (`int`, `tuple[int, int, int]` or a list of them, *optional*, defaults to `(3, 8, 8)`): window
            `(t, h, w)` in tokens, one int for a cube; a list of windows gives one per head and an `(H, ...)`
            mask. The parameter [`~Pattern.at_density`] scales.
        stride (`int` or `tuple[int, int, int]`, *optional*, defaults to `1`): query group size per axis,
            `1 <= stride <= window` on every axis (of every head).

    Example:
        >>> from diffsparse.patterns import VideoLayout, Window3D
        >>> Window3D((3, 8, 8))
        window3d(window=(3, 8, 8))
        >>> per_head = Window3D([(3, 8, 8), (1, 16, 16)])
        >>> per_head.block_mask(VideoLayout(frames=8, height=16, width=16), 128).shape
        torch.Size([2, 16, 16])
    """

    window: Triple | list[Triple] | tuple[Triple, ...] = (3, 8, 8)
    stride: Triple = 1

    name = "window3d"

    def __post_init__(self):
        object.__setattr__(self, "window", _as_windows(self.window))
        object.__setattr__(self, "stride", as_triple(self.stride, "stride"))
        for window in self.windows:
            if any(s > w for s, w in zip(self.stride, window)):
                raise ValueError(
                    f"Window3D.stride must be <= window on every axis, got stride={self.stride!r}, "
                    f"window={self.window!r}"
                )

    @property
    def windows(self) -> tuple[tuple[int, int, int], ...]:
        """One window per head (a single entry when all heads share it)."""
        return self.window if isinstance(self.window[0], tuple) else (self.window,)

    @property
    def num_heads(self) -> int:
        return len(self.windows) if isinstance(self.window[0], tuple) else 1

    def __repr__(self) -> str:
        # The constructor's own keywords, so that the repr an eval table prints works as `--pattern` again.
        stride = "" if self.stride == (1, 1, 1) else f", stride={self.stride!r}"
        return f"{self.name}(window={self.window!r}{stride})"

    def _axis(self, axis: int, ndim: int) -> torch.Tensor:
        """The window along `axis` per head, shaped `(heads, 1, ..., 1)` to broadcast over `ndim` dims."""
        return torch.tensor([w[axis] for w in self.windows]).view(-1, *([1] * ndim))

    def _video_token_mask(self, layout):
        coords = layout.video_coordinates()
        keep = []  # per axis, (heads, n, n): key k kept for query p along that axis
        for axis, size in enumerate(layout.grid):
            window = self._axis(axis, 1)
            pos = torch.arange(size)
            start = _window_start(pos, size, window, self.stride[axis])  # (heads, n)
            keep.append((start[:, :, None] <= pos) & (pos < (start + window.clamp(max=size))[:, :, None]))
        v = layout.num_video_tokens
        out = torch.empty(len(self.windows), v, v, dtype=torch.bool)
        step = max(1, _CHUNK_ELEMENTS // (v * len(self.windows)))
        for a in range(0, v, step):
            rows = slice(a, a + step)
            out[:, rows] = (
                keep[0][:, coords[0][rows, None], coords[0]]
                & keep[1][:, coords[1][rows, None], coords[1]]
                & keep[2][:, coords[2][rows, None], coords[2]]
            )
        return out

    def _axis_bounds(self, layout, q, k):
        ndim = max(q.t0.dim(), k.t0.dim())
        for axis, size in enumerate(layout.grid):
            window = self._axis(axis, ndim)
            first = _window_start(q[2 * axis], size, window, self.stride[axis])
            last = _window_start(q[2 * axis + 1], size, window, self.stride[axis])
            yield first, last, window.clamp(max=size), k[2 * axis], k[2 * axis + 1]

    def _box_any(self, layout, q, k):
        keep = True
        for first, last, window, k0, k1 in self._axis_bounds(layout, q, k):
            # The queries' windows cover keys [first, last + window - 1]: does that run meet [k0, k1]?
            keep = keep & (first <= k1) & (k0 <= last + window - 1)
        return keep

    def _box_all(self, layout, q, k):
        keep = True
        for first, last, window, k0, k1 in self._axis_bounds(layout, q, k):
            # Every query's window holds [k0, k1]: the last window starts by k0, the first ends after k1.
            keep = keep & (last <= k0) & (k1 <= first + window - 1)
        return keep

    def _density_knob(self, layout):
        # Scale every window by x, rounded to a multiple of the stride, from the stride up to the canvas.
        caps = [math.ceil(n / s) * s for n, s in zip(layout.grid, self.stride)]

        def make(x):
            windows = [
                tuple(
                    min(cap, max(s, s * math.floor(w * x / s + 0.5)))
                    for w, s, cap in zip(win, self.stride, caps)
                )
                for win in self.windows
            ]
            return replace(self, window=tuple(windows) if self.num_heads > 1 else windows[0])

        hi = max(cap / w for win in self.windows for w, cap in zip(win, caps)) + 1
        return make, 0.0, float(hi), ()  # density grows with every window
