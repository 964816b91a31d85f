"""Does a generated video show what its prompt asks for? Shape, colour and motion scores for single-shape prompts.

    python -m diffsparse.testbed.fidelity                                   # shipped weights, evaluation size
    python -m diffsparse.testbed.fidelity --model runs/testbed60/pipeline --size 9x32x32
    python -m diffsparse.testbed.fidelity --model runs/testbed60/snapshots/step_002000 --size 9x32x32 --sensitivity-only
    python -m diffsparse.testbed.fidelity --size 9x32x32 --steering-only   # does the direction word steer motion?
    python -m diffsparse.testbed.fidelity --size 9x32x32 --two-stage       # first frame as an image, then the clip
    python -m diffsparse.testbed.fidelity --two-stage --still-candidates 4  # ... from the still with room to move

Eyeballing a grid of frames cannot tell "ragged blobs" from "shapes" reproducibly, so every video of a fixed set
of single-shape prompts (every shape x every direction) is scored frame by frame:

- the shape's pixels are those nearer the prompted colour than the frame's background (its median colour; the
  median of its edge when much of the frame is near the prompted colour, as a large shape on a small canvas),
  within `COLOUR_TOLERANCE` of the prompted colour, and nearer it than any other prompt colour by chromaticity
  (each channel's share of the pixel's sum, which blending with a dark background keeps): yellow and orange are
  0.35 apart in RGB, within the tolerance, so without this a shape of one scored as the other;
- `shape_iou`: intersection over union of those pixels with the prompted shape drawn at their centroid with their
  area (one template per frame, so size is free but outline is not; a frame without the shape scores 0); a
  fragmented or ragged blob scores low;
- `kind_accuracy`: over the frames with the shape present, how often the prompted shape fits better than the
  other shapes (circle, square, triangle);
- `present`: share of frames whose shape has at least a third of the training shapes' smallest area;
- `direction_accuracy`: share of videos whose centroid moves along the prompted direction by at least half the
  prompted speed (least-squares slope over the frames with the shape present).

Image-to-video from a training clip's first frame (`--first-frame`) fixes shape, colour and place, but the place
hints the direction (a shape near the left edge rarely moves left). `steering` (`--steering-only`) removes the hint:
each shape starts at the centre and is sampled with every direction word from the same first frame and seed;
`steered` is the share that moves most along the prompted way (chance: one in four).
Two-stage text-to-video (`--two-stage`) draws each first frame from the model itself, as a single image of the
shapes-only prompt, and then samples the clip from it with the full prompt: the placement is the model's, so the
direction score measures the word in a generation that starts from text alone.

The same scores of the training data itself (rendered clips of the same prompts) are the ceiling: they come out
below 1 only through anti-aliasing at the outline.

`prompt_sensitivity` asks the model more directly whether it uses each prompt word: how much its denoising error
on training clips grows when the colour, the shape kind or the direction in the prompt is wrong (0: the word is
ignored). It needs no sampling (`--sensitivity-only` runs just this and `text_separation`), so it can follow a
word starting to matter across a run's snapshots. `text_separation` looks one step earlier: how far apart the
text path keeps prompts that differ in one word, before cross-attention reads them.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import add_two_stage_options
from .data import (
    COLOURS,
    DIRECTIONS,
    RADIUS_RANGE,
    REACH,
    SHAPES,
    SPEEDS,
    Clip,
    Shape,
    _signed_distance,
    _start,
    article,
    render,
)

COLOUR_TOLERANCE = 0.4  # RGB distance in [0, 1] units; the closest two prompt colours (yellow, orange) are 0.35 apart
MIN_AREA = math.pi * RADIUS_RANGE[0] ** 2 / 3  # pixels: a third of the smallest training shape
MIN_SPEED_FRACTION = 0.5
PLAIN_BACKGROUND = (0.02, 0.02, 0.02)  # the darkest training background: scored clips and first frames use it


@dataclass(frozen=True)
class Request:
    """One single-shape prompt and what it asks for."""

    colour: str
    kind: str
    direction: str
    speed: str = ""

    @property
    def prompt(self) -> str:
        shape = f"{article(self.colour)} {self.colour} {self.kind} moving {self.direction}"
        return " ".join(filter(None, (shape, self.speed)))


def requests() -> list[Request]:
    """Every shape x every direction, colours taken in turn (12 prompts at the plain speed)."""
    colours = list(COLOURS)
    return [
        Request(colours[i % len(colours)], kind, direction)
        for i, (kind, direction) in enumerate((k, d) for k in SHAPES for d in DIRECTIONS)
    ]


@dataclass
class Scores:
    """Mean scores over videos (see the module docstring); `videos` is how many were scored."""

    videos: int
    shape_iou: float
    kind_accuracy: float
    present: float
    direction_accuracy: float


def _shape_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    """`frame` `(3, H, W)` in [0, 1] -> bool `(H, W)`: pixels of the prompted colour (see the module docstring)."""
    pixels = frame.reshape(3, -1).T
    target = np.asarray(COLOURS[colour])
    to_target = np.linalg.norm(pixels - target, axis=1)
    colours = _chromaticity(np.array(list(COLOURS.values())))
    nearest_colour = np.linalg.norm(_chromaticity(pixels)[:, None] - colours, axis=2).argmin(axis=1)
    nearest = nearest_colour == list(COLOURS).index(colour)
    candidates = (to_target < COLOUR_TOLERANCE) & nearest
    background = np.median(pixels, axis=0)
    if candidates.mean() > 0.3:
        # The frame's median is a blend of the shape's colour once the shape and its outline cover half of it (a
        # training-sized circle fills up to 79% of 16 x 16), and the outline or the whole shape vanished: the
        # frame's edge, which it covers far less of, is the background then. Below 30% (every shape at 32 x 32 and
        # up) the whole frame's median stays, and the scores of the shipped runs with it.
        edge = np.concatenate([frame[:, 0], frame[:, -1], frame[:, 1:-1, 0], frame[:, 1:-1, -1]], axis=1).T
        background = np.median(edge, axis=0)
    to_background = np.linalg.norm(pixels - background, axis=1)
    return ((to_target < to_background) & candidates).reshape(frame.shape[1:])


def _chromaticity(rgb: np.ndarray) -> np.ndarray:
    """Each channel's share of the `(..., 3)` colour's sum (black: equal shares)."""
    total = rgb.sum(axis=-1, keepdims=True)
    return np.where(total > 1e-6, rgb / np.maximum(total, 1e-6), 1 / 3)


def _template_iou(mask: np.ndarray, kind: str) -> float:
    """IoU of `mask` with shape `kind` of the same area centred at the mask's centroid."""
    ys, xs = np.nonzero(mask)
    radius = math.sqrt(len(xs) / math.pi)  # every shape kind has the area of the circle of this radius
    y = np.arange(mask.shape[0])[:, None] + 0.5
    x = np.arange(mask.shape[1])[None, :] + 0.5
    template = _signed_distance(kind, x - (xs.mean() + 0.5), y - (ys.mean() + 0.5), radius) < 0
    return float((template & mask).sum() / (template | mask).sum())


