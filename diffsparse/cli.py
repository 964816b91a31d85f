"""The `diffsparse` command: `compare` (the main job of `make run`), `eval`, `masks`, `bench ...`, `trace`, `demo`."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .testbed import add_two_stage_options


def _step_count(text: str) -> int | float:
    """`"3"` -> 3 steps; `"0.2"` -> a fraction of the steps: `SparseConfig`'s two forms, checked here so that the
    message says what is allowed (argparse's own said only "invalid _step_count value")."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        value = None
    if value is None or not (0 <= value < 1 if isinstance(value, float) else value >= 0):  # nan fails both
        raise argparse.ArgumentTypeError(
            f"expected a step count (a whole number >= 0) or a fraction of the steps in [0, 1), got {text!r}")
    return value


def at_least(minimum: int):
    """An argparse type for whole numbers of at least `minimum` (a count, a size), with a message naming the value
    and the bound instead of a crash, or a silent empty run, deep inside the command."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _seed(text: str) -> int:
    """A seed torch's generators take (`manual_seed`: a 64-bit value); before, a larger one ended the run with
    "Overflow when unpacking long long", naming no option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must fit in 64 bits (-2**63 to 2**64 - 1), got {value}")
    return value


_positive = at_least(1)
_non_negative = at_least(0)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's `(default: ...)` only where the help does not say it: a help stating the default in words got
    "(default: None)" after it, and a `None` default means the option's absence, or is spelt `none` in the help. A
    list or tuple default reads as the option is typed, where the help places it (`%(default)s`) too."""

    def _get_help_string(self, action):
        help = action.help or ""
        if isinstance(action.default, (list, tuple)):
            # As the option is typed, `0.25,0.5`: Python's `[0.25, 0.5]` or `(1, 2, 2)`, copied from the help, is
            # refused.
            typed = ",".join("none" if value is None else str(value) for value in action.default).replace("%", "%%")
            if "%(default)s" in help:  # placed by the help: not a second time after it
                return help.replace("%(default)s", typed)
            if not action.default or "default:" in help:  # an empty one is the option's absence, as `None` is
                return action.help
            return f"{help} (default: {typed})"
        if action.default is None or "default:" in help:
            return action.help
        return super()._get_help_string(action)


def _port(text: str) -> int:
    """A TCP port; before, one above 65535 ended `demo` in a traceback after the model had loaded."""
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1 .. 65535, got {value}")
    return value


def _is_none(text: str) -> bool:
    """`none` (any case: `None` as Python writes it too) is the CLI's spelling of a `None` setting."""
    return text.strip().lower() == "none"


def _correction(text: str) -> str | None:
    """`none` is the CLI's spelling of `SparseConfig.correction=None`; other names are checked by the config."""
    return None if _is_none(text) else text.strip()


def _comma_list(convert, what: str):
    """An argparse type for comma-separated values ("0.1,0.25"), with a message naming what was expected."""

    def parse(text: str) -> list:
        try:
            return [convert(x.strip()) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


def _top_level_items(text: str) -> list[str] | None:
    """`text` split at the commas outside parentheses and brackets; `None` when those do not balance or an item
    is empty."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if depth < 0:
            return None
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return items if depth == 0 and all(items) else None


def _density(text: str) -> float:
    """A block density in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:  # also refuses nan
        raise ValueError(text)
    return value


_densities = _comma_list(_density, "block densities in (0, 1]")


def _optional_density(text: str) -> float | None:
    """A block density in (0, 1], or `none`: `SparseConfig.density=None`, the pattern as written."""
    return None if _is_none(text) else _density(text)


def _one(convert, what: str):
    """An argparse type for one value, with a message naming what was expected (a bare `_density` would read
    "invalid _density value")."""

    def parse(text: str):
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    parse.__name__ = what
    return parse


# `--density` of the one-configuration commands: what `eval` takes for one of its list's items (`none` too).
_one_optional_density = _one(_optional_density, "a block density in (0, 1] or none")


def _distinct(parse):
    """`parse`'s list with each value at most once: `eval` runs every combination of its lists, so a value given
    twice generated every video again for an identical row."""

    def distinct(text: str) -> list:
        values = parse(text)
        for i, value in enumerate(values):
            if value in values[:i]:
                shown = "none" if value is None else repr(value)  # as typed: `none` is the CLI's None
                raise argparse.ArgumentTypeError(f"{shown} is given twice in {text!r}: give each value once")
        return values

    distinct.__name__ = parse.__name__
    return distinct


def _json_object(text: str) -> dict:
    from .compare import parse_call_kwargs

    try:
        return parse_call_kwargs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _pattern_list(text: str) -> list[str]:
    """Comma-separated patterns, each a name or a name with parameters: `"radial,searched(keep=0.3, refresh=4)"`
    (commas inside parentheses belong to the pattern)."""
    items = _top_level_items(text)
    if items is None:
        raise argparse.ArgumentTypeError(f"expected comma-separated patterns, e.g. radial,searched(refresh=4), got {text!r}")
    return items


def _dense_layers(text: str) -> int | list[int]:
    """`SparseConfig.dense_layers` in its two forms: `"2"` -> the first 2 blocks, `"[0,3]"` -> blocks 0 and 3."""
    from .config import parse_dense_layers

    try:
        return parse_dense_layers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _dense_layers_list(text: str) -> list[int | list[int]]:
    """Comma-separated `dense_layers` settings for `eval`: `"0,1,[3]"` (commas inside brackets belong to a list)."""
    items = _top_level_items(text)
    if items is None:
        raise argparse.ArgumentTypeError(f"expected comma-separated dense-layer settings, e.g. 0,1,[0,3], got {text!r}")
    return [_dense_layers(item) for item in items]


# The names of `bench.DTYPES` and `compare.OFFLOADS`, spelled here so that `--help` imports neither torch nor diffusers.
DTYPE_NAMES = ("fp32", "fp16", "bf16")
OFFLOADS = ("none", "model", "sequential")
PATTERN_HELP = "pattern name, optionally with parameters, e.g. radial or 'searched(refresh=4)' (see diffsparse.patterns)"


def _add_model_and_video(p) -> None:
    """The options `compare` and `eval` share: which pipeline, and the video it generates (pixels)."""
    p.add_argument("--model", default=None,
                   help="hub id or local folder of a pipeline of a supported model family, or of a testbed training "
                        "run (default: the embedded trained testbed)")
    p.add_argument("--block-size", type=_positive, default=64, help="tokens per block side of the sparse masks")
    # The model's own by default: the testbed's evaluation size (20 steps, 17 frames, 48 x 48), or the pipeline's
    # call defaults (Wan: 50 steps, 81 frames, 480 x 832; image models one frame).
    p.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: the model's own)")
    p.add_argument("--frames", type=_positive, default=None,
                   help="video frames (default: the model's own; 1 for image models: FLUX, SD3)")
    p.add_argument("--height", type=_positive, default=None, help="video height in pixels (default: the model's own)")
    p.add_argument("--width", type=_positive, default=None, help="video width in pixels (default: the model's own)")
    p.add_argument("--image", default=None,
                   help="an image file, for image-to-video and editing pipelines (their `image` argument)")
    p.add_argument("--call-kwargs", type=_json_object, default=None,
                   help="more keyword arguments of the pipeline call, as a JSON object, e.g. "
                        "'{\"guidance_scale\": 5.0, \"negative_prompt\": \"blurry\"}' or SkyReels-V2 diffusion "
                        "forcing's '{\"ar_step\": 5, \"causal_block_size\": 5}'; not what the options set (prompt, "
                        "frames, size, steps, image, seed)")
    _add_loading(p)


def _add_loading(p) -> None:
    """Where and how the pipeline is loaded (`compare.load_pipeline`)."""
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="weights' dtype (default: fp32 on cpu, bf16 on other devices)")
    p.add_argument("--offload", default="none", choices=OFFLOADS,
                   help="model: diffusers' enable_model_cpu_offload (each model on the device only for its calls); "
                        "sequential: enable_sequential_cpu_offload (least memory, slowest); for checkpoints larger "
                        "than the device's memory. Timings then include the moves")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode in tiles (pipe.vae.enable_tiling()), for HunyuanVideo or CogVideoX at their native "
                        "sizes on one GPU; dense and sparse videos alike")


