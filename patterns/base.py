"""The pattern interface, the token -> block reduction rule, and the text structure shared by all patterns."""

from __future__ import annotations

import abc
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .layout import VideoLayout
from .ordering import Boxes, IdentityOrder, TokenOrder, as_order

BlockSize = int | tuple[int, int]

# token_mask allocates N**2 bytes plus row-chunked intermediates: 16384 tokens is 256 MiB, enough for tests.
MAX_TOKEN_MASK_TOKENS = 16384
# Box pairs per vectorised chunk of the block-mask computation: bounds each intermediate to a few MB.
_CHUNK_PAIRS = 1 << 15
# `at_density` searches every monotone piece of a parameter on masks of at most this many blocks.
_SMALL_MASK_BLOCKS = 1 << 12


def as_pair(value: BlockSize, name: str = "block_size") -> tuple[int, int]:
    r"""
    Normalise an int-or-pair argument to `(query, key)` sizes.

    Args:
        value (`int` or `tuple[int, int]`): one positive size for both sides, or `(block_q, block_k)`.
        name (`str`, *optional*, defaults to `"block_size"`): the argument's name, for the error message.

    Example:
        >>> as_pair(64), as_pair((128, 64))
        ((64, 64), (128, 64))
    """
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {name}={value!r}")
    return pair


def reduce_token_mask(token_mask: torch.Tensor, block_size: BlockSize) -> torch.Tensor:
    r"""
    The rule that maps a token mask to a block mask: block `(i, j)` is kept iff at least one (query, key)
    token pair inside it is kept. The last block row/column may be partial; its padding counts as "not
    kept", so it never turns a block on.

    Every pattern's `block_mask(layout, block_size)` equals `reduce_token_mask(pattern.token_mask(layout),
    block_size)` exactly.

    Args:
        token_mask (`torch.BoolTensor` of shape `(..., Nq, Nk)`): `True` where a query attends to a key.
        block_size (`int` or `tuple[int, int]`): `block_q` (rows) and `block_k` (columns).

    Returns:
        `torch.BoolTensor` of shape `(..., ceil(Nq / block_q), ceil(Nk / block_k))`.

    Example:
        >>> reduce_token_mask(torch.eye(5, dtype=torch.bool)[None], 2).int()
        tensor([[[1, 0, 0],
                 [0, 1, 0],
                 [0, 0, 1]]], dtype=torch.int32)
    """
    bq, bk = as_pair(block_size)
    *lead, nq_tok, nk_tok = token_mask.shape
    nq, nk = math.ceil(nq_tok / bq), math.ceil(nk_tok / bk)
    padded = torch.nn.functional.pad(
        token_mask.bool(), (0, nk * bk - nk_tok, 0, nq * bq - nq_tok), value=False
    )
    return padded.reshape(*lead, nq, bq, nk, bk).any(dim=-1).any(dim=-2)


def add_text_structure(mask: torch.Tensor, query_text: torch.Tensor, key_text: torch.Tensor) -> torch.Tensor:
    r"""
    Apply the fixed text structure to a `(H or 1, rows, cols)` mask: text queries attend to every key and
    every query attends to all text keys. Works at token level (flags per token) and block level (flags per
    block: "this block holds at least one text token"), which is why both levels agree under
    `reduce_token_mask`.

    Args:
        mask (`torch.BoolTensor` of shape `(H or 1, rows, cols)`): the pattern's mask over video tokens.
        query_text (`torch.BoolTensor` of shape `(rows,)`): rows that hold text.
        key_text (`torch.BoolTensor` of shape `(cols,)`): columns that hold text.

    Example:
        >>> add_text_structure(torch.zeros(1, 2, 2, dtype=torch.bool), torch.tensor([True, False]),
        ...                    torch.tensor([False, False])).int()
        tensor([[[1, 1],
                 [0, 0]]], dtype=torch.int32)
    """
    return mask | query_text[:, None] | key_text[None, :]


def _block_spans(layout: VideoLayout, block: int, tokens: tuple[int, int] | None = None):
    """Per block of `block` consecutive tokens of the sequence, or of its part `tokens = (start, stop)`: its video
    tokens as `[lo, hi)` in video numbering (empty when `lo == hi`) and whether it holds a text token."""
    n, v = layout.num_tokens, layout.num_video_tokens
    first, stop = (0, n) if tokens is None else tokens
    start = torch.arange(first, stop, block, dtype=torch.int64)
    end = (start + block).clamp(max=stop)
    lo = (start - layout.video_start).clamp(0, v)
    hi = (end - layout.video_start).clamp(0, v)
    text_lo, text_hi = layout.text_start, layout.text_start + layout.text_len
    has_text = (start < text_hi) & (end > text_lo)
    return lo, hi, has_text