def score_video(video: np.ndarray | torch.Tensor, request: Request) -> dict:
    """Scores of one video `(F, 3, H, W)` in [0, 1] (the layout `sample` returns) for `request`."""
    video = np.asarray(video, dtype=np.float64)
    masks = _present_masks(video, request.colour)
    fits = [{kind: _template_iou(mask, kind) for kind in SHAPES} for mask in masks.values()]
    velocity = _velocity(masks)
    return {
        "shape_iou": sum(fit[request.kind] for fit in fits) / len(video),  # a frame without the shape scores 0
        "kind_accuracy": float(np.mean([max(fit, key=fit.get) == request.kind for fit in fits])) if fits else 0.0,
        "present": len(masks) / len(video),
        "direction_accuracy": float(_moves_along(velocity, request.direction, SPEEDS[request.speed])),
    }


def _present_masks(video: np.ndarray, colour: str) -> dict[int, np.ndarray]:
    """`{frame index: shape mask}` of the frames of `video` `(F, 3, H, W)` where the `colour` shape is present."""
    masks = {f: _shape_mask(frame, colour) for f, frame in enumerate(video)}
    return {f: mask for f, mask in masks.items() if mask.sum() >= MIN_AREA}


def _velocity(masks: dict[int, np.ndarray]) -> np.ndarray | None:
    """Pixels per frame `(vx, vy)`: least-squares slope of the masks' centroids over frames; None below two."""
    if len(masks) < 2:
        return None
    f = np.asarray(list(masks), dtype=np.float64)
    x, y = np.asarray([(np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()) for m in masks.values()]).T
    return np.array([np.polyfit(f, x, 1)[0], np.polyfit(f, y, 1)[0]])