def _add_sparse_config(p) -> None:
    """The `SparseConfig` options of the one-configuration commands (`compare`, `trace`)."""
    p.add_argument("--pattern", default="radial", help=PATTERN_HELP)
    p.add_argument("--density", type=_one_optional_density, default=None,
                   help="target block density in (0, 1], or none: the pattern's own parameters (a density replaces "
                        "a radial decay or searched keep that --pattern gives, with a warning) (default: none)")
    p.add_argument("--dense-steps", type=_step_count, default=0.2,
                   help="first denoising steps kept dense: a step count, or a fraction of the steps in [0, 1)")
    p.add_argument("--dense-last-steps", type=_step_count, default=0,
                   help="last denoising steps kept dense: a step count, or a fraction of the steps in [0, 1)")
    p.add_argument("--dense-layers", type=_dense_layers, default=0,
                   help="transformer blocks kept dense: L = the first L, or a bracketed list of indices, e.g. '[0,3]'")
    p.add_argument("--correction", type=_correction, default=None,
                   help="softmax-statistics correction: none or residual (see SparseConfig.correction) (default: none)")
    p.add_argument("--correction-refresh", type=_non_negative, default=0,
                   help="with a correction, measure again this many steps after the last measurement (0 = once)")
    p.add_argument("--tile", type=_tiles, default=None,
                   help="3D tile order t,h,w the kernel sees (SparseConfig.order; default: frame-major); several "
                        "separated by / are cycled over the layers (1,1,1 = frame-major), e.g. 1,1,1/1,8,8")


