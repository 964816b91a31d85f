"""Composed patterns: `a | b` keeps a pair kept by either part, `a & b` a pair kept by both."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import Pattern
from .ordering import Boxes


def _check_parts(composed):
    for side in ("left", "right"):
        part = getattr(composed, side)
        if not isinstance(part, Pattern):
            raise ValueError(f"{type(composed).__name__}.{side} must be a Pattern, got {side}={part!r}")
        if not part.composable:
            raise ValueError(
                f"{type(composed).__name__}.{side}={part!r} cannot be combined: its blocks come from fitting it to the "
                f"model's own attention (Pattern.fit), not from a rule (use it alone)"
            )
    heads = {composed.left.num_heads, composed.right.num_heads} - {1}
    if len(heads) > 1:
        raise ValueError(
            f"{type(composed).__name__} parts must give masks for the same number of heads (or one shared "
            f"mask), "
            f"got {composed.left!r} with {composed.left.num_heads} and {composed.right!r} with "
            f"{composed.right.num_heads}"
        )


def _at_heads(mask: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """`mask[head[i], i]` for a `(H or 1, M)` mask."""
    return mask[0] if mask.shape[0] == 1 else mask[head, torch.arange(len(head))]


def _split(q: Boxes, k: Boxes):
    """Halve the larger box of each pair (by tokens) along its longest axis: `2 M` pairs, low halves first."""
    split_q = q.num_tokens() >= k.num_tokens()
    box = Boxes(*(torch.where(split_q, a, b) for a, b in zip(q, k)))
    extent = torch.stack([box.t1 - box.t0, box.h1 - box.h0, box.w1 - box.w0])
    axis = extent.argmax(dim=0)
    bounds = list(box)
    low_half, high_half = list(bounds), list(bounds)
    for a in range(3):
        lo, hi = bounds[2 * a], bounds[2 * a + 1]
        here = axis == a
        mid = lo + (hi - lo) // 2
        low_half[2 * a + 1] = torch.where(here, mid, hi)
        high_half[2 * a] = torch.where(here, mid + 1, lo)
    children = Boxes(*(torch.cat([lo, hi]) for lo, hi in zip(low_half, high_half)))
    twice = torch.cat([split_q, split_q])
    q2, k2 = q.map(lambda b: b.repeat(2)), k.map(lambda b: b.repeat(2))
    return (
        Boxes(*(torch.where(twice, c, b) for c, b in zip(children, q2))),
        Boxes(*(torch.where(twice, b, c) for c, b in zip(children, k2))),
    )


@dataclass(frozen=True, repr=False)
class _Composed(Pattern):
    """Two patterns joined by an operator; the subclasses say how masks combine."""

    left: Pattern
    right: Pattern

    symbol = "?"

    def __post_init__(self):
        _check_parts(self)

    @property
    def num_heads(self) -> int:
        return max(self.left.num_heads, self.right.num_heads)

    def __repr__(self) -> str:
        return f"({self.left!r} {self.symbol} {self.right!r})"

    # The runtime fits the pattern it is given: a part fitted to the model's attention (`SpatialTemporal`'s heads)
    # is fitted through the composition, else it would keep its unfitted mask for the whole generation.
    @property
    def data_dependent(self) -> bool:
        return self.left.data_dependent or self.right.data_dependent

    @property
    def refit_every(self) -> int:
        return min((n for n in (self.left.refit_every, self.right.refit_every) if n), default=0)

    def fit(self, query, key, value, layout, block_size, order=None, generator=None, within=None, shard=None,
            q_tokens=None):
        """A copy with each part fitted ([`Pattern.fit`]); static parts return themselves."""
        span = {} if q_tokens is None else {"q_tokens": q_tokens}  # as the runtime gives it: only when set
        left, right = (
            part.fit(query, key, value, layout, block_size, order=order, generator=generator, within=within,
                     shard=shard, **span)
            for part in (self.left, self.right)
        )
        return replace(self, left=left, right=right)


@dataclass(frozen=True, repr=False)
class Union(_Composed):
    r"""
    The pairs kept by either part (`left | right`). Its token mask is the OR of the parts' token masks, and
    so is its block mask, exactly (a block holds a pair kept by the union iff it holds one kept by a part).

    Args:
        left ([`Pattern`]): first part.
        right ([`Pattern`]): second part; per-head parts must agree on the number of heads (or give one
            shared mask).

    Example:
        >>> from diffsparse.patterns import Radial, VideoLayout, Window3D
        >>> pattern = Radial(decay=0.1, min_window=16) | Window3D((3, 8, 8))
        >>> pattern
        (radial(decay=0.1, min_window=16, sink=False) | window3d(window=(3, 8, 8)))
        >>> layout = VideoLayout(frames=8, height=16, width=16)
        >>> bool((pattern.block_mask(layout, 64) >= Window3D((3, 8, 8)).block_mask(layout, 64)).all())
        True
    """

    name = "union"
    symbol = "|"

    def _video_token_mask(self, layout):
        return self.left._video_token_mask(layout) | self.right._video_token_mask(layout)

    def _video_block_mask(self, layout, q_lo, q_hi, k_lo, k_hi):
        spans = (q_lo, q_hi, k_lo, k_hi)
        return self.left._video_block_mask(layout, *spans) | self.right._video_block_mask(layout, *spans)

    def _box_any(self, layout, q, k):
        return self.left._box_any(layout, q, k) | self.right._box_any(layout, q, k)

    def _box_all(self, layout, q, k):
        # Sound, not exact: every pair may be kept by one part or the other without either keeping all.
        return self.left._box_all(layout, q, k) | self.right._box_all(layout, q, k)


@dataclass(frozen=True, repr=False)
class Intersection(_Composed):
    r"""
    The pairs kept by both parts (`left & right`). Its token mask is the AND of the parts' token masks; its
    block mask is the exact reduction of that AND, which in general is *not* the AND of the parts' block masks
    (a block can hold a pair kept by one part and another pair kept by the other, but none kept by both).

    The exact rule: for a pair of token boxes, the AND is empty if either part keeps nothing, and it equals
    the other part's "any" if one part keeps everything; otherwise the larger box is halved along its longest
    axis and both halves are tested again, down to single tokens where "any" is exact. Only box pairs on the
    edges of both parts are refined, and a block pair stops as soon as one kept pair is found, so the cost
    grows with those edges, not with `N**2`. Memory stays at box level, but the list of pairs being refined
    is not chunked: intersections whose edges cross many blocks can be slow (seconds at 75k tokens).

    Args:
        left ([`Pattern`]): first part.
        right ([`Pattern`]): second part; per-head parts must agree on the number of heads (or give one
            shared mask).

    Example:
        >>> from diffsparse.patterns import Radial, VideoLayout, Window3D
        >>> pattern = Radial(decay=0.1, min_window=16) & Window3D((5, 8, 8))
        >>> pattern
        (radial(decay=0.1, min_window=16, sink=False) & window3d(window=(5, 8, 8)))
        >>> layout = VideoLayout(frames=8, height=16, width=16)
        >>> from diffsparse.patterns import reduce_token_mask
        >>> torch.equal(pattern.block_mask(layout, 64), reduce_token_mask(pattern.token_mask(layout), 64))
        True
    """

    name = "intersection"
    symbol = "&"

    def _video_token_mask(self, layout):
        return self.left._video_token_mask(layout) & self.right._video_token_mask(layout)

    def _box_all(self, layout, q, k):
        return self.left._box_all(layout, q, k) & self.right._box_all(layout, q, k)

    def _decide(self, layout, q: Boxes, k: Boxes):
        """`(kept, undecided)`, `(H or 1, M)` each, for flat box pairs."""
        both = self.left._box_any(layout, q, k) & self.right._box_any(layout, q, k)
        single = (q.num_tokens() == 1) & (k.num_tokens() == 1)  # "any" is exact for one token pair
        kept = both & (self.left._box_all(layout, q, k) | self.right._box_all(layout, q, k) | single)
        return kept, both & ~kept

    def _box_any(self, layout, q, k):
        shape = torch.broadcast_shapes(*(b.shape for b in (*q, *k)))
        q, k = (box.map(lambda b: b.expand(shape).reshape(-1)) for box in (q, k))
        kept, undecided = self._decide(layout, q, k)
        result = kept.expand(self.num_heads, -1).clone()
        head, pair = undecided.expand(self.num_heads, -1).nonzero(as_tuple=True)
        q, k = q.map(lambda b: b[pair]), k.map(lambda b: b[pair])
        while len(pair):
            q, k = _split(q, k)
            head, pair = head.repeat(2), pair.repeat(2)
            kept, undecided = self._decide(layout, q, k)
            kept, undecided = _at_heads(kept, head), _at_heads(undecided, head)
            result[head[kept], pair[kept]] = True
            # A pair already known to be kept needs no more refinement.
            go_on = undecided & ~result[head, pair]
            q, k = Boxes(*(b[go_on] for b in q)), Boxes(*(b[go_on] for b in k))
            head, pair = head[go_on], pair[go_on]
        return result.reshape(self.num_heads, *shape)
