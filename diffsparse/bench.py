"""`diffsparse bench attention`: dense SDPA vs block-sparse attention, same tensors, same process;
`diffsparse bench pipeline`: one video generated dense and sparse, end to end, same pipeline, same process;
`diffsparse bench search`: one search of a data-dependent pattern against one dense attention call, same tensors;
`diffsparse bench causal`: SDPA under a causal frame-group mask (SkyReels-V2's asynchronous diffusion forcing) vs the
runtime's sparse path under the same mask, same tensors.

Runs are interleaved (dense, sparse, dense, sparse, ...) and medians reported, so machine noise hits both
alike. Efficiency = speedup x density: 1.0 means the sparse kernel reaches the 1/density bound. `bench attention`'s
density is the kept blocks' share of the score matrix, a partial last block at its real size
(`BlockSparsePlan.token_density`): counted whole, a diagonal of 1024-token blocks on 2056 tokens read 0.333 of the
work for 0.496, its bound 3.0 for 2.0. `bench causal`'s density is the same share of the whole call's score matrix,
read from the runtime's plan (`kept_share`); the runtime's own block density, each causal group's partial edge blocks
counted whole, is beside it (`block_density`: for two groups of 32 tokens at block 64, 2.0 where 0.75 is kept, the
efficiency read 2.7x too high). Its speedup is over SDPA with the mask (what the original processor runs), its
efficiency over the faster of SDPA with and without the mask: on CPU the masked call costs about 1.3-1.5x the
unmasked one, so against it alone the efficiency passed 1.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import DiffsparseWarning
from .kernels import block_sparse_attention, make_plan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["mask", "backend", "target_density", "density", "dense_ms", "sparse_ms", "speedup", "bound", "efficiency",
           "plan_ms", "plan_mb", "peak_mb"]


def random_block_mask(num_blocks: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """A `(1, 1, n, n)` mask keeping about `density` of the blocks, the diagonal included."""
    mask = torch.rand(num_blocks, num_blocks, generator=generator) < density
    mask |= torch.eye(num_blocks, dtype=torch.bool)
    return mask[None, None]


def _dtype(name) -> torch.dtype:
    """`--dtype` as a torch dtype, before any tensor is made: called directly with another name, a bench ended in a
    bare `KeyError`."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got dtype={name!r}") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _plan_mb(plan) -> float:
    """What the plan holds, on any device: its tensors and those its backend keeps per call shape in `plan._cache`
    (the torch-ops path's row and index lists, which grow with batch x heads: left out, the column read 2-4x low),
    each storage once (the cached lists are slices of a few tensors)."""
    storages = {}

    def walk(item) -> None:
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[item.device, storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            for value in item.values():
                walk(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                walk(value)

    walk(vars(plan))  # `_cache` included
    return sum(storages.values()) / 2**20


def _sparse_peak_mb(sparse, device: torch.device) -> float | None:
    """CUDA's peak allocated memory over one sparse call alone (the inputs, the plan and what the call allocates), or
    `None` where torch keeps no allocator statistics (CPU). Reset right before the call: reset earlier, the peak
    would be the dense call's whenever that is higher."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    sparse()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _density_text(density: float | None) -> str:
    """A `--density` as the CLI spells it: `none` for `None`, the pattern as written."""
    return "none" if density is None else str(density)


def _check_repeats(repeats, what: str) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1 ({what}), got repeats={repeats!r}")


def _check_backend(backend: str, device: str) -> None:
    """`--backend` as the kernel call will check it (a known name; triton only where it can run), before any tensor
    is made: refused by the warm-up call, it ended the run after the tensors, the plans and a dense call."""
    from .kernels import choose_backend

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's fallback warning: the timed call itself gives it
            choose_backend(device, backend)
    except ValueError as error:
        raise ValueError(f"--backend {backend!r}: {error}") from None


def _device_label(device: str) -> str:
    """The device as a result records it; on CPU with its thread count, without which a time means little."""
    return f"{device} ({torch.get_num_threads()} threads)" if torch.device(device).type == "cpu" else device


def strict_json(value, indent: int = 1) -> str:
    """`value` as standard JSON: an infinite float (the PSNR of identical videos) as `null`, where Python would
    write `Infinity`, which jq, JavaScript and strict parsers refuse; NaN (the score of a broken run, whose video
    holds NaN) as the string `"nan"`, so that it never reads as the `null` of a perfect one."""

    def finite(item):
        if isinstance(item, float) and math.isnan(item):
            return "nan"
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(x) for key, x in item.items()}
        return [finite(x) for x in item] if isinstance(item, (list, tuple)) else item

    return json.dumps(finite(value), indent=indent, allow_nan=False)


def _write_json(result: dict, out: str | Path, name: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(strict_json(result) + "\n")
    print(f"wrote {out / name}")


def _not_static(option: str, text: str, allowed: str) -> ValueError:
    """The error of a bench that times or measures a pattern's mask as written, without a search, given one it
    cannot: `allowed`, what `option` takes instead."""
    return ValueError(f"{option} {text!r}: must be {allowed}; a data-dependent one's masks come from searching a "
                      "model's attention during a run (`bench search` and `bench pipeline` time them)")


# What `bench permute`, `bench density` and `masks` take: a data-dependent pattern has no mask to time, measure or
# draw before its search (searched's is none at all; spatial_temporal's, the union of its kinds' masks, is no mask
# any call runs: density 1.0 on small layouts), except spatial_temporal with its heads' kinds given: each head's mask
# is then the one a head of that kind runs.
STATIC_PATTERN = ("a static pattern (e.g. radial, window3d), whose mask needs no search of a model's attention, or "
                  "spatial_temporal with each head's kind given (e.g. \"spatial_temporal(heads='ST')\")")


def mask_needs_search(pattern) -> bool:
    """Whether `pattern` has no mask before a search of a model's attention (see `STATIC_PATTERN`)."""
    from .patterns import SpatialTemporal

    return pattern.data_dependent and not (isinstance(pattern, SpatialTemporal) and pattern.heads is not None)


def pattern_option(text: str, option: str = "--pattern", static: str | None = None, others: str = ""):
    """The pattern an option names (`get_pattern`), before any tensor is made, its errors naming the option and the
    value as typed: `--pattern 'foo': pattern must be one of [...]`. `static`: what the option takes where the bench
    times or measures the mask as written (`STATIC_PATTERN`): a data-dependent pattern is refused. `others`: what
    else the option takes, said first (`--mask`: "random, or a pattern; ")."""
    from .patterns import get_pattern

    try:
        pattern = get_pattern(text)
    except ValueError as error:
        raise ValueError(f"{option} {text!r}: {others}{error}") from None
    if static is not None and mask_needs_search(pattern):
        raise _not_static(option, text, static)
    return pattern


def _mask_layout(name: str, seq: int):
    """The video layout a pattern `--mask` is solved on: `seq // 1024` frames of 32x32 tokens (exactly `seq`)."""
    from .patterns import Dense, VideoLayout

    pattern = pattern_option(name, "--mask", others="random, or a pattern; ")
    allowed = "random or a static pattern solved for each --density (radial, window3d)"
    # spatial_temporal unfitted is the union of its masks, dense keeps every block: density 1.0 whatever asked, a row
    # would time something other than its target density.
    if pattern.data_dependent:
        raise _not_static("--mask", name, allowed)
    if isinstance(pattern, Dense):
        # `_not_static`'s reason, a search, is not dense's: it had said dense's masks come from searching.
        raise ValueError(f"--mask {name!r}: must be {allowed}; dense keeps every block, density 1.0 whatever "
                         "--density asks (its time is the kernel on a full mask, not a sparse one)")
    if not pattern.solves_density:
        raise ValueError(f"--mask {name!r}: must be {allowed}; {pattern!r} has no parameter to solve for a density, "
                         "so each row would time the same mask whatever --density asks")
    if seq % 1024:
        lower = seq // 1024 * 1024
        near = f"{lower} or {lower + 1024}" if lower else "1024"
        raise ValueError(f"--mask {name} lays tokens out as frames of 32x32 tokens: --seq must be a multiple of 1024 "
                         f"(e.g. {near}), got seq={seq}")
    return VideoLayout(seq // 1024, 32, 32)


def pattern_block_mask(name: str, seq: int, density: float, block_size: int) -> torch.Tensor:
    """A `(1, 1, n, n)` block mask of a registered pattern solved for `density`, on `seq // 1024` frames of
    32x32 tokens (a video-shaped layout of exactly `seq` tokens)."""
    from .patterns import get_pattern

    layout = _mask_layout(name, seq)
    pattern = get_pattern(name).at_density(layout, density, block_size)
    return pattern.block_mask(layout, block_size)[None]


def kept_share(cached, num_tokens: int) -> float:
    """The share of a call's `num_tokens` x `num_tokens` score matrix that a plan of the runtime (`_CachedPlan`: one
    plan, or under a causal frame-group mask one per group, its queries over the keys up to the group's end) keeps,
    each partial block at its real size (`BlockSparsePlan.token_density`), averaged over the plan's heads: the work
    `bench attention`'s density counts. The runtime's own density counts each block whole, a causal group's partial
    edge blocks too, so it passes 1 where groups are short against a block."""
    plans = [cached.plan] if cached.plan is not None else [plan for _, _, plan in cached.groups]
    return sum(plan.token_density * plan.q_len * plan.kv_len for plan in plans) / num_tokens**2


def _warn_if_off_target(command: str, target: float, reached: float, of: str, timed: str, runs: str) -> None:
    """Warn when the timed mask's density is far from the `--density` asked (radial keeps neighbouring frames
    whole: on 2 frames it stays at 1.0 whatever the target; a random mask keeps its diagonal, 1 / blocks at
    least; a search keeps each query block's diagonal), which would otherwise show only as a speedup near 1 in a
    row or a search's cost put beside the wrong density; with the runtime's tolerance. `of`: what could not reach
    the target and where, `timed`: what was timed, `runs`: whose density it is, e.g. "this row runs"."""
    from .runtime import out_of_reach  # diffusers comes with the runtime: loaded only where a row is checked

    if not out_of_reach(target, reached):
        return
    warnings.warn(
        f"diffsparse: {command}: --density {target} is out of reach of {of}: {timed} has density {reached:.3f}, so "
        f"{runs} {'denser' if reached > target else 'sparser'} than asked",
        category=DiffsparseWarning,
        stacklevel=2,
    )


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
    # The share of the score matrix computed, not of the blocks: a partial last block counted whole overstated the
    # work and the 1/density bound with it (module docstring).
    work = plan.token_density
    _warn_if_off_target("bench attention", density, work, f"--mask {mask_kind} on {n} tokens, block "
                        f"{block_size}", "the mask timed", "this row runs")

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
        "backend": _backend_label(device, q.dtype, backend, plan, q.shape[-1]),
        "target_density": density,  # what `density` (the timed plan's) was asked to be
        "density": work,
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "speedup": speedup,
        "bound": 1.0 / work,
        "efficiency": speedup * work,
        "plan_ms": plan_ms,
        "plan_mb": _plan_mb(plan),
        "peak_mb": _sparse_peak_mb(sparse, device),
    }


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Lines join the points in the order given: rows in --density's order (0.5,0.1,0.25) drew both curves doubling
    # back on themselves.
    rows = sorted(rows, key=lambda r: r["density"])
    densities = [r["density"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(densities, [r["bound"] for r in rows], "k--", label="1/density bound")
    ax.plot(densities, [r["speedup"] for r in rows], "o-", label="block-sparse")
    ax.set_xlabel("density (kept share of the score matrix)")
    ax.set_ylabel("speedup over dense SDPA")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _backend_label(device: torch.device, dtype: torch.dtype, requested: str, plan, head_dim: int) -> str:
    """The backend that ran and, for "cpu", which of its two paths: timings mean little without it. Chosen with
    the call's own plan, head dim and dtype, as `block_sparse_attention` chooses: on CUDA, "auto" runs blocks other
    than 64/128, head dims above 256 and float32 tiles too large for shared memory on the torch-ops path."""
    from .kernels import choose_backend, cpu_native

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto's fallback warning: the timed call itself gives it
        backend = choose_backend(device, requested, False, plan, head_dim, dtype)
    if backend != "cpu":
        return backend
    # The compiled kernel takes CPU tensors only: elsewhere (CUDA's fallback) "cpu" is the torch-ops path.
    compiled = device.type == "cpu" and dtype in cpu_native.DTYPES and cpu_native.forward_op() is not None
    return "cpu (compiled kernel)" if compiled else "cpu (torch ops)"


def run_attention_bench(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = _dtype(args.dtype)
    if args.mask != "random":
        _mask_layout(args.mask, args.seq)  # before the tensors: a bad --seq ended the run after they were made
    _check_backend(args.backend, args.device)
    _check_repeats(args.repeats, "timed dense/sparse pairs")  # called directly: statistics' error, after the work
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.heads, args.seq, args.dim)
    q, k, v = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(3))
    densities = args.density
    rows = []
    for density in tqdm(densities, desc="densities"):
        rows.append(bench_one(q, k, v, density, args.block_size, args.backend, args.repeats, generator, args.mask))
    backends = ", ".join(dict.fromkeys(r["backend"] for r in rows))
    title = (
        f"B={args.batch} H={args.heads} N={args.seq} D={args.dim} {args.dtype} block={args.block_size} "
        f"{args.device} ({torch.get_num_threads()} threads) backend={backends} mask={args.mask}"
    )
    print(title)
    if device.type != "cuda":
        print("peak_mb: no allocator statistics on this device (CUDA only); plan_mb: the plan's tensors and its "
              "backend cache")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(_cell(c, r[c]) for c in COLUMNS) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out / "bench_attention.png", title)
    print(f"wrote {out / 'bench_attention.csv'} and {out / 'bench_attention.png'}")
    return rows


def _cell(column: str, value) -> str:
    """A table cell: 3 decimals for ratios and the plan's (small) memory, 1 for times, bound and peak memory."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if column == "target_density":  # as given
        return f"{value:g}"
    return f"{value:.3f}" if column in ("density", "speedup", "efficiency", "plan_mb") else f"{value:.1f}"


def run_permute_bench(args) -> dict:
    """The cost of the 3D tile permutation (q, k, v in, output back) as a share of one sparse attention call;
    `args.order`: the `SparseConfig.order` of `--tile` (`cli._order`; `None`, frame-major, permutes by identity).
    Interleaved `args.repeats` pairs (permutation, attention) after one untimed run of each; medians. The dense
    pattern is a `ValueError`: its calls run the model's own attention, neither permuted nor through the kernel."""
    from .patterns import VideoLayout
    from .patterns.ordering import as_order

    pattern = pattern_option(args.pattern, static=STATIC_PATTERN)  # before any tensor is made
    if pattern.name == "dense":
        # Before, it timed the kernel on a full mask against the permutation: a share of a call no run makes
        # (`SparseRuntime` hands the dense pattern's calls to the original processor, in the model's order).
        raise ValueError(
            f"--pattern {args.pattern!r}: must be a sparse pattern, e.g. radial or window3d (the dense pattern's calls "
            "run the model's own attention, neither permuted nor through the block-sparse kernel, so there is no "
            "permutation cost to share); `bench attention` times dense SDPA against the kernel")
    _check_backend(args.backend, args.device)
    _check_repeats(args.repeats, "timed permutation and attention calls")
    device, dtype = torch.device(args.device), _dtype(args.dtype)
    layout = VideoLayout(args.frames, args.height, args.width)
    order = as_order(args.order)
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
        return block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan,
                                      backend=args.backend)

    permute_in_and_out(), attend()  # warm-up: lazy plan data, the compiled CPU kernel
    pairs = [(_time_ms(permute_in_and_out, device), _time_ms(attend, device)) for _ in range(args.repeats)]
    permute_ms = statistics.median(p for p, _ in pairs)
    attention_ms = statistics.median(a for _, a in pairs)
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
    print(" | ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in row.items()))
    return row


def run_search_bench(args) -> dict:
    r"""
    What one search of a data-dependent pattern costs, in dense attention calls: `fit` of `args.pattern` (at
    `args.density`, its main parameter set for it as `SparseConfig.density` sets it, over what the pattern text
    gives; `None`: the pattern as written) on one video's random queries, keys and values of the token grid,
    against dense SDPA on the same tensors, interleaved `args.repeats` times after one untimed run of each;
    medians. The runtime pays one such fit per layer and video at the first sparse step, and again every
    `refit_every` steps (`Searched(refresh=...)`). Random tensors time the search, not its choice: its work is fixed
    by the shapes (the greedy search takes the same number of steps whatever the values). Writes
    `bench_search.json` into `args.out`.
    """
    from .patterns import VideoLayout

    _check_repeats(args.repeats, "timed search/dense pairs")
    device, dtype = torch.device(args.device), _dtype(args.dtype)
    layout = VideoLayout(args.frames, args.height, args.width)
    pattern = pattern_option(args.pattern)
    if not pattern.data_dependent:
        raise ValueError(f"--pattern {args.pattern!r} is static: it has no search to time (data-dependent patterns "
                         "override Pattern.fit: searched, searched_windows, spatial_temporal)")
    if args.density is not None:
        from .compare import warn_if_density_replaces
        from .config import SparseConfig

        # As every command says it: `--pattern 'searched(keep=0.5)' --density 0.25` timed keep=0.25 without a word.
        warn_if_density_replaces(SparseConfig(pattern=args.pattern, density=args.density, block_size=args.block_size))
        pattern = pattern.at_density(layout, args.density, args.block_size)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (1, args.heads, layout.num_tokens, args.dim)
    q, k, v = (torch.randn(*shape, generator=generator).to(device, dtype) for _ in range(3))

    def search():
        # A generator on the tensors' device, as the runtime gives `fit`.
        return pattern.fit(q, k, v, layout, args.block_size, generator=torch.Generator(device).manual_seed(args.seed))

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    searched = search()
    dense()
    reached = searched.density(layout, args.block_size)
    # Small layouts keep more than a low target (a search keeps each query block's diagonal; spatial_temporal's
    # kinds a frame or a neighbourhood whole): the cost below is that of a search for `reached`.
    if args.density is not None:
        _warn_if_off_target("bench search", args.density, reached, f"--pattern {args.pattern} on "
                            f"{layout.num_tokens} tokens ({args.frames}x{args.height}x{args.width}), block "
                            f"{args.block_size}", "the pattern the search found", "the search timed ends up")
    pairs = [(_time_ms(search, device), _time_ms(dense, device)) for _ in range(args.repeats)]
    search_ms = statistics.median(s for s, _ in pairs)
    dense_ms = statistics.median(d for _, d in pairs)
    result = {
        "layout": f"{args.frames}x{args.height}x{args.width}",
        "tokens": layout.num_tokens,
        "block_size": args.block_size,
        "heads": args.heads,
        "dim": args.dim,
        "dtype": args.dtype,
        "device": _device_label(args.device),
        "pattern": repr(searched),
        "target_density": args.density,  # None: the pattern as written
        "density": reached,
        "repeats": args.repeats,
        "search_ms": search_ms,
        "dense_ms": dense_ms,
        "dense_calls_per_search": search_ms / dense_ms,
    }
    print(f"{searched!r} on {layout.num_tokens} tokens ({result['layout']}), block {args.block_size}, "
          f"{args.heads} heads x {args.dim}, {args.dtype}, {result['device']}: one search {search_ms:.1f} ms, "
          f"one dense attention call {dense_ms:.1f} ms (medians of {args.repeats}): a search costs "
          f"{result['dense_calls_per_search']:.3g} dense calls")
    _write_json(result, args.out, "bench_search.json")
    return result


def run_causal_bench(args) -> list[dict]:
    r"""
    Self-attention under a causal mask over groups of `args.causal_frames` frames of the token grid (the mask
    SkyReels-V2's transformer gives every call in asynchronous diffusion forcing): dense SDPA with that boolean
    mask (what the original processor runs) against `SparseRuntime.attention` on the same tensors, with the
    pattern solved for each of `args.density` (`None`: the pattern as written) and the mask applied by skipping
    the later groups' blocks (blocks that fill the groups) or group by group (blocks across them). Interleaved
    `args.repeats` runs of each (masked SDPA, unmasked SDPA, sparse) after one untimed run of each; medians. Each
    row's density is the kept share of the score matrix (`kept_share`; `block_density`: the runtime's, each group's
    partial edge blocks counted whole), its speedup over the masked SDPA, its efficiency (speedup x density, 1.0 the
    1/density bound) over the faster of the masked and the unmasked SDPA (`efficiency_baseline` says which). Writes
    `bench_causal.json` into `args.out`.
    """
    from diffusers.hooks.hooks import CacheContext

    from .config import SparseConfig
    from .patterns import FrameCausal, VideoLayout
    from .runtime import SparseRuntime

    _check_repeats(args.repeats, "timed dense/sparse pairs")
    if not 1 <= args.causal_frames < args.frames:
        # One group holding every frame masks nothing: the "masked" SDPA would be plain attention, its speedup
        # reported against a mask that is not there.
        raise ValueError(f"--causal-frames {args.causal_frames} with --frames {args.frames}: a causal mask needs at "
                         "least two groups of frames, so --causal-frames must be below --frames (and --frames at "
                         "least 2)")
    pattern = pattern_option(args.pattern)
    if pattern.name == "dense":
        # The runtime runs dense through the original processor, which this bench skips: the kernel ran on the
        # mask's blocks while the row said density 1.0, and --density went unused.
        raise ValueError(f"--pattern {args.pattern!r}: must be a sparse pattern (e.g. radial, window3d, searched); "
                         "dense runs the original processor, the masked SDPA this bench times the sparse path against")
    # Every row's configuration before any tensor is made: a bad --density or --backend ended the run after the
    # rows before it had been timed, with nothing written.
    try:
        configs = [SparseConfig(pattern=args.pattern, density=density, block_size=args.block_size, dense_steps=0,
                                backend=args.backend) for density in args.density]
    except ValueError as error:
        densities = ",".join(_density_text(density) for density in args.density)
        raise ValueError(f"--pattern {args.pattern!r}, --density {densities}, --block-size {args.block_size} and "
                         f"--backend {args.backend!r} make no sparse configuration: {error}") from None
    _check_backend(args.backend, args.device)  # the config checks the name only: triton on CPU failed at the warm-up
    from .compare import warn_if_density_replaces

    for config in configs:  # as every command says it: a row labelled with the pattern text ran the density's
        warn_if_density_replaces(config)
    device, dtype = torch.device(args.device), _dtype(args.dtype)
    layout = VideoLayout(args.frames, args.height, args.width)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (1, layout.num_tokens, args.heads, args.dim)
    q, k, v = (torch.randn(*shape, generator=generator).to(device, dtype) for _ in range(3))
    mask = FrameCausal(args.causal_frames).token_mask(layout).to(device)[None]

    def dense():
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask)

    def unmasked():  # the call without the mask (a fused kernel where one exists): the efficiency's baseline if faster
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))

    unmasked()
    rows, unmasked_times = [], []
    for density, config in zip(tqdm(args.density, desc="densities"), configs):
        runtime = SparseRuntime(config, "bench")
        runtime.state_manager.set_context(CacheContext("bench"))
        runtime.begin_call(layout, step=0, num_steps=1)
        with warnings.catch_warnings(record=True) as refused:
            warnings.simplefilter("always")
            if not runtime.allow_frame_causal(0, args.causal_frames):
                raise ValueError(f"the sparse path cannot apply this mask: {refused[-1].message}")
        whole = runtime._frame_causal_blocks(layout, args.causal_frames, config.layer_order(0)) is not None
        path = "whole blocks" if whole else "per group"

        def sparse(runtime=runtime):
            return runtime.attention(0, q, k, v)

        dense(), sparse()  # warm-up: plans, the compiled CPU kernel
        if not runtime.records[-1].sparse:
            # Its density would be 1.0 whatever the kernel ran, the efficiency overstated.
            raise RuntimeError(f"diffsparse: bench causal: the runtime logged the call under {config!r} as dense: "
                               "nothing sparse to time")
        # The plan the call ran: the one the runtime's cache handed out last (it moves each to the end as it does).
        cached = next(reversed(runtime._plans.values()))
        if cached.density != runtime.records[-1].density:
            raise RuntimeError(f"diffsparse: bench causal: the runtime's last plan (density {cached.density}) is not "
                               f"the one its call logged (density {runtime.records[-1].density})")
        work = kept_share(cached, layout.num_tokens)
        # The unmasked call in each run too: timed apart, before the rows, machine noise could decide which of the
        # two dense calls the efficiency was over.
        runs = [tuple(_time_ms(fn, device) for fn in (dense, unmasked, sparse)) for _ in range(args.repeats)]
        dense_ms, unmasked_ms, sparse_ms = (statistics.median(times) for times in zip(*runs))
        unmasked_times += [u for _, u, _ in runs]
        # Against the masked call alone (on CPU about 1.3-1.5x the unmasked one), the efficiency passed the 1/density
        # bound it is read against: that bound is of the work, which the faster dense call measures. The work is the
        # kept share of the score matrix, as `bench attention` counts it: the runtime's block density, each group's
        # partial edge blocks whole, overstated it and the efficiency with it (module docstring).
        baseline = "unmasked" if unmasked_ms < dense_ms else "masked"
        rows.append({"target_density": density, "density": work, "block_density": runtime.records[-1].density,
                     "path": path, "dense_ms": dense_ms, "unmasked_ms": unmasked_ms, "sparse_ms": sparse_ms,
                     "speedup": dense_ms / sparse_ms, "efficiency": min(dense_ms, unmasked_ms) / sparse_ms * work,
                     "efficiency_baseline": baseline})
    result = {
        "layout": f"{args.frames}x{args.height}x{args.width}",
        "tokens": layout.num_tokens,
        "causal_frames": args.causal_frames,
        "group_tokens": args.causal_frames * args.height * args.width,
        "pattern": args.pattern,
        "block_size": args.block_size,
        "heads": args.heads,
        "dim": args.dim,
        "dtype": args.dtype,
        "device": _device_label(args.device),
        "repeats": args.repeats,
        "unmasked_sdpa_ms": statistics.median(unmasked_times),  # over every row's runs
        "rows": rows,
    }
    print(f"{args.pattern} under a causal mask over groups of {args.causal_frames} frames "
          f"({result['group_tokens']} tokens) on {layout.num_tokens} tokens ({result['layout']}), block "
          f"{args.block_size}, {args.heads} heads x {args.dim}, {args.dtype}, {result['device']}; dense: SDPA with the "
          f"boolean mask (without it: {result['unmasked_sdpa_ms']:.1f} ms); density: the kept share of the score "
          "matrix (block density: the runtime's, partial blocks counted whole); speedup over the masked SDPA, "
          "efficiency (speedup x density, 1.0 the 1/density bound) over the faster SDPA, masked or unmasked")
    print("| target density | density | block density | path | masked ms | unmasked ms | sparse ms | speedup | "
          "efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {_density_text(r['target_density'])} | {r['density']:.3f} | {r['block_density']:.3f} | {r['path']} "
              f"| {r['dense_ms']:.1f} | {r['unmasked_ms']:.1f} | {r['sparse_ms']:.1f} | {r['speedup']:.2f} | "
              f"{r['efficiency']:.2f} |")
    _write_json(result, args.out, "bench_causal.json")
    return rows