def _sparse_config(args):
    from .config import SparseConfig

    return SparseConfig(
        pattern=args.pattern,
        density=args.density,
        block_size=args.block_size,
        dense_steps=args.dense_steps,
        dense_last_steps=args.dense_last_steps,
        dense_layers=args.dense_layers,
        correction=args.correction,
        correction_refresh=args.correction_refresh,
        order=_order(args.tile),
    )


def _add_one_generation(sub, name: str, help: str, seed_help: str, out_help: str) -> argparse.ArgumentParser:
    """A command that generates one video under one `SparseConfig` (`compare`, `trace`)."""
    p = sub.add_parser(name, help=help, formatter_class=_DefaultsHelpFormatter)
    _add_model_and_video(p)
    _add_sparse_config(p)
    p.add_argument("--prompt", default="a red circle moving left", help="text prompt")
    p.add_argument("--seed", type=_seed, default=0, help=seed_help)
    p.add_argument("--out", default="outputs", help=out_help)
    return p


def _add_compare(sub) -> None:
    p = _add_one_generation(sub, "compare",
                            "generate one video dense and sparse (same seed); time, density, PSNR/SSIM",
                            "seed of the initial noise (the same for both runs)",
                            "folder for compare.mp4, dense.mp4, sparse.mp4 (PNGs for one frame) and "
                            "compare.json")
    add_two_stage_options(p, "testbed models: sample a still from the shapes-only prompt first (dense, untimed), "
                          "then both clips image-to-video from it, so the video follows the direction word; frame 0 "
                          "is not scored")
    _add_lpips_weights(p)
    p.add_argument("--fps", type=_positive, default=8,
                   help="frame rate of compare.mp4, dense.mp4 and sparse.mp4; the model's own plays at its speed "
                        "(diffusers' examples: Wan 16, HunyuanVideo 15, CogVideoX 8, LTX-Video 24, Mochi 30)")


def _add_lpips_weights(p) -> None:
    p.add_argument("--lpips-weights", default=None,
                   help="torchvision's AlexNet checkpoint for LPIPS (default: the torch hub cache's, when it holds "
                        "one; without it LPIPS is left out and the output says so)")


def _add_trace(sub) -> None:
    _add_one_generation(sub, "trace", "per step and layer: error of each sparse attention call vs dense attention",
                        "seed of the initial noise",
                        "folder for trace.csv and trace.png (an earlier run's there are replaced)")


def _run_trace(args) -> None:
    from .trace import run_trace

    run_trace(args, _sparse_config(args))


def pattern_line(config) -> str:
    """The printed `pattern:` line: a name's defaults spelled out (e.g. searched's budget), and what a density does
    to it: a searched pattern's `keep` is set to it once (the search's block budget), any other pattern's main
    parameter is solved for it on each layout."""
    from .patterns import Searched, SearchedWindows

    pattern = config.resolved_pattern
    if config.density is None:
        return f"pattern: {pattern!r}"
    if pattern.name == "dense":
        return f"pattern: {pattern!r} (every block kept: the density {config.density} changes nothing)"
    if isinstance(pattern, (Searched, SearchedWindows)):
        return f"pattern: {pattern!r}, its keep set to the density {config.density} (the search's block budget)"
    return f"pattern: {pattern!r}, its main parameter solved for density {config.density} per layout"


