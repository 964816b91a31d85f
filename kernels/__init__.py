"""How to compute: block-sparse attention kernels. Knows nothing of diffusers or patterns."""

from .attention import BACKENDS, block_sparse_attention, choose_backend
from .plan import BlockSparsePlan, make_plan

__all__ = ["BACKENDS", "BlockSparsePlan", "block_sparse_attention", "choose_backend", "make_plan"]
