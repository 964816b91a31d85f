"""`diffsparse bench attention`: dense SDPA vs block-sparse attention, same tensors, same process.

Runs are interleaved (dense, sparse, dense, sparse, ...) and medians reported, so machine noise hits both
alike. Efficiency = speedup x density: 1.0 means the sparse kernel reaches the 1/density bound.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .kernels import block_sparse_attention, make_plan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["mask", "density", "dense_ms", "sparse_ms", "speedup", "bound", "efficiency", "plan_ms", "peak_mb"]


def random_block_mask(num_blocks: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """A `(1, 1, n, n)` mask keeping about `density` of the blocks, the diagonal included."""
    mask = torch.rand(num_blocks, num_blocks, generator=generator) < density
    mask |= torch.eye(num_blocks, dtype=torch.bool)
    return mask[None, None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _peak_mb(device: torch.device, plan) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # On CPU torch has no allocator statistics: report what the plan itself holds.
    tensors = [v for v in vars(plan).values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def pattern_block_mask(name: str, seq: int, density: float, block_size: int) -> torch.Tensor:
    """A `(1, 1, n, n)` block mask of a registered pattern solved for `density`, on `seq // 1024` frames of
    32x32 tokens (a video-shaped layout of exactly `seq` tokens)."""
    from .patterns import VideoLayout, get_pattern

    if seq % 1024:
        raise ValueError(f"--mask {name} lays tokens out as frames of 32x32: seq must be a multiple of 1024, got {seq=}")
    layout = VideoLayout(seq // 1024, 32, 32)
    pattern = get_pattern(name).at_density(layout, density, block_size)
    return pattern.block_mask(layout, block_size)[None]


def bench_one(q, k, v, density: float, block_size: int, backend: str, repeats: int, generator, mask_kind="random"):
    device = q.device
    n = q.shape[2]
    num_blocks = -(-n // block_size)
    if mask_kind == "random":
        mask = random_block_mask(num_blocks, density, generator).to(device)
    else:
        mask = pattern_block_mask(mask_kind, n, density, block_size).to(device)
    plan_ms = statistics.median(
        _time_ms(lambda: make_plan(mask, n, n, block_size), device) for _ in range(max(3, repeats))
    )
    plan = make_plan(mask, n, n, block_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    def sparse():
        return block_sparse_attention(q, k, v, plan, backend=backend)

    dense(), sparse()  # warm-up: lazy plan data, kernel compilation
    dense_times, sparse_times = [], []
    for _ in range(repeats):
        dense_times.append(_time_ms(dense, device))
        sparse_times.append(_time_ms(sparse, device))
    dense_ms, sparse_ms = statistics.median(dense_times), statistics.median(sparse_times)
    speedup = dense_ms / sparse_ms
    return {
        "mask": mask_kind,
        "density": plan.density,
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "speedup": speedup,
        "bound": 1.0 / plan.density,
        "efficiency": speedup * plan.density,
        "plan_ms": plan_ms,
        "peak_mb": _peak_mb(device, plan),
    }


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = [r["density"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(densities, [r["bound"] for r in rows], "k--", label="1/density bound")
    ax.plot(densities, [r["speedup"] for r in rows], "o-", label="block-sparse")
    ax.set_xlabel("block density")
    ax.set_ylabel("speedup over dense SDPA")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _backend_label(device: torch.device, dtype: torch.dtype, requested: str) -> str:
    """The backend that ran and, for "cpu", which of its two paths: timings mean little without it."""
    from .kernels import choose_backend, cpu_native

    backend = choose_backend(device, requested)
    if backend != "cpu" or device.type != "cpu":
        return backend
    compiled = dtype in cpu_native.DTYPES and cpu_native.forward_op() is not None
    return "cpu (compiled kernel)" if compiled else "cpu (torch ops)"


def run_attention_bench(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.heads, args.seq, args.dim)
    q, k, v = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(3))
    densities = [float(d) for d in args.density.split(",")]
    rows = []
    for density in tqdm(densities, desc="densities"):
        rows.append(bench_one(q, k, v, density, args.block_size, args.backend, args.repeats, generator, args.mask))
    title = (
        f"B={args.batch} H={args.heads} N={args.seq} D={args.dim} {args.dtype} block={args.block_size} "
        f"{args.device} ({torch.get_num_threads()} threads) backend={_backend_label(device, dtype, args.backend)} "
        f"mask={args.mask}"
    )
    print(title)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = [
            r[c] if c == "mask" else f"{r[c]:.3f}" if c in ("density", "speedup", "efficiency") else f"{r[c]:.1f}"
            for c in COLUMNS
        ]
        print("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out / "bench_attention.png", title)
    print(f"wrote {out / 'bench_attention.csv'} and {out / 'bench_attention.png'}")
    return rows


def run_permute_bench(args) -> dict:
    """The cost of the 3D tile permutation (q, k, v in, output back) as a share of one sparse attention call."""
    from .patterns import TileOrder, VideoLayout, get_pattern

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    layout = VideoLayout(args.frames, args.height, args.width)
    order = TileOrder(tuple(args.tile))
    pattern = get_pattern(args.pattern)
    n = layout.num_tokens
    generator = torch.Generator().manual_seed(args.seed)
    # The processor layout (B, S, H, D), as the runtime permutes it.
    q, k, v = (torch.randn(1, n, args.heads, args.dim, generator=generator).to(device, dtype) for _ in range(3))
    perm, inverse = order.permutation(layout).to(device), order.inverse(layout).to(device)
    mask = pattern.block_mask(layout, args.block_size, order=order)[None].to(device)
    plan = make_plan(mask, n, n, args.block_size)

    def permute_in_and_out():
        qp, kp, vp = (x.index_select(1, perm) for x in (q, k, v))
        return qp.index_select(1, inverse), kp, vp

    def attend():
        return block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan, backend=args.backend)

    permute_in_and_out(), attend()
    permute_ms = statistics.median(_time_ms(permute_in_and_out, device) for _ in range(args.repeats))
    attention_ms = statistics.median(_time_ms(attend, device) for _ in range(args.repeats))
    row = {
        "layout": f"{args.frames}x{args.height}x{args.width}",
        "tokens": n,
        "order": repr(order),
        "pattern": repr(pattern),
        "density": plan.density,
        "permute_ms": permute_ms,
        "attention_ms": attention_ms,
        "share": permute_ms / attention_ms,
    }
    print(" | ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()))
    return row