def _run_compare(args) -> None:
    from .compare import placement_label, run_compare, scored_label, speedup_note

    config = _sparse_config(args)
    r = run_compare(args, config)
    print(f"model: {r.model}")
    print(f"config: {r.config}")
    print(pattern_line(config))
    print(f"video: {r.frames} frames {r.height}x{r.width}, {r.steps} steps, seed {r.seed}, {r.device}, "
          f"{placement_label(r.dtype, r.offload)}, {r.sampler}")
    print(f"dense  {r.dense_seconds:8.2f} s end-to-end, {r.dense_denoise_seconds:8.2f} s text encoding + denoising")
    print(f"sparse {r.sparse_seconds:8.2f} s end-to-end, {r.sparse_denoise_seconds:8.2f} s text encoding + denoising")
    note = speedup_note(r)
    print(f"speedup {r.speedup:.2f}x end-to-end, {r.denoise_speedup:.2f}x text encoding + denoising"
          + (f" ({note})" if note else ""))
    print(f"mean attention density: {r.mean_attention_density:.3f}")
    print(f"PSNR {r.psnr_db:.2f} dB   SSIM {r.ssim:.4f}   (sparse vs dense, {scored_label(args)})")
    if r.lpips is None:
        from .metrics import lpips_missing_reason

        print(f"LPIPS not computed: {lpips_missing_reason((r.height, r.width))}")
    else:
        print(f"LPIPS {r.lpips:.4f}")
    # One frame: compare.png beside compare.mp4 (`image_path`), which the line left out.
    written = [path for path in (r.video_path, r.image_path, r.dense_path, r.sparse_path) if path is not None]
    print(f"wrote {', '.join(written)} and {os.path.join(args.out, 'compare.json')}")


_ints = _comma_list(_positive, "positive integers")


def _order(tile: list[int] | list[list[int]] | None):
    """The `--tile` option's `SparseConfig.order`: one tile, or (`_tiles`) one per layer in turn, `1,1,1` (or the
    cube `1`) being the frame-major order itself."""
    from .patterns import TileOrder

    if tile is None:
        return None
    if isinstance(tile[0], list):
        return [_order(one) for one in tile]
    return None if tile in ([1], [1, 1, 1]) else TileOrder(tuple(tile) if len(tile) == 3 else tile[0])


def _tile(text: str) -> list[int]:
    """One 3D tile, `t,h,w` (or one number for a cube); before, other counts were cut to their first number."""
    tile = _ints(text)
    if len(tile) not in (1, 3):
        raise argparse.ArgumentTypeError(f"a tile is t,h,w (three positive integers) or one for a cube, got {text!r}")
    return tile


def _tiles(text: str) -> list[int] | list[list[int]]:
    """`t,h,w`, or several separated by `/` (the layers cycle through them)."""
    tiles = [_tile(part) for part in text.split("/")]
    return tiles[0] if len(tiles) == 1 else tiles


def _add_token_grid(p, several_frame_counts: bool = False) -> None:
    """The options `masks` and `bench density/permute` share: a latent token grid (Wan 2.1 480p by default)."""
    if several_frame_counts:
        p.add_argument("--frames", type=_ints, default=[8, 16, 32, 64],
                       help="comma-separated latent frame counts (tokens along time)")
    else:
        p.add_argument("--frames", type=_positive, default=21, help="latent frames (tokens along time)")
    p.add_argument("--height", type=_positive, default=30, help="tokens along height")
    p.add_argument("--width", type=_positive, default=52, help="tokens along width")
    p.add_argument("--block-size", type=_positive, default=128, help="tokens per block side")


def _add_masks(sub) -> None:
    p = sub.add_parser("masks", help="print a pattern's block density and write a PNG of its block mask",
                       formatter_class=_DefaultsHelpFormatter)
    _add_token_grid(p)
    p.add_argument("--pattern", default="radial",
                   help="a static pattern, optionally with parameters, e.g. radial or 'window3d(window=(1,3,3))' "
                        "(see diffsparse.patterns; data-dependent ones, searched, searched_windows and "
                        "spatial_temporal, are refused: they have no mask before their search; spatial_temporal "
                        "with its heads' kinds given, e.g. \"spatial_temporal(heads='ST')\", draws each head's)")
    p.add_argument("--tile", type=_tile, default=None, help="3D tile order t,h,w (default: frame-major)")
    p.add_argument("--density", type=_one_optional_density, default=None,
                   help="solve the pattern's parameter for this density in (0, 1]; none: the pattern as written "
                        "(default: none)")
    p.add_argument("--head", type=_non_negative, default=0,
                   help="which head to draw, for patterns that differ per head (0 for a mask every head shares)")
    p.add_argument("--text-tokens", type=_non_negative, default=0,
                   help="text tokens in the same sequence (joint-attention models: CogVideoX, HunyuanVideo, Mochi, "
                        "FLUX, SD3); their rows and columns stay whole")
    p.add_argument("--text-position", default="end", choices=["start", "end"],
                   help="where the text tokens sit: start (CogVideoX, FLUX) or end (HunyuanVideo, Mochi, SD3)")
    p.add_argument("--out", default="outputs", help="folder for the PNG")