def _moves_along(velocity: np.ndarray | None, direction: str, speed: float) -> bool:
    """Does `velocity` go `direction` by at least `MIN_SPEED_FRACTION` of `speed` pixels per frame?"""
    if velocity is None:
        return False
    return float(velocity @ np.asarray(DIRECTIONS[direction], dtype=np.float64)) >= MIN_SPEED_FRACTION * speed


def motion_direction(video: np.ndarray | torch.Tensor, colour: str) -> str | None:
    """Which of `DIRECTIONS` the `colour` shape of `video` `(F, 3, H, W)` moves along most, or None when it moves
    less than `MIN_SPEED_FRACTION` of the plain speed that way (or is in fewer than two frames)."""
    return _main_direction(_velocity(_present_masks(np.asarray(video, dtype=np.float64), colour)))


def _main_direction(velocity: np.ndarray | None) -> str | None:
    if velocity is None:
        return None
    best = max(DIRECTIONS, key=lambda d: float(velocity @ np.asarray(DIRECTIONS[d], dtype=np.float64)))
    return best if _moves_along(velocity, best, SPEEDS[""]) else None


def _mean(scores: list[dict]) -> Scores:
    return Scores(len(scores), *(float(np.mean([s[k] for s in scores])) for k in list(scores[0])))


def _check_seeds(seeds) -> None:
    # No seed, no video: before, the mean of no scores ended in a bare IndexError.
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r}: must be an int of at least 1 (seeds 0 .. seeds-1)")


def request_clip(rng: np.random.Generator, request: Request, frames: int, height: int, width: int) -> Clip:
    """A training-data clip showing exactly `request` (one shape, dark background), placed as training places."""
    ux, uy = DIRECTIONS[request.direction]
    step = SPEEDS[request.speed]
    radius = float(rng.uniform(*RADIUS_RANGE))
    reach = REACH[request.kind] * radius
    x0 = _start(rng, width, reach, ux * step * (frames - 1))
    y0 = _start(rng, height, reach, uy * step * (frames - 1))
    shape = Shape(request.kind, request.colour, radius, x0, y0, ux * step, uy * step)
    return Clip(frames, height, width, PLAIN_BACKGROUND, (shape,), request.direction, request.speed)


def reference_scores(frames: int, height: int, width: int, seeds: int = 2) -> Scores:
    """The scores of the training data for the same prompts and size: the ceiling a model can reach."""
    _check_seeds(seeds)
    scored = []
    for seed in range(seeds):
        rng = np.random.default_rng([seed, 7])
        for request in requests():
            video = (render(request_clip(rng, request, frames, height, width)).permute(1, 0, 2, 3) + 1) / 2
            scored.append(score_video(video, request))  # video: (F, 3, H, W) in [0, 1]
    return _mean(scored)


# Noise levels of the sensitivity probe: where the outline is still being decided, not the last touches.
SENSITIVITY_NOISE_LEVELS = (0.3, 0.5, 0.7, 0.9)


def _altered(request: Request, word: str) -> Request:
    """`request` with its `word` field ("colour", "kind" or "direction") changed to the next value of its list."""
    values = {"colour": list(COLOURS), "kind": list(SHAPES), "direction": list(DIRECTIONS)}[word]
    current = getattr(request, word)
    return replace(request, **{word: values[(values.index(current) + 1) % len(values)]})


