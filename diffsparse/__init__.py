"""diffsparse: 3D-aware block-sparse attention for Hugging Face diffusers video transformers.

>>> import diffsparse
>>> config = diffsparse.SparseConfig(pattern="radial", dense_steps=0.2)
"""

from .api import LayerStats, SparseHandle, SparseStats, apply, remove, sparse, stats
from .config import SparseConfig

__all__ = ["LayerStats", "SparseConfig", "SparseHandle", "SparseStats", "apply", "remove", "sparse", "stats"]
__version__ = "0.1.0"