def _box_block_mask(pattern, layout: VideoLayout, q, k, nq: int, nk: int) -> torch.Tensor:
    """`(H or 1, nq, nk)`: OR of `pattern._box_any` over the boxes of each (query block, key block) pair.
    `q = (boxes, block)`, `k = (boxes, block)` as [`TokenOrder.boxes`] returns them: boxes of one block are
    consecutive. Chunked over query blocks so no intermediate exceeds `_CHUNK_PAIRS` box pairs per head."""
    (q_boxes, q_block), (k_boxes, k_block) = q, k
    heads = max(1, pattern.num_heads)
    out = torch.zeros(heads, nq, nk, dtype=torch.bool)
    q_start = torch.zeros(nq + 1, dtype=torch.int64)
    q_start[1:] = torch.bincount(q_block, minlength=nq).cumsum(0)
    k_cols = k_boxes.map(lambda b: b[None, :])
    rows_per_chunk = max(1, _CHUNK_PAIRS // (heads * max(1, len(k_block))))
    a = 0
    while a < nq:
        # As many query blocks as fit in the chunk (at least one).
        b = max(a + 1, int(torch.searchsorted(q_start, q_start[a] + rows_per_chunk, right=True)) - 1)
        b = min(b, nq)
        r0, r1 = int(q_start[a]), int(q_start[b])
        if r1 > r0:
            rows = Boxes(*(bound[r0:r1, None] for bound in q_boxes))
            hit = pattern._box_any(layout, rows, k_cols)
            hit = hit.expand(hit.shape[0], r1 - r0, len(k_block))
            per_key_block = torch.zeros(*hit.shape[:2], nk, dtype=torch.int32)
            per_key_block.index_add_(2, k_block, hit.to(torch.int32))
            per_block = torch.zeros(hit.shape[0], b - a, nk, dtype=torch.int32)
            per_block.index_add_(1, q_block[r0:r1] - a, per_key_block)
            out[:, a:b] = per_block > 0
        a = b
    return out


def check_target(target) -> None:
    """`Pattern.at_density`'s `target`: a block density in `(0, 1]`. Overrides check it first, so a bad target is
    named as `target`, not as the field it would set."""
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target <= 1:
        raise ValueError(f"target must be a block density in (0, 1], got {target=}")


def check_max_iter(max_iter) -> None:
    """`Pattern.at_density`'s `max_iter`: an int >= 1. Zero or fewer steps would skip the bisection and return the
    sparsest end of the range as if it were the answer; overrides that do not bisect check it too, so one call
    means the same for every pattern."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1 (bisection steps per bracket), got {max_iter=}")


def check_qkv(layout: VideoLayout, query, key, value) -> None:
    """A search's `query`, `key` and `value` (`None`: a search that needs none): `(B, H, N, D)` tensors over the
    layout's `N` tokens, of one batch and one set of heads, `query` and `key` of one head dim. Unchecked, a
    mismatch either failed deep inside the search or was broadcast into heads (or videos) no tensor held."""
    tensors = {"query": query, "key": key} | ({} if value is None else {"value": value})
    shapes = ", ".join(
        f"{name}={tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}" for name, x in tensors.items()
    )
    n = layout.num_tokens
    if any(not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != n for x in tensors.values()):
        raise ValueError(f"query, key and value must be (B, H, N, D) tensors of layout.num_tokens={n} tokens for "
                         f"{layout}, got {shapes}")
    if len({x.shape[:2] for x in tensors.values()}) > 1:
        raise ValueError(f"query, key and value must share batch and heads (B, H), got {shapes}")
    if query.shape[3] != key.shape[3]:
        raise ValueError(f"query and key must share their head dim D, got {shapes}")


def check_spans(layout: VideoLayout, q_tokens, k_tokens) -> None:
    """`Pattern.block_mask`'s token ranges: `None` or a `(start, stop)` pair of ints within the layout's tokens."""
    for name, span in (("q_tokens", q_tokens), ("k_tokens", k_tokens)):
        if span is not None and not (
            isinstance(span, tuple) and len(span) == 2 and all(type(x) is int for x in span)
            and 0 <= span[0] < span[1] <= layout.num_tokens
        ):
            raise ValueError(
                f"{name} must be a (start, stop) pair of ints with 0 <= start < stop <= {layout.num_tokens} "
                f"(the layout's tokens), got {name}={span!r}"
            )


@dataclass(frozen=True)
class HeadShard:
    r"""
    The heads one process holds when the model's heads are split over processes (context parallelism
    after its all-to-all, tensor parallelism): consecutive heads from `first` on (as many as its tensors hold) of
    the model's `total`, and `gather`, which takes a tensor whose dim 0 is this process's heads and returns it for
    all the model's heads, in head order (an all-gather; every process of the split must call it together). A fit
    whose result depends on all heads at once (a block budget shared over the layer) uses it to decide as one
    process would.

    Example:
        >>> shard = HeadShard(first=2, total=4, gather=lambda x: torch.cat([x - 1, x]))  # what 2 processes return
        >>> full = shard.all_heads(torch.tensor([[5.0], [6.0]]))
        >>> full.flatten().tolist(), shard.own(full, 2).flatten().tolist()
        ([4.0, 5.0, 5.0, 6.0], [5.0, 6.0])
    """

    first: int
    total: int
    gather: Callable[[torch.Tensor], torch.Tensor]

    def all_heads(self, local: torch.Tensor) -> torch.Tensor:
        """`local` (dim 0: this process's heads) for all the model's heads."""
        gathered = self.gather(local)
        if gathered.shape[0] != self.total or gathered.shape[1:] != local.shape[1:]:
            raise ValueError(f"HeadShard.gather returned shape {tuple(gathered.shape)} for local shape "
                             f"{tuple(local.shape)}: expected ({self.total}, *local.shape[1:])")
        return gathered

    def own(self, full: torch.Tensor, count: int) -> torch.Tensor:
        """This process's `count` heads of `full` (dim 0: all the model's heads)."""
        return full[self.first : self.first + count]

    @classmethod
    def in_group(cls, rank: int, local_heads: int | list[int], group) -> HeadShard:
        """The shard of the process of `rank` in a `torch.distributed` process group whose ranks hold consecutive
        heads in rank order, `local_heads` each, or `local_heads[r]` on rank r (context parallelism after its
        all-to-all, whose shares may differ by one; tensor parallelism's column-sharded projections)."""
        if isinstance(local_heads, int):
            local_heads = [local_heads] * torch.distributed.get_world_size(group)
        return cls(sum(local_heads[:rank]), sum(local_heads),
                   functools.partial(_all_gather, group=group, counts=tuple(local_heads)))


def _all_gather(x: torch.Tensor, group, counts: tuple[int, ...]) -> torch.Tensor:
    """Every rank's `x` (`counts[r]` rows on rank r) concatenated along dim 0 in rank order. Each rank sends the
    largest count's rows (gloo gathers equal sizes only), then each part is cut back."""
    sent = x.new_zeros((max(counts), *x.shape[1:]))
    sent[: x.shape[0]] = x
    parts = [torch.empty_like(sent) for _ in counts]
    torch.distributed.all_gather(parts, sent, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


@dataclass(frozen=True, repr=False)
class Pattern(abc.ABC):
    r"""
    A sparse-attention pattern: parameters (the dataclass fields) plus a pure function from a
    [`VideoLayout`] to a block mask. Subclasses set `name`, define the pattern on video tokens with
    `_video_token_mask`, and give its block-level form with `_box_any` (and optionally `_box_all`); text
    tokens, token orders, padding and the output shape are handled here, once, for every pattern.

    Block masks are exact and never touch token pairs: a block of any [`TokenOrder`] is a short list of
    axis-aligned [`Boxes`] of tokens (at most 5 in frame-major order, 15 in tile order), and a block pair is
    kept iff some pair of its boxes holds a kept (query, key) token pair, which `_box_any` decides from the
    box bounds alone. Work and memory scale with the number of box pairs, chunked to a few MB.

    Patterns combine with `|` and `&` (see [`Union`], [`Intersection`]). Instances are frozen and hashable,
    so they can key caches of plans.
    """

    name: ClassVar[str] = "pattern"
    # Whether the pattern has a rule `|` and `&` can combine; a pattern whose mask comes only from `fit` has not.
    composable: ClassVar[bool] = True
    # The parameter `at_density` sets outright, whatever value it was given (radial's `decay`; window3d instead
    # scales the window it was given): patterns differing only there run the same at a target density.
    density_sets: ClassVar[str | None] = None

    @property
    def num_heads(self) -> int:
        """How many per-head masks the pattern gives: `1` when all heads share one mask."""
        return 1

    @abc.abstractmethod
    def _video_token_mask(self, layout: VideoLayout) -> torch.Tensor:
        """`(H or 1, V, V)` bool over video tokens in frame-major order (the definition)."""

    def _box_any(self, layout: VideoLayout, q: Boxes, k: Boxes) -> torch.Tensor:
        """`(H or 1, *shape)` bool, `shape` the broadcast shape of the box bounds: does the pattern keep at
        least one (query in box `q`, key in box `k`) pair? Must be exact."""
        if type(self)._video_block_mask is Pattern._video_block_mask:
            # The default block rule is this box test: without either, no block mask exists in any order.
            raise NotImplementedError(
                f"{self!r} defines no block-mask rule: implement _box_any (block masks in any token order and inside "
                f"an Intersection) or _video_block_mask (frame-major block masks only)"
            )
        raise NotImplementedError(
            f"{self!r} gives block masks in frame-major order only (it implements _video_block_mask); "
            f"implement _box_any to use it with a token order or inside an Intersection"
        )

    def _box_all(self, layout: VideoLayout, q: Boxes, k: Boxes) -> torch.Tensor:
        """`(H or 1, *shape)` bool: does the pattern keep every (query in `q`, key in `k`) pair? May answer
        `False` when unsure (it only prunes the refinement of [`Intersection`]). Default: exact for pairs of
        single tokens, `False` otherwise."""
        single = (q.num_tokens() == 1) & (k.num_tokens() == 1)
        return self._box_any(layout, q, k) & single

    def _video_block_mask(self, layout: VideoLayout, q_lo, q_hi, k_lo, k_hi) -> torch.Tensor:
        """`(H or 1, nq, nk)` bool in frame-major order: is any video pair kept between query span
        `[q_lo, q_hi)` and key span `[k_lo, k_hi)` (video numbering; empty spans may return anything, they are
        masked out). Default: the box test of `_box_any`; a pattern may override it with a faster rule."""
        order = IdentityOrder()
        return _box_block_mask(
            self,
            layout,
            order.boxes(layout, q_lo, q_hi),
            order.boxes(layout, k_lo, k_hi),
            len(q_lo),
            len(k_lo),
        )

    def block_mask(
        self,
        layout: VideoLayout,
        block_size: BlockSize,
        order: TokenOrder | None = None,
        q_tokens: tuple[int, int] | None = None,
        k_tokens: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        r"""
        The block mask, built at block granularity (no `N x N` tensor).

        Args:
            layout ([`VideoLayout`]): frames, height, width and text tokens of the sequence.
            block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.
            order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): the
                token order of the sequence the kernel sees. With an order, the mask is over the reordered
                sequence: it equals `reduce_token_mask(token_mask(layout, order), block_size)`.
            q_tokens, k_tokens (`tuple[int, int]`, *optional*): a part `(start, stop)` of the sequence (in that
                order) as the queries, or the keys, blocks counted from its start: the mask of
                `token_mask(...)[:, q0:q1, k0:k1]` (queries of one causal group attending the keys up to its end).

        Returns:
            `torch.BoolTensor` of shape `(H or 1, ceil(Nq / block_q), ceil(Nk / block_k))` with `Nq`, `Nk` the
            lengths of `q_tokens`, `k_tokens` (default: `N = layout.num_tokens` each).

        Example:
            >>> from diffsparse.patterns import Dense, TileOrder, VideoLayout
            >>> Dense().block_mask(VideoLayout(frames=3, height=5, width=7), (64, 32)).shape
            torch.Size([1, 2, 4])
            >>> Dense().block_mask(VideoLayout(frames=3, height=5, width=7), 64, order=TileOrder(4)).shape
            torch.Size([1, 2, 2])
        """
        bq, bk = as_pair(block_size)
        order = as_order(order)
        check_spans(layout, q_tokens, k_tokens)
        q_lo, q_hi, q_text = _block_spans(layout, bq, q_tokens)
        k_lo, k_hi, k_text = _block_spans(layout, bk, k_tokens)
        if isinstance(order, IdentityOrder):
            video = self._video_block_mask(layout, q_lo, q_hi, k_lo, k_hi)
        else:
            q, k = order.boxes(layout, q_lo, q_hi), order.boxes(layout, k_lo, k_hi)
            video = _box_block_mask(self, layout, q, k, len(q_lo), len(k_lo))
        # A block with no video token on either side has no video pair to keep.
        video = video & (q_hi > q_lo)[:, None] & (k_hi > k_lo)[None, :]
        return add_text_structure(video, q_text, k_text)

    def token_mask(self, layout: VideoLayout, order: TokenOrder | None = None) -> torch.Tensor:
        r"""
        The token-level definition of the pattern. For tests and small shapes only.

        Args:
            layout ([`VideoLayout`]): at most `MAX_TOKEN_MASK_TOKENS` (16384) tokens.
            order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): give the
                mask over the reordered sequence, `mask[:, perm][:, :, perm]` with `perm =
                order.permutation(layout)`.

        Returns:
            `torch.BoolTensor` of shape `(H or 1, N, N)`.

        Example:
            >>> from diffsparse.patterns import Radial, VideoLayout
            >>> Radial().token_mask(VideoLayout(frames=2, height=2, width=2, text_len=3)).shape
            torch.Size([1, 11, 11])
        """
        n = layout.num_tokens
        if n > MAX_TOKEN_MASK_TOKENS:
            raise ValueError(
                f"token_mask materialises an N x N reference (N**2 bytes) and is limited to N <= "
                f"{MAX_TOKEN_MASK_TOKENS}; use block_mask for real shapes, got N={n} for {layout}"
            )
        order = as_order(order)
        video = self._video_token_mask(layout)
        vs, ve = layout.video_start, layout.video_start + layout.num_video_tokens
        full = torch.zeros(video.shape[0], n, n, dtype=torch.bool)
        full[:, vs:ve, vs:ve] = video
        idx = torch.arange(n)
        is_text = (idx >= layout.text_start) & (idx < layout.text_start + layout.text_len)
        full = add_text_structure(full, is_text, is_text)
        if isinstance(order, IdentityOrder):
            return full
        perm = order.permutation(layout)
        return full[:, perm][:, :, perm]

    def density(
        self,
        layout: VideoLayout,
        block_size: BlockSize,
        order: TokenOrder | None = None,
        q_tokens: tuple[int, int] | None = None,
    ) -> float:
        r"""
        Fraction of kept blocks (all heads, partial edge blocks counted as whole blocks); with `q_tokens`, of the
        blocks between those queries and every key (`block_mask`'s `q_tokens`).

        Example:
            >>> from diffsparse.patterns import Dense, VideoLayout
            >>> Dense().density(VideoLayout(frames=2, height=4, width=4), 16)
            1.0
        """
        # Double: the plan's own density (`make_plan`) is exact; a float32 mean was 1e-8 off it.
        return self.block_mask(layout, block_size, order, q_tokens=q_tokens).double().mean().item()

    def fit(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: VideoLayout,
        block_size: BlockSize,
        order: TokenOrder | None = None,
        generator: torch.Generator | None = None,
        within: Pattern | None = None,
        shard: HeadShard | None = None,
        q_tokens: tuple[int, int] | None = None,
    ) -> Pattern:
        r"""
        The pattern specialised to one layer's attention: the runtime calls this at each layer's first sparse
        call of a generation (and again every `refit_every` steps), once per video of the batch with that
        video's `(1, H, N, D)` queries, keys and values in the model's frame-major order, and uses the results
        (one mask per video) for the layer's next steps. `within`: the model's own attention mask, when the
        call has one ([`FrameCausal`]: SkyReels-V2's causal frame groups): the fit measures the attention it allows.
        `shard`: when the tensors hold only some of the model's heads (context or tensor parallelism), which ones,
        and how to see all of them; every process of the split calls `fit` together. `q_tokens`: `(start, stop)`,
        the only queries the call computes (the video rows of a `video_queries` call; the others are zeros), as
        `density`'s: a search spends its budget on their blocks.
        Static patterns return themselves; data-dependent ones override it ([`SpatialTemporal`] classifies its
        heads, [`Searched`] searches its blocks).
        """
        return self

    @property
    def data_dependent(self) -> bool:
        """Whether `fit` specialises the pattern to a layer's attention (it overrides [`Pattern.fit`]; a
        composition, when one of its parts does); the runtime fits only such patterns, and `diffsparse bench search`
        times only their fit."""
        return type(self).fit is not Pattern.fit

    @property
    def refit_every(self) -> int:
        """Steps after which the runtime calls `fit` again with the current step's tensors (`0`: fitted once per
        generation and layer)."""
        return 0

    @property
    def solves_density(self) -> bool:
        """Whether `at_density` can solve the pattern for a target density (`SparseConfig.density`): it has a main
        parameter to solve, or an `at_density` of its own (the searched patterns' `keep`)."""
        return type(self)._density_knob is not Pattern._density_knob or type(self).at_density is not Pattern.at_density

    def _density_knob(self, layout: VideoLayout):
        """`(make, lo, hi, breaks)`: `make(x)` is a copy of the pattern for parameter `x` in `[lo, hi]`,
        spanning its densities; density grows with `x` between consecutive `breaks` (empty when it grows
        everywhere). Used by `at_density`."""
        raise ValueError(
            f"{self!r} has no single parameter to solve for a density (radial, window3d, spatial_temporal, searched, "
            f"searched_windows and dense have one); solve its parts with at_density"
        )

    def at_density(
        self,
        layout: VideoLayout,
        target: float,
        block_size: BlockSize,
        order: TokenOrder | None = None,
        max_iter: int = 40,
        q_tokens: tuple[int, int] | None = None,
    ) -> Pattern:
        r"""
        A copy of the pattern with its main parameter solved by bisection (`decay` for [`Radial`], the window
        scale for [`Window3D`]) so that its block density is as close as possible to `target`.

        Density is a step function of the parameter, so the answer is the closer of the two steps around the
        target (found to `max_iter` halvings of the parameter interval); a target outside the reachable range
        gives the nearest end. Where density is not monotone in the parameter ([`Radial`] keeps every k-th
        frame distance once windows fall below `min_window`, which can lose a little density as `decay` grows),
        each monotone piece is bracketed and bisected on its own, so the closest achievable density is found,
        where the mask has at most 4,096 blocks or the first bisection lands more than one query-block row
        (`1 / ceil(N / block_q)`) from the target; on larger masks a first answer within one row stands (the
        pieces cost two masks or more per break, and Wan 480p has 84 breaks).
        Where the parameter cannot change the density on `layout` (radial on one or two frames), the pattern is
        returned as given. A pattern with no such parameter (a combination, the frame patterns) raises
        `ValueError`: solve its parts.

        Args:
            layout ([`VideoLayout`]): the sequence layout.
            target (`float`): wanted block density, in `(0, 1]`.
            block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.
            order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): the
                token order the density is measured in.
            max_iter (`int`, *optional*, defaults to `40`): bisection steps per bracket (one block mask each).
            q_tokens (`tuple[int, int]`, *optional*): the density of the blocks of these queries only (`density`'s
                `q_tokens`): a call that attends only some of the sequence's queries (the runtime's `video_queries`).

        Example:
            >>> from diffsparse.patterns import Radial, VideoLayout
            >>> layout = VideoLayout(frames=16, height=16, width=16)
            >>> round(Radial(min_window=16).at_density(layout, 0.4, 64).density(layout, 64), 3)
            0.346
        """
        check_target(target)
        check_max_iter(max_iter)
        make, lo, hi, breaks = self._density_knob(layout)
        cache = {}  # parameter -> density
        measured = {}  # pattern -> density: parameters that round to one pattern (integer windows) share a mask

        def density(x):
            if x not in cache:
                pattern = make(x)
                if pattern not in measured:
                    measured[pattern] = pattern.density(layout, block_size, order, q_tokens)
                cache[x] = measured[pattern]
            return cache[x]

        def closest():
            return min(cache, key=lambda x: (abs(cache[x] - target), cache[x]))  # ties: the sparser

        def bisect(a, b):  # density(a) < target < density(b), monotone in between
            for _ in range(max_iter):
                mid = (a + b) / 2
                if mid in (a, b) or density(mid) == target:
                    return
                a, b = (mid, b) if density(mid) < target else (a, mid)

        if density(lo) == density(hi) and not breaks:
            return self  # the parameter does not change the density on this layout: keep the one given
        if density(lo) < target < density(hi):
            bisect(lo, hi)
        rows, columns = (math.ceil(layout.num_tokens / size) for size in as_pair(block_size))
        # Searching every piece costs two masks or more per break: done where the first bisection is more than a
        # query-block row off the target, or on any mask small enough to cost a millisecond or so (where one row is a
        # large step).
        tolerance = 0.0 if rows * columns <= _SMALL_MASK_BLOCKS else 1 / rows
        if abs(cache[closest()] - target) > tolerance and breaks:
            edges = sorted({lo, hi, *(x for x in breaks if lo < x < hi)})
            for a, b in itertools.pairwise(edges):
                # Just inside the piece [a, b): the parameter's value at a break belongs to the piece above.
                a_in, b_in = a + (b - a) * 1e-6, b - (b - a) * 1e-6
                if density(a_in) < target < density(b_in):
                    bisect(a_in, b_in)
        if len(set(cache.values())) == 1 and self.density(layout, block_size, order, q_tokens) in cache.values():
            # Every parameter tried gives the given pattern's density (radial on 3 frames in one block): keep the
            # pattern given, not the first value tried (a decay of 2**-40 in the stats and tables).
            return self
        return make(closest())

    def __or__(self, other: Pattern) -> Pattern:
        from .compose import Union

        return Union(self, other) if isinstance(other, Pattern) else NotImplemented

    def __and__(self, other: Pattern) -> Pattern:
        from .compose import Intersection

        return Intersection(self, other) if isinstance(other, Pattern) else NotImplemented

    def render(
        self, layout: VideoLayout, block_size: BlockSize, path, head: int = 0, order: TokenOrder | None = None
    ):
        r"""
        Write a PNG of the block mask (one head), with frame boundaries in red and the text span in blue.

        Args:
            layout ([`VideoLayout`]): the sequence layout.
            block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.
            path (`str` or `os.PathLike`): where to write the PNG.
            head (`int`, *optional*, defaults to `0`): which head to draw when the mask has several.
            order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): draw the
                mask over the reordered sequence (frame boundaries are then not drawn).

        Returns:
            `path`, unchanged.

        Example:
            >>> from diffsparse.patterns import Radial, VideoLayout
            >>> Radial().render(VideoLayout(frames=8, height=8, width=8), 32, "/tmp/radial.png")
            '/tmp/radial.png'
        """
        # The Agg canvas is used directly so no process-wide matplotlib backend is switched.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        bq, bk = as_pair(block_size)
        order = as_order(order)
        mask = self.block_mask(layout, (bq, bk), order)
        heads = mask.shape[0]
        # One shared mask is every head's, so any head draws it; per-head masks have only their own (before, a head
        # past the last was drawn as the last one, unsaid).
        if isinstance(head, bool) or not isinstance(head, int) or head < 0 or (heads > 1 and head >= heads):
            what = "one mask, every head's" if heads == 1 else f"{heads} per-head masks, so head must be < {heads}"
            raise ValueError(f"head must be an int >= 0 ({self!r} gives {what}), got head={head!r}")
        head_mask = mask[head if heads > 1 else 0]
        nq, nk = head_mask.shape
        fig = Figure(figsize=(6, 6 * nq / max(nq, nk) + 0.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.imshow(
            head_mask.numpy(), cmap="Greys", interpolation="nearest", extent=(0, nk, nq, 0), vmin=0, vmax=1
        )
        # Boundaries are drawn in token units divided by the block size, so they fall inside blocks when a
        # frame does not start on a block edge.
        for f in range(1, layout.frames if isinstance(order, IdentityOrder) else 1):
            t = layout.video_start + f * layout.tokens_per_frame
            ax.axvline(t / bk, color="red", linewidth=0.5)
            ax.axhline(t / bq, color="red", linewidth=0.5)
        if layout.text_len:
            for t in (layout.text_start, layout.text_start + layout.text_len):
                ax.axvline(t / bk, color="blue", linewidth=0.8)
                ax.axhline(t / bq, color="blue", linewidth=0.8)
        ax.set_title(
            f"{self!r} {order!r}\nblock=({bq}, {bk}), density={mask.float().mean().item():.3f}", fontsize=8
        )
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path

    def __repr__(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{self.name}({params})"