def run_pipeline_bench(args, config) -> dict:
    r"""
    Time one video (`args.prompt`, `args.seed`, the size and steps of `args`) dense and sparse under `config`,
    `args.repeats` times, interleaved (dense, sparse, dense, ...), after one untimed run of each. Each sparse
    run applies `config` afresh, so its time includes building its plans, as a user's first video would.

    Reported (medians over the pairs): end-to-end speedup (dense / sparse wall seconds), self-attention
    speedup (timing hooks on the adapter's self-attention modules, projections included), the attention work
    (mean block density over every self-attention call, dense calls counting 1.0) and the efficiency,
    attention speedup x work (1.0: the sparse path reaches the 1 / work bound). Writes `bench_pipeline.json`
    into `args.out`. The work is `stats()`'s, the runtime's blocks counted whole (it keeps no other per call), not
    the kept share of the score matrix that `bench attention` and `bench causal` read: about 1.5% from it on
    the testbed's whole frames (2,448 tokens at block 64: window3d 0.256 against 0.260; more on small frames), past it
    under a causal frame-group mask whose groups blocks straddle (`bench causal`'s `block_density`).
    """
    from .api import SparseStats, sparse
    from .compare import (
        check_call_kwargs_before_loading,
        check_config_fits,
        fill_call_defaults,
        load_pipeline_for,
        model_label,
        offload_mode,
        placement,
        prompt_passed,
        warn_if_density_replaces,
        weights_dtype,
    )
    from .evaluate import diffsparse_warnings, timed_generation

    _check_repeats(args.repeats, "timed dense/sparse pairs")
    check_call_kwargs_before_loading(args)  # and --image
    pipe = load_pipeline_for(args)
    fill_call_defaults(args, pipe)
    check_config_fits(pipe, config)  # what `apply` refuses for this model: before the dense runs, not after

    made = []  # the size of the video generated, which a pipeline may round or work out itself (`call_defaults`)

    def dense_run() -> tuple[float, float]:
        frames, *seconds = timed_generation(pipe, args.prompt, args.seed, args)
        made[:] = frames.shape[:3]
        return tuple(seconds)

    def sparse_run() -> tuple[float, float, SparseStats]:
        with sparse(pipe, config) as handle:
            _, seconds, attention = timed_generation(pipe, args.prompt, args.seed, args)
            call_stats = handle.stats(since_apply=True)  # every segment of a pipeline that runs several
        return seconds, attention, call_stats

    # diffsparse's warnings ("nothing runs sparse", a density out of reach) for readers of the JSON, who see no
    # stderr; every run under the config says them again, so the untimed one is no different.
    with diffsparse_warnings() as kept:
        warn_if_density_replaces(config)  # the JSON's config names the parameter the density replaced
        dense_run(), sparse_run()  # one-time costs (thread pools, the compiled CPU kernel) off the timed runs
        pairs = []
        for _ in tqdm(range(args.repeats), desc="dense, sparse", unit="pair"):
            dense_seconds, dense_attention = dense_run()
            sparse_seconds, sparse_attention, call_stats = sparse_run()
            pairs.append(
                {
                    "dense_seconds": dense_seconds,
                    "sparse_seconds": sparse_seconds,
                    "dense_attention_seconds": dense_attention,
                    "sparse_attention_seconds": sparse_attention,
                    "speedup": dense_seconds / sparse_seconds,
                    "attention_speedup": dense_attention / sparse_attention,
                }
            )
    work = call_stats.mean_density
    attention_speedup = statistics.median(p["attention_speedup"] for p in pairs)
    result = {
        "model": model_label(args.model),
        "config": repr(config),
        "video": "{} frames {}x{}, {} steps".format(*made, args.steps),
        "prompt": prompt_passed(pipe, args.prompt),
        "seed": args.seed,
        "call_kwargs": args.call_kwargs,
        "image": getattr(args, "image", None),
        "vae_tiling": bool(getattr(getattr(pipe, "vae", None), "use_tiling", False)),
        "device": _device_label(args.device),
        "dtype": weights_dtype(pipe),
        "offload": offload_mode(pipe),
        "repeats": args.repeats,
        "pairs": pairs,
        "dense_seconds": statistics.median(p["dense_seconds"] for p in pairs),
        "sparse_seconds": statistics.median(p["sparse_seconds"] for p in pairs),
        "speedup": statistics.median(p["speedup"] for p in pairs),
        "attention_speedup": attention_speedup,
        "sparse_step_density": call_stats.sparse_steps_density,
        "attention_work": work,
        "efficiency": attention_speedup * work,
        "warnings": kept,
    }
    print(f"{result['model']}; {result['video']}; {result['device']}, {placement(pipe)}; {config!r}")
    print("| pair | dense s | sparse s | end-to-end speedup | attention speedup |")
    print("|---|---|---|---|---|")
    for i, p in enumerate(pairs, 1):
        print(f"| {i} | {p['dense_seconds']:.2f} | {p['sparse_seconds']:.2f} | {p['speedup']:.3f} | "
              f"{p['attention_speedup']:.3f} |")
    density = "-" if result["sparse_step_density"] is None else f"{result['sparse_step_density']:.3f}"
    print(f"median end-to-end speedup {result['speedup']:.3f}, attention speedup {attention_speedup:.3f}; "
          f"sparse-step density {density}, attention work {work:.3f}, efficiency {result['efficiency']:.3f}")
    _write_json(result, args.out, "bench_pipeline.json")
    return result
