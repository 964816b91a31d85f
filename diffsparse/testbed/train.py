"""Train the testbed model: rectified flow on procedural shape videos, on CPU, resumable.

    python -m diffsparse.testbed.train --out runs/testbed       # 60 minutes, the last fifth cooling down
    python -m diffsparse.testbed.train --out runs/testbed --minutes 120 --decay 0 --resume   # continue a --decay 0 run
    python -m diffsparse.testbed.train --out runs/testbed --minutes 20 --decay 1 --resume   # cool down to the end
    python -m diffsparse.testbed.train --out runs/ft --init pipelines/weights/testbed --minutes 30   # fine-tune shipped

Objective (rectified flow, as Wan and SD3 train): for a clean video `x0` (space-to-depth pixels), noise `n` and
`t` in [0, 1), `x_t = (1 - t) x0 + t n`; the transformer, given `x_t`, the timestep `1000 t` (the scale of
`FlowMatchEulerDiscreteScheduler.timesteps`) and the prompt, predicts the velocity `n - x0` under a mean squared
error. `t` is `shift * u / (1 + (shift - 1) * u)`, the scheduler's shift applied to `u`, and `u = sigmoid(z)`,
`z ~ N(0, 1)` (logit-normal, SD3's choice for rectified flow): more training on the middle noise levels, where
the shape's outline is decided, than uniform `u` (`--timestep-sampling uniform`: the density sampling visits).
One prompt in ten is replaced by the empty prompt (for CFG).
With `--frame-noise P`, a share P of the clips gets one noise level per frame instead (diffusion forcing; the
transformer then gets one timestep per token, Wan 2.2 TI2V's path), so that clear frames sit beside noisy ones;
with `--clean-first-frame P`, a share P of the clips gets a clean first frame (level 0) that conditions the rest
and is left out of the loss, as TI2V trains image-to-video.

Each step's batch, noise, timesteps and prompt drops depend only on `(seed, step)`, and torch's generator (dropout
in a `--config` that sets it) is seeded from `--seed` and kept in the checkpoint, so a resumed run continues
exactly: a `--steps` run interrupted and resumed with the same command logs the losses and learning rates of an
uninterrupted one (the checkpoint keeps where its cool-down started). Resumed with another `--steps`, or with
`--minutes`, the cool-down covers what is left of that invocation's budget. The checkpoint also keeps the
optimizer, the EMA weights, the step, the model config and the arguments: on `--resume`, an option left out takes
the run's value, not the default (`--config` too: the config kept in the checkpoint; another is refused); the run's
seed, batch, shape counts, noise-level sampling and shift, precision and `--freeze-text-encoder` cannot change
(another value is refused), while `--lr`, `--weight-decay`, `--warmup`, `--ema`, `--image-share`,
`--image-prompts`, `--frame-noise` and `--clean-first-frame` can (a fine-tune that continues a run with another
data mix). The budget and bookkeeping (`--minutes`, `--steps`, `--decay`,
`--save-every`, `--keep-every`, `--threads`) and `--init` are each invocation's own, except that a run resumed with
its own `--steps` and no `--decay` continues its cool-down at the run's `--decay`. A checkpoint from before an option
whose default has changed since resumes with what that run trained with (`LEGACY_VALUES`). A loss that is not finite
ends the run without saving the weights that broke it over the last checkpoint (one saved by `--save-every` on the
step before may hold them already).

Written to `--out`:
    checkpoint.pt   model, EMA, optimizer, step, RNG state, config, arguments, where the `--steps` cool-down
                    started (every `--save-every` steps and at the end)
    loss.csv        one row per step: the loss curve and the time per step (wall and CPU)
    pipeline/       EMA weights as a diffusers folder (`TestbedPipeline.from_pretrained`), refreshed with each
                    checkpoint: model_index.json, transformer/, text_encoder/, tokenizer/, scheduler/
    snapshots/      with --keep-every N: a copy of pipeline/ every N steps (step_000500/, ...)
A folder holding a run's loss.csv (with a step logged), pipeline/ or snapshots/ but no checkpoint.pt is refused, with
or without --resume: a new run there would overwrite them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..pipelines.testbed import (
    TestbedPipeline,
    build_components,
    encode_prompts,
    load,
    per_token_timesteps,
    space_to_depth,
    space_to_depth_factor_of,
    testbed_config,
)
from .data import IMAGE_PROMPTS, PROMPT_WORDS, SHAPE_COUNT_WEIGHTS, check_shape_counts, make_batch, train_buckets

CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss.csv"
PIPELINE_DIR = "pipeline"
INIT_PARTS = ("transformer", "text_encoder")
SNAPSHOT_DIR = "snapshots"
LOG_FIELDS = (
    "step",
    "loss",
    "lr",
    "frames",
    "height",
    "width",
    "batch",
    "tokens",
    "step_seconds",
    "cpu_seconds",
    "train_seconds",
)
UNCOND_PROBABILITY = 0.1
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal")
MIN_LR_RATIO = 0.02  # where --decay ends, as a fraction of --lr
# On --resume an option left out takes the run's value, kept in its checkpoint: before, it fell back to its default
# and the run went on with other data. These make the run what it is: given with another value, they are refused.
FIXED_ON_RESUME = (
    "seed",
    "batch",
    "shape_counts",
    "timestep_sampling",
    "timestep_shift",
    "precision",
    "freeze_text_encoder",
)
# These a resume may change: the fine-tunes of docs/testbed/experiments.md and the README continue a run with
# another data mix or learning rate. The rest (budget, --decay, saving, threads, --init) are each invocation's own.
CHANGEABLE_ON_RESUME = (
    "lr",
    "weight_decay",
    "warmup",
    "ema",
    "image_share",
    "image_prompts",
    "frame_noise",
    "clean_first_frame",
)
# What runs from before an option trained with, where its default has changed since: a checkpoint without the
# option ran these (uniform noise levels and shape counts (0.5, 0.3, 0.2) before 6ed39af, clips only before 724bd9e).
LEGACY_VALUES = {"timestep_sampling": "uniform", "shape_counts": (0.5, 0.3, 0.2), "image_share": 0.0}
CONFIG_KEYS = ("transformer", "text_encoder", "vocabulary", "max_sequence_length", "scheduler")  # what training reads
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # pipelines.text.word_tokenizer needs them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m diffsparse.testbed.train",
        description="Train the tiny testbed video model (rectified flow, CPU). Stops at --minutes or --steps.",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, loss log, exported pipeline")
    p.add_argument(
        "--minutes", type=float, default=None, help="wall-time budget of this invocation (default 60 without --steps)"
    )
    p.add_argument("--steps", type=int, default=None, help="stop when the run reaches this total step count")
    p.add_argument("--batch", type=int, default=16, help="clips per step at 9x32x32 px; other sizes get as many tokens")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (after a linear warm-up)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument(
        "--decay",
        type=float,
        default=0.2,
        help="fraction of the budget (--steps or --minutes, whichever ends first) at its end over which the "
        "learning rate falls linearly to 2%% of --lr (0: constant after warm-up; default %(default)s); a run resumed "
        "with its own --steps continues its cool-down (at the run's --decay when left out), otherwise it covers "
        "what this invocation has left",
    )
    p.add_argument(
        "--image-share",
        type=float,
        default=0.7,
        help="fraction of steps trained on single frames (diffsparse.testbed.data.IMAGE_BUCKETS) instead of clips "
        "(default %(default)s)",
    )
    p.add_argument(
        "--image-prompts",
        choices=IMAGE_PROMPTS,
        default="motion",
        help="prompts of the single-frame steps: motion (the default; the drawn motion is named, \"a red circle "
        "moving left\", though one frame cannot show it) or still (the shapes only, \"a red circle\")",
    )
    p.add_argument(
        "--timestep-shift",
        type=float,
        default=None,
        help="shift of the training noise levels, t = s u / (1 + (s - 1) u) (default: the sampling scheduler's "
        "shift; below it trains more on the low noise levels where outlines are drawn)",
    )
    p.add_argument(
        "--timestep-sampling",
        choices=TIMESTEP_SAMPLINGS,
        default="logit-normal",
        help="distribution of u before the shift: logit-normal (the default; sigmoid of a standard normal: more "
        "weight on the middle noise levels), or uniform (the density sampling visits)",
    )
    p.add_argument(
        "--frame-noise",
        type=float,
        default=0.0,
        help="probability that a clip gets its own noise level per frame (diffusion forcing) instead of one for the "
        "whole clip: a clear frame beside noisy ones makes the motion words worth learning, since the noisy frames "
        "must then be placed from the prompt (default %(default)s: one level per clip)",
    )
    p.add_argument(
        "--clean-first-frame",
        type=float,
        default=0.0,
        help="probability that a clip gets its first frame clean, as a condition the loss does not score (Wan 2.2 "
        "TI2V's image-to-video training): the rest of the clip must then follow the prompt's motion from it "
        "(default %(default)s)",
    )
    p.add_argument(
        "--shape-counts",
        type=_shape_counts,
        default=SHAPE_COUNT_WEIGHTS,
        help="comma-separated probabilities of drawing 1, 2, 3 shapes per training clip (a shape that finds no room "
             "is left out, so fewer clips show several; default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: forward and backward under torch.autocast (weights, optimizer and EMA stay float32); faster "
        "only on CPUs with native bf16 (avx512_bf16 or amx_bf16 in lscpu), about 2.5x slower without",
    )
    p.add_argument(
        "--freeze-text-encoder",
        action="store_true",
        help="keep the text encoder at its seeded initial weights and train the transformer only: the words stay "
        "as distinct as at initialisation, which training otherwise erodes for words the loss does not yet reward "
        "(text_separation in diffsparse.testbed.fidelity)",
    )
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights (0 disables)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the initial weights, every batch and torch's generator (dropout) (--resume: the run's own)",
    )
    p.add_argument("--save-every", type=int, default=250, help="steps between checkpoints (and pipeline exports)")
    p.add_argument(
        "--keep-every",
        type=int,
        default=0,
        help="also keep a copy of the exported pipeline every N steps in <out>/snapshots/step_N (0: never)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="model config JSON (default: the testbed config); the transformer's in_channels, 3 * f**2, sets the "
        "space-to-depth factor f, as the pipeline reads it (a \"space_to_depth\" key must agree); its vocabulary "
        "must hold every word of the training prompts",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/checkpoint.pt when it exists; the run's options where left out (not the "
        "defaults), its model config where --config is; another --config, --seed, --batch, --shape-counts, "
        "--timestep-sampling, --timestep-shift, --precision or --freeze-text-encoder than the run's is refused; "
        "budget, --decay (but see --decay) and saving are this invocation's",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start a new run from the weights of a testbed pipeline folder (the shipped pipelines/weights/testbed, "
        "a run's pipeline/ or one of its snapshots) instead of the seeded initialisation; a fine-tune starts fresh "
        "(new optimizer, step 0); a resumed run takes its trained parts from the checkpoint",
    )
    p.add_argument(
        "--init-parts",
        default="transformer,text_encoder",
        help="comma list of the components --init loads (transformer, text_encoder); the others keep the seeded "
        "initialisation: `transformer` with --freeze-text-encoder pairs trained weights with a fresh, fixed encoder",
    )
    args = p.parse_args(argv)
    args.init_parts = tuple(part.strip() for part in args.init_parts.split(",") if part.strip())
    unknown = sorted(set(args.init_parts) - set(INIT_PARTS))
    if unknown or not args.init_parts:
        p.error(f"--init-parts must be a non-empty comma list of {', '.join(INIT_PARTS)}, got {unknown or 'nothing'}")
    if args.init is not None and not (args.init / "model_index.json").is_file():
        p.error(f"--init must be a testbed pipeline folder with model_index.json, got {str(args.init)!r}")
    if args.minutes is None and args.steps is None:
        args.minutes = 60.0
    for name in ("batch", "threads", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.keep_every < 0:
        p.error(f"--keep-every must be 0 (never) or a positive step count, got {args.keep_every}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.minutes is not None and not args.minutes > 0:  # also refuses nan
        p.error(f"--minutes must be positive, got {args.minutes}")
    for name in ("lr", "weight_decay"):
        if not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be a step count >= 0, got {args.warmup}")
    if not 0 <= args.seed < 2**32:  # numpy's generators take 32 bits
        p.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.config is not None and not args.config.is_file():
        p.error(f"--config must be a model config JSON file, got {str(args.config)!r}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out must be a folder (new or a run's), got the file {str(args.out)!r}")
    if args.init is None and args.init_parts != INIT_PARTS:
        p.error("--init-parts chooses what --init loads: give --init too")
    if not 0 <= args.decay <= 1:
        p.error(f"--decay must be a fraction in [0, 1], got {args.decay}")
    if not 0 <= args.image_share < 1:
        p.error(f"--image-share must be a fraction in [0, 1), got {args.image_share}")
    for name in ("frame_noise", "clean_first_frame"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be a probability in [0, 1], got {getattr(args, name)}")
    if args.timestep_shift is not None and not args.timestep_shift > 0:  # also refuses nan
        p.error(f"--timestep-shift must be positive, got {args.timestep_shift}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    args.given = _given_flags(p, argv, args)
    return args


def _given_flags(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> frozenset:
    """The options on the command line (`args`' names): parsed again into a namespace holding a marker for each,
    which argparse keeps in place of the default where an option is not given."""
    unset = object()
    again = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return frozenset(name for name, value in vars(again).items() if value is not unset)


def _shape_counts(text: str) -> tuple[float, ...]:
    try:
        counts = tuple(float(v) for v in text.split(","))
        check_shape_counts(counts)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return counts


def _step_generator(seed: int, step: int) -> torch.Generator:
    # Independent of the data stream (which uses default_rng([seed, step])).
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, step, 1]).integers(2**62)))


def flow_matching_loss(
    components: dict,
    videos: torch.Tensor,
    prompts: list[str],
    generator: torch.Generator,
    shift: float,
    text_length: int,
    timestep_sampling: str = "logit-normal",
    frame_noise: float = 0.0,
    clean_first_frame: float = 0.0,
) -> torch.Tensor:
    """Rectified-flow loss of one batch of pixel videos `(B, 3, F, H, W)` in [-1, 1] (see the module docstring).

    `frame_noise`: the probability that a clip of several frames gets one noise level per frame instead of one
    for the whole clip (see `--frame-noise`). `clean_first_frame`: the probability that a clip of several
    frames gets its first frame clean, as a condition the loss does not score (see `--clean-first-frame`). At 0
    both draw exactly the batches of runs made before the options.
    """
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {timestep_sampling=}")
    for name, value in (("frame_noise", frame_noise), ("clean_first_frame", clean_first_frame)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {name}={value}")
    # The factor the pipeline samples with: a fixed 2 fed a 48-channel --config 12 channels.
    x0 = space_to_depth(videos, space_to_depth_factor_of(components["transformer"].config.in_channels))
    b, frames = x0.shape[0], x0.shape[2]
    noise = torch.randn(x0.shape, generator=generator)

    def noise_levels(*shape: int) -> torch.Tensor:
        if timestep_sampling == "uniform":
            u = torch.rand(shape, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(shape, generator=generator))
        return shift * u / (1 + (shift - 1) * u)

    t = noise_levels(b)
    drop = torch.rand(b, generator=generator) < UNCOND_PROBABILITY
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    if frame_noise > 0 and frames > 1:
        per_frame = torch.rand(b, generator=generator) < frame_noise
        t = torch.where(per_frame.unsqueeze(1), noise_levels(b, frames), t.unsqueeze(1))
    if clean_first_frame > 0 and frames > 1:
        clean = torch.rand(b, generator=generator) < clean_first_frame
        t = t.unsqueeze(1).repeat(1, frames) if t.ndim == 1 else t.clone()
        t[clean, 0] = 0.0
    return velocity_errors(components, x0, prompts, noise, t, text_length).mean()


def velocity_errors(
    components: dict, x0: torch.Tensor, prompts: list[str], noise: torch.Tensor, t: torch.Tensor, text_length: int
) -> torch.Tensor:
    """Per-clip mean squared error `(B,)` of the predicted velocity for clean inputs `x0` (space-to-depth pixels)
    at noise levels `t` with `noise`: `(B,)`, one level per clip, or `(B, F)`, one per frame (the transformer
    then gets one timestep per token, the path Wan 2.2 TI2V uses). A frame at level 0 is given clean as a
    condition (TI2V's first frame) and left out of its clip's error.

    The training objective per clip; `diffsparse.testbed.fidelity.prompt_sensitivity` calls it with altered
    prompts to see which prompt words the model uses.
    """
    b = x0.shape[0]
    tt = t.view(b, 1, -1, 1, 1)  # broadcasts over frames when t has one level per clip
    x_t = (1 - tt) * x0 + tt * noise
    timestep = t * 1000
    if t.ndim == 2:
        timestep = per_token_timesteps(timestep, x0, components["transformer"].config.patch_size)
    embeds = encode_prompts(components["tokenizer"], components["text_encoder"], prompts, text_length)
    velocity = components["transformer"](
        hidden_states=x_t, timestep=timestep, encoder_hidden_states=embeds, return_dict=False
    )[0]
    errors = (velocity.float() - (noise - x0)).pow(2)
    if t.ndim == 1:
        return errors.flatten(1).mean(1)
    per_frame = errors.mean(dim=(1, 3, 4))
    scored = (t > 0).to(per_frame.dtype)
    return (per_frame * scored).sum(1) / scored.sum(1).clamp(min=1)


class _EMA:
    """Exponential moving average of the trainable modules' parameters (warm-up: decay (1 + n) / (10 + n))."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {name: copy.deepcopy(m).requires_grad_(False) for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        weight = 1 - min(self.decay, (1 + step) / (10 + step))
        for name, module in modules.items():
            torch._foreach_lerp_(list(self.shadow[name].parameters()), list(module.parameters()), weight)

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.shadow.items():
            m.load_state_dict(state[name])


@contextlib.contextmanager
def _written_beside(path: Path):
    """Yields a path beside `path` to write, swapped in for `path` once written: a failure (a full disk, a kill)
    leaves `path` as it was, and no partial file (a checkpoint's is tens of MB)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_save(obj, path: Path) -> None:
    with _written_beside(path) as tmp:
        torch.save(obj, tmp)


def export_pipeline(components: dict, weights: dict[str, torch.nn.Module], folder: Path) -> None:
    """Write a `TestbedPipeline` with `weights` (e.g. the EMA modules) to `folder` via `save_pretrained`."""
    pipe = TestbedPipeline(
        tokenizer=components["tokenizer"],
        text_encoder=weights["text_encoder"],
        transformer=weights["transformer"],
        scheduler=components["scheduler"],
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _open_log(path: Path, keep_until_step: int):
    """The loss log opened for appending, without rows past `keep_until_step` (left by a run that died)."""
    rows = []
    if path.exists() and keep_until_step > 0:
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
    # Rewritten beside and swapped in: truncating in place, a run stopped (or a full disk) before the rows were back
    # lost the whole curve of the steps the checkpoint holds.
    with _written_beside(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    f = path.open("a", newline="")
    return f, csv.DictWriter(f, fieldnames=LOG_FIELDS)


def _load_initial_weights(components: dict, folder: Path, parts: tuple[str, ...]) -> None:
    """Copy `parts` of the testbed pipeline saved in `folder` into `components` (same config, strictly)."""
    source = load(path=folder)
    for part in parts:
        try:
            components[part].load_state_dict(getattr(source, part).state_dict())
        except RuntimeError as error:
            raise SystemExit(f"--init {folder}: its {part} does not fit this run's model config ({error})") from None
    print(f"starting from {', '.join(parts)} of {folder}", file=sys.stderr)


def _model_part(config: dict) -> dict:
    """`config` without its `_comment`: rewording the comment must not stop a run from resuming."""
    return {key: value for key, value in config.items() if key != "_comment"}


def _tokens(videos: torch.Tensor, transformer_config) -> int:
    """Transformer tokens in a batch of pixel videos `(B, 3, F, H, W)`: space-to-depth (the factor
    `TestbedPipeline.space_to_depth_factor` reads from `in_channels`), then the config's patch, whatever
    `--config` sets them to."""
    factor = space_to_depth_factor_of(transformer_config.in_channels)
    p_t, p_h, p_w = transformer_config.patch_size
    batch, _, frames, height, width = videos.shape
    return batch * (frames // p_t) * (height // factor // p_h) * (width // factor // p_w)


def _check_training_sizes(transformer_config, buckets) -> None:
    """`ValueError` unless the space-to-depth factor times the patch divides every training size of `buckets`."""
    factor = space_to_depth_factor_of(transformer_config.in_channels)
    p_t, p_h, p_w = transformer_config.patch_size
    for bucket in buckets:
        if bucket.frames % p_t or bucket.height % (factor * p_h) or bucket.width % (factor * p_w):
            raise ValueError(
                f"patch_size={list(transformer_config.patch_size)} with the space-to-depth factor {factor} (from "
                f"in_channels={transformer_config.in_channels}) must divide every training size (frames, then "
                f"pixels / {factor}), got the bucket {bucket.frames}x{bucket.height}x{bucket.width}"
            )


def _read_config(path: Path) -> dict:
    """The model config JSON at `path`, checked for what training reads before anything is built or written."""
    config = json.loads(path.read_text())
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"--config {path} must hold the keys {', '.join(CONFIG_KEYS)}; it lacks {missing}")
    # The tokenizer reads a word outside the vocabulary as <unk>: the model could never learn what a training word
    # missing there names, and before, every step logged a warning about it.
    lacking = sorted((set(SPECIAL_TOKENS) | PROMPT_WORDS) - set(config["vocabulary"]))
    if lacking:
        raise ValueError(f"--config {path}: the vocabulary must hold {', '.join(SPECIAL_TOKENS)} and every word of "
                         f"the training prompts (diffsparse.testbed.data.PROMPT_WORDS); it lacks {lacking}")
    return config


def _as_flag(name: str, value) -> str:
    """`value` of the option `name` as typed on the command line."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or value is None:
        return flag if value else f"no {flag}"
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f"{flag} {value}"


def _resumed_args(args: argparse.Namespace, run_args: dict, checkpoint_path: Path) -> argparse.Namespace:
    """A copy of `args` with the run's values (`run_args`, its checkpoint's) for the options the command line left
    out; `SystemExit` for an option of `FIXED_ON_RESUME` given with another value."""
    given = getattr(args, "given", None)  # None: a Namespace not made by parse_args, every option the caller's
    args = copy.copy(args)
    for name in (*FIXED_ON_RESUME, *CHANGEABLE_ON_RESUME):
        if name not in run_args and name not in LEGACY_VALUES:  # a checkpoint from before the option: its default
            continue
        run_value, value = run_args.get(name, LEGACY_VALUES.get(name)), getattr(args, name)
        if given is not None and name not in given:
            setattr(args, name, run_value)
        elif value != run_value:
            run, this = _as_flag(name, run_value), _as_flag(name, value)
            if name in FIXED_ON_RESUME:
                raise SystemExit(f"{checkpoint_path} was trained with {run}, this invocation has {this}: resume with "
                                 f"{run} or without the option, or choose another --out")
            print(f"resuming with {this} (the run had {run})", file=sys.stderr)
    return args


def _resumed_config(args: argparse.Namespace, config: dict, state: dict, checkpoint_path: Path):
    """The model config a resume trains and its --config path: the run's (the config kept in its checkpoint) where
    the command leaves --config out, else `config`, read from `args.config`; `SystemExit` where that is not the
    run's."""
    run_path = state.get("args", {}).get("config")
    run_path = Path(run_path) if run_path else None
    given = getattr(args, "given", None)  # None: a Namespace not made by parse_args, its config the caller's
    if given is not None and "config" not in given:
        return state["config"], run_path
    if _model_part(state["config"]) != _model_part(config):
        run, this = _config_flag(run_path), _config_flag(args.config)
        # The run's file may have changed since: then only the copy in the checkpoint is the run's.
        advice = "resume without --config" if run_path in (None, args.config) else (
            f"resume with {run} or without --config")
        raise SystemExit(f"{checkpoint_path} was trained with {run}, this invocation has {this}, another model "
                         f"config: {advice} (the run's config, kept in the checkpoint), or choose another --out")
    return config, args.config


def _config_flag(path: Path | None) -> str:
    return f"--config {path}" if path else "no --config (the testbed config)"


def _earlier_results(out: Path) -> list[str]:
    """What a run left in `out` that a new run there would overwrite."""
    left = [f"{name}/" for name in (PIPELINE_DIR, SNAPSHOT_DIR) if (out / name).exists()]
    if (out / LOSS_LOG).exists():
        with (out / LOSS_LOG).open(errors="replace") as f:
            _header, first_row = next(f, None), next(f, None)
        if first_row is not None:  # the header alone: a run that failed in its first step, nothing to keep
            left.insert(0, LOSS_LOG)
    return left


def _learning_rate(args: argparse.Namespace, step: int, cool_down_from: int, seconds: float) -> float:
    """The learning rate of `step` (0-based): a linear warm-up over `args.warmup` steps to `args.lr`, then, over the
    last `args.decay` of the budget (`args.steps` counted from `cool_down_from`, or `args.minutes` of which `seconds`
    have passed, whichever is further along), a linear fall to `MIN_LR_RATIO` of it.

    Example:
        >>> args = argparse.Namespace(lr=1e-3, warmup=0, decay=0.5, steps=100, minutes=None)
        >>> [round(_learning_rate(args, step, 0, 0.0), 6) for step in (0, 50, 75, 99)]
        [0.001, 0.001, 0.0005, 2e-05]
    """
    lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    if args.decay == 0:
        return lr
    done = 0.0
    if args.steps is not None:
        done = (step - cool_down_from) / max(1, args.steps - cool_down_from)
    if args.minutes is not None:
        done = max(done, seconds / (args.minutes * 60))
    return lr * max(MIN_LR_RATIO, min(1.0, (1 - done) / args.decay))


def _run_seed(seed: int) -> int:
    # torch's generator of a fresh run (dropout), independent of the data stream and the per-step noise.
    return int(np.random.default_rng([seed, 0, 2]).integers(2**62))


def train(args: argparse.Namespace) -> dict:
    """Run training as `args` says; returns a summary (steps done, seconds per step, paths)."""
    # The run's own torch generator, seeded or restored from the checkpoint; the caller's is left as it was.
    with torch.random.fork_rng(devices=[]):
        return _train(args)


def _train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = _read_config(args.config) if args.config else testbed_config()
    out: Path = args.out
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not args.resume:
        raise SystemExit(f"{checkpoint_path} exists: pass --resume to continue that run, or choose another --out")
    if not checkpoint_path.exists():
        # A finished run whose checkpoint was deleted to keep only its exported weights: a new run rewrote its loss
        # log and replaced its weights without a word.
        left = _earlier_results(out)
        if left:
            raise SystemExit(f"{out} holds {', '.join(left)} of an earlier run but no {CHECKPOINT} to continue it "
                             "from: choose another --out, or delete them to start a new run there")
    state = None
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        # The run's config where --config is left out: before, the testbed's, refused as another model config.
        config, config_path = _resumed_config(args, config, state, checkpoint_path)
        # The run's own options where left out (before, their defaults: the run went on with other data).
        args = _resumed_args(args, state.get("args", {}), checkpoint_path)
        args.config = config_path  # the checkpoint keeps naming the run's file (`_resumed_args` made a copy)
    # Before the run folder is made: a config the model cannot be built from, or whose space-to-depth and patch
    # do not divide the training sizes, failed inside the first step and left an empty run behind.
    components = build_components(config, seed=args.seed)
    buckets = train_buckets(args.image_share)
    _check_training_sizes(components["transformer"].config, buckets)
    out.mkdir(parents=True, exist_ok=True)

    if args.init is not None:  # resumed too: the parts it does not train keep --init's weights (the checkpoint's)
        _load_initial_weights(components, args.init, args.init_parts)
    trainable = {"transformer": components["transformer"].train()}
    if args.freeze_text_encoder:
        components["text_encoder"].eval().requires_grad_(False)
    else:
        trainable["text_encoder"] = components["text_encoder"].train()
    params = [p for m in trainable.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)

    step, train_seconds, ema_state, schedule = 0, 0.0, None, {}
    if state is not None:
        if set(state["model"]) != set(trainable):
            raise SystemExit(
                f"{checkpoint_path} trained {sorted(state['model'])}, this invocation trains {sorted(trainable)}: "
                "resume with the same --freeze-text-encoder setting"
            )
        for name, module in trainable.items():
            module.load_state_dict(state["model"][name])
        # The parts not trained, as the run had them (a frozen text encoder from --init); older checkpoints lack them.
        for name, weights in state.get("frozen", {}).items():
            components[name].load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        ema_state = state.get("ema")
        torch.set_rng_state(state["rng"])
        step, train_seconds = state["step"], state["train_seconds"]
        schedule = state.get("schedule") or {}  # older checkpoints lack it: the cool-down starts anew
        print(f"resuming {checkpoint_path} at step {step} ({train_seconds / 60:.1f} min trained)", file=sys.stderr)
    else:
        if args.resume:
            print(f"no {checkpoint_path} yet: starting a new run", file=sys.stderr)
        # Dropout in a --config draws from torch's generator: unseeded, a run depended on what the caller drew.
        torch.default_generator.manual_seed(_run_seed(args.seed))  # not `torch.manual_seed`: the GPUs' too
    # A resumed run may change --lr and --weight-decay: loading restored the checkpoint's (the flag was ignored).
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = args.lr, args.weight_decay
    # Made from the weights the run continues from: a run resumed with EMA that had none starts it from its trained
    # weights, not from the seeded ones.
    ema = _EMA(trainable, args.ema) if args.ema > 0 else None
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    # Where the --steps cool-down is measured from: resumed with the run's own --steps, where the run started it
    # (an interrupted run goes on as it would have), else where this invocation starts.
    same_steps = args.steps is not None and schedule.get("steps") == args.steps
    cool_down_from = schedule["from"] if same_steps else step
    # The run's own cool-down where the command leaves --decay out: else the default's (0.2) replaced it. (A caller's
    # own Namespace, without `given`, is taken as it is.)
    run_decay = (state or {}).get("args", {}).get("decay")
    given = getattr(args, "given", None)
    if same_steps and run_decay is not None and given is not None and "decay" not in given and args.decay != run_decay:
        print(f"resuming with the run's --decay {run_decay:g}", file=sys.stderr)
        args = copy.copy(args)
        args.decay = run_decay

    def save() -> None:
        # The export first: a checkpoint written before an export that then failed claimed a step pipeline/ never
        # got, and a resume to the same --steps ran nothing and left it stale. The other way round, a failed
        # checkpoint leaves pipeline/ a few steps ahead, which the resume recomputes bit for bit and rewrites.
        weights = ema.shadow if ema is not None else trainable
        export_pipeline(components, {"text_encoder": components["text_encoder"], **weights}, out / PIPELINE_DIR)
        _atomic_save(
            {
                "step": step,
                "train_seconds": train_seconds,
                "model": {name: m.state_dict() for name, m in trainable.items()},
                "frozen": {name: components[name].state_dict() for name in INIT_PARTS if name not in trainable},
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "config": config,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "given"},
                "schedule": {"from": cool_down_from, "steps": args.steps},
            },
            checkpoint_path,
        )

    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the step, save, exit cleanly
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log_file, log = _open_log(out / LOSS_LOG, step)
    deadline = time.monotonic() + args.minutes * 60 if args.minutes is not None else math.inf
    shift = args.timestep_shift or float(components["scheduler"].config.shift)
    text_length = config["max_sequence_length"]
    first_step, started = step, time.monotonic()
    diverged = False

    smoothed = None
    progress = tqdm(total=args.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    try:
        while (args.steps is None or step < args.steps) and time.monotonic() < deadline and stop["signal"] is None:
            wall, cpu = time.perf_counter(), time.process_time()
            lr = _learning_rate(args, step, cool_down_from, time.monotonic() - started)
            for group in optimizer.param_groups:
                group["lr"] = lr
            videos, prompts = make_batch(args.seed, step, args.batch, buckets, args.shape_counts, args.image_prompts)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = flow_matching_loss(
                    components,
                    videos,
                    prompts,
                    _step_generator(args.seed, step),
                    shift,
                    text_length,
                    args.timestep_sampling,
                    args.frame_noise,
                    args.clean_first_frame,
                )
            if not torch.isfinite(loss):
                diverged = True  # the weights now broke the loss: not saved over the last good checkpoint
                # With no checkpoint yet, the rerun goes to a fresh --out: this one holds the log, which is refused.
                advice = ("lower --lr or resume from the checkpoint" if checkpoint_path.exists() else
                          "no checkpoint yet: lower --lr and start again in another --out (or delete "
                          f"{out / LOSS_LOG})" if _earlier_results(out) else "no checkpoint yet: lower --lr")
                raise FloatingPointError(f"loss is {loss.item()} at {step=}; {advice}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if ema is not None:
                ema.update(trainable, step)
            step += 1
            step_seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
            train_seconds += step_seconds
            _, _, frames, height, width = videos.shape
            log.writerow(
                {
                    "step": step,
                    "loss": f"{loss.item():.6f}",
                    "lr": f"{lr:.3g}",
                    "frames": frames,
                    "height": height,
                    "width": width,
                    "batch": videos.shape[0],
                    "tokens": _tokens(videos, components["transformer"].config),
                    "step_seconds": f"{step_seconds:.3f}",
                    "cpu_seconds": f"{cpu_seconds:.3f}",
                    "train_seconds": f"{train_seconds:.1f}",
                }
            )
            log_file.flush()
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            progress.set_postfix(loss=f"{smoothed:.4f}", s_per_step=f"{step_seconds:.2f}", refresh=False)
            progress.update()
            if step % args.save_every == 0:
                save()
            if args.keep_every and step % args.keep_every == 0:
                # Lets one long run also answer "what did the model look like after N steps / M minutes".
                if step % args.save_every:
                    save()
                snapshot = out / SNAPSHOT_DIR / f"step_{step:06d}"
                shutil.rmtree(snapshot, ignore_errors=True)
                shutil.copytree(out / PIPELINE_DIR, snapshot)
    finally:
        progress.close()
        if step > first_step and not diverged:
            save()
        log_file.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    elapsed = time.monotonic() - started
    done = step - first_step
    summary = {
        "step": step,
        "steps_this_run": done,
        "seconds_per_step": elapsed / done if done else None,
        "train_minutes_total": train_seconds / 60,
        "checkpoint": str(checkpoint_path),
        "pipeline": str(out / PIPELINE_DIR),
        "loss_log": str(out / LOSS_LOG),
        "stopped_by_signal": stop["signal"],
    }
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per checkpoint export would bury the training bar
    train(parse_args(argv))


if __name__ == "__main__":
    main()
