"""`diffsparse trace`: where the sparse error comes from, per denoising step and layer.

During one sparse generation, every self-attention call that diffsparse computes is compared with dense
attention on the very same q, k, v (so the error is the attention's own, not the drift of the trajectory):
relative L2 error `|out - dense| / |dense|`. The per-step curve says which steps need to stay dense and whether a
correction helps, the per-layer table which layer to keep dense; it costs one dense attention per call, so it is
a diagnostic, not a way to generate.
"""

from __future__ import annotations

import csv
import statistics
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .api import sparse
from .config import SparseConfig
from .runtime import CallRecord


@dataclass
class TracedCall:
    transformer: str  # the pipeline component: "transformer", Wan 2.2's low-noise expert "transformer_2", ...
    step: int
    layer: int
    branch: str
    sparse: bool  # False: a call that measured a correction's statistics (dense through the kernel)
    density: float
    error: float  # relative L2 error against dense attention on the same inputs


def _relative_error(query, key, value, out, causal_groups=None) -> float:
    """`causal_groups`: the `(start, stop)` token ranges of a causal frame-group mask the call computed under
    (`SparseRuntime.add_observer`); the reference is then the same masked attention, or the mask would count as
    the sparse pattern's error."""
    q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if causal_groups is None:
        dense = sdpa(q, k, v)
    else:
        dense = torch.cat([sdpa(q[:, :, a:b], k[:, :, :b], v[:, :, :b]) for a, b in causal_groups], dim=2)
    dense = dense.transpose(1, 2)
    return float((out.float() - dense).norm() / dense.norm().clamp(min=1e-12))


def trace_attention_errors(pipe, config: SparseConfig, **call_kwargs) -> list[TracedCall]:
    """Run `pipe(**call_kwargs)` under `config` and return every call diffsparse computed, with its error.

    Calls that stay with the original processors (dense steps and layers) are exact and not listed.
    """
    traced: list[TracedCall] = []

    def observer(name: str):
        def observe(record: CallRecord, query, key, value, out, causal_groups=None) -> None:
            error = _relative_error(query, key, value, out, causal_groups)
            traced.append(
                TracedCall(name, record.step, record.layer, record.branch, record.sparse, record.density, error)
            )

        return observe

    with sparse(pipe, config) as handle, torch.no_grad():
        for name, runtime in handle.runtimes.items():
            runtime.add_observer(observer(name))
        pipe(**call_kwargs)
    return traced


def _summary(calls: list[TracedCall]) -> dict:
    return {
        "calls": len(calls),
        "density": statistics.fmean(c.density for c in calls),
        "error": statistics.fmean(c.error for c in calls),
    }


def per_step(traced: list[TracedCall]) -> list[dict]:
    """Mean error (and density) over layers and branches, per step and kind of call."""
    groups: dict[tuple[int, bool], list[TracedCall]] = {}
    for call in traced:
        groups.setdefault((call.step, call.sparse), []).append(call)
    return [
        {"step": step, "sparse": is_sparse, **_summary(calls)} for (step, is_sparse), calls in sorted(groups.items())
    ]


def per_layer(traced: list[TracedCall]) -> list[dict]:
    """Mean error (and density) of each layer's sparse calls over steps and branches, and at its first sparse step,
    per transformer (the experts of Wan 2.2 are different models: their layer 3 is not one layer).

    The layer whose error stands out is the one to keep dense (`SparseConfig.dense_layers`); the first sparse
    step's error is reported apart because the earliest sparse steps move the trajectory the most.
    """
    groups: dict[tuple[str, int], list[TracedCall]] = {}
    for call in traced:
        if call.sparse:
            groups.setdefault((call.transformer, call.layer), []).append(call)
    rows = []
    for (transformer, layer), calls in groups.items():
        first = min(c.step for c in calls)
        first_error = statistics.fmean(c.error for c in calls if c.step == first)
        rows.append({"transformer": transformer, "layer": layer, **_summary(calls), "first_step": first,
                     "first_step_error": first_error})
    # The pipeline's order of its transformers (first seen first), then layers in order.
    order = {name: i for i, name in enumerate(dict.fromkeys(c.transformer for c in traced))}
    return sorted(rows, key=lambda r: (order[r["transformer"]], r["layer"]))