@torch.no_grad()
def prompt_sensitivity(
    model,
    frames: int,
    height: int,
    width: int,
    seeds: int = 2,
    noise_levels: tuple[float, ...] = SENSITIVITY_NOISE_LEVELS,
    first_frame_level: float | None = None,
) -> dict[str, float]:
    """How much the model's denoising error grows when one word of the prompt is wrong: does it use that word?

    For training clips of every `requests()` prompt, the velocity error (the training objective) at the noise
    levels `noise_levels`, with fixed noise, under the true prompt and under the prompt with its
    colour, shape kind or direction changed. Returns `{word: error(altered) / error(true) - 1}`: 0 when the model
    ignores the word, larger the more it relies on it. Unlike the scores of sampled videos, this needs no
    sampling and no shape detection, so it shows a word starting to matter long before samples change.

    Args:
        model: a testbed pipeline or a folder `diffsparse.pipelines.testbed.load` accepts.
        frames, height, width (`int`): clip size in frames and pixels, as the pipeline takes it (height and width
            multiples of the pixels one token covers: 4 in the shipped model).
        seeds (`int`): clips per prompt (placement and noise seeds 0 .. seeds-1).
        noise_levels (`tuple[float, ...]`, *optional*, defaults to `SENSITIVITY_NOISE_LEVELS`): flow-matching
            times in (0, 1] (1 = pure noise). The defaults are where outlines are decided; levels near 1 show
            what a word does to the layout of the whole clip.
        first_frame_level (`float`, *optional*): when given, the first frame is noised to this level and only
            the other frames to `noise_levels` (one noise level per frame, as `train --frame-noise` trains; at 0
            the first frame is a clean condition left out of the error, as `train --clean-first-frame` trains):
            with a clear first frame, the direction word says where the shape goes next.
    """
    check_noise_levels(noise_levels)
    _check_seeds(seeds)
    if first_frame_level is not None and not 0 <= first_frame_level <= 1:
        raise ValueError(f"first_frame_level must be in [0, 1] (0: given clean, not scored), got {first_frame_level}")
    from ..pipelines.testbed import TestbedPipeline, load, space_to_depth
    from .train import velocity_errors

    pipe = model if isinstance(model, TestbedPipeline) else load(path=model)
    # As the pipeline checks its own calls: a size off the token grid failed inside space_to_depth or the model.
    frames, height, width = pipe.check_video_size(frames, height, width, frames_name="frames")
    if first_frame_level is not None and frames < 2:
        # One frame is the first frame alone: at level 0 nothing is scored (0 / 0 = nan), else `noise_levels` unused.
        raise ValueError(f"first_frame_level sets the first frame apart from the others: it needs frames >= 2, got "
                         f"{frames=} with {first_frame_level=}")
    components = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "transformer": pipe.transformer}
    # The length the pipeline samples with (and the model trained with), not the shipped config's.
    text_length = pipe.tokenizer.model_max_length
    todo = [(seed, request) for seed in range(seeds) for request in requests()]
    clips = [request_clip(np.random.default_rng([seed, 11]), r, frames, height, width) for seed, r in todo]
    x0 = space_to_depth(torch.stack([render(c) for c in clips]), pipe.space_to_depth_factor)
    x0 = x0.to(pipe.transformer.device, pipe.transformer.dtype)
    generator = torch.Generator().manual_seed(0)
    errors: dict[str, list[torch.Tensor]] = {"true": [], "colour": [], "kind": [], "direction": []}
    for level in noise_levels:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = torch.full((len(todo),), level, device=x0.device, dtype=x0.dtype)
        if first_frame_level is not None:
            t = t[:, None].repeat(1, frames)
            t[:, 0] = first_frame_level
        for word, per_level in errors.items():
            prompts = [(r if word == "true" else _altered(r, word)).prompt for _, r in todo]
            per_level.append(velocity_errors(components, x0, prompts, noise, t, text_length))
    true = torch.cat(errors.pop("true")).mean()
    return {word: float(torch.cat(e).mean() / true - 1) for word, e in errors.items()}