def _warm_up_torch() -> None:
    """Pay untimed what a first block mask pays once per process: torch's first `broadcast_shapes` imports
    torch.fx's symbolic shapes (0.7-1.4 s here), which landed in the first timing printed (`masks`' planning cost,
    `bench density`'s first row)."""
    import torch

    torch.broadcast_shapes((2, 1), (1, 3))


def _file_safe(text: str) -> str:
    """`text` (a pattern's or an order's repr) as part of a file name that a shell takes unquoted, as the printed
    `wrote ...` path gets pasted, and that Windows takes: no spaces, quotes, brackets, `|` or `&`."""
    import re

    text = re.sub(r"[\s'\"]", "", text).replace("|", "-or-").replace("&", "-and-")  # a union is no intersection
    text = re.sub(r"[)\]],[(\[]", "_", text)  # between the windows of a per-head parameter
    text = re.sub(r"(?<=\w)\(", "_", text)  # a name and its parameters
    return re.sub(r"[^\w.,=+-]+", "_", re.sub(r"[()\[\]]", "", text)).strip("_")


def _mask_png_name(pattern, layout, block_size: int, order, head: int) -> str:
    """The name of `masks`' PNG, made of everything the drawing depends on: it held the pattern's name and the grid
    alone, so masks of other densities, tiles, heads, block sizes or parameters overwrote one file while every run
    said it wrote it."""
    import hashlib

    text = f"_text{layout.text_len}{layout.text_position}" if layout.text_len else ""
    tile = "" if order is None else f"_{_file_safe(repr(order))}"
    one_head = f"_head{head}" if pattern.num_heads > 1 else ""  # a shared mask is every head's: --head 0 alone
    spelled = _file_safe(repr(pattern))
    digest = hashlib.sha1(repr(pattern).encode()).hexdigest()[:8]
    if len(spelled) > 150:  # file names end at 255 bytes; a hash of the whole repr keeps long ones apart
        spelled = f"{spelled[:140]}-{digest}"
    elif "|" in repr(pattern) or "&" in repr(pattern):  # the name drops the grouping: (a | b) & c is not a | (b & c)
        spelled = f"{spelled}-{digest}"
    grid = "x".join(str(n) for n in layout.grid)
    return f"mask_{spelled}_{grid}{text}_block{block_size}{tile}{one_head}.png"