def plot(traced: list[TracedCall], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    transformers = list(dict.fromkeys(c.transformer for c in traced))
    for transformer in transformers:
        for layer in sorted({c.layer for c in traced if c.transformer == transformer}):
            rows = per_step([c for c in traced if c.transformer == transformer and c.layer == layer and c.sparse])
            label = f"layer {layer}" if len(transformers) == 1 else f"{transformer} layer {layer}"
            ax.plot([r["step"] for r in rows], [r["error"] for r in rows], marker="o", ms=3, label=label)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("relative L2 error vs dense attention")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)  # a config's repr runs past the figure's width
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nothing_to_trace(config: SparseConfig) -> ValueError:
    return ValueError(f"nothing to trace: every self-attention call ran the original dense attention under "
                      f"{config!r} (a dense pattern, dense steps or layers covering the whole run, or a correction "
                      f"measuring its statistics at every sparse step: a correction_refresh of 1)")


def run_trace(args, config: SparseConfig) -> list[TracedCall]:
    """`diffsparse trace`: one generation of `args.prompt` and `args.seed` under `config`, traced
    (`trace_attention_errors`); prints the per-step and per-layer tables and writes `trace.csv` (each row with the
    run's `model` and `config`) and `trace.png` into `args.out` after the generation, replacing an earlier run's there
    (as `compare` replaces its files); a run that stops before (an error, nothing to trace) leaves them as they were.
    Returns the traced calls."""
    from .compare import (
        check_call_kwargs_before_loading,
        fill_call_defaults,
        generation_kwargs,
        load_pipeline_for,
        model_label,
        seeded_global_generator,
        warn_if_density_replaces,
    )

    # Before loading, as compare and bench pipeline say it: a density replacing the pattern's keep or decay ran unsaid.
    warn_if_density_replaces(config)
    # The dense pattern runs every call with the original processors: said before the model loads and generates,
    # not after. Dense steps or layers covering the whole run are known only once the model's are.
    if config.resolved_pattern.name == "dense":
        raise _nothing_to_trace(config)
    check_call_kwargs_before_loading(args)  # and --image
    pipe = load_pipeline_for(args)
    fill_call_defaults(args, pipe)
    with seeded_global_generator(args.seed):  # as compare's runs: pipelines that also draw from the global one
        traced = trace_attention_errors(pipe, config, **generation_kwargs(pipe, args, args.prompt, args.seed))
    # A correction's measuring calls are traced (dense, error 0) but leave the per-layer table and the plot empty.
    if not any(call.sparse for call in traced):
        raise _nothing_to_trace(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every row names the model and config that made it: two runs' files did not differ but in their numbers, and
    # read together (concatenated) their calls mixed. Columns, not a comment line that CSV readers take for a row;
    # after the call's own, which keep their places for readers of earlier files.
    run = {"model": model_label(args.model), "config": repr(config)}
    with open(out / "trace.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(traced[0]), *run])
        writer.writeheader()
        writer.writerows({**asdict(c), **run} for c in traced)
    title = f"{run['model']}; {run['config']}"  # as `bench pipeline` prints its run
    plot(traced, out / "trace.png", title)
    print(title)
    print("| step | call | density | error |")
    print("|---:|---|---:|---:|")
    for r in per_step(traced):
        kind = "sparse" if r["sparse"] else "measured (dense)"
        print(f"| {r['step']} | {kind} | {r['density']:.3f} | {r['error']:.4f} |")
    print()
    # The transformer's column only for pipelines with several (Wan 2.2's experts): one model's table as before.
    named = len({c.transformer for c in traced}) > 1
    header = "| layer | sparse calls | density | error | error at its first sparse step |"
    print(("| transformer " if named else "") + header)
    print(("|---" if named else "") + "|---:|---:|---:|---:|---|")
    for r in per_layer(traced):
        print((f"| {r['transformer']} " if named else "") + f"| {r['layer']} | {r['calls']} | {r['density']:.3f} | "
              f"{r['error']:.4f} | {r['first_step_error']:.4f} (step {r['first_step']}) |")
    print(f"wrote {out / 'trace.csv'} and {out / 'trace.png'}")
    return traced