@torch.no_grad()
def text_separation(model) -> dict[str, float]:
    """How far apart the text path keeps prompts that differ in one word, before the video is involved.

    For every `requests()` prompt, the relative change `|e' - e| / |e|` of its embedding after the transformer's
    text projection (`condition_embedder.text_embedder`, what cross-attention reads) when the colour, the shape
    kind or the direction is changed, averaged. A word the model has stopped telling apart comes out near 0,
    whatever the transformer could do with it.
    """
    from ..pipelines.testbed import TestbedPipeline, encode_prompts, load

    pipe = model if isinstance(model, TestbedPipeline) else load(path=model)
    text_length = pipe.tokenizer.model_max_length  # as the pipeline encodes prompts, whatever config built it

    def projected(prompts: list[str]) -> torch.Tensor:
        embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, text_length)
        return pipe.transformer.condition_embedder.text_embedder(embeds.to(pipe.transformer.dtype)).flatten(1)

    base = projected([r.prompt for r in requests()])
    separation = {}
    for word in ("colour", "kind", "direction"):
        other = projected([_altered(r, word).prompt for r in requests()])
        separation[word] = float(((other - base).norm(dim=1) / base.norm(dim=1)).mean())
    return separation


def fidelity(
    model,
    frames: int,
    height: int,
    width: int,
    seeds: int = 2,
    steps: int = 20,
    first_frame: bool = False,
    two_stage: bool = False,
    **sample_kwargs,
) -> Scores:
    """Generate every prompt of `requests()` with `seeds` seeds and score the videos.

    Args:
        model: what `diffsparse.pipelines.testbed.sample` accepts (a pipeline, a folder, components).
        frames, height, width (`int`): video size in frames and pixels.
        seeds (`int`): seeds 0 .. seeds-1, one batch of all prompts per seed.
        steps (`int`): denoising steps.
        first_frame (`bool`, *optional*, defaults to `False`): image-to-video: each video starts from the first
            frame of a training clip of its prompt (drawn per seed), given clean, so the shape, its colour and its
            place are fixed and only the motion is left to the prompt.
        two_stage (`bool`, *optional*, defaults to `False`): text-to-video in two samplings: each first frame is
            generated as a single image from the shapes-only prompt (`testbed.still_prompt`, the model's image
            mode), then the clip is sampled image-to-video from it with the full prompt. Nothing from the
            training data enters, so the direction score measures the word with no placement hint.
        **sample_kwargs: passed on to `sample` (e.g. `guidance_scale`).
    """
    from ..pipelines.testbed import sample

    _check_seeds(seeds)
    if first_frame and two_stage:
        raise ValueError("first_frame and two_stage each choose where the first frame comes from: give one of them")
    todo = requests()
    scored = []
    for seed in range(seeds):
        condition = None
        if first_frame:
            rng = np.random.default_rng([seed, 13])
            clips = [request_clip(rng, r, frames, height, width) for r in todo]
            condition = torch.stack([(render(c)[:, 0] + 1) / 2 for c in clips])  # (B, 3, H, W) in [0, 1]
        videos = sample(model, [r.prompt for r in todo], frames=frames, height=height, width=width, steps=steps,
                        seed=seed, first_frame=condition, two_stage=two_stage, **sample_kwargs)
        scored += [score_video(v, r) for v, r in zip(videos, todo)]
    return _mean(scored)


def steering_batch(seed: int, height: int, width: int) -> tuple[list[Request], torch.Tensor]:
    """The image-to-video prompts and first frames of `steering` for one seed.

    One base shape per kind (colours taken in turn, shifted per seed, radius drawn from the seed), drawn at the
    centre of a dark canvas, so no start position hints a direction; each base is asked for with every direction
    word on the same first frame. Returns the requests and their first frames `(B, 3, H, W)` in [0, 1].
    """
    rng = np.random.default_rng([seed, 17])
    colours = list(COLOURS)
    todo, frames = [], []
    for i, kind in enumerate(SHAPES):
        colour = colours[(i + seed * len(SHAPES)) % len(colours)]
        shape = Shape(kind, colour, float(rng.uniform(*RADIUS_RANGE)), width / 2, height / 2, 0.0, 0.0)
        first = (render(Clip(1, height, width, PLAIN_BACKGROUND, (shape,), "", ""))[:, 0] + 1) / 2
        for direction in DIRECTIONS:
            todo.append(Request(colour, kind, direction))
            frames.append(first)
    return todo, torch.stack(frames)


