"""What to compute: block masks over token layouts. Knows nothing of diffusers or kernels."""

from .base import HeadShard, Pattern, as_pair, reduce_token_mask
from .causal import FrameCausal
from .compose import Intersection, Union
from .dense import Dense
from .layout import VideoLayout, as_triple
from .ordering import Boxes, IdentityOrder, TileOrder, TokenOrder, permute, unpermute
from .radial import Radial
from .registry import PATTERNS, get_pattern
from .searched import Searched
from .sink import DenseQueryFrames, FrameSink
from .spatial_temporal import SpatialTemporal
from .window3d import Window3D
from .window_search import SearchedWindows

__all__ = [
    "PATTERNS",
    "Boxes",
    "Dense",
    "DenseQueryFrames",
    "FrameCausal",
    "FrameSink",
    "HeadShard",
    "IdentityOrder",
    "Intersection",
    "Pattern",
    "Radial",
    "Searched",
    "SearchedWindows",
    "SpatialTemporal",
    "TileOrder",
    "TokenOrder",
    "Union",
    "VideoLayout",
    "Window3D",
    "as_pair",
    "as_triple",
    "get_pattern",
    "permute",
    "reduce_token_mask",
    "unpermute",
]