def _run_masks(args) -> None:
    import time
    from pathlib import Path

    from .bench import STATIC_PATTERN, pattern_option
    from .kernels import make_plan
    from .patterns import VideoLayout

    layout = VideoLayout(
        args.frames, args.height, args.width, text_len=args.text_tokens, text_position=args.text_position
    )
    order = _order(args.tile)
    # Refused as `bench density` refuses it: spatial_temporal's union of its kinds' masks, drawn and "solved" for a
    # density, was shown without a word, though no call runs it (each head runs one kind); searched has no mask.
    pattern = pattern_option(args.pattern, static=STATIC_PATTERN)
    # Before solving. `render` draws a shared mask for any head (every head's), but here `--head` exists for
    # per-head patterns: asking a shared one for head 5 expected a per-head mask and would get head 0's, unsaid.
    if args.head >= pattern.num_heads > 1:
        raise ValueError(f"--head {args.head}: {pattern!r} gives {pattern.num_heads} per-head masks, so --head must "
                         f"be in 0 .. {pattern.num_heads - 1}")
    if args.head >= pattern.num_heads:
        raise ValueError(f"--head {args.head}: {pattern!r} gives one mask, shared by every head, so --head must be 0 "
                         "(--head chooses among a per-head pattern's masks)")
    _warm_up_torch()
    start = time.perf_counter()
    if args.density is not None:
        pattern = pattern.at_density(layout, args.density, args.block_size, order=order)
    solved = time.perf_counter()
    mask = pattern.block_mask(layout, args.block_size, order)
    make_plan(mask[None], layout.num_tokens, layout.num_tokens, args.block_size)
    planned = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / _mask_png_name(pattern, layout, args.block_size, order, args.head)
    pattern.render(layout, args.block_size, path, head=args.head, order=order)
    density = pattern.density(layout, args.block_size, order)
    text = f" + {layout.text_len} text at the {layout.text_position}" if layout.text_len else ""
    # A per-head pattern's density is the mean over its heads; the picture is one head's.
    drawn = (f" (the mean over {mask.shape[0]} heads; head {args.head}, drawn: "
             f"{float(mask[args.head].float().mean()):.4f})" if mask.shape[0] > 1 else "")
    print(f"{pattern!r} on {layout.num_tokens} tokens ({args.frames}x{args.height}x{args.width}{text}), "
          f"block {args.block_size}, order {order or 'frame-major'}: block density {density:.4f}{drawn}")
    # What a pipeline's first call at this resolution pays once (then the plan is cached), on this machine.
    solve = f"solving for the density {solved - start:.2f} s, " if args.density is not None else ""
    print(f"planning cost: {solve}block mask and kernel plan {planned - solved:.2f} s")
    print(f"wrote {path}")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="PSNR/SSIM/LPIPS and time ratios of sparse configurations vs dense",
                       formatter_class=_DefaultsHelpFormatter)
    _add_model_and_video(p)
    # Each list once per value: a repeated item made identical rows, every video generated again for each.
    p.add_argument("--pattern", type=_distinct(_pattern_list), default=["radial", "window3d"],
                   help="comma-separated patterns, each a " + PATTERN_HELP)
    p.add_argument("--density", type=_distinct(_comma_list(_optional_density, "densities in (0, 1] or none")),
                   default=[0.1, 0.2, 0.3],
                   help="comma-separated target block densities in (0, 1], each pattern's main parameter solved for "
                        "each (the table's pattern_ran names the solved pattern), or none: the pattern as written")
    p.add_argument("--dense-steps", type=_distinct(_comma_list(_step_count, "step counts or fractions")),
                   default=[0, 0.2],
                   help="comma-separated dense-step settings, each a step count or a fraction of the steps")
    p.add_argument("--dense-last-steps", type=_distinct(_comma_list(_step_count, "step counts or fractions")),
                   default=[0],
                   help="comma-separated settings of the last denoising steps kept dense, each a step count or a "
                        "fraction of the steps")
    p.add_argument("--dense-layers", type=_distinct(_dense_layers_list), default=[0],
                   help="comma-separated dense-layer settings, each a count of leading transformer blocks or a "
                        "bracketed list of block indices, e.g. '0,1,[3]'")
    p.add_argument("--correction", type=_distinct(_comma_list(_correction, "corrections")), default=[None],
                   help="comma-separated softmax-statistics corrections: none, residual (see SparseConfig.correction) "
                        "(default: none)")
    p.add_argument("--correction-refresh", type=_distinct(_comma_list(_non_negative, "whole numbers >= 0")),
                   default=[0],
                   help="comma-separated correction refreshes, each the steps after which a correction measures "
                        "again (0 = once); a configuration without a correction runs, and is labelled, with 0, each "
                        "other refresh named in a warning; a refresh that never comes in the run's steps measures "
                        "once, as 0 does, in one row")
    p.add_argument("--tile", type=_tiles, default=None,
                   help="3D tile order t,h,w for every configuration (SparseConfig.order; default: frame-major); "
                        "several separated by / are cycled over the layers (1,1,1 = frame-major)")
    p.add_argument("--prompt-file", default=None,
                   help="a text file of prompts, one per line (blank lines and lines starting with # skipped), "
                        "instead of the three fixed ones (the testbed's shape prompts)")
    p.add_argument("--prompts", type=_positive, default=None,
                   help="how many prompts: the first N of --prompt-file's or of the three fixed ones (default: every "
                        "prompt of --prompt-file, else 2)")
    p.add_argument("--seeds", type=_positive, default=1, help="how many seeds per prompt")
    p.add_argument("--seed", type=_seed, default=0, help="the first seed")
    p.add_argument("--out", default="outputs",
                   help="folder for eval.md and eval.csv (an earlier run's there are replaced once the model has "
                        "loaded)")
    _add_lpips_weights(p)
    add_two_stage_options(p, "testbed models: every run of a (prompt, seed) starts from one still sampled from the "
                          "shapes-only prompt (dense, untimed) and samples the clip image-to-video from it, as "
                          "`make run` does; frame 0 is not scored")


