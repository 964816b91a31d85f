"""Ground truth: the block mask expanded to tokens, masked softmax in float32. Small shapes only."""

import torch

from .plan import BlockSparsePlan


def token_mask(plan: BlockSparsePlan) -> torch.Tensor:
    """The plan's block mask expanded to a `(B or 1, H or 1, q_len, kv_len)` token mask (tokens squared!)."""
    # Each token's block, looked up: repeating the blocks and cropping allocated blocks-squared, so a block far
    # longer than the sequence (block_size=2**20 on 256 tokens) asked for a terabyte.
    device = plan.block_mask.device
    q_blocks = torch.arange(plan.q_len, device=device) // plan.block_q
    k_blocks = torch.arange(plan.kv_len, device=device) // plan.block_k
    return plan.block_mask[..., q_blocks[:, None], k_blocks[None, :]]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockSparsePlan, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~token_mask(plan).to(q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ v.float()
    return out.to(q.dtype), (lse if return_lse else None)
