"""The `"cpu"` backend: block-sparse attention that really skips the masked blocks.

Float32 and bfloat16 inference runs the compiled kernel of `cpu_native` (one task per query block, GEMMs over
the whole block and up to 512 kept keys, as wide as dense attention's). Everything else (float16, autograd, or
when that kernel cannot be built) runs the torch-ops path below, which gives the same results and differentiates
the output and the LSE (a merge of partial attentions, `pipelines.base.merge_attention`, weights by the LSE).

A *segment* is a run of consecutive query blocks of one (batch, head) with the same kept key blocks (often a
single block; long runs are common in structured patterns). Segments with the same shape (query blocks, key
blocks, whether the padded tail key block is kept) are batched: their key/value blocks are gathered with one
index op into `(R, count * block_k, D)` and one fused attention call runs over the R segments. Work and memory
traffic are proportional to the kept blocks. The grouping is computed once per (plan, batch, heads, ...) and
cached on the plan, so a call is a short loop of index + attention ops.
"""

import torch
import torch.nn.functional as F

from . import cpu_native
from .plan import BlockSparsePlan, needs_grad

# Gathered K+V per chunk: small enough to stay in cache between the gather and the attention call that reads
# it. Measured on a 32 MB-L3 CPU: 2-4 MB beat 16-32 MB by 5-9% of the call time. The price is more (smaller)
# parallel regions, which suffer when other processes oversubscribe the cores.
_CHUNK_BYTES = 4 * 2**20

# Returns (out, logsumexp) in one pass; SDPA would drop the LSE.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# (flat query-block rows, flat key-block rows, segments, query blocks per segment, key blocks, valid keys)
_Chunk = tuple[torch.Tensor, torch.Tensor, int, int, int, int]


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q.float() @ k.float().transpose(-1, -2)) * scale


class _LogSumExp(torch.autograd.Function):
    """The float32 log-sum-exp of the scaled scores of `q` over all of `k` (a chunk's keys, cut to the valid
    ones), differentiable. The backward recomputes the scores rather than keep them: autograd holds q, k and the
    LSE per chunk, as the fused attention ops do, not a float per query-key pair."""

    @staticmethod
    def forward(ctx, q, k, scale):
        lse = torch.logsumexp(_scores(q, k, scale), dim=-1)
        ctx.save_for_backward(q, k, lse)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx, grad):
        q, k, lse = ctx.saved_tensors
        # d lse_i / d score_ij is the softmax weight p_ij.
        weights = torch.exp(_scores(q, k, ctx.scale) - lse.unsqueeze(-1)) * (grad.unsqueeze(-1) * ctx.scale)
        dq = (weights @ k.float()).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = (weights.transpose(-1, -2) @ q.float()).to(k.dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, None


def _dense_attention(q, k, v, scale: float, need_lse: bool):
    """Attention over each segment's gathered keys, as (out, lse or None); lse is float32 and, where q or k need
    gradients, differentiable."""
    if _FLASH_CPU is not None and q.device.type == "cpu":
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, scale=scale)
    else:  # other devices, or a torch without the CPU flash op: SDPA, which gives no LSE
        out, lse = F.scaled_dot_product_attention(q, k, v, scale=scale), None
    if need_lse and (lse is None or needs_grad(q, k)):
        # The flash op's backward ignores its LSE: one that is differentiated, or missing, comes from explicit
        # scores, one chunk at a time (forward and backward).
        lse = _LogSumExp.apply(q, k, scale)
    return out, lse if need_lse else None


def _block_sizes(plan: BlockSparsePlan) -> tuple[int, int]:
    """`(block_q, block_k)` as both paths run them: a single block longer than its sequence is the sequence. The
    compiled kernel sizes its per-block scratch by the block (a 100,000-token block over 320 tokens asked for 40 GB
    of it) and the torch-ops path pads each sequence to whole blocks (a 10**6-token block there: 1.5 GB, 3.6 s)."""
    block_q = min(plan.block_q, plan.q_len) if plan.num_q_blocks == 1 else plan.block_q
    block_k = min(plan.block_k, plan.kv_len) if plan.num_kv_blocks == 1 else plan.block_k
    return block_q, block_k