def _run_eval(args) -> None:
    from .evaluate import run_eval

    args.order = _order(args.tile)
    run_eval(args)


def _add_kernel_run(p, dim: int, dtype: str, repeats: int, sparse_kernel: bool = True) -> None:
    """The options the timed benchmarks share: tensor shape and type, device, kernel path (`sparse_kernel`),
    repeats."""
    p.add_argument("--heads", type=_positive, default=8, help="attention heads")
    p.add_argument("--dim", type=_positive, default=dim, help="head dimension")
    p.add_argument("--dtype", default=dtype, choices=DTYPE_NAMES, help="tensor dtype")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    if sparse_kernel:
        p.add_argument("--backend", default="auto", help="block-sparse kernel path (see SparseConfig.backend)")
    p.add_argument("--repeats", type=_positive, default=repeats, help="timed runs per measurement (the median is kept)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random tensors and masks")


# `bench causal`'s `--density`: `none` among them too (the pattern as written), as eval takes it.
_optional_densities = _comma_list(_optional_density, "block densities in (0, 1] or none")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    defaults = _DefaultsHelpFormatter
    d = bench.add_parser("density", help="block density against frame count (radial falls like log(n)/n)",
                         formatter_class=defaults)
    _add_token_grid(d, several_frame_counts=True)
    d.add_argument("--pattern", type=_pattern_list, default=["radial", "window3d"],
                   help="comma-separated patterns, each a " + PATTERN_HELP)
    d.add_argument("--tile", type=_tile, default=None, help="3D tile order t,h,w (default: frame-major)")
    d.add_argument("--out", default="outputs", help="folder for bench_density.png")
    m = bench.add_parser("permute", help="3D tile permutation cost as a share of one sparse attention call",
                         formatter_class=defaults)
    _add_token_grid(m)
    _add_kernel_run(m, dim=128, dtype="bf16", repeats=3)
    m.set_defaults(heads=12)
    m.add_argument("--tile", type=_tile, default=[1, 8, 16], help="3D tile order t,h,w")
    m.add_argument("--pattern", default="window3d",
                   help="a static sparse pattern, optionally with parameters, e.g. window3d or 'radial(decay=0.5)' "
                        "(dense is refused: its calls are neither permuted nor run through the kernel; "
                        "data-dependent ones have no mask before their search)")
    a = bench.add_parser("attention", help="dense SDPA vs block-sparse attention on the same tensors",
                         formatter_class=defaults)
    _add_kernel_run(a, dim=64, dtype="fp32", repeats=5)
    a.add_argument("--seq", type=_positive, default=16384, help="tokens per sequence")
    a.add_argument("--batch", type=_positive, default=1, help="batch size")
    # Each density once, as eval's lists: a repeat timed the same row again.
    a.add_argument("--density", type=_distinct(_densities), default=[0.1, 0.25, 0.5],
                   help="comma-separated target block densities, each in (0, 1]")
    a.add_argument("--block-size", type=_positive, default=128, help="tokens per block side")
    a.add_argument("--mask", default="random",
                   help="random, or a pattern name solved for each density (radial, window3d)")
    a.add_argument("--out", default="outputs", help="folder for bench_attention.csv and .png")
    s = bench.add_parser("search", help="one search of a data-dependent pattern vs one dense attention call",
                         formatter_class=defaults)
    _add_token_grid(s)
    _add_kernel_run(s, dim=32, dtype="fp32", repeats=5, sparse_kernel=False)
    # The embedded testbed's self-attention at its evaluation size (17 x 48 x 48 pixels: 17 x 12 x 12 tokens).
    s.set_defaults(frames=17, height=12, width=12, block_size=64, heads=4)
    s.add_argument("--pattern", default="searched", help=PATTERN_HELP)
    s.add_argument("--density", type=_one_optional_density, default=0.25,
                   help="target block density in (0, 1] the pattern is searched for (its main parameter set for it, "
                        "as compare's --density sets it, over one the pattern text gives), or none: the pattern as "
                        "written")
    s.add_argument("--out", default="outputs", help="folder for bench_search.json")
    c = bench.add_parser("causal", help="SDPA under a causal frame-group mask vs the sparse path under it (speedup "
                         "over the masked SDPA, efficiency over the faster of the masked and the unmasked)",
                         formatter_class=defaults)
    _add_token_grid(c)
    _add_kernel_run(c, dim=64, dtype="fp32", repeats=5)
    # Groups of 2 frames of 25 x 38 tokens: 1900 tokens, no multiple of 64, so the per-group path.
    c.set_defaults(frames=8, height=25, width=38, block_size=64, heads=4)
    c.add_argument("--causal-frames", type=_positive, default=2, help="frames per causal group (causal_block_size)")
    c.add_argument("--pattern", default="radial", help=PATTERN_HELP)
    c.add_argument("--density", type=_distinct(_optional_densities), default=[0.25, 0.5],
                   help="comma-separated target block densities, each in (0, 1] (the pattern's main parameter solved "
                        "for it, as compare's --density solves it, over one the pattern text gives), or none: the "
                        "pattern as written")
    c.add_argument("--out", default="outputs", help="folder for bench_causal.json")
    e = bench.add_parser("pipeline", help="one video dense and sparse, end to end, interleaved runs (medians)",
                         formatter_class=defaults)
    _add_model_and_video(e)
    _add_sparse_config(e)
    e.add_argument("--prompt", default="a red circle moving left", help="text prompt")
    e.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise (the same for every run)")
    e.add_argument("--repeats", type=_positive, default=3, help="timed dense/sparse pairs (the medians are kept)")
    e.add_argument("--out", default="outputs", help="folder for bench_pipeline.json")


