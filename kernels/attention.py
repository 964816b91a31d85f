"""Public entry point: validate once, pick a backend, run it."""

import logging
import warnings
from types import MappingProxyType

import torch

from .. import DiffsparseWarning, outside_stacklevel
from . import cpu, reference, triton_block_sparse
from .plan import BlockSparsePlan, needs_grad, resolve_scale
from .triton_block_sparse import (
    FP32_MAX_HEAD_DIM_WITH_128_BLOCKS,
    MAX_HEAD_DIM,
    SUPPORTED_BLOCK_SIZES,
    exceeds_shared_memory,
    triton_available,
    triton_block_sparse_attention,
)

logger = logging.getLogger(__name__)



def _triton(q, k, v, plan, scale, return_lse):
    if plan.kv_indices.device != q.device:
        raise ValueError(
            f"the plan must live on the inputs' device for the triton backend, got {plan.kv_indices.device=} "
            f"and {q.device=}: build it from a block mask on {q.device}"
        )
    result = triton_block_sparse_attention(q, k, v, plan, scale=scale, return_lse=return_lse)
    return result if return_lse else (result, None)


# name -> fn(q, k, v, plan, scale, return_lse) -> (out, lse or None). Read-only: no global state to mutate.
BACKENDS = MappingProxyType({"reference": reference.attention, "cpu": cpu.attention, "triton": _triton})

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def choose_backend(
    device: torch.device | str,
    requested: str = "auto",
    needs_grad: bool = False,
    plan: BlockSparsePlan | None = None,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    r"""
    Pick the backend for tensors on `device`, saying why the others were not chosen.

    `"auto"` picks `"triton"` for CUDA tensors when Triton can run there and no gradient is needed (it has no
    backward pass), else `"cpu"` (on CPU tensors a compiled C++ kernel for float32/bfloat16 inference, see
    `kernels/cpu_native.py`; otherwise plain torch ops, gather + fused attention, so it runs on any device and
    differentiates); `"reference"` is never picked automatically because it materialises `q_len x kv_len` scores.
    The reasons are logged at debug level; forcing `"triton"` where it cannot run raises a `ValueError` saying
    why.

    Args:
        device (`torch.device` or `str`): Device of the attention inputs.
        requested (`str`, *optional*, defaults to `"auto"`): `"auto"` or a name in `BACKENDS`.
        needs_grad (`bool`, *optional*, defaults to `False`): Whether autograd will differentiate the output
            (training through the sparse attention, e.g. a LoRA): `"auto"` then leaves out `"triton"`, which has
            no backward pass.
        plan (`BlockSparsePlan`, *optional*), head_dim (`int`, *optional*), dtype (`torch.dtype`, *optional*):
            the call's; `"auto"` leaves out `"triton"` for blocks other than 64 or 128 tokens, head dims above 256,
            or float32 with head dims above 128 and a 128-token block (more shared memory than a GPU has), which
            its kernel does not take, with a warning (the torch-ops path computes the same, more slowly); and
            bfloat16 under `TRITON_INTERPRET=1`, which the interpreter computes wrongly, also with a warning.

    Returns:
        `str`: A key of `BACKENDS`.

    Example:

    ```py
    >>> from diffsparse.kernels import choose_backend
    >>> choose_backend("cpu")
    'cpu'

    ```
    """
    if requested != "auto" and requested not in BACKENDS:
        # Named for block_sparse_attention's and SparseConfig's argument, the one a user sets.
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got backend={requested!r}")
    device = torch.device(device)
    if requested == "triton":
        ok, why = triton_available(device)
        if not ok:
            raise ValueError(f"backend='triton' was requested but cannot run: {why}")
    if requested != "auto":
        return requested
    logger.debug("backend 'reference' not chosen: it materialises tokens-squared scores (tests only)")
    if device.type == "cuda" and needs_grad:
        logger.debug("backend 'triton' not chosen: the inputs need gradients and it has no backward pass")
    elif device.type == "cuda":
        ok, why = triton_available(device)
        refused = _triton_refuses(plan, head_dim, dtype) if ok else None
        if ok and refused is None:
            return "triton"
        # Both name the user's line (in a pipeline call, past any number of frames of diffsparse, diffusers and
        # torch): a fixed count named a line of diffsparse's runtime there.
        if refused == _INTERPRETER_BFLOAT16:
            warnings.warn(
                f"diffsparse: backend='auto' runs {refused} on the torch-ops path (float16 or float32 run the "
                "Triton kernel under the interpreter; or unset TRITON_INTERPRET)",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )
        elif refused is not None:
            warnings.warn(
                f"diffsparse: backend='auto' runs {refused} on the torch-ops path, slower than the Triton kernel, "
                f"which takes blocks of {' or '.join(map(str, SUPPORTED_BLOCK_SIZES))} tokens and head dims up to "
                f"{MAX_HEAD_DIM} (at float32 above {FP32_MAX_HEAD_DIM_WITH_128_BLOCKS} only blocks of 64) "
                "(SparseConfig.block_size=64 or 128 for its speed)",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )
        logger.debug(f"backend 'triton' not chosen: {refused or why}; using the portable 'cpu' backend")
    else:
        logger.debug(f"backend 'triton' not chosen: auto picks it for CUDA tensors only, got {device.type}")
    return "cpu"


_INTERPRETER_BFLOAT16 = "bfloat16 under TRITON_INTERPRET=1 (which Triton's interpreter computes wrongly)"


def _triton_refuses(
    plan: BlockSparsePlan | None, head_dim: int | None, dtype: torch.dtype | None = None
) -> str | None:
    """What of this call the Triton kernel does not take (its block sizes, head dim, shared memory), or `None`."""
    if plan is not None and not {plan.block_q, plan.block_k} <= set(SUPPORTED_BLOCK_SIZES):
        return f"blocks of {plan.block_q} x {plan.block_k} tokens"
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim}"
    if dtype == torch.bfloat16 and triton_block_sparse._INTERPRETED:
        return _INTERPRETER_BFLOAT16
    if None not in (plan, head_dim, dtype) and exceeds_shared_memory(plan.block_q, plan.block_k, head_dim, dtype):
        return f"float32 with head dim {head_dim} and blocks of {plan.block_q} x {plan.block_k} tokens"
    return None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockSparsePlan) -> None:
    if not isinstance(plan, BlockSparsePlan):
        raise TypeError(f"plan must be a BlockSparsePlan from make_plan, got {type(plan)=}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(
                f"{name} must be a (B, H, N, D) tensor, got {name}.shape={getattr(x, 'shape', None)}"
            )
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]) or not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(
            f"q, k, v must share batch, heads and head_dim, got {tuple(q.shape)=}, {tuple(k.shape)=}, {tuple(v.shape)=}"
            " (grouped-query attention: repeat k's and v's heads first, `k.repeat_interleave(groups, dim=1)`)"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {tuple(k.shape)=}, {tuple(v.shape)=}")
    if q.shape[3] == 0:
        raise ValueError(f"head_dim (q.shape[3]) must be >= 1, got {tuple(q.shape)=}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(
            f"q, k, v must share one dtype out of {_DTYPES}, got {q.dtype=}, {k.dtype=}, {v.dtype=}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
    if (q.shape[2], k.shape[2]) != (plan.q_len, plan.kv_len):
        raise ValueError(
            f"q and k lengths must match the plan's, got {q.shape[2]=}, {k.shape[2]=} "
            f"for {plan.q_len=}, {plan.kv_len=}"
        )
    mask_bh = tuple(plan.block_mask.shape[:2])
    if any(m not in (1, n) for m, n in zip(mask_bh, q.shape[:2])):
        raise ValueError(
            f"plan mask batch/head dims must be 1 or equal to q's, got mask (B, H)={mask_bh} for q (B, H)="
            f"{tuple(q.shape[:2])}"
        )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    return_lse: bool = False,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""
    Attention restricted to the key blocks in `plan`, on `(B, H, N, D)` tensors like
    `torch.nn.functional.scaled_dot_product_attention`.

    Args:
        q (`torch.Tensor` of shape `(B, H, q_len, D)`): Queries; float32, float16 or bfloat16.
        k (`torch.Tensor` of shape `(B, H, kv_len, D)`): Keys, same dtype and device as `q`.
        v (`torch.Tensor` of shape `(B, H, kv_len, D)`): Values, same dtype and device as `q`.
        plan ([`BlockSparsePlan`]): From [`make_plan`]; its mask broadcasts over size-1 batch/head dims.
        return_lse (`bool`, *optional*, defaults to `False`): Also return the float32 log-sum-exp of the kept
            scaled scores, shape `(B, H, q_len)`. It is differentiated as the output is (merging attention over
            disjoint key sets by their LSEs gives dense attention's gradients).
        backend (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"cpu"`, `"triton"` or `"reference"`; see
            [`choose_backend`].
        scale (`float`, *optional*, defaults to `1 / sqrt(D)`): Score scale, a finite real number.

    Returns:
        `torch.Tensor` (same dtype as `q`) or `Tuple[torch.Tensor, torch.Tensor]` `(out, lse)`.

    Example:

    ```py
    >>> import torch
    >>> from diffsparse.kernels import block_sparse_attention, make_plan
    >>> q = k = v = torch.randn(1, 2, 256, 64)
    >>> plan = make_plan(torch.ones(1, 1, 2, 2, dtype=torch.bool), 256, 256, block_size=128)
    >>> out, lse = block_sparse_attention(q, k, v, plan, return_lse=True)
    >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)
    True

    ```
    """
    _check_inputs(q, k, v, plan)
    scale = resolve_scale(scale, q.shape[-1])
    fn = BACKENDS[choose_backend(q.device, backend, needs_grad(q, k, v), plan, q.shape[-1], q.dtype)]
    out, lse = fn(q, k, v, plan, scale, return_lse)
    return (out, lse) if return_lse else out
