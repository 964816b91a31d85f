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

    def _box_any(self, layout, q, k):
        return torch.ones(1, *torch.broadcast_shapes(q.t0.shape, k.t0.shape), dtype=torch.bool)

    _box_all = _box_any

    def _density_knob(self, layout):
        return (lambda x: self), 0.0, 0.0, ()  # one density, 1: at_density returns the pattern itself