def _run_bench(args) -> None:
    if args.bench == "attention":
        from .bench import run_attention_bench

        run_attention_bench(args)
        return
    if args.bench == "pipeline":
        from .bench import run_pipeline_bench

        run_pipeline_bench(args, _sparse_config(args))
        return
    if args.bench == "search":
        from .bench import run_search_bench

        run_search_bench(args)
        return
    if args.bench == "causal":
        from .bench import run_causal_bench

        run_causal_bench(args)
        return
    if args.bench == "permute":
        from .bench import run_permute_bench

        args.order = _order(args.tile)  # as masks and bench density read --tile (a single number: a cube)
        run_permute_bench(args)
        return
    from pathlib import Path

    from .bench import STATIC_PATTERN, pattern_option
    from .patterns.plots import density_vs_frames

    # Unfitted, a data-dependent pattern has no mask (searched) or one no call runs (spatial_temporal's union of its
    # kinds' masks, 1.0 on small layouts): refused, as `bench permute` and `bench attention --mask` refuse them.
    patterns = [pattern_option(name, static=STATIC_PATTERN) for name in args.pattern]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "bench_density.png"
    _warm_up_torch()
    rows = density_vs_frames(patterns, args.frames, args.height, args.width, args.block_size, path, _order(args.tile))
    print(f"{args.height}x{args.width} tokens per frame, block {args.block_size}")
    print("| pattern | frames | tokens | density | density*frames/log2(frames) | build s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pattern']} | {r['frames']} | {r['tokens']} | {r['density']:.4f} | "
              f"{r['density_n_over_log_n']:.3f} | {r['seconds']:.3f} |")
    print(f"wrote {path}")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a Gradio page: one prompt dense and sparse, side by side, with the numbers",
                       formatter_class=_DefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="hub id or local folder of a diffusers pipeline (default: the embedded trained testbed)")
    _add_loading(p)
    _add_lpips_weights(p)
    p.add_argument("--out", default="outputs/demo", help="folder for each request's compare.mp4 and compare.json")
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=7860, help="port of the page (1 .. 65535)")


def _run_demo(args) -> None:
    from .demo import run_demo

    run_demo(args)


def _check_device(device: str | None) -> None:
    """`--device` names a torch device that is here, before anything loads."""
    if device is not None:
        from .devices import device_here

        device_here(device)


def _make_out(out: str | None) -> None:
    """The `--out` folder, made before the work so that an unusable path fails at once, not after the runs."""
    if out is None:
        return
    from pathlib import Path

    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"out={out!r}: cannot be used as the output folder ({error.strerror or error})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsparse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compare(sub)
    _add_masks(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_trace(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {
        "compare": _run_compare,
        "masks": _run_masks,
        "eval": _run_eval,
        "bench": _run_bench,
        "trace": _run_trace,
        "demo": _run_demo,
    }
    try:
        _check_device(getattr(args, "device", None))
        _make_out(getattr(args, "out", None))
        commands[args.command](args)
    except ValueError as error:
        # diffsparse's ValueErrors name the bad setting and what is allowed: a usage error, not a crash. Prefixed as
        # argparse prefixes the same subcommand's errors: `bench`'s parse errors name its subcommand too.
        command = f"{args.command} {args.bench}" if args.command == "bench" else args.command
        parser.exit(2, f"diffsparse {command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
