"""Dense attention as a pattern: every block kept. The baseline every sparse pattern is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern


@dataclass(frozen=True, repr=False)
class Dense(Pattern):
    r"""
    Every query attends to every key (name `"dense"`).

    Example:
        >>> from diffsparse.patterns import Dense, VideoLayout
        >>> Dense().block_mask(VideoLayout(frames=2, height=3, width=5), 8).all().item()
        True
    """

    name = "dense"

    def _video_token_mask(self, layout):
        v = layout.num_video_tokens
        return torch.ones(1, v, v, dtype=torch.bool)

    def _video_block_mask(self, layout, q_lo, q_hi, k_lo, k_hi):
        return torch.ones(1, len(q_lo), len(k_lo), dtype=torch.bool)
