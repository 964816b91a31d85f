"""The `diffsparse` command: `compare` (the main job of `make run`) and `bench attention`."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _step_count(text: str) -> int | float:
    """`"3"` -> 3 steps; `"0.2"` -> a fraction of the steps."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="generate one video dense and sparse (same seed); time, density, PSNR/SSIM")
    p.add_argument("--model", default=None, help="hub id or local path of a Wan checkpoint (default: embedded tiny)")
    p.add_argument("--pattern", default="radial", help="pattern name (dense, radial)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dense-steps", type=_step_count, default=0.2, help="int steps or a fraction in [0, 1)")
    p.add_argument("--dense-last-steps", type=_step_count, default=0)
    p.add_argument("--dense-layers", type=int, default=0, help="the first L blocks stay dense")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--prompt", default="a red circle moving left")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="outputs", help="folder for compare.mp4 and compare.json")


def _run_compare(args) -> None:
    from .compare import run_compare
    from .config import SparseConfig

    config = SparseConfig(
        pattern=args.pattern,
        block_size=args.block_size,
        dense_steps=args.dense_steps,
        dense_last_steps=args.dense_last_steps,
        dense_layers=args.dense_layers,
    )
    r = run_compare(args, config)
    print(f"model: {r.model}")
    print(f"config: {r.config}")
    print(f"video: {r.frames} frames {r.height}x{r.width}, {r.steps} steps, seed {r.seed}, {r.device}")
    print(f"dense  {r.dense_seconds:8.2f} s end-to-end, {r.dense_denoise_seconds:8.2f} s text encoding + denoising")
    print(f"sparse {r.sparse_seconds:8.2f} s end-to-end, {r.sparse_denoise_seconds:8.2f} s text encoding + denoising")
    print(f"speedup {r.speedup:.2f}x end-to-end, {r.denoise_speedup:.2f}x text encoding + denoising")
    print(f"mean attention density: {r.mean_attention_density:.3f}")
    print(f"PSNR {r.psnr_db:.2f} dB   SSIM {r.ssim:.4f}   (sparse vs dense)")
    print(f"wrote {r.video_path} and {os.path.join(args.out, 'compare.json')}")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    a = bench.add_parser("attention", help="dense SDPA vs block-sparse attention on the same tensors")
    a.add_argument("--seq", type=int, default=16384)
    a.add_argument("--heads", type=int, default=8)
    a.add_argument("--dim", type=int, default=64)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--density", default="0.1,0.25,0.5", help="comma-separated target block densities")
    a.add_argument("--block-size", type=int, default=128)
    a.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    a.add_argument("--device", default="cpu")
    a.add_argument("--backend", default="auto")
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default="outputs", help="folder for bench_attention.csv and .png")


def _run_bench(args) -> None:
    from .bench import run_attention_bench

    run_attention_bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffsparse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compare(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    {"compare": _run_compare, "bench": _run_bench}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
