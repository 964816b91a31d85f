"""Radial attention: a static mask whose spatial window halves each time the temporal distance doubles."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from .base import _CHUNK_PAIRS, Pattern
from .ordering import Boxes, IdentityOrder

# Elements per vectorised chunk of the token-level reference.
_CHUNK_ELEMENTS = 1 << 18
# "Skipped" in the frame-pair tables: below any (possibly negative) distance.
_NEVER = -(1 << 40)
# "Always kept": above any spatial distance.
_ALWAYS = 1 << 40
# The float's exact value: disc thresholds are decided on rationals, like the band's.
_PI = Fraction(math.pi)
SPATIAL = ("band", "box", "disc")


def _spatial_threshold(width: Fraction, spatial: str, tokens_per_frame: int) -> int:
    """The largest spatial distance kept for a window of `width` keys per frame, in the metric of `spatial`
    (band: `|s_q - s_k|`; box: `max(|dh|, |dw|)`; disc: `dh**2 + dw**2`), capped above any in-frame
    distance."""
    if spatial == "band":  # |s_q - s_k| <= width / 2: a stripe of ~width keys
        value = math.floor(width / 2)
    elif spatial == "box":  # max(|dh|, |dw|) <= sqrt(width) / 2: a square of ~width keys
        value = math.isqrt(math.floor(width / 4))
    else:  # dh**2 + dw**2 <= width / pi: a disc of ~width keys
        value = math.floor(width / _PI)
    return min(value, _dense_threshold(spatial, tokens_per_frame))


def _dense_threshold(spatial: str, tokens_per_frame: int) -> int:
    """A threshold above any distance inside a frame (all metrics are below `S`, or `S**2` for the disc)."""
    return tokens_per_frame**2 if spatial == "disc" else tokens_per_frame


def max_spatial_distance(
    frames: int, tokens_per_frame: int, decay: float, min_window: int, spatial: str = "band"
) -> torch.Tensor:
    r"""
    The frame-pair rule of [`Radial`] as a table: entry `d` is the largest spatial distance kept between two
    frames `d` apart (in the metric of `spatial`), or `-1` when that frame pair is skipped entirely.

    Computed with exact rationals (`Fraction(decay)` is the float's exact value and the canvas is a power of
    two), so `|s_q - s_k| <= width(d) / 2` is decided without rounding: for integer distances it equals
    `|s_q - s_k| <= floor(width(d) / 2)`. Likewise `max(|dh|, |dw|) <= isqrt(floor(width / 4))` for `"box"`
    and `dh**2 + dw**2 <= floor(width / pi)` for `"disc"` (with `pi` the float's exact value).

    Example:
        >>> max_spatial_distance(frames=10, tokens_per_frame=64, decay=1.0, min_window=16).tolist()
        [64, 64, 8, 8, 8, -1, 8, -1, 8, -1]
        >>> max_spatial_distance(10, 64, decay=1.0, min_window=16, spatial="disc").tolist()
        [4096, 4096, 5, 5, 5, -1, 5, -1, 5, -1]
    """
    canvas = 1 << (tokens_per_frame - 1).bit_length()  # 2 ** ceil(log2(tokens_per_frame))
    table = []
    for d in range(frames):
        if d <= 1:
            table.append(_dense_threshold(spatial, tokens_per_frame))  # beyond any in-frame distance: dense
            continue
        width = Fraction(decay) * canvas / 2 ** d.bit_length()
        if width >= min_window:
            table.append(_spatial_threshold(width, spatial, tokens_per_frame))
        else:
            # The window is floored at min_window; compute is cut instead by keeping every k-th distance.
            k = math.ceil(min_window / width)
            table.append(
                _spatial_threshold(Fraction(min_window), spatial, tokens_per_frame) if d % k == 0 else -1
            )
    return torch.tensor(table, dtype=torch.int64)


def frame_pair_table(
    frames: int, tokens_per_frame: int, decay: float, min_window: int, sink: bool, spatial: str = "band"
) -> torch.Tensor:
    r"""
    The frame-pair rule of [`Radial`] for every (query frame, key frame): entry `[i, j]` is the largest
    spatial distance kept, or a large negative value when the pair is skipped. Row and column `frames` are
    padding (never kept).

    Example:
        >>> table = frame_pair_table(frames=3, tokens_per_frame=4, decay=1.0, min_window=1, sink=False)
        >>> table[:3, :3].tolist()
        [[4, 4, 0], [4, 4, 4], [0, 4, 4]]
    """
    per_distance = max_spatial_distance(frames, tokens_per_frame, decay, min_window, spatial)
    f = torch.arange(frames)
    pairs = per_distance[(f[:, None] - f[None, :]).abs()]
    if sink:
        pairs[:, 0] = _dense_threshold(spatial, tokens_per_frame)
    table = torch.full((frames + 1, frames + 1), _NEVER, dtype=torch.int64)
    table[:frames, :frames] = torch.where(pairs < 0, _NEVER, pairs)
    return table


@functools.lru_cache(maxsize=32)
def _distance_range_tables(frames, tokens_per_frame, decay, min_window, spatial):
    """`(range_max, range_min)`, `(frames, frames)` each: entry `[a, b]` (`a <= b`) is the largest / smallest
    threshold over frame distances `a..b` (skipped distances count as `_NEVER`). Between two frame intervals
    the distances form one integer range, so these two lookups decide any/all over a pair of boxes."""
    per_distance = max_spatial_distance(frames, tokens_per_frame, decay, min_window, spatial)
    per_distance = torch.where(per_distance < 0, _NEVER, per_distance)
    a, b = torch.arange(frames)[:, None], torch.arange(frames)[None, :]
    upper = b >= a
    range_max = torch.where(upper, per_distance[None, :], _NEVER).cummax(dim=1).values
    range_min = torch.where(upper, per_distance[None, :], _ALWAYS).cummin(dim=1).values
    return range_max, range_min


@dataclass(frozen=True)
class _BlockPairGeometry:
    """What decides Radial's frame-major block mask apart from `decay`: for each (block pair, frame-distance
    range, key box in frame 0) the smallest spatial distance between their boxes. A mask is then one gather,
    one comparison and one scatter, which is what `at_density` repeats a hundred times per layout."""

    pair: torch.Tensor  # (U,) query block * nk + key block
    index: torch.Tensor  # (U,) near * frames + far: the frame-distance range, a key of the range tables
    key_frame0: torch.Tensor  # (U,) bool: the key box starts in frame 0 (the sink keeps it)
    min_spatial: torch.Tensor  # (U,) smallest spatial distance over those box pairs
    shape: tuple[int, int]  # (nq, nk)


@functools.lru_cache(maxsize=8)
def _block_pair_geometry(layout, spatial: str, spans: tuple[tuple[int, ...], ...]) -> _BlockPairGeometry:
    q_lo, q_hi, k_lo, k_hi = (torch.tensor(x, dtype=torch.int64) for x in spans)
    order = IdentityOrder()
    (q_boxes, q_block), (k_boxes, k_block) = order.boxes(layout, q_lo, q_hi), order.boxes(layout, k_lo, k_hi)
    nq, nk, frames = len(q_lo), len(k_lo), layout.frames
    k_cols = k_boxes.map(lambda b: b[None, :])
    k_frame0 = (k_boxes.t0 == 0)[None, :]
    rows_per_chunk = max(1, _CHUNK_PAIRS * 8 // max(1, len(k_block)))
    parts = []
    for r0 in range(0, len(q_block), rows_per_chunk):
        rows = Boxes(*(bound[r0 : r0 + rows_per_chunk, None] for bound in q_boxes))
        index = _gap(rows.t0, rows.t1, k_cols.t0, k_cols.t1) * frames + _far(rows.t0, rows.t1, k_cols.t0, k_cols.t1)
        pair = q_block[r0 : r0 + rows_per_chunk, None] * nk + k_block[None, :]
        key = ((pair * frames * frames + index) * 2 + k_frame0).flatten()
        distance = _min_spatial(spatial, layout.width, rows, k_cols).flatten()
        unique, inverse = torch.unique(key, return_inverse=True)
        smallest = torch.full((len(unique),), _ALWAYS, dtype=distance.dtype).scatter_reduce_(
            0, inverse, distance, reduce="amin"
        )
        parts.append((unique, smallest))
    if not parts:  # queries of text tokens only (no video box): no pair to limit, every block is kept
        parts.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
    key = torch.cat([u for u, _ in parts])
    smallest = torch.cat([m for _, m in parts])
    # Chunks may split one query block's boxes, so the same key can come from two chunks: reduce again.
    key, inverse = torch.unique(key, return_inverse=True)
    smallest = torch.full((len(key),), _ALWAYS, dtype=smallest.dtype).scatter_reduce_(
        0, inverse, smallest, reduce="amin"
    )
    frame0, rest = key % 2, key // 2
    return _BlockPairGeometry(rest // (frames * frames), rest % (frames * frames), frame0.bool(), smallest, (nq, nk))


def _gap(a0, a1, b0, b1):
    """Smallest `|x - y|` for `x` in `[a0, a1]`, `y` in `[b0, b1]`."""
    return torch.maximum(a0 - b1, b0 - a1).clamp(min=0)


def _far(a0, a1, b0, b1):
    """Largest `|x - y|` for `x` in `[a0, a1]`, `y` in `[b0, b1]`."""
    return torch.maximum(a1 - b0, b1 - a0)


def _min_spatial(spatial: str, width: int, q, k):
    """Smallest spatial distance between the (row, col) rectangles of two boxes, exactly."""
    if spatial == "band":
        # s_q - s_k = dh * W + dw with dh in [lo_h, hi_h], |dw| < W. For one dh the values fill
        # [dh*W + lo_w, dh*W + hi_w]; the distance of that interval to 0 is convex in dh and smallest for
        # |dh| < 1, so the best integer dh is one of -1, 0, 1 clamped to [lo_h, hi_h].
        lo_h, hi_h, lo_w, hi_w = q.h0 - k.h1, q.h1 - k.h0, q.w0 - k.w1, q.w1 - k.w0
        best = None
        for c in (-1, 0, 1):
            shift = torch.maximum(lo_h, hi_h.clamp(max=c)) * width
            dist = torch.maximum(shift + lo_w, -(shift + hi_w)).clamp(min=0)
            best = dist if best is None else torch.minimum(best, dist)
        return best
    gap_h, gap_w = _gap(q.h0, q.h1, k.h0, k.h1), _gap(q.w0, q.w1, k.w0, k.w1)
    return torch.maximum(gap_h, gap_w) if spatial == "box" else gap_h * gap_h + gap_w * gap_w


def _max_spatial(spatial: str, width: int, q, k):
    """Largest spatial distance between the (row, col) rectangles of two boxes, exactly (corners)."""
    if spatial == "band":
        high = (q.h1 - k.h0) * width + (q.w1 - k.w0)
        low = (q.h0 - k.h1) * width + (q.w0 - k.w1)
        return torch.maximum(high.abs(), low.abs())
    far_h, far_w = _far(q.h0, q.h1, k.h0, k.h1), _far(q.w0, q.w1, k.w0, k.w1)
    return torch.maximum(far_h, far_w) if spatial == "box" else far_h * far_h + far_w * far_w


@dataclass(frozen=True, repr=False)
class Radial(Pattern):
    r"""
    Radial attention ([Li et al., 2025](https://arxiv.org/abs/2506.19852)): attention mass decays with spatial
    and temporal distance, so the spatial window shrinks as frames get further apart (name `"radial"`).

    For a query in frame `i` and a key in frame `j`, `d = |i - j|`, `S` tokens per frame and
    `P = 2 ** ceil(log2(S))`:

    - `d <= 1`: kept (dense).
    - otherwise `width(d) = decay * P / 2 ** bit_length(d)` keys per frame, halving each time `d` doubles:
        - `width(d) >= min_window`: kept iff the key is within the spatial window of `width(d)` keys;
        - `width(d) < min_window`: kept iff within the window of `min_window` keys and `d % k == 0` with
          `k = ceil(min_window / width(d))`, so only every k-th frame distance is computed.
    - `sink=True`: every query also keeps all keys of frame 0 (the attention sink used for Wan).

    The spatial window of `width` keys (`spatial`), for row/column offsets `dh, dw` and flattened index
    `s = row * W + col`:

    - `"band"`: `|s_q - s_k| <= width / 2`, a stripe of `width` keys on the flattened index (the shape of the
      authors' code, at half its width: see below);
    - `"box"`: `max(|dh|, |dw|) <= sqrt(width) / 2`, a square of about `width` keys;
    - `"disc"`: `dh**2 + dw**2 <= width / pi`, a disc of about `width` keys.

    All three are decided exactly on integers (see [`max_spatial_distance`]). Text tokens follow the shared
    rule of [`Pattern`]. Block masks are decided per pair of token boxes (see [`Pattern`]): the frame
    distances between two boxes form one integer range, so the largest threshold over it (a table lookup)
    against the smallest spatial distance between the two rectangles decides "any token pair kept".

    Like the authors' code (`radial_attn/attn_mask.py`): a band on the flattened index whose width halves
    each time `bit_length(d)` grows, floored at about a block, with only every k-th frame distance kept below
    the floor, and a frame-0 sink. Not like it, so one `decay` is not one density in both:

    - its band keeps `|s_q - s_k| <= width`, twice this one's, and its scale is `2 ** bit_length(S)` (`2 * S`,
      not `S`, when `S` is a power of two);
    - which frame distances it skips does not depend on its decay (`k = int(128 / width at decay 1)`, a fixed
      128-token threshold); here it does (`k = ceil(min_window / width(d))`, `decay` included);
    - for Wan it narrows `d = 1` to a band of `S / 2` keys (here `d = 1` is dense), and it always keeps frame 0
      (`sink=True` here);
    - it keeps a block only when most of its key columns are over a third kept; here, any kept pair keeps it.

    Its Wan scripts' `decay_factor=0.2` keeps 0.285 of the token pairs on Wan 480p (81 frames, 21 x 30 x 52
    latents) and 0.223 on 720p (21 x 45 x 80); `Radial(decay=0.2, sink=True)` keeps 0.203 and 0.202, and
    reaches those densities near `decay=0.9` (480p) and `decay=0.4` (720p). To match a density, set
    `SparseConfig.density` rather than a decay.

    Args:
        decay (`float`, *optional*, defaults to `1.0`): window scale; smaller is sparser (not the authors'
            `decay_factor`: see above). The parameter [`~Pattern.at_density`] solves for.
        min_window (`int`, *optional*, defaults to `64`): smallest window in tokens; below it frame pairs are
            skipped instead of narrowed. About one kernel block is the natural choice.
        sink (`bool`, *optional*, defaults to `False`): keep all keys of frame 0 for every query.
        spatial (`str`, *optional*, defaults to `"band"`): the window's shape, `"band"`, `"box"` or `"disc"`.

    Example:
        >>> from diffsparse.patterns import Radial, VideoLayout
        >>> pattern = Radial(decay=0.5)
        >>> pattern
        radial(decay=0.5, min_window=64, sink=False)
        >>> pattern.block_mask(VideoLayout(frames=21, height=30, width=52), 128).shape
        torch.Size([1, 256, 256])
        >>> Radial(decay=0.5, spatial="disc")
        radial(decay=0.5, min_window=64, sink=False, spatial='disc')
    """

    decay: float = 1.0
    min_window: int = 64
    sink: bool = False
    spatial: str = "band"

    name = "radial"
    density_sets = "decay"  # `_density_knob` replaces it

    def __post_init__(self):
        d = self.decay
        try:  # an int beyond float's range cannot be a decay either
            finite = isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(float(d))
        except OverflowError:
            finite = False
        if not finite or d <= 0:
            raise ValueError(f"Radial.decay must be a finite number > 0, got decay={d!r}")
        # One spelling per value: the repr keys eval's duplicate check and reads back through `get_pattern`
        # (radial(decay=1) and radial(decay=1.0) were two reprs of one pattern).
        object.__setattr__(self, "decay", float(d))
        w = self.min_window
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError(f"Radial.min_window must be an int >= 1 (tokens), got min_window={w!r}")
        if not isinstance(self.sink, bool):
            raise ValueError(f"Radial.sink must be a bool, got sink={self.sink!r}")
        if self.spatial not in SPATIAL:
            raise ValueError(f"Radial.spatial must be one of {SPATIAL}, got spatial={self.spatial!r}")

    def __repr__(self) -> str:
        spatial = "" if self.spatial == "band" else f", spatial={self.spatial!r}"
        return (
            f"{self.name}(decay={self.decay!r}, min_window={self.min_window!r}, sink={self.sink!r}{spatial})"
        )

    def _ranges(self, layout):
        return _distance_range_tables(
            layout.frames, layout.tokens_per_frame, float(self.decay), self.min_window, self.spatial
        )

    def _video_token_mask(self, layout):
        v, width = layout.num_video_tokens, layout.width
        table = frame_pair_table(
            layout.frames, layout.tokens_per_frame, self.decay, self.min_window, self.sink, self.spatial
        )
        frame, row, col = layout.video_coordinates()
        out = torch.empty(1, v, v, dtype=torch.bool)
        step = max(1, _CHUNK_ELEMENTS // v)
        for a in range(0, v, step):
            rows = slice(a, a + step)
            dh, dw = row[rows, None] - row, col[rows, None] - col
            if self.spatial == "band":
                dist = (dh * width + dw).abs()
            elif self.spatial == "box":
                dist = torch.maximum(dh.abs(), dw.abs())
            else:
                dist = dh * dh + dw * dw
            out[0, rows] = dist <= table[frame[rows, None], frame]
        return out

    def _video_block_mask(self, layout, q_lo, q_hi, k_lo, k_hi):
        # Same result as the generic box test, with the decay-independent geometry computed once per layout.
        spans = tuple(tuple(x.tolist()) for x in (q_lo, q_hi, k_lo, k_hi))
        geometry = _block_pair_geometry(layout, self.spatial, spans)
        range_max, _ = self._ranges(layout)
        threshold = range_max.flatten().index_select(0, geometry.index)
        if self.sink:
            threshold = torch.where(geometry.key_frame0, _ALWAYS, threshold)
        hits = torch.zeros(geometry.shape[0] * geometry.shape[1], dtype=torch.int32)
        hits.index_add_(0, geometry.pair, (geometry.min_spatial <= threshold).to(torch.int32))
        return (hits > 0).view(1, *geometry.shape)

    def _box_any(self, layout, q, k):
        range_max, _ = self._ranges(layout)
        near = _gap(q.t0, q.t1, k.t0, k.t1)
        far = _far(q.t0, q.t1, k.t0, k.t1)
        index = near * layout.frames + far
        threshold = range_max.flatten().index_select(0, index.flatten()).view(index.shape)
        if self.sink:
            threshold = torch.where(k.t0 == 0, _ALWAYS, threshold)
        return (_min_spatial(self.spatial, layout.width, q, k) <= threshold)[None]

    def _box_all(self, layout, q, k):
        _, range_min = self._ranges(layout)
        f = layout.frames
        # With a sink, key frame 0 is always kept: only the key frames after it can fail.
        k_t0 = k.t0.clamp(min=1) if self.sink else k.t0
        near, far = _gap(q.t0, q.t1, k_t0, k.t1), _far(q.t0, q.t1, k_t0, k.t1)
        index = (near * f + far).clamp(0, f * f - 1)
        threshold = range_min.flatten().index_select(0, index.flatten()).view(index.shape)
        if self.sink:
            threshold = torch.where(k.t1 == 0, _ALWAYS, threshold)
        return (_max_spatial(self.spatial, layout.width, q, k) <= threshold)[None]

    def _density_knob(self, layout):
        # x = log2(decay), from "every width below one token" to "every window covers the frame".
        s, frames = layout.tokens_per_frame, layout.frames
        hi = math.log2(4 * s * s) + frames.bit_length() + 2
        # ... and every frame distance kept: width(d) >= min_window, however large min_window is for the frame.
        canvas = 1 << (s - 1).bit_length()
        hi = max(hi, math.log2(max(self.min_window, 1) / canvas) + (frames - 1).bit_length() + 1)
        # Density grows with decay except where k = ceil(min_window / width(d)) changes: width(d) =
        # min_window / m at decay = min_window * 2**j / (P * m), for each level j = bit_length(d).
        levels = range(2, (frames - 1).bit_length() + 1)
        breaks = [
            math.log2(self.min_window * 2**j / (canvas * m)) for j in levels for m in range(1, frames + 1)
        ]
        return (lambda x: replace(self, decay=2.0**x)), -40.0, hi, breaks
