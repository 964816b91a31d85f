"""The pattern interface, the token -> block reduction rule, and the text structure shared by all patterns."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .layout import VideoLayout

BlockSize = int | tuple[int, int]

# token_mask allocates N**2 bytes plus row-chunked intermediates: 16384 tokens is 256 MiB, enough for tests.
MAX_TOKEN_MASK_TOKENS = 16384


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


def _block_spans(layout: VideoLayout, block: int):
    """Per block of `block` consecutive tokens: its video tokens as `[lo, hi)` in video numbering (empty when
    `lo == hi`) and whether it holds a text token."""
    n, v = layout.num_tokens, layout.num_video_tokens
    start = torch.arange(0, n, block, dtype=torch.int64)
    end = (start + block).clamp(max=n)
    lo = (start - layout.video_start).clamp(0, v)
    hi = (end - layout.video_start).clamp(0, v)
    text_lo, text_hi = layout.text_start, layout.text_start + layout.text_len
    has_text = (start < text_hi) & (end > text_lo)
    return lo, hi, has_text


@dataclass(frozen=True, repr=False)
class Pattern(abc.ABC):
    r"""
    A sparse-attention pattern: parameters (the dataclass fields) plus a pure function from a
    [`VideoLayout`] to a block mask. Subclasses set `name` and implement the two `_video_*` hooks over video
    tokens only; text tokens, padding and the output shape are handled here, once, for every pattern.

    Instances are frozen and hashable, so they can key caches of plans.
    """

    name: ClassVar[str] = "pattern"

    @abc.abstractmethod
    def _video_token_mask(self, layout: VideoLayout) -> torch.Tensor:
        """`(H or 1, V, V)` bool over video tokens in frame-major order (the definition)."""

    @abc.abstractmethod
    def _video_block_mask(self, layout: VideoLayout, q_lo, q_hi, k_lo, k_hi) -> torch.Tensor:
        """`(H or 1, nq, nk)` bool: is any video pair kept between query span `[q_lo, q_hi)` and key span
        `[k_lo, k_hi)` (video numbering; empty spans may return anything, they are masked out)."""

    def block_mask(self, layout: VideoLayout, block_size: BlockSize) -> torch.Tensor:
        r"""
        The block mask, built at block granularity (no `N x N` tensor).

        Args:
            layout ([`VideoLayout`]): frames, height, width and text tokens of the sequence.
            block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.

        Returns:
            `torch.BoolTensor` of shape `(H or 1, ceil(N / block_q), ceil(N / block_k))` with
            `N = layout.num_tokens`.

        Example:
            >>> from diffsparse.patterns import Dense, VideoLayout
            >>> Dense().block_mask(VideoLayout(frames=3, height=5, width=7), (64, 32)).shape
            torch.Size([1, 2, 4])
        """
        bq, bk = as_pair(block_size)
        q_lo, q_hi, q_text = _block_spans(layout, bq)
        k_lo, k_hi, k_text = _block_spans(layout, bk)
        video = self._video_block_mask(layout, q_lo, q_hi, k_lo, k_hi)
        # A block with no video token on either side has no video pair to keep.
        video = video & (q_hi > q_lo)[:, None] & (k_hi > k_lo)[None, :]
        return add_text_structure(video, q_text, k_text)

    def token_mask(self, layout: VideoLayout) -> torch.Tensor:
        r"""
        The token-level definition of the pattern, in the original (frame-major) order. For tests and small
        shapes only.

        Args:
            layout ([`VideoLayout`]): at most `MAX_TOKEN_MASK_TOKENS` (16384) tokens.

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
        video = self._video_token_mask(layout)
        vs, ve = layout.video_start, layout.video_start + layout.num_video_tokens
        full = torch.zeros(video.shape[0], n, n, dtype=torch.bool)
        full[:, vs:ve, vs:ve] = video
        idx = torch.arange(n)
        is_text = (idx >= layout.text_start) & (idx < layout.text_start + layout.text_len)
        return add_text_structure(full, is_text, is_text)

    def density(self, layout: VideoLayout, block_size: BlockSize) -> float:
        r"""
        Fraction of kept blocks (all heads, partial edge blocks counted as whole blocks).

        Example:
            >>> from diffsparse.patterns import Dense, VideoLayout
            >>> Dense().density(VideoLayout(frames=2, height=4, width=4), 16)
            1.0
        """
        return self.block_mask(layout, block_size).float().mean().item()

    def render(self, layout: VideoLayout, block_size: BlockSize, path, head: int = 0):
        r"""
        Write a PNG of the block mask (one head), with frame boundaries in red and the text span in blue.

        Args:
            layout ([`VideoLayout`]): the sequence layout.
            block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.
            path (`str` or `os.PathLike`): where to write the PNG.
            head (`int`, *optional*, defaults to `0`): which head to draw when the mask has several.

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
        mask = self.block_mask(layout, (bq, bk))
        head_mask = mask[min(head, mask.shape[0] - 1)]
        nq, nk = head_mask.shape
        fig = Figure(figsize=(6, 6 * nq / max(nq, nk) + 0.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.imshow(
            head_mask.numpy(), cmap="Greys", interpolation="nearest", extent=(0, nk, nq, 0), vmin=0, vmax=1
        )
        # Boundaries are drawn in token units divided by the block size, so they fall inside blocks when a
        # frame does not start on a block edge.
        for f in range(1, layout.frames):
            t = layout.video_start + f * layout.tokens_per_frame
            ax.axvline(t / bk, color="red", linewidth=0.5)
            ax.axhline(t / bq, color="red", linewidth=0.5)
        if layout.text_len:
            for t in (layout.text_start, layout.text_start + layout.text_len):
                ax.axvline(t / bk, color="blue", linewidth=0.8)
                ax.axhline(t / bq, color="blue", linewidth=0.8)
        ax.set_title(f"{self!r}\nblock=({bq}, {bk}), density={mask.float().mean().item():.3f}", fontsize=8)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path

    def __repr__(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{self.name}({params})"