def steering(model, frames: int, height: int, width: int, seeds: int = 2, steps: int = 20, **sample_kwargs) -> dict:
    """Does the direction word steer sampled motion? Image-to-video with no placement hint (`steering_batch`).

    `fidelity(first_frame=True)` starts each video from a training clip's first frame, whose position already
    hints the direction (a shape near the left edge is rarely moving left), so a model deaf to the word scores
    well there. Here every base shape starts at the centre and is sampled once per direction word from the same
    first frame and seed. Returns:

    - `steered`: share of videos whose shape moves most along the prompted direction (`motion_direction`);
      chance for a model that moves but ignores the word is `1 / len(DIRECTIONS)`;
    - `moving`: share of videos with any clear motion (a model that never moves scores 0 on both);
    - `direction_accuracy`: the `score_video` direction score of the same videos (half the prompted speed or
      more along the prompted way);
    - `videos`: how many were scored.
    """
    from ..pipelines.testbed import sample

    _check_seeds(seeds)
    steered, moving, along = [], [], []
    for seed in range(seeds):
        todo, first_frames = steering_batch(seed, height, width)
        videos = sample(model, [r.prompt for r in todo], frames=frames, height=height, width=width, steps=steps,
                        seed=seed, first_frame=first_frames, **sample_kwargs)
        for video, request in zip(videos, todo):
            velocity = _velocity(_present_masks(np.asarray(video, dtype=np.float64), request.colour))
            chosen = _main_direction(velocity)
            steered.append(chosen == request.direction)
            moving.append(chosen is not None)
            along.append(_moves_along(velocity, request.direction, SPEEDS[request.speed]))
    return {"videos": len(steered), "steered": float(np.mean(steered)), "moving": float(np.mean(moving)),
            "direction_accuracy": float(np.mean(along)), "chance": 1 / len(DIRECTIONS)}


def parse_size(text: str) -> tuple[int, int, int]:
    """'FxHxW' (frames x height x width pixels) -> (F, H, W)."""
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be FRAMESxHEIGHTxWIDTH, e.g. 9x32x32, got {text!r}") from None
    if frames < 1 or height < 1 or width < 1 or height % 4 or width % 4:  # the testbed's 4-pixel patches
        raise argparse.ArgumentTypeError(f"--size needs frames >= 1 and height and width multiples of 4, got {text!r}")
    return frames, height, width


def check_noise_levels(noise_levels: tuple[float, ...]) -> None:
    if not noise_levels or not all(0 < level <= 1 for level in noise_levels):
        raise ValueError(f"noise_levels must be a non-empty sequence of values in (0, 1], got {noise_levels!r}")


def parse_noise_levels(text: str) -> tuple[float, ...]:
    """'0.9,0.99' -> (0.9, 0.99), each in (0, 1]."""
    try:
        levels = tuple(float(v) for v in text.split(","))
        check_noise_levels(levels)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--noise-levels must be comma-separated numbers in (0, 1], got {text!r}"
        ) from None
    return levels


# The options each check run alone does not read: steering samples from its own centred first frames, the prompt
# sensitivity samples nothing.
UNUSED_BY_MODE = {
    "sensitivity_only": ("two_stage", "still_candidates", "steps", "guidance_scale", "first_frame"),
    "steering_only": ("two_stage", "still_candidates", "first_frame", "noise_levels", "first_frame_level"),
}


def _given_flags(parser: argparse.ArgumentParser, argv, args: argparse.Namespace) -> frozenset:
    """The options on the command line (`args`' names): parsed again into a namespace holding a marker for each,
    which argparse keeps in place of the default where an option is not given."""
    unset = object()
    again = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return frozenset(name for name, value in vars(again).items() if value is not unset)


