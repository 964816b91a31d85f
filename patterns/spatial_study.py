"""Radial's spatial window, band vs box vs disc, at equal block density on synthetic decaying attention.

Run `python -m diffsparse.patterns.spatial_study` to print the table the README quotes. Token-level (N x N)
on purpose: small shapes only.
"""

from __future__ import annotations

import argparse
import math

import torch

from .base import BlockSize, Pattern, as_pair
from .layout import VideoLayout
from .ordering import IdentityOrder, TileOrder, TokenOrder, as_order
from .radial import SPATIAL, Radial


def synthetic_logits(
    layout: VideoLayout,
    kind: str = "distance",
    alpha: float = 0.5,
    frame_scale: float = 1.0,
    noise: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    r"""
    Attention logits over video tokens (frame-major) that decay with spatiotemporal distance, plus noise.

    Args:
        layout ([`VideoLayout`]): the grid (text tokens are ignored).
        kind (`str`, *optional*, defaults to `"distance"`): `"distance"`: `-alpha * sqrt((frame_scale * dt)**2
            + dh**2 + dw**2)`, an isotropic decay; `"rope"`: the logits of `q = k = R(p) c` under a 3D rotary
            embedding (Wan's split of a 128-dim head into t/h/w frequency bands, random content `c`), a sum of
            per-axis terms that decays along each axis separately; scaled so its spread matches `alpha`.
        alpha (`float`, *optional*, defaults to `0.5`): decay per token of distance.
        frame_scale (`float`, *optional*, defaults to `1.0`): one frame counts as this many tokens of
            spatial distance (`"distance"` only).
        noise (`float`, *optional*, defaults to `1.0`): standard deviation of i.i.d. Gaussian noise added.
        seed (`int`, *optional*, defaults to `0`): random seed.

    Returns:
        `torch.FloatTensor` of shape `(V, V)`.

    Example:
        >>> synthetic_logits(VideoLayout(2, 3, 4)).shape
        torch.Size([24, 24])
    """
    gen = torch.Generator().manual_seed(seed)
    t, h, w = (c.float() for c in layout.video_coordinates())
    if kind == "distance":
        dist = ((frame_scale * (t[:, None] - t)) ** 2 + (h[:, None] - h) ** 2 + (w[:, None] - w) ** 2).sqrt()
        logits = -alpha * dist
    elif kind == "rope":
        head_dim, theta = 128, 10000.0
        split = [
            head_dim - 4 * (head_dim // 6),
            2 * (head_dim // 6),
            2 * (head_dim // 6),
        ]  # Wan's t/h/w bands
        logits = torch.zeros(layout.num_video_tokens, layout.num_video_tokens)
        for pos, dim in zip((t, h, w), split):
            freqs = theta ** (-torch.arange(0, dim, 2).float() / dim)
            power = torch.randn(dim // 2, 2, generator=gen).pow(2).sum(-1)  # |c_f|^2 per frequency pair
            offset = pos[:, None] - pos
            for f, p in zip(freqs, power):
                logits += p * torch.cos(f * offset)
        logits = logits / logits.std() * alpha * 4.0
    else:
        raise ValueError(f"kind must be 'distance' or 'rope', got {kind=}")
    return logits + noise * torch.randn(logits.shape, generator=gen)


class BlockedAttention:
    r"""
    Dense attention for fixed logits and values, pre-reduced per key block so that the output of block-sparse
    attention under any block mask costs `O(N * blocks * D)` instead of a softmax over `N x N`. Exact: with
    dense probabilities `P`, sparse attention is `P * keep` renormalised per row, and both the masked mass and
    the masked `P @ V` are sums over whole key blocks.

    Args:
        layout ([`VideoLayout`]): a layout without text tokens.
        block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.
        logits (`torch.FloatTensor` of shape `(V, V)`): frame-major attention logits.
        values (`torch.FloatTensor` of shape `(V, D)`): frame-major values.
        order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): token order.

    Example:
        >>> layout = VideoLayout(4, 4, 4)
        >>> attn = BlockedAttention(layout, 16, synthetic_logits(layout), torch.randn(64, 8))
        >>> attn.error(Radial(min_window=8))["density"]
        0.875
    """

    def __init__(self, layout, block_size, logits, values, order=None):
        if layout.text_len:
            raise ValueError(f"BlockedAttention takes a layout without text tokens, got {layout}")
        self.layout, self.block_size, self.order = layout, as_pair(block_size), as_order(order)
        bk = self.block_size[1]
        perm = self.order.permutation(layout)
        n = layout.num_tokens
        nk = -(-n // bk)
        probs = torch.softmax(logits[perm][:, perm].float(), dim=-1)
        values = values[perm].float()
        self.dense = probs @ values
        pad = nk * bk - n
        blocked = torch.nn.functional.pad(probs, (0, pad)).view(n, nk, bk)
        self.mass = blocked.sum(-1)  # (N, nk): dense probability mass per key block
        self.partial = torch.einsum(
            "ikj,kjd->ikd", blocked, torch.nn.functional.pad(values, (0, 0, 0, pad)).view(nk, bk, -1)
        )

    def error(self, pattern: Pattern) -> dict:
        """`density`, `rel_l2` (`||O_sparse - O_dense|| / ||O_dense||`) and `recall` (mean dense attention
        mass inside the kept blocks) of block-sparse attention under `pattern`."""
        bq = self.block_size[0]
        blocks = _one_head_blocks(pattern, self.layout, self.block_size, self.order)
        keep = blocks.repeat_interleave(bq, dim=0)[: self.layout.num_tokens].float()  # (N, nk)
        kept_mass = (keep * self.mass).sum(-1)
        sparse = torch.einsum("ik,ikd->id", keep, self.partial) / kept_mass[:, None]
        return {
            "density": blocks.float().mean().item(),
            "rel_l2": ((sparse - self.dense).norm() / self.dense.norm()).item(),
            "recall": kept_mass.mean().item(),
        }


def _one_head_blocks(pattern: Pattern, layout: VideoLayout, block_size, order) -> torch.Tensor:
    """The block mask of a pattern with one mask for every head: the study scores one head's logits, and scoring
    them under another head's mask (or the first of several) would report a density the pattern does not have."""
    if pattern.num_heads != 1:
        raise ValueError(
            f"the spatial study scores one head's attention, so it takes a pattern with one mask for every head, got "
            f"{pattern!r} with {pattern.num_heads} heads"
        )
    return pattern.block_mask(layout, block_size, order)[0]


def attention_error(
    pattern: Pattern,
    layout: VideoLayout,
    block_size: BlockSize,
    logits: torch.Tensor,
    values: torch.Tensor,
    order: TokenOrder | None = None,
) -> dict:
    r"""
    How far block-sparse attention under `pattern` is from dense attention, computed directly with a masked
    softmax over `N x N` (the reference for [`BlockedAttention`]).

    Args:
        pattern ([`Pattern`]): the pattern (its mask over the reordered sequence when `order` is given).
        layout ([`VideoLayout`]): a layout without text tokens.
        block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.
        logits (`torch.FloatTensor` of shape `(V, V)`): frame-major attention logits.
        values (`torch.FloatTensor` of shape `(V, D)`): frame-major values.
        order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): token order.

    Returns:
        `dict` with `density` (block density), `rel_l2` (`||O_sparse - O_dense|| / ||O_dense||`) and `recall`
        (mean over queries of the dense attention mass inside the kept blocks).

    Example:
        >>> layout = VideoLayout(4, 4, 4)
        >>> logits, values = synthetic_logits(layout), torch.randn(64, 8)
        >>> attention_error(Radial(min_window=8), layout, 16, logits, values)["density"]
        0.875
    """
    if layout.text_len:
        raise ValueError(f"attention_error takes a layout without text tokens, got {layout}")
    bq, bk = as_pair(block_size)
    order = as_order(order)
    perm = order.permutation(layout)
    logits, values = logits[perm][:, perm], values[perm]
    n = layout.num_tokens
    blocks = _one_head_blocks(pattern, layout, (bq, bk), order)
    keep = blocks.repeat_interleave(bq, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :n]
    dense = torch.softmax(logits, dim=-1)
    sparse = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    out_dense, out_sparse = dense @ values, sparse @ values
    return {
        "density": blocks.float().mean().item(),
        "rel_l2": ((out_sparse - out_dense).norm() / out_dense.norm()).item(),
        "recall": (dense * keep).sum(-1).mean().item(),
    }


_STUDY_LAYOUT = VideoLayout(12, 24, 32)


def compare_spatial(
    layout: VideoLayout = _STUDY_LAYOUT,
    block_size: BlockSize = 64,
    budgets: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6),
    orders: tuple[TokenOrder, ...] = (IdentityOrder(), TileOrder((1, 8, 8))),
    kinds: tuple[str, ...] = ("distance", "rope"),
    min_window: int = 64,
    decays: tuple[float, ...] = tuple(2.0 ** (i / 8) for i in range(-32, 33)),
    alpha: float = 0.5,
    frame_scale: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    r"""
    Radial with `spatial="band"`, `"box"` and `"disc"` at equal block-density budgets: each shape sweeps
    `decay`, and for each budget the best (lowest error) setting whose density is at most the budget is kept.
    Scored by attention-output error against dense attention on [`synthetic_logits`].

    Returns:
        `list[dict]`, one row per (kind, order, budget, spatial) with keys `kind`, `order`, `budget`,
        `spatial`, `decay`, `density`, `rel_l2`, `recall` (`decay` is `None` when no setting fits the budget).

    Example:
        >>> rows = compare_spatial(VideoLayout(4, 8, 8), 16, budgets=(0.9,), orders=(TileOrder((1, 4, 4)),),
        ...                        kinds=("distance",), min_window=4, decays=(0.5, 1.0))
        >>> [r["spatial"] for r in rows]
        ['band', 'box', 'disc']
    """
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(layout.num_video_tokens, 32, generator=gen)
    rows = []
    for kind in kinds:
        logits = synthetic_logits(layout, kind=kind, alpha=alpha, frame_scale=frame_scale, seed=seed)
        for order in orders:
            attention = BlockedAttention(layout, block_size, logits, values, order)
            for spatial in SPATIAL:
                sweep = [
                    {
                        "decay": decay,
                        **attention.error(Radial(decay=decay, min_window=min_window, spatial=spatial)),
                    }
                    for decay in decays
                ]
                for budget in budgets:
                    fits = [r for r in sweep if r["density"] <= budget]
                    best = min(fits, key=lambda r: r["rel_l2"], default=None)
                    empty = {
                        "decay": None,
                        "density": float("nan"),
                        "rel_l2": float("nan"),
                        "recall": float("nan"),
                    }
                    rows.append(
                        {
                            "kind": kind,
                            "order": repr(order),
                            "budget": budget,
                            "spatial": spatial,
                            **(best or empty),
                        }
                    )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--height", type=int, default=24)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--min-window", type=int, default=64)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--frame-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.block_size < 1:
        parser.error(f"--block-size must be at least 1, got {args.block_size}")
    layout = VideoLayout(args.frames, args.height, args.width)
    # A 2D tile of exactly one block, as square as the block allows: isqrt alone gave 11 x 11 = 121-token tiles for
    # 128-token blocks, so every block held parts of two tiles and the study compared another layout.
    side = max(d for d in range(1, math.isqrt(args.block_size) + 1) if args.block_size % d == 0)
    orders = (IdentityOrder(), TileOrder((1, side, args.block_size // side)))
    rows = compare_spatial(
        layout,
        args.block_size,
        tuple(args.budgets),
        orders,
        min_window=args.min_window,
        alpha=args.alpha,
        frame_scale=args.frame_scale,
        seed=args.seed,
    )
    print(
        f"{layout}, block_size={args.block_size}, min_window={args.min_window}, alpha={args.alpha}, "
        f"frame_scale={args.frame_scale}, seed={args.seed}; best rel_l2 with block density <= budget"
    )
    print(
        f"{'kind':9} {'order':14} {'budget':>6} {'spatial':7} {'decay':>8} {'density':>7} {'rel_l2':>7} "
        f"{'recall':>7}"
    )
    for r in rows:
        decay = "-" if r["decay"] is None else f"{r['decay']:.4f}"
        print(
            f"{r['kind']:9} {r['order']:14} {r['budget']:6.2f} {r['spatial']:7} {decay:>8} "
            f"{r['density']:7.3f} {r['rel_l2']:7.4f} {r['recall']:7.4f}"
        )
    return rows


if __name__ == "__main__":
    main()
