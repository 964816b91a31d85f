"""Block-sparse attention forward pass in Triton.

One program handles one query block of one (batch, head). It walks only the key blocks its
row of the plan keeps (``plan.kv_indices[b, h, qb, :plan.kv_counts[b, h, qb]]``) with an online
softmax (running max, running sum, rescaled fp32 accumulator), so the work is proportional to
the plan's density. The algorithm is FlashAttention's
([Dao et al., 2022](https://arxiv.org/abs/2205.14135)) restricted to a per-row list of key blocks.

Compile-time shape of the kernel:

- ``BLOCK_Q`` / ``BLOCK_K`` are the plan's block sizes, each 64 or 128, independently.
- ``HEAD_DIM`` is the head dimension rounded up to a power of two >= 16. Head dims 64 and 128
  run natively; any other (e.g. 40 or 96) is padded: loads along the head dimension are masked
  with zeros, which add nothing to ``q @ k^T`` and produce zero columns of ``p @ v`` that are never
  stored. Padding costs the extra (zero) FLOPs of the padded width.
- Head dims up to 256. At fp32, head dims above 128 (padded to 256) with a 128-sized block need
  more shared memory than current GPUs have (Triton would raise ``OutOfResources``), so such calls
  are refused up front: use 64-sized blocks or a half-precision dtype there.
- There is no per-element masking inside full blocks. Only the ragged tail is masked: query
  rows ``>= q_len`` (loads and stores of the last query block) and key columns ``>= kv_len`` (the
  last key block). Because a row's kept blocks are listed in ascending order, the last key
  block can only be the last entry of a row, so the loop runs unmasked over all entries but the
  last one and a masked copy of the loop body handles that one.

The Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors, fp32) cannot use a loop bound loaded
from memory, so there the loop runs to the constexpr ``MAX_BLOCKS`` (the plan's key-block count)
and skips entries past the row's count; compiled on a GPU the loop bound is the loaded count.
Whether the kernels are interpreted is decided by Triton when this module is imported: set
``TRITON_INTERPRET=1`` before importing it.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux-only dependency: the module stays importable without it.
    triton = None
    tl = None

from .plan import needs_grad, resolve_scale

if TYPE_CHECKING:
    from .plan import BlockSparsePlan

__all__ = ["triton_available", "triton_block_sparse_attention"]

SUPPORTED_BLOCK_SIZES = (64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Beyond 256 the q/k/v tiles of one program no longer fit in shared memory.
MAX_HEAD_DIM = 256
# One program holds its q, k and v tiles in shared memory, (BLOCK_Q + 2 * BLOCK_K) * HEAD_DIM * 4 bytes at fp32
# (compiled for sm90: 196,608 B for 64 x 64 blocks at HEAD_DIM 256, 262,144 B for 128 x 64, 393,216 B for
# 128 x 128), and an H100 grants a block 232,448 B: past this padded head dim fp32 needs 64 x 64 blocks.
FP32_MAX_HEAD_DIM_WITH_128_BLOCKS = 128
_LOG2E = 1.4426950408889634


if triton is not None:
    # Globals read inside a jit function must be constexpr.
    _LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
        # Masks are compile-time choices so full, unpadded tiles load without any predicate.
        if MASK_ROWS:
            if MASK_COLS:
                tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
            else:
                tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            if MASK_COLS:
                tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
            else:
                tile = tl.load(ptrs)
        return tile

    @triton.jit
    def _attend_block(
        acc, l_i, m_i, q,
        k_base, v_base, idx_row, i,
        stride_idx, stride_kn, stride_kd, stride_vn, stride_vd,
        kv_len, qk_scale,
        offs_n, offs_d, d_ok,
        BLOCK_K: tl.constexpr,
        MASK_K: tl.constexpr,
        PAD_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        # One step of the online softmax over the i-th kept key block of this row.
        start_n = tl.load(idx_row + i * stride_idx) * BLOCK_K
        # 64-bit block offset: start_n * stride_kn can pass 2**31 for long (B, N, H, D) layouts.
        k_blk = k_base + start_n.to(tl.int64) * stride_kn
        v_blk = v_base + start_n.to(tl.int64) * stride_vn
        cols_ok = (start_n + offs_n) < kv_len
        k = _load_tile(k_blk + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols_ok, d_ok, MASK_K, PAD_D)
        v = _load_tile(v_blk + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols_ok, d_ok, MASK_K, PAD_D)

        # Scores in the base-2 domain: qk_scale = scale * log2(e), so exp2 below is exp of the scores.
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if MASK_K:
            qk = tl.where(cols_ok[None, :], qk, float("-inf"))
        # The tail block always has a valid column, so m_new is finite after the first block.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # p is cast to v's dtype so the second product runs on the same tensor-core path as the first.
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        return acc, l_i, m_new

    @triton.jit
    def _block_sparse_attn_inner(
        acc, l_i, m_i, q,
        k_base, v_base, idx_row,
        stride_idx, stride_kn, stride_kd, stride_vn, stride_vd,
        lo, hi, kv_len, qk_scale,
        offs_n, offs_d, d_ok,
        BLOCK_K: tl.constexpr,
        MAX_BLOCKS: tl.constexpr,
        MASK_K: tl.constexpr,
        PAD_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        # Loop over the entries lo..hi-1 of this row's compacted key-block list.
        if MAX_BLOCKS > 0:
            # Interpreter: the bound must be a compile-time constant, so visit every slot and skip
            # those outside [lo, hi).
            for i in range(MAX_BLOCKS):
                if (i >= lo) & (i < hi):
                    acc, l_i, m_i = _attend_block(
                        acc, l_i, m_i, q, k_base, v_base, idx_row, i,
                        stride_idx, stride_kn, stride_kd, stride_vn, stride_vd,
                        kv_len, qk_scale, offs_n, offs_d, d_ok,
                        BLOCK_K, MASK_K, PAD_D, INPUT_PRECISION,
                    )
        else:
            # Compiled: the loaded count is the bound, so skipped blocks cost nothing.
            for i in range(lo, hi):
                acc, l_i, m_i = _attend_block(
                    acc, l_i, m_i, q, k_base, v_base, idx_row, i,
                    stride_idx, stride_kn, stride_kd, stride_vn, stride_vd,
                    kv_len, qk_scale, offs_n, offs_d, d_ok,
                    BLOCK_K, MASK_K, PAD_D, INPUT_PRECISION,
                )
        return acc, l_i, m_i

    @triton.jit
    def _block_sparse_attn_fwd(
        Q, K, V, Out, Lse, KvIdx, KvCnt,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_ib, stride_ih, stride_iq, stride_ik,
        stride_cb, stride_ch, stride_cq,
        num_heads, q_len, kv_len, qk_scale,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        D: tl.constexpr,
        MAX_BLOCKS: tl.constexpr,
        EVEN_Q: tl.constexpr,
        EVEN_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        tl.static_assert(BLOCK_Q == 64 or BLOCK_Q == 128, "BLOCK_Q must be 64 or 128")
        tl.static_assert(BLOCK_K == 64 or BLOCK_K == 128, "BLOCK_K must be 64 or 128")
        tl.static_assert(HEAD_DIM >= 16, "HEAD_DIM must be at least 16 for tl.dot")
        tl.static_assert((HEAD_DIM & (HEAD_DIM - 1)) == 0, "HEAD_DIM must be a power of two")
        tl.static_assert(D <= HEAD_DIM, "the real head dim D must fit in the padded HEAD_DIM")
        PAD_D: tl.constexpr = D != HEAD_DIM

        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads

        # Plan tensors arrive expanded to (B, H, ...): broadcast dims carry stride 0.
        idx_row = KvIdx + b * stride_ib + h * stride_ih + pid_q * stride_iq
        count = tl.load(KvCnt + b * stride_cb + h * stride_ch + pid_q * stride_cq)

        # 64-bit (batch, head) offsets: b * stride_qb overflows int32 on long videos.
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        k_base = K + b64 * stride_kb + h64 * stride_kh
        v_base = V + b64 * stride_vb + h64 * stride_vh
        o_base = Out + b64 * stride_ob + h64 * stride_oh

        # Tiles are addressed as a 64-bit block start plus small in-block offsets (see _attend_block).
        start_m = pid_q * BLOCK_Q
        q_base += start_m.to(tl.int64) * stride_qn
        o_base += start_m.to(tl.int64) * stride_on
        offs_m = tl.arange(0, BLOCK_Q)
        offs_n = tl.arange(0, BLOCK_K)
        offs_d = tl.arange(0, HEAD_DIM)
        rows_ok = (start_m + offs_m) < q_len
        d_ok = offs_d < D

        q = _load_tile(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                       rows_ok, d_ok, not EVEN_Q, PAD_D)

        m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, HEAD_DIM], dtype=tl.float32)

        if EVEN_K:
            acc, l_i, m_i = _block_sparse_attn_inner(
                acc, l_i, m_i, q, k_base, v_base, idx_row,
                stride_ik, stride_kn, stride_kd, stride_vn, stride_vd,
                0, count, kv_len, qk_scale, offs_n, offs_d, d_ok,
                BLOCK_K, MAX_BLOCKS, False, PAD_D, INPUT_PRECISION,
            )
        else:
            # Kept blocks are ascending, so only the row's last entry can be the ragged last key
            # block: every other entry runs unmasked. Clamped so a (forbidden) empty row reads nothing.
            last = tl.maximum(count - 1, 0)
            acc, l_i, m_i = _block_sparse_attn_inner(
                acc, l_i, m_i, q, k_base, v_base, idx_row,
                stride_ik, stride_kn, stride_kd, stride_vn, stride_vd,
                0, last, kv_len, qk_scale, offs_n, offs_d, d_ok,
                BLOCK_K, MAX_BLOCKS, False, PAD_D, INPUT_PRECISION,
            )
            acc, l_i, m_i = _block_sparse_attn_inner(
                acc, l_i, m_i, q, k_base, v_base, idx_row,
                stride_ik, stride_kn, stride_kd, stride_vn, stride_vd,
                last, count, kv_len, qk_scale, offs_n, offs_d, d_ok,
                BLOCK_K, MAX_BLOCKS, True, PAD_D, INPUT_PRECISION,
            )

        # Epilogue: normalise, and turn the base-2 running max/sum into a natural-log LSE.
        out = acc / l_i[:, None]
        lse = (m_i + tl.math.log2(l_i)) * _LN2
        o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
        lse_ptrs = Lse + pid_bh.to(tl.int64) * q_len + start_m + offs_m
        out = out.to(Out.dtype.element_ty)
        if EVEN_Q:
            if PAD_D:
                tl.store(o_ptrs, out, mask=d_ok[None, :])
            else:
                tl.store(o_ptrs, out)
            tl.store(lse_ptrs, lse)
        else:
            if PAD_D:
                tl.store(o_ptrs, out, mask=rows_ok[:, None] & d_ok[None, :])
            else:
                tl.store(o_ptrs, out, mask=rows_ok[:, None])
            tl.store(lse_ptrs, lse, mask=rows_ok)

    def _keep(config, block_q, head_dim, elem_bytes):
        # 8 warps on a 64-row query tile leave each warp too few rows to fill an MMA.
        if block_q == 64 and config.num_warps == 8:
            return False
        # Wide tiles (fp32, or HEAD_DIM > 128) overflow shared memory when k/v are multi-buffered:
        # at fp32 and 128x128x128 only one stage fits on an H100. Narrow tiles gain from pipelining.
        wide = elem_bytes == 4 or head_dim > 128
        if config.num_stages == 1:
            return wide
        return not (wide and config.num_stages > 2)

    def _prune_configs(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elem_bytes = args["Q"].element_size()
        kept = [c for c in configs if _keep(c, args["BLOCK_Q"], args["HEAD_DIM"], elem_bytes)]
        return kept or configs[:1]

    # Configs that do not fit in shared memory on the running GPU are skipped by the autotuner.
    _CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]

    # The interpreter runs whatever config it is given, so it gets one pinned config and no
    # tuning; compiled, the best config is measured once per (BLOCK_Q, BLOCK_K, HEAD_DIM, dtypes).
    _INTERPRETED = not isinstance(_block_sparse_attn_fwd, triton.runtime.jit.JITFunction)
    if _INTERPRETED:
        _fwd_launcher = _block_sparse_attn_fwd
    else:
        _fwd_launcher = triton.autotune(
            configs=_CONFIGS,
            key=["BLOCK_Q", "BLOCK_K", "HEAD_DIM"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_block_sparse_attn_fwd)
else:
    _INTERPRETED = False


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    r"""
    Whether the Triton backend can run on `device`, and why (not).

    Args:
        device (`torch.device` or `str`, *optional*, defaults to `None`):
            The device the attention inputs live on. `None` means the current CUDA device.

    Returns:
        `tuple[bool, str]`: `(True, what will run)` or `(False, the reason)`, so a backend chooser
        can log why this backend was or was not picked.

    Examples:

    ```py
    >>> from diffsparse.kernels.triton_block_sparse import triton_available
    >>> ok, reason = triton_available("cpu")
    >>> ok or "TRITON_INTERPRET" in reason  # on CPU only the interpreter runs it (set before import)
    True

    ```
    """
    if triton is None:
        return False, "triton is not installed (pip install triton)"
    device = torch.device("cuda" if device is None else device)
    if _INTERPRETED:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): slow, for tests"
    if device.type != "cuda":
        if _env_interpret():
            return False, (
                "TRITON_INTERPRET=1 was set after diffsparse.kernels.triton_block_sparse was imported; "
                f"set it before the import to run on {device.type}"
            )
        return False, f"the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1), got {device.type!r}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available to torch"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name(device)}"


def _padded_head_dim(head_dim: int) -> int:
    # tl.arange and tl.dot need a power of two, and tl.dot at least 16.
    return max(16, 1 << (head_dim - 1).bit_length())


def exceeds_shared_memory(block_q: int, block_k: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel's tiles for these blocks, head dim and dtype overflow a GPU's shared memory (see
    `FP32_MAX_HEAD_DIM_WITH_128_BLOCKS`), which the autotuner would only report as `OutOfResources` at launch."""
    return (
        dtype == torch.float32
        and _padded_head_dim(head_dim) > FP32_MAX_HEAD_DIM_WITH_128_BLOCKS
        and max(block_q, block_k) > 64
    )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockSparsePlan) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4D tensor (B, H, N, D), got {name}.shape={shape}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must be one of {SUPPORTED_DTYPES}, got {q.dtype=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(
            "k and v must have shape (B, H, kv_len, D) with q's B, H and D, "
            f"got {tuple(q.shape)=}, {tuple(k.shape)=}, {tuple(v.shape)=}"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dims from 1 to {MAX_HEAD_DIM} are supported by the Triton kernel, got {head_dim=} "
            "(the 'cpu' backend takes any)"
        )
    for name in ("block_q", "block_k"):
        size = getattr(plan, name)
        if size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"plan.{name} must be one of {SUPPORTED_BLOCK_SIZES}, got plan.{name}={size}")
    if exceeds_shared_memory(plan.block_q, plan.block_k, head_dim, q.dtype):
        raise ValueError(
            f"float32 with head dims above {FP32_MAX_HEAD_DIM_WITH_128_BLOCKS} needs blocks of 64 x 64 tokens in "
            f"the Triton kernel (larger tiles overflow GPU shared memory), got {head_dim=}, "
            f"plan.block_q={plan.block_q}, plan.block_k={plan.block_k}: use block_size=64, float16/bfloat16 "
            "inputs or the 'cpu' backend"
        )
    if plan.q_len != q.shape[2] or plan.kv_len != k.shape[2]:
        raise ValueError(
            "the plan was made for other sequence lengths: need plan.q_len == q.shape[2] and "
            f"plan.kv_len == k.shape[2], got {plan.q_len=}, {plan.kv_len=}, {tuple(q.shape)=}, {tuple(k.shape)=}"
        )
    n_q, n_k = -(-plan.q_len // plan.block_q), -(-plan.kv_len // plan.block_k)
    idx, counts = plan.kv_indices, plan.kv_counts
    if idx.dim() != 4 or tuple(idx.shape[2:]) != (n_q, n_k) or tuple(counts.shape) != tuple(idx.shape[:3]):
        raise ValueError(
            f"plan.kv_indices must have shape (Bm, Hm, {n_q}, {n_k}) and plan.kv_counts (Bm, Hm, {n_q}), "
            f"got {tuple(idx.shape)=}, {tuple(counts.shape)=}"
        )
    if idx.shape[0] not in (1, batch) or idx.shape[1] not in (1, heads):
        raise ValueError(
            f"the plan's batch/head dims must be 1 or match q's ({batch}, {heads}), got {tuple(idx.shape[:2])=}"
        )
    if idx.dtype != torch.int32 or counts.dtype != torch.int32:
        raise ValueError(f"plan.kv_indices and plan.kv_counts must be int32, got {idx.dtype=}, {counts.dtype=}")
    if idx.device != q.device or counts.device != q.device:
        # Moving the plan on every call would be a hidden host-to-device copy per layer and step.
        raise ValueError(
            f"the plan must live on the inputs' device (build it there once), got {idx.device=}, {q.device=}"
        )


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""
    Block-sparse attention with the Triton kernel: each query block attends only to the key blocks
    its row of `plan` keeps.

    Args:
        q (`torch.Tensor`):
            Queries `(B, H, q_len, D)`, float32, float16 or bfloat16; any strides.
        k (`torch.Tensor`):
            Keys `(B, H, kv_len, D)`, same dtype and device as `q`.
        v (`torch.Tensor`):
            Values `(B, H, kv_len, D)`, same dtype and device as `q`.
        plan (`BlockSparsePlan`):
            From `diffsparse.kernels.make_plan`, built for `q_len`/`kv_len` on the inputs' device,
            with `block_q` and `block_k` in `{64, 128}`. Its batch and head dims may be 1 (shared).
        scale (`float`, *optional*, defaults to `1 / sqrt(D)`):
            Multiplies `q @ k^T` before the softmax.
        return_lse (`bool`, *optional*, defaults to `False`):
            Also return the natural-log log-sum-exp of the scaled scores over the kept keys.

    Returns:
        `torch.Tensor` `out` with `q`'s shape and dtype, or `(out, lse)` with `lse` float32
        `(B, H, q_len)` when `return_lse=True`.

    Examples:

    ```py
    >>> import torch
    >>> from diffsparse.kernels import make_plan
    >>> from diffsparse.kernels.triton_block_sparse import triton_block_sparse_attention
    >>> q, k, v = torch.randn(3, 1, 2, 300, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    >>> mask = torch.eye(3, dtype=torch.bool, device="cuda")[None, None]  # (1, 1, nq, nk), block-diagonal
    >>> plan = make_plan(mask, q_len=300, kv_len=300, block_size=128)
    >>> out, lse = triton_block_sparse_attention(q, k, v, plan, return_lse=True)
    >>> out.shape, lse.dtype
    (torch.Size([1, 2, 300, 64]), torch.float32)

    ```
    """
    if triton is None:
        raise ImportError("the Triton block-sparse kernel needs triton: pip install triton")
    _check_inputs(q, k, v, plan)
    if needs_grad(q, k, v):
        # Its output would carry no gradient: training through it would silently skip the attention.
        raise ValueError(
            "the Triton block-sparse kernel has no backward pass, and q, k or v requires grad; backend='auto' "
            "takes the differentiable torch-ops path ('cpu', any device) for such inputs, or run under "
            "torch.no_grad()"
        )
    if not (_INTERPRETED or q.is_cuda):
        raise ValueError(f"the Triton backend cannot run these inputs: {triton_available(q.device)[1]}")
    if _INTERPRETED and q.dtype == torch.bfloat16:
        # Triton's interpreter (TRITON_INTERPRET=1) gets bfloat16 `tl.dot` wrong (errors of 1e8 measured), not
        # this kernel: refuse rather than return those numbers.
        raise ValueError("the Triton backend under TRITON_INTERPRET=1 computes bfloat16 wrongly (Triton's "
                         "interpreter); use float32 or float16 there, or the 'cpu' backend")

    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    n_q, n_k = plan.kv_indices.shape[2:]
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return (out, lse) if return_lse else out

    scale = resolve_scale(scale, head_dim)
    # expand() is a view: a plan shared over batch or heads is read with stride 0 on that dim.
    kv_indices = plan.kv_indices.expand(batch, heads, n_q, n_k)
    kv_counts = plan.kv_counts.expand(batch, heads, n_q)
    launch = {
        "BLOCK_Q": plan.block_q,
        "BLOCK_K": plan.block_k,
        "HEAD_DIM": _padded_head_dim(head_dim),
        "D": head_dim,
        # 0 selects the loaded count as the loop bound; the interpreter needs a constant bound.
        "MAX_BLOCKS": n_k if _INTERPRETED else 0,
        "EVEN_Q": q_len % plan.block_q == 0,
        "EVEN_K": kv_len % plan.block_k == 0,
        # fp32 inputs keep full fp32 products (matching the fp32 reference) instead of TF32; half
        # types take the backend default (None), as "tf32" is not a valid choice on every backend.
        "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 else None,
    }
    if _INTERPRETED:
        launch.update({"num_warps": 4, "num_stages": 2})
    # Triton launches on the current CUDA device, which need not be the inputs' device.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _fwd_launcher[(n_q, batch * heads)](
            q, k, v, out, lse, kv_indices, kv_counts,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *kv_indices.stride(), *kv_counts.stride(),
            heads, q_len, kv_len, scale * _LOG2E,
            **launch,
        )
    return (out, lse) if return_lse else out