def main(argv=None) -> dict:
    from ..cli import at_least
    from ..pipelines.testbed import load, testbed_config

    p = argparse.ArgumentParser(prog="python -m diffsparse.testbed.fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="testbed pipeline folder (default: the shipped weights)")
    p.add_argument("--size", type=parse_size, default=None, help="FxHxW pixels (default: the evaluation size)")
    p.add_argument("--seeds", type=at_least(1), default=2, help="seeds per prompt")
    p.add_argument("--steps", type=at_least(1), default=20, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--first-frame", action="store_true",
                   help="sample image-to-video: each video starts from the clean first frame of a training clip of its "
                        "prompt, so only the motion is left to the prompt (the direction score then measures the word)")
    add_two_stage_options(p, "sample text-to-video in two stages: the first frame as a single image from the "
                          "shapes-only prompt (\"a red circle\"), then the clip image-to-video from it with the full "
                          "prompt")
    p.add_argument("--steering-only", action="store_true",
                   help="only the steering check: image-to-video from centred first frames with every direction word "
                        "(no start position hints the way), does the word steer the motion?")
    p.add_argument("--sensitivity-only", action="store_true",
                   help="only the prompt sensitivity (no sampling): seconds instead of minutes, e.g. per snapshot")
    p.add_argument("--noise-levels", type=parse_noise_levels, default=SENSITIVITY_NOISE_LEVELS,
                   help="comma-separated flow-matching times in (0, 1] for the prompt sensitivity "
                        f"(default {','.join(map(str, SENSITIVITY_NOISE_LEVELS))})")
    p.add_argument("--first-frame-level", type=float, default=None,
                   help="noise level of the first frame for the prompt sensitivity (the others get --noise-levels; "
                        "0: a clean condition, not scored); default: the whole clip at each of --noise-levels")
    args = p.parse_args(argv)
    if args.steering_only and args.sensitivity_only:
        p.error("--steering-only and --sensitivity-only each run one check alone: give one of them")
    # Before, the check alone ran without a word about the options it does not read.
    given = _given_flags(p, argv, args)
    for mode, unused in UNUSED_BY_MODE.items():
        passed = [f"--{name.replace('_', '-')}" for name in unused if name in given]
        if getattr(args, mode) and passed:
            p.error(f"--{mode.replace('_', '-')} does not use {', '.join(passed)}: leave "
                    f"{'them' if len(passed) > 1 else 'it'} out, or run without --{mode.replace('_', '-')}")
    if args.first_frame and args.two_stage:
        p.error("--first-frame and --two-stage each choose where the first frame comes from: give one of them")
    if args.still_candidates > 1 and not args.two_stage:
        p.error(f"--still-candidates {args.still_candidates}: more than 1 only with --two-stage")
    if args.first_frame_level is not None and not 0 <= args.first_frame_level <= 1:
        p.error(f"--first-frame-level must be in [0, 1], got {args.first_frame_level}")
    if args.size is None:
        size = testbed_config()["eval"]
        args.size = (size["frames"], size["height"], size["width"])
    if args.first_frame_level is not None and args.size[0] < 2:
        p.error(f"--first-frame-level sets the first frame apart from the others: it needs --size with 2 or more "
                f"frames, got {args.size[0]}")
    pipe = load(path=args.model)
    result = {"model": str(args.model or "shipped weights"), "size": list(args.size)}
    if args.steering_only:
        result["steering"] = steering(pipe, *args.size, seeds=args.seeds, steps=args.steps,
                                      guidance_scale=args.guidance_scale)
        print(json.dumps(result, indent=1))
        return result
    if not args.sensitivity_only:
        result["generated"] = asdict(fidelity(pipe, *args.size, seeds=args.seeds, steps=args.steps,
                                              first_frame=args.first_frame, two_stage=args.two_stage,
                                              guidance_scale=args.guidance_scale,
                                              still_candidates=args.still_candidates))
        result["first_frame"] = args.first_frame
        result["two_stage"] = args.two_stage
        result["still_candidates"] = args.still_candidates
        result["training_data"] = asdict(reference_scores(*args.size, seeds=args.seeds))
    result["prompt_sensitivity"] = prompt_sensitivity(pipe, *args.size, seeds=args.seeds,
                                                      noise_levels=args.noise_levels,
                                                      first_frame_level=args.first_frame_level)
    result["text_separation"] = text_separation(pipe)
    result["noise_levels"] = list(args.noise_levels)
    result["first_frame_level"] = args.first_frame_level
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
