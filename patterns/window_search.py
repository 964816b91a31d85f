"""Sliding Tile Attention's per-head windows, searched from the model's own attention instead of offline."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from .base import BlockSize, HeadShard, as_pair, check_max_iter, check_qkv, check_spans, check_target
from .causal import FrameCausal
from .layout import Triple, VideoLayout, as_triple
from .ordering import TokenOrder, as_order
from .window3d import Window3D, _window_start

# float32 elements per chunk of the sampled rows' probabilities and weighted values: 64 MB.
_CHUNK = 1 << 24
# `allocate` counts whole blocks up to this many over all heads (its tables: candidates x this many entries).
_EXACT_UNITS = 1 << 14


def axis_sizes(size: int, stride: int) -> tuple[int, ...]:
    """Candidate window sizes along an axis of `size` tokens with query groups of `stride`: odd multiples of the
    stride that about double (1, 3, 5, 9, 17, ... strides, so a window stays centred on its group), up to the
    first one that covers the axis, which is the last."""
    cap = math.ceil(size / stride) * stride
    sizes, odd = [], 1
    while stride * odd < cap:
        sizes.append(stride * odd)
        odd = 2 * odd - 1 if odd > 2 else odd + 2
    return (*sizes, cap)


@functools.lru_cache(maxsize=32)
def _candidate_densities(
    stride: Triple,
    layout: VideoLayout,
    block_size: tuple[int, int],
    order: TokenOrder,
    q_tokens: tuple[int, int] | None = None,
):
    """`(windows, densities, blocks)`: every candidate window of `layout` (a product of the per-axis sizes), its
    block density (text rows and columns included; over the blocks of the queries `q_tokens` only, when given: those
    a call computes) and the number of blocks those densities are fractions of. Cached: each layer of a model asks
    for the same."""
    sizes = [axis_sizes(n, s) for n, s in zip(layout.grid, stride)]
    windows = [(t, h, w) for t in sizes[0] for h in sizes[1] for w in sizes[2]]
    masks = [Window3D(window, stride).block_mask(layout, block_size, order, q_tokens=q_tokens) for window in windows]
    # float64, as `Pattern.density`: a float32 0.6 is 0.6000000238, above a budget of exactly 0.6.
    densities = torch.tensor([mask.double().mean().item() for mask in masks], dtype=torch.float64)
    return tuple(windows), densities, masks[0].numel()


def allocate(
    losses: torch.Tensor, densities: torch.Tensor, budget: float, units: int = 2048, blocks: int | None = None
) -> torch.Tensor:
    """One candidate per head (`(H,)` indices) with mean density at most `budget` and the least total loss: a
    multiple-choice knapsack, solved by dynamic programming. With `blocks`, the number of blocks each density is a
    fraction of, and at most `_EXACT_UNITS` blocks over all heads, over whole blocks: exact. Otherwise over the
    budget cut into `units` steps, rounded up to a multiple of the heads, each candidate's density rounded up (so
    the budget holds; a choice within a step per head of the budget can be missed, as 0.25 and 0.5 for 0.375 on two
    heads: 683 + 1366 steps of 2048). `losses` `(H, C)`, `densities` `(C,)`. Where even the sparsest candidates
    exceed the budget, those."""
    heads = losses.shape[0]
    sparsest = torch.full((heads,), int(torch.argmin(densities)))
    if blocks is not None and heads * blocks <= _EXACT_UNITS:
        # Every candidate counts whole blocks of one layout: its cost is its count, the budget the whole blocks it
        # allows, so a mix whose mean is exactly the budget is affordable (the grid's rounding could miss it).
        cost = torch.round(densities.double() * blocks).long()
        units = math.floor(budget * heads * blocks + 1e-9)
        # Counts sharing a factor (tile-sized windows) need a table that much shorter.
        step = math.gcd(*cost.tolist()) or 1
        cost, units = cost // step, units // step
    else:
        # Whole steps per head: with `units / heads` steps each, a candidate of exactly the budget's density rounded
        # up past its share whenever heads did not divide units, so `keep=1.0` on 3 heads could not keep every block.
        share = -(-units // max(heads, 1))  # no heads (an empty shard): nothing to choose
        units = share * heads
        cost = torch.ceil(densities.double() * share / budget - 1e-9).long()
    if int(cost.min()) * heads > units:
        return sparsest
    # best[b]: the least loss of the heads so far spending at most b units; picks[h][b]: head h's candidate there.
    best, picks = torch.zeros(units + 1, dtype=torch.float64), []
    before = torch.arange(units + 1)[None, :] - cost[:, None]  # (C, units + 1): what is left before the head's pick
    for head in range(heads):
        total = best[before.clamp(min=0)] + losses[head].double()[:, None]
        best, pick = total.masked_fill(before < 0, math.inf).min(dim=0)
        picks.append(pick)
    choice, left = torch.empty(heads, dtype=torch.long), units
    for head in reversed(range(heads)):
        choice[head] = picks[head][left]
        left -= int(cost[choice[head]])
    return choice


@dataclass(frozen=True, repr=False, init=False)
class SearchedWindows(Window3D):
    r"""
    Per-head 3D windows (name `"searched_windows"`) chosen from the model's own attention, as Sliding Tile
    Attention ([Zhang et al., 2025](https://arxiv.org/abs/2502.04507)) chooses them, but at each layer's first
    sparse call of a generation instead of from an offline search stored per model: any resolution, no file.

    The candidates are the windows `(t, h, w)` whose sizes along each axis are odd multiples of the stride that
    about double (1, 3, 5, 9, 17, ... strides) up to the axis ([`axis_sizes`]). For `num_samples` video query
    rows, each head's attention over all keys is computed exactly; a candidate's loss for a head is the squared
    error of those rows' outputs when they keep only the window's video keys (and every text key), against
    their full attention, averaged over the rows (values projected to `value_dims` dimensions, as [`Searched`]
    does). The error, not the mass left out: a head that averages broadly loses much mass to any window but
    little output. Then one budget for the layer, `keep` of its blocks, is shared over its heads
    ([`allocate`]): heads whose attention is local get small windows, heads that look far get large ones, and
    the layer's block density stays at most `keep` (or the sparsest candidates', when those exceed it). The
    result is a [`Window3D`] with one window per head: static and exact from then on, so every property of a
    window holds (with a [`TileOrder`], `stride` equal to the tile and tile-sized blocks: whole blocks only).

    Before a search it has no windows, and asking for its mask raises; measure it through the runtime
    (`diffsparse eval`, `diffsparse trace`). Under context or tensor parallelism the budget is shared over all the
    model's heads, as in one process.

    Args:
        keep (`float`, *optional*, defaults to `0.25`): the layer's block density, in `(0, 1]`.
            `SparseConfig.density` sets it.
        stride (`int` or `tuple[int, int, int]`, *optional*, defaults to `1`): query group size per axis, as
            [`Window3D`]'s; candidate sizes are multiples of it.
        num_samples (`int`, *optional*, defaults to `32`): video query rows the losses are measured on, `>= 1`.
        value_dims (`int`, *optional*, defaults to `32`): dimensions the values are projected to for the losses,
            `>= 1` (a head dim at most this is used as is).
        refresh (`int`, *optional*, defaults to `0`): search again every this many steps after a layer's last
            search, on that step's tensors (`0`: once per generation), as [`Searched`]'s `refresh`.
        window: the searched windows (one per head); set by the search, not by hand.

    Example:
        >>> import torch
        >>> from diffsparse.patterns import SearchedWindows, VideoLayout
        >>> layout = VideoLayout(frames=4, height=8, width=8)
        >>> frame_code = 4 * torch.randn(4, 1, 16, generator=torch.Generator().manual_seed(0))
        >>> local = frame_code.expand(4, 64, 16).reshape(1, 1, 256, 16)  # alike within a frame
        >>> SearchedWindows(keep=0.5).search(local, local, local, layout, 64).windows[0][0]  # one frame is enough
        1
    """

    keep: float = 0.25
    num_samples: int = 32
    value_dims: int = 32
    refresh: int = 0
    window: Triple | tuple[Triple, ...] | None = None

    name = "searched_windows"
    composable = False  # the runtime fits the pattern it is given, not a composition's parts
    set_by_search = ("window",)  # constructor fields a spec string may not give (`get_pattern`): the search's

    # Written out because the generated one would take Window3D's fields first: `SearchedWindows(0.5)` would be a
    # window of 0.5 and `SearchedWindows(3)` a pattern that looks searched. `window` is the search's to set.
    def __init__(
        self,
        keep: float = 0.25,
        stride: Triple = 1,
        num_samples: int = 32,
        value_dims: int = 32,
        refresh: int = 0,
        *,
        window: Triple | tuple[Triple, ...] | None = None,
    ):
        for name, value in (("keep", keep), ("stride", stride), ("num_samples", num_samples),
                            ("value_dims", value_dims), ("refresh", refresh), ("window", window)):
            object.__setattr__(self, name, value)
        self.__post_init__()

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"SearchedWindows.keep must be a block density in (0, 1], got keep={self.keep!r}")
        for name, low in (("num_samples", 1), ("value_dims", 1), ("refresh", 0)):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < low:
                raise ValueError(f"SearchedWindows.{name} must be an int >= {low}, got {name}={count!r}")
        if self.window is None:
            object.__setattr__(self, "stride", as_triple(self.stride, "stride"))
        else:
            super().__post_init__()

    @property
    def windows(self) -> tuple[Triple, ...]:
        if self.window is None:
            raise ValueError(
                f"{self!r} has no windows before a search: they come from a model's queries and keys "
                "(SearchedWindows.search, called by the runtime at each layer's first sparse call)"
            )
        return super().windows

    @property
    def num_heads(self) -> int:
        return 1 if self.window is None else super().num_heads

    @property
    def refit_every(self) -> int:
        return self.refresh

    def __repr__(self) -> str:
        stride = "" if self.stride == (1, 1, 1) else f", stride={self.stride!r}"
        samples = "" if self.num_samples == 32 else f", num_samples={self.num_samples!r}"
        samples += "" if self.value_dims == 32 else f", value_dims={self.value_dims!r}"
        samples += f", refresh={self.refresh!r}" if self.refresh else ""
        searched = "" if self.window is None else f", window={self.window!r}"
        return f"{self.name}(keep={self.keep!r}{stride}{samples}{searched})"

    def at_density(self, layout, target, block_size, order=None, max_iter=40, q_tokens=None) -> SearchedWindows:
        r"""A copy whose search keeps `target` of the blocks (no solving: `keep` is the budget). Searched windows can
        only confirm their own `keep`; search again for another."""
        check_target(target)
        check_max_iter(max_iter)
        if self.window is None:
            return replace(self, keep=target)
        if target != self.keep:
            raise ValueError(f"{self!r} was searched for keep={self.keep}; search again for density {target}")
        return self

    def fit(
        self, query, key, value, layout, block_size, order=None, generator=None, within=None, shard=None, q_tokens=None
    ):
        """[`~SearchedWindows.search`]."""
        return self.search(query, key, value, layout, block_size, order, generator, within, shard, q_tokens)

    @torch.no_grad()
    def search(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: VideoLayout,
        block_size: BlockSize,
        order: TokenOrder | None = None,
        generator: torch.Generator | None = None,
        within: FrameCausal | None = None,
        shard: HeadShard | None = None,
        q_tokens: tuple[int, int] | None = None,
    ) -> SearchedWindows:
        r"""
        A copy with one window per head, chosen under the layer's budget.

        Args:
            query, key, value (`torch.Tensor` of shape `(B, H, N, D)`): the layer's queries, keys and values in the
                model's (frame-major) token order, `N = layout.num_tokens`, after RoPE; one batch and one set of
                heads (nothing is broadcast), `query` and `key` of one head dim.
            layout ([`VideoLayout`]): the sequence layout.
            block_size (`int` or `tuple[int, int]`): the kernel's blocks, which the candidates' densities count.
            order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): the token
                order the kernel sees (densities depend on it; the windows do not).
            generator (`torch.Generator`, *optional*): draws the rows; `None`: a private generator seeded with 0.
            within ([`FrameCausal`], *optional*): the model's own mask: each row's softmax is over the keys it keeps.
            shard ([`HeadShard`], *optional*): when the tensors hold only some of the model's heads: the budget is
                shared over all of them (every process calls this together).
            q_tokens (`tuple[int, int]`, *optional*): the queries `(start, stop)` the kernel computes, when not all
                of them (the runtime's `video_queries` calls): `keep` is then the density of those queries' blocks
                (`density(..., q_tokens)`), not of the whole layout's, whose text rows the call does not compute.
        """
        if value is None:
            raise ValueError(f"{self!r} measures the output error of its windows: give value, not None")
        check_qkv(layout, query, key, value)
        if within is not None and not isinstance(within, FrameCausal):
            raise ValueError(f"within must be a FrameCausal mask or None, got within={within!r}")
        check_spans(layout, q_tokens, None)
        windows, densities, blocks = _candidate_densities(
            self.stride, layout, as_pair(block_size), as_order(order), q_tokens
        )
        losses = self._errors(query, key, value, layout, windows, generator, within)
        if shard is not None:
            losses = shard.all_heads(losses.to(query.device)).cpu()
        choice = allocate(losses, densities, self.keep, blocks=blocks)
        if shard is not None:
            choice = shard.own(choice, query.shape[1])
        return replace(self, window=tuple(windows[int(c)] for c in choice))

    def _errors(self, query, key, value, layout, windows, generator, within) -> torch.Tensor:
        """`(H, C)` float32 on the CPU: per head and candidate window, the squared error of the sampled video rows'
        attention output with only the window's video keys (and every text key) against their full attention,
        values projected to `value_dims` dimensions, averaged over rows and batch."""
        v, start = layout.num_video_tokens, layout.video_start
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        count = min(self.num_samples, v)
        rows = torch.randperm(v, generator=generator, device=generator.device)[:count].sort().values.to(query.device)
        batch, heads, _, dim = query.shape
        if value.shape[-1] > self.value_dims:
            # Squared norms survive a Gaussian projection in expectation, at a fraction of the sums' size.
            projection = torch.randn(value.shape[-1], self.value_dims, generator=generator, device=generator.device)
            value = value.float() @ (projection.to(value.device) / math.sqrt(self.value_dims))
        # Each key's projected value and a 1, so one box sum gives a window's weighted values and its mass.
        value = torch.cat([value.float(), value.new_ones(*value.shape[:-1], 1, dtype=torch.float32)], dim=-1)
        grid = layout.grid
        positions = [rows // (grid[1] * grid[2]), (rows // grid[2]) % grid[1], rows % grid[2]]
        # Per axis, which positions each row's window holds for each candidate size of that axis: (rows, n, sizes).
        # A window is a product of three intervals, so its sums reduce one axis at a time.
        sizes = [sorted({w[axis] for w in windows}) for axis in range(3)]
        inside_axis = []
        for axis, size in enumerate(grid):
            width = torch.tensor(sizes[axis], device=query.device)
            first = _window_start(positions[axis][:, None], size, width[None, :], self.stride[axis])  # (rows, sizes)
            pos = torch.arange(size, device=query.device)[None, :, None]
            inside_axis.append(((first[:, None] <= pos) & (pos < (first + width.clamp(max=size))[:, None])).float())
        index = [torch.tensor([sizes[axis].index(w[axis]) for w in windows], device=query.device) for axis in range(3)]
        masked = None
        if within is not None:
            groups = within.video_groups(layout).to(query.device)
            masked = groups[None, :] > groups[rows][:, None]  # (rows, V)
        text = torch.cat([torch.arange(start), torch.arange(start + v, layout.num_tokens)]).to(query.device)
        errors = torch.zeros(heads, len(windows))
        # One head at a time, rows in chunks: the weighted values stay under _CHUNK elements.
        step = max(1, _CHUNK // (batch * (v + layout.num_tokens) * value.shape[-1]))
        for head in range(heads):
            for r0 in range(0, count, step):
                chunk = slice(r0, r0 + step)
                q = query[:, head, start + rows[chunk]].float() / math.sqrt(dim)  # (B, r, D)
                scores = q @ key[:, head].float().transpose(-1, -2)  # (B, r, N)
                if masked is not None:
                    scores[..., start : start + v] = scores[..., start : start + v].masked_fill(masked[chunk], -math.inf)
                probs = torch.softmax(scores, dim=-1)
                text_sum = probs[..., text] @ value[:, head, text]  # (B, r, D' + 1)
                weighted = probs[..., start : start + v, None] * value[:, head, None, start : start + v]
                sums = weighted.reshape(*weighted.shape[:2], *grid, -1)  # (B, r, F, H, W, D' + 1)
                sums = torch.einsum("zrfhwd,rwc->zrfhcd", sums, inside_axis[2][chunk])
                sums = torch.einsum("zrfhcd,rhb->zrfbcd", sums, inside_axis[1][chunk])
                sums = torch.einsum("zrfbcd,rfa->zrabcd", sums, inside_axis[0][chunk])  # per size triple
                inside = sums[:, :, index[0], index[1], index[2]]  # (B, r, C, D' + 1)
                full = weighted.sum(-2) + text_sum  # (B, r, D' + 1): the whole attention's sums
                kept = inside + text_sum[:, :, None]
                out_kept = kept[..., :-1] / kept[..., -1:].clamp_min(torch.finfo(torch.float32).tiny)
                out_full = full[..., :-1] / full[..., -1:]
                errors[head] += ((out_kept - out_full[:, :, None]) ** 2).sum(-1).sum(dim=(0, 1)).cpu()
        return errors / (batch * count)
