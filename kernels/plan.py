"""The kernel plan: a block mask compacted into per-query-block lists of key blocks."""

import math
import numbers
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

BlockSize = int | tuple[int, int]


def _as_int(value) -> int | None:
    """`value` as a Python int where it is an integer (a numpy integer, a 0-dim integer tensor: lengths read off
    arrays and shapes), else `None`."""
    if isinstance(value, torch.Tensor):
        integer = value.ndim == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    else:
        # bool is an int subclass; True as a length or block size is a bug, not a 1.
        integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return int(value) if integer else None


def _as_pair(block_size: BlockSize) -> tuple[int, int]:
    single = _as_int(block_size)
    if single is not None:
        pair = (single, single)
    else:
        pair = tuple(map(_as_int, block_size)) if isinstance(block_size, (tuple, list)) else ()
    if len(pair) != 2 or any(b is None or b <= 0 for b in pair):
        raise ValueError(
            f"block_size must be a positive int or a (block_q, block_k) pair of positive ints, got {block_size=}"
        )
    return pair


@dataclass(frozen=True, eq=False)
class BlockSparsePlan:
    r"""
    An immutable, reusable description of which key blocks each query block attends to. Build it with
    [`make_plan`]; one plan serves any number of calls (and any batch/head count its mask broadcasts to). A plan
    built otherwise (by hand, `dataclasses.replace`) is checked against its `block_mask` and raises a `ValueError`
    naming the first field that disagrees, since the kernels would read out of bounds or divide by an empty row.

    Args:
        block_q (`int`): Query tokens per block.
        block_k (`int`): Key tokens per block.
        q_len (`int`): Query sequence length in tokens.
        kv_len (`int`): Key/value sequence length in tokens.
        block_mask (`torch.BoolTensor` of shape `(B or 1, H or 1, nq, nk)`):
            The mask after the diagonal rule (every query block keeps its own key block).
        kv_indices (`torch.IntTensor` of shape `(B or 1, H or 1, nq, nk)`):
            Per query block, the kept key-block indices in ascending order, padded to the fixed capacity `nk`
            with the last kept index, so compiled code and CUDA graphs always see the same shapes.
        kv_counts (`torch.IntTensor` of shape `(B or 1, H or 1, nq)`): Number of kept key blocks per query block.
        density (`float`): Kept blocks divided by all blocks, the ideal fraction of dense attention work where
            the lengths are whole blocks (see `token_density` where they are not).
    """

    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    block_mask: torch.Tensor
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    density: float
    # Backend-derived data (row groupings, index lists) computed once on first use; the plan stays logically
    # immutable because the cache is a pure function of the fields above.
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    # make_plan's plans are right by construction, and checking one costs about as much as building it (plus a
    # device sync) on the per-call hot path: only plans built otherwise are checked.
    _from_make_plan: InitVar[bool] = False

    def __post_init__(self, _from_make_plan: bool) -> None:
        if not _from_make_plan:
            _check_plan(self)

    def __repr__(self) -> str:
        # The default repr would print every index tensor; plans get logged and used as labels.
        return (
            f"BlockSparsePlan(block_size=({self.block_q}, {self.block_k}), q_len={self.q_len}, "
            f"kv_len={self.kv_len}, mask={tuple(self.block_mask.shape)}, density={self.density:.3f})"
        )

    @property
    def num_q_blocks(self) -> int:
        return self.block_mask.shape[-2]

    @property
    def num_kv_blocks(self) -> int:
        return self.block_mask.shape[-1]

    @property
    def token_density(self) -> float:
        r"""
        The kept blocks' share of the `q_len x kv_len` score matrix (averaged over the mask's batch and heads), each
        edge block at its real size: the fraction of dense attention work the plan leaves, which `density` (blocks
        counted alike) overstates when the last block of a length is partial. Equal to `density` where `q_len` and
        `kv_len` are multiples of the block sizes. Read-only, worked out on each read (a device sync where the mask
        is on one): for reports, not the per-call path.

        Example:

        ```py
        >>> import torch
        >>> from diffsparse.kernels import make_plan
        >>> plan = make_plan(torch.zeros(1, 1, 2, 2, dtype=torch.bool), q_len=130, kv_len=130, block_size=128)
        >>> plan.density, round(plan.token_density, 4), (128**2 + 2**2) / 130**2 == plan.token_density
        (0.5, 0.9697, True)

        ```
        """
        rows = (self.q_len - self.block_q * torch.arange(self.num_q_blocks, device=self.block_mask.device)).clamp(
            max=self.block_q)
        cols = (self.kv_len - self.block_k * torch.arange(self.num_kv_blocks, device=self.block_mask.device)).clamp(
            max=self.block_k)
        # Integer counts, then one division: exact, so whole-block lengths give `density` to the last bit.
        kept = int((self.block_mask.long() * rows[:, None] * cols[None, :]).sum())
        return kept / (self.block_mask.shape[0] * self.block_mask.shape[1] * self.q_len * self.kv_len)


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(kv_indices, kv_counts)` of a block mask whose every row keeps a block."""
    counts = mask.sum(-1, dtype=torch.int32)
    # A stable sort of "not kept" puts kept indices first, already ascending.
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    last = order.gather(-1, (counts.long() - 1).unsqueeze(-1))
    slots = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(slots < counts.unsqueeze(-1), order, last).to(torch.int32), counts


def _check_plan(plan: "BlockSparsePlan") -> None:
    for name in ("block_q", "block_k", "q_len", "kv_len"):
        value = getattr(plan, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"BlockSparsePlan.{name} must be a positive int, got {name}={value!r}")
    nq, nk = -(-plan.q_len // plan.block_q), -(-plan.kv_len // plan.block_k)
    mask, indices, counts = plan.block_mask, plan.kv_indices, plan.kv_counts
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[2:] != (nq, nk):
        raise ValueError(
            f"BlockSparsePlan.block_mask must be a bool tensor of shape (B or 1, H or 1, {nq}, {nk}) for "
            f"q_len={plan.q_len}, kv_len={plan.kv_len}, block sizes ({plan.block_q}, {plan.block_k}), got "
            f"{type(mask).__name__} of shape={tuple(getattr(mask, 'shape', ()))} dtype={getattr(mask, 'dtype', None)}"
        )
    if 0 in mask.shape:
        raise ValueError(f"BlockSparsePlan.block_mask batch and head dims must be >= 1, got shape={tuple(mask.shape)}")
    for name, tensor, shape in (("kv_indices", indices, mask.shape), ("kv_counts", counts, mask.shape[:3])):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32 or tensor.shape != shape:
            raise ValueError(
                f"BlockSparsePlan.{name} must be an int32 tensor of shape {tuple(shape)} on the block_mask's device, "
                f"got {type(tensor).__name__} of shape={tuple(getattr(tensor, 'shape', ()))} "
                f"dtype={getattr(tensor, 'dtype', None)}"
            )
        if tensor.device != mask.device:
            raise ValueError(
                f"BlockSparsePlan.{name} must be on block_mask's device {mask.device}, got {tensor.device}"
            )
    density = plan.density
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 <= density <= 1:
        raise ValueError(f"BlockSparsePlan.density must be a real number in [0, 1], got density={density!r}")
    kept = mask.any(-1)
    if not kept.all():
        b, h, i = (~kept).nonzero()[0].tolist()
        raise ValueError(
            f"every query block must keep a key block (make_plan adds its diagonal one), got none in "
            f"BlockSparsePlan.block_mask[{b}, {h}, {i}]"
        )
    want_indices, want_counts = _compact(mask)
    for name, got, want in (("kv_counts", counts, want_counts), ("kv_indices", indices, want_indices)):
        wrong = got != want
        wrong = wrong.any(-1) if wrong.ndim == 4 else wrong
        if wrong.any():
            b, h, i = wrong.nonzero()[0].tolist()
            raise ValueError(
                f"BlockSparsePlan.{name}[{b}, {h}, {i}] must be {want[b, h, i].tolist()}, from the key blocks "
                f"block_mask keeps there (ascending, padded with the last), got {got[b, h, i].tolist()}"
            )
    # Reported as the plan's work (bench's efficiency, the runtime's stats): it must be the mask's, to float32's
    # rounding (`mask.float().mean()` is 1e-8 off).
    kept_share = float(want_counts.sum()) / mask.numel()
    if not math.isclose(density, kept_share, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"BlockSparsePlan.density must be {kept_share!r}, the share of blocks block_mask keeps, "
                         f"got density={density!r}")


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will differentiate an attention over `tensors`: the kernels without a backward pass (the
    compiled CPU kernel, Triton) must then leave it to the torch-ops path."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def resolve_scale(scale, head_dim: int) -> float:
    """The score scale as a float: `1 / sqrt(head_dim)` for `None`, else `scale` if it is a finite real number, as
    `scaled_dot_product_attention` takes (a NaN scale gave NaN on some backends and finite numbers on others)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        real = scale.ndim == 0 and not (scale.is_complex() or scale.dtype == torch.bool)
    else:
        # bool is an int subclass; True as a scale is a bug, not a 1.
        real = isinstance(scale, numbers.Real) and not isinstance(scale, bool)
    if not (real and math.isfinite(value := float(scale))):
        raise ValueError(f"scale must be None (1 / sqrt(head_dim)) or a finite real number, got {scale=}")
    return value


def diagonal_kv_blocks(
    num_q_blocks: int, block_q: int, block_k: int, num_kv_blocks: int, device=None, q_offset: int = 0
):
    """Key block holding each query block's first token (the queries starting at key position `q_offset`), clamped
    for queries that run past the keys."""
    first_token = q_offset + torch.arange(num_q_blocks, device=device) * block_q
    return torch.clamp(first_token // block_k, max=num_kv_blocks - 1)


def make_plan(
    block_mask: torch.Tensor, q_len: int, kv_len: int, block_size: BlockSize, q_offset: int = 0
) -> BlockSparsePlan:
    r"""
    Compact a block mask into a [`BlockSparsePlan`].

    Every query block row always keeps its diagonal key block, the key block containing the row's first query
    token (`min((q_offset + i * block_q) // block_k, nk - 1)`), so no row is empty and the log-sum-exp stays
    finite. The returned plan's `block_mask` includes it. Cost and memory grow with the number of blocks, never with
    tokens squared.

    Args:
        block_mask (`torch.BoolTensor` of shape `(B or 1, H or 1, ceil(q_len / block_q), ceil(kv_len / block_k))`):
            `True` where a query block attends to a key block. Size-1 batch/head dims broadcast.
        q_len (`int`): Query sequence length in tokens; need not be a multiple of the block. Any integer (a numpy
            integer, a 0-dim integer tensor) but a bool, as are `kv_len`, `block_size` and `q_offset`.
        kv_len (`int`): Key/value sequence length in tokens; need not be a multiple of the block.
        block_size (`int` or `Tuple[int, int]`): Block size, or `(block_q, block_k)`.
        q_offset (`int`, *optional*, defaults to `0`): the first query's position among the keys, when the queries
            are a later part of the key sequence (a group of queries attending the keys up to its end).

    Returns:
        [`BlockSparsePlan`]

    Example:

    ```py
    >>> import torch
    >>> from diffsparse.kernels import make_plan
    >>> mask = torch.zeros(1, 1, 3, 2, dtype=torch.bool)
    >>> plan = make_plan(mask, q_len=300, kv_len=200, block_size=(128, 128))
    >>> plan.kv_counts.tolist(), round(plan.density, 3)
    ([[[1, 1, 1]]], 0.5)

    ```
    """
    block_q, block_k = _as_pair(block_size)
    lengths = []
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        length = _as_int(value)
        if length is None or length <= 0:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        lengths.append(length)
    # The plan's fields are Python ints whatever integer type came in: its own check and the kernels take those.
    q_len, kv_len = lengths
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    expected = f"(B or 1, H or 1, {nq}, {nk})"
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(
            f"block_mask must be a bool torch.Tensor of shape {expected}, got {type(block_mask)=}"
        )
    if block_mask.dtype != torch.bool or block_mask.ndim != 4 or tuple(block_mask.shape[2:]) != (nq, nk):
        raise ValueError(
            f"block_mask must be a bool tensor of shape {expected} for {q_len=}, {kv_len=}, "
            f"{block_size=}, got shape={tuple(block_mask.shape)} dtype={block_mask.dtype}"
        )
    if 0 in block_mask.shape[:2]:
        raise ValueError(f"block_mask batch and head dims must be >= 1, got shape={tuple(block_mask.shape)}")

    offset = _as_int(q_offset)
    if offset is None or offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset=}")
    q_offset = offset
    diag = diagonal_kv_blocks(nq, block_q, block_k, nk, device=block_mask.device, q_offset=q_offset)
    mask = block_mask.clone()  # the plan must not alias the caller's tensor
    mask[:, :, torch.arange(nq, device=mask.device), diag] = True

    kv_indices, counts = _compact(mask)
    density = float(counts.sum()) / mask.numel()
    return BlockSparsePlan(block_q, block_k, q_len, kv_len, mask, kv_indices, counts, density, _from_make_plan=True)