def _chunks(plan: BlockSparsePlan, batch: int, heads: int, head_dim: int, itemsize: int, device) -> list[_Chunk]:
    key = ("cpu", batch, heads, head_dim, itemsize, str(device), torch.get_num_threads(), _CHUNK_BYTES)
    cached = plan._cache.get(key)
    if cached is not None:
        return cached
    nq, nk = plan.num_q_blocks, plan.num_kv_blocks
    bq, bk = _block_sizes(plan)
    rows = batch * heads * nq
    counts = plan.kv_counts.expand(batch, heads, nq).reshape(-1).long()
    indices = plan.kv_indices.expand(batch, heads, nq, nk).reshape(-1, nk).long()
    tail_pad = nk * bk - plan.kv_len
    # The padded tail key block must be cut off; as the largest index it is last in the gathered row.
    has_tail = plan.block_mask[..., -1].expand(batch, heads, nq).reshape(-1) & (tail_pad > 0)

    # Padded index rows are equal exactly when the kept sets are, so a row-wise compare finds the runs.
    arange = torch.arange(rows, device=indices.device)
    same = torch.zeros(rows, dtype=torch.bool, device=indices.device)
    same[1:] = (indices[1:] == indices[:-1]).all(-1) & (arange[1:] % nq != 0)
    starts = arange[~same]
    lengths = torch.diff(starts, append=torch.tensor([rows], device=starts.device))
    group_key = (counts[starts] * 2 + has_tail[starts].long()) * (nq + 1) + lengths
    # Stable: segments of a group stay in (batch, head, block) order, so neighbours share source K/V in cache.
    order = torch.sort(group_key, stable=True).indices
    group_keys, sizes = torch.unique_consecutive(group_key[order], return_counts=True)

    chunks: list[_Chunk] = []
    done = 0
    for gkey, size in zip(group_keys.tolist(), sizes.tolist()):
        first = starts[order[done : done + size]]
        done += size
        (count, tail), length = divmod(gkey // (nq + 1), 2), gkey % (nq + 1)
        q_rows = (first.unsqueeze(-1) + torch.arange(length, device=first.device)).to(device)
        kv_rows = (indices[first, :count] + (first // nq * nk).unsqueeze(-1)).to(device)
        # Enough segments to keep every thread busy (the fused op splits queries into tiles of 32-256), else
        # as many as fit the cache budget.
        min_segments = -(-torch.get_num_threads() * 64 // (length * bq))
        per_chunk = max(min_segments, _CHUNK_BYTES // (2 * count * bk * head_dim * itemsize))
        for s in range(0, size, per_chunk):
            n = min(per_chunk, size - s)
            chunks.append(
                (
                    q_rows[s : s + n].reshape(-1),
                    kv_rows[s : s + n].reshape(-1),
                    n,
                    length,
                    count,
                    count * bk - tail * tail_pad,
                )
            )
    plan._cache[key] = chunks
    return chunks


def _as_blocks(x: torch.Tensor, num_blocks: int, block: int) -> torch.Tensor:
    pad = num_blocks * block - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(-1, block, x.shape[-1])


def _gather(blocks: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    if buffer is None:
        return blocks.index_select(0, index)
    return torch.index_select(blocks, 0, index, out=buffer.view(len(index), *blocks.shape[1:]))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockSparsePlan, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    differentiated = needs_grad(q, k, v)
    if q.device.type == "cpu" and q.dtype in cpu_native.DTYPES and not differentiated:
        op = cpu_native.forward_op()
        if op is not None:
            # BLAS takes each row at stride(2) and refuses a leading dimension below D (MKL then computes nothing
            # and the kernel read stale scores): a sequence broadcast with `expand` (stride 0), or one token whose
            # stride is anything, is copied. `.contiguous()` keeps such tensors as they are; a clone does not.
            q, k, v = (x if x.stride(-1) == 1 and x.stride(2) >= x.shape[3]
                       else x.clone(memory_format=torch.contiguous_format) for x in (q, k, v))
            indices, counts = (t.to(q.device).contiguous() for t in (plan.kv_indices, plan.kv_counts))
            out, lse = op(q, k, v, indices, counts, *_block_sizes(plan), scale)
            return out, lse if return_lse else None

    batch, heads, _, head_dim = q.shape
    if batch * heads == 0:  # nothing to attend (the chunking below has no chunk to size its buffers by)
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32) if return_lse else None
    nq, nk = plan.num_q_blocks, plan.num_kv_blocks
    bq, bk = _block_sizes(plan)
    q_blocks, k_blocks, v_blocks = _as_blocks(q, nq, bq), _as_blocks(k, nk, bk), _as_blocks(v, nk, bk)
    out = q.new_empty(batch * heads * nq, bq, head_dim)
    lse = q.new_empty(batch * heads * nq, bq, dtype=torch.float32) if return_lse else None
    chunks = _chunks(plan, batch, heads, head_dim, q.element_size(), q.device)
    # Gather into two reused buffers: fresh multi-MB allocations cost page faults on every chunk. out= ops
    # cannot be differentiated, so autograd gets fresh tensors instead.
    reuse = not differentiated
    capacity = max(c[2] * c[4] for c in chunks) * bk * head_dim if reuse else 0
    k_buf, v_buf = k_blocks.new_empty(capacity), v_blocks.new_empty(capacity)
    for q_rows, kv_rows, n, length, count, valid in chunks:
        size = n * count * bk * head_dim
        kc = _gather(k_blocks, kv_rows, k_buf[:size] if reuse else None)
        vc = _gather(v_blocks, kv_rows, v_buf[:size] if reuse else None)
        kc = kc.view(n, 1, count * bk, head_dim)[:, :, :valid]
        vc = vc.view(n, 1, count * bk, head_dim)[:, :, :valid]
        qc = q_blocks.index_select(0, q_rows).view(n, 1, length * bq, head_dim)
        o, l = _dense_attention(qc, kc, vc, scale, return_lse)
        out.index_copy_(0, q_rows, o.reshape(n * length, bq, head_dim))
        if return_lse:
            lse.index_copy_(0, q_rows, l.reshape(n * length, bq))
    out = out.view(batch, heads, nq * bq, head_dim)[:, :, : plan.q_len]
    lse = lse.view(batch, heads, nq * bq)[:, :, : plan.q_len] if return_lse else None
    return out, lse
