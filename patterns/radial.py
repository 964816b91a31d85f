"""Radial attention: a static mask whose spatial window halves each time the temporal distance doubles."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .base import Pattern

# Elements per vectorised chunk (query rows x key columns x segments): bounds every intermediate to a few MB.
_CHUNK_ELEMENTS = 1 << 18
# "Skipped" in the frame-pair table: below any (possibly negative) distance between overlapping segments.
_NEVER = -(1 << 40)


def max_spatial_distance(frames: int, tokens_per_frame: int, decay: float, min_window: int) -> torch.Tensor:
    r"""
    The frame-pair rule of [`Radial`] as a table: entry `d` is the largest spatial distance `|s_q - s_k|` kept
    between two frames `d` apart, or `-1` when that frame pair is skipped entirely.

    Computed with exact rationals (`Fraction(decay)` is the float's exact value and the canvas is a power of
    two), so `|s_q - s_k| <= width(d) / 2` is decided without rounding: for integer distances it equals
    `|s_q - s_k| <= floor(width(d) / 2)`.

    Example:
        >>> max_spatial_distance(frames=10, tokens_per_frame=64, decay=1.0, min_window=16).tolist()
        [64, 64, 8, 8, 8, -1, 8, -1, 8, -1]
    """
    canvas = 1 << (tokens_per_frame - 1).bit_length()  # 2 ** ceil(log2(tokens_per_frame))
    table = []
    for d in range(frames):
        if d <= 1:
            table.append(tokens_per_frame)  # beyond any in-frame distance: dense
            continue
        width = Fraction(decay) * canvas / 2 ** d.bit_length()
        if width >= min_window:
            table.append(min(math.floor(width / 2), tokens_per_frame))
        else:
            # The window is floored at min_window; compute is cut instead by keeping every k-th distance.
            k = math.ceil(min_window / width)
            table.append(min_window // 2 if d % k == 0 else -1)
    return torch.tensor(table, dtype=torch.int64)


def frame_pair_table(
    frames: int, tokens_per_frame: int, decay: float, min_window: int, sink: bool
) -> torch.Tensor:
    r"""
    The frame-pair rule of [`Radial`] for every (query frame, key frame): entry `[i, j]` is the largest
    spatial distance kept, or a large negative value when the pair is skipped. Row and column `frames` are
    padding (never kept), so ragged per-block segment lists need no separate validity mask.

    Example:
        >>> table = frame_pair_table(frames=3, tokens_per_frame=4, decay=1.0, min_window=1, sink=False)
        >>> table[:3, :3].tolist()
        [[4, 4, 0], [4, 4, 4], [0, 4, 4]]
    """
    per_distance = max_spatial_distance(frames, tokens_per_frame, decay, min_window)
    f = torch.arange(frames)
    pairs = per_distance[(f[:, None] - f[None, :]).abs()]
    if sink:
        pairs[:, 0] = tokens_per_frame
    table = torch.full((frames + 1, frames + 1), _NEVER, dtype=torch.int64)
    table[:frames, :frames] = torch.where(pairs < 0, _NEVER, pairs)
    return table


def _keep(frame_q, frame_k, spatial_distance, table):
    """The one rule both mask levels use. Monotone in the distance, so testing the smallest distance between
    two segments decides whether any token pair in them is kept."""
    return spatial_distance <= table[frame_q, frame_k]


def _segments(lo, hi, tokens_per_frame: int, frames: int):
    """Split each block's video span `[lo, hi)` into per-frame segments `(frame, first, last spatial index)`,
    each of shape `(max segments, blocks)`; missing segments of shorter spans get the padding frame
    `frames`."""
    nonempty = hi > lo
    last = (hi - 1).clamp(min=0)
    first_frame = torch.where(nonempty, lo // tokens_per_frame, 0)
    last_frame = torch.where(nonempty, last // tokens_per_frame, 0)
    count = int((last_frame - first_frame).max()) + 1
    frame = first_frame + torch.arange(count)[:, None]
    first = (lo - frame * tokens_per_frame).clamp(min=0)
    last = (last - frame * tokens_per_frame).clamp(max=tokens_per_frame - 1)
    frame = torch.where((frame <= last_frame) & nonempty, frame, frames)
    return frame, first, last


@dataclass(frozen=True, repr=False)
class Radial(Pattern):
    r"""
    Radial attention ([Li et al., 2025](https://arxiv.org/abs/2506.19852)): attention mass decays with spatial
    and temporal distance, so the spatial window shrinks as frames get further apart (name `"radial"`).

    For a query in frame `i` and a key in frame `j`, `d = |i - j|`, spatial indices `s_q, s_k` in the
    flattened frame (`h * W + w`), `S` tokens per frame and `P = 2 ** ceil(log2(S))`:

    - `d <= 1`: kept (dense).
    - otherwise `width(d) = decay * P / 2 ** bit_length(d)`, halving each time `d` doubles:
        - `width(d) >= min_window`: kept iff `|s_q - s_k| <= width(d) / 2` (a band on the flattened index);
        - `width(d) < min_window`: kept iff `|s_q - s_k| <= min_window / 2` and `d % k == 0` with
          `k = ceil(min_window / width(d))`, so only every k-th frame distance is computed.
    - `sink=True`: every query also keeps all keys of frame 0 (the attention sink used for Wan).

    `|s_q - s_k| <= width / 2` is decided exactly: `width` is evaluated as a rational (`Fraction(decay)` is
    the float's exact value, `P` a power of two) and the test is `|s_q - s_k| <= floor(width / 2)` on
    integers.
    The band is on the flattened index (row stripes), as in the paper's code, not a 2-D disc. Text tokens
    follow the shared rule of [`Pattern`].

    `block_mask` never touches token pairs: each block of consecutive tokens is split into per-frame segments
    `(frame, first, last spatial index)` and two segments are kept iff the gap between their spatial intervals
    passes the same frame-pair rule as single tokens (the rule is monotone in the distance, so this equals
    "any token pair kept"). Work and memory scale with `blocks_q * blocks_k * segments**2`, chunked to a
    few MB.

    Args:
        decay (`float`, *optional*, defaults to `1.0`): window scale; smaller is sparser (the paper's Wan
            setting is `0.2`).
        min_window (`int`, *optional*, defaults to `64`): smallest window in tokens; below it frame pairs are
            skipped instead of narrowed. About one kernel block is the natural choice.
        sink (`bool`, *optional*, defaults to `False`): keep all keys of frame 0 for every query.

    Example:
        >>> from diffsparse.patterns import Radial, VideoLayout
        >>> pattern = Radial(decay=0.5)
        >>> pattern
        radial(decay=0.5, min_window=64, sink=False)
        >>> pattern.block_mask(VideoLayout(frames=21, height=30, width=52), 128).shape
        torch.Size([1, 256, 256])
    """

    decay: float = 1.0
    min_window: int = 64
    sink: bool = False

    name = "radial"

    def __post_init__(self):
        d = self.decay
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not math.isfinite(d) or d <= 0:
            raise ValueError(f"Radial.decay must be a finite number > 0, got decay={d!r}")
        w = self.min_window
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError(f"Radial.min_window must be an int >= 1 (tokens), got min_window={w!r}")
        if not isinstance(self.sink, bool):
            raise ValueError(f"Radial.sink must be a bool, got sink={self.sink!r}")  # noqa: TRY004

    def _table(self, layout):
        return frame_pair_table(
            layout.frames, layout.tokens_per_frame, self.decay, self.min_window, self.sink
        )

    def _video_token_mask(self, layout):
        v, s = layout.num_video_tokens, layout.tokens_per_frame
        table, idx = self._table(layout), torch.arange(v)
        out = torch.empty(1, v, v, dtype=torch.bool)
        step = max(1, _CHUNK_ELEMENTS // v)
        for a in range(0, v, step):
            q = idx[a : a + step, None]
            out[0, a : a + step] = _keep(q // s, idx // s, (q % s - idx % s).abs(), table)
        return out

    def _video_block_mask(self, layout, q_lo, q_hi, k_lo, k_hi):
        s, table = layout.tokens_per_frame, self._table(layout)
        # Axes (query segment, key segment, query block, key block): the innermost loop runs over key blocks.
        fq, first_q, last_q = (t[:, None, :, None] for t in _segments(q_lo, q_hi, s, layout.frames))
        fk, first_k, last_k = (t[None, :, None, :] for t in _segments(k_lo, k_hi, s, layout.frames))
        nq, nk = len(q_lo), len(k_lo)
        out = torch.empty(1, nq, nk, dtype=torch.bool)
        step = max(1, _CHUNK_ELEMENTS // (nk * fq.shape[0] * fk.shape[1]))
        for a in range(0, nq, step):
            rows = slice(a, a + step)
            # Signed gap between two spatial intervals (<= 0 when they overlap); its positive part is the
            # smallest |s_q - s_k|, and skipped pairs sit below any gap, so no clamp is needed.
            gap = torch.maximum(first_k - last_q[:, :, rows], first_q[:, :, rows] - last_k)
            keep = _keep(fq[:, :, rows], fk, gap, table)
            out[0, rows] = keep.flatten(0, 1).any(dim=0)
        return out
