"""Figures of patterns for eyes: block density against video length. matplotlib is imported when drawing."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

from .base import BlockSize, Pattern
from .layout import VideoLayout
from .ordering import TokenOrder


def density_vs_frames(
    patterns: Sequence[Pattern],
    frames_list: Sequence[int],
    height: int,
    width: int,
    block_size: BlockSize,
    path: str | os.PathLike | None = None,
    order: TokenOrder | None = None,
) -> list[dict]:
    r"""
    Block density of each pattern as the video grows in frames (fixed frame size), written as a PNG with
    frames on a log axis and, for reference, `c * log2(frames) / frames` through each pattern's first point: the
    O(n log n) cost that Radial attention claims falls along it (n in frames: the frame size is fixed, so tokens are
    a constant times frames and only `c` changes).

    Args:
        patterns (`Sequence[Pattern]`): the patterns, one line each (labelled by their repr).
        frames_list (`Sequence[int]`): latent frame counts.
        height (`int`): tokens along height.
        width (`int`): tokens along width.
        block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.
        path (`str` or `os.PathLike`, *optional*): where to write the PNG; `None` only returns the rows.
        order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): token order.

    Returns:
        `list[dict]`: one row per (pattern, frames) with keys `pattern`, `frames`, `tokens`, `density`,
        `density_n_over_log_n` (`density * frames / log2(frames)`, n counted in frames, not tokens: flat when
        density falls like `log(frames) / frames`) and
        `seconds` (time to build the block mask).

    Example:
        >>> from diffsparse.patterns import Radial
        >>> rows = density_vs_frames([Radial()], [8, 16, 32], 16, 16, 64)
        >>> [(r["frames"], round(r["density"], 3)) for r in rows]
        [(8, 0.676), (16, 0.478), (32, 0.313)]
    """
    rows = []
    for pattern in patterns:
        for frames in frames_list:
            layout = VideoLayout(frames, height, width)
            start = time.perf_counter()
            density = pattern.density(layout, block_size, order)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "pattern": repr(pattern),
                    "frames": frames,
                    "tokens": layout.num_tokens,
                    "density": density,
                    "density_n_over_log_n": density * frames / math.log2(frames) if frames > 1 else math.nan,
                    "seconds": seconds,
                }
            )
    if path is not None:
        _draw(rows, height, width, block_size, order, path)
    return rows


def _draw(rows, height, width, block_size, order, path):
    # The Agg canvas is used directly so no process-wide matplotlib backend is switched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["pattern"] for r in rows):
        mine = [r for r in rows if r["pattern"] == name]
        frames = [r["frames"] for r in mine]
        (line,) = ax.plot(frames, [r["density"] for r in mine], marker="o", label=name)
        first = next((r for r in mine if r["frames"] > 1), None)
        if first is not None:
            c = first["density_n_over_log_n"]
            ax.plot(
                frames,
                [min(1.0, c * math.log2(f) / f) if f > 1 else 1.0 for f in frames],
                linestyle=":",
                color=line.get_color(),
                linewidth=1,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latent frames")
    ax.set_ylabel("block density")
    ax.set_ylim(0, 1.05)
    order_name = "frame_major()" if order is None else repr(order)
    ax.set_title(
        f"{height}x{width} tokens/frame, block={block_size}, {order_name}; dotted: c log2(frames)/frames", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")

