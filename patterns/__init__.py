"""What to compute: block masks over token layouts. Knows nothing of diffusers or kernels."""

from .base import Pattern, as_pair, reduce_token_mask
from .dense import Dense
from .layout import VideoLayout
from .radial import Radial
from .registry import PATTERNS, get_pattern

__all__ = [
    "PATTERNS",
    "Dense",
    "Pattern",
    "Radial",
    "VideoLayout",
    "as_pair",
    "get_pattern",
    "reduce_token_mask",
]
