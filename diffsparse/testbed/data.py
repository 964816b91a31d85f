"""Procedural training videos for the testbed model: coloured shapes moving over plain dark backgrounds.

Every clip is drawn from a seeded `numpy.random.Generator`, so the same seed gives the same clip bit for bit,
and comes with the prompt that describes it ("a red circle moving left", "a blue square and a green triangle
moving up quickly"). All shapes of one clip share the direction and speed the prompt names.

Shapes are rendered from signed distance functions with one pixel of anti-aliasing (coverage
`clip(0.5 - distance, 0, 1)`). Sizes and speeds are in pixels, the same on every canvas, so a larger canvas or a
longer clip shows the same local picture over more room and time: what lets a model trained mostly on short, small
clips still draw at evaluation size.

Videos are float32 tensors `(3, frames, height, width)` in [-1, 1], the layout a diffusers video decoder returns
before post-processing; the model's 2x2 space-to-depth (`diffsparse.testbed.space_to_depth`) turns them into its
12-channel input. Heights and widths are multiples of `PIXELS_PER_TOKEN` (4: space-to-depth 2 x patch 2).

Example:
    >>> import numpy as np
    >>> from diffsparse.testbed.data import random_clip, render
    >>> clip = random_clip(np.random.default_rng(0), frames=9, height=32, width=32)
    >>> video = render(clip)
    >>> tuple(video.shape), clip.prompt == random_clip(np.random.default_rng(0), 9, 32, 32).prompt
    ((3, 9, 32, 32), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# One transformer token covers PIXELS_PER_TOKEN x PIXELS_PER_TOKEN pixels (2x2 space-to-depth, then patch (1,2,2)).
PIXELS_PER_TOKEN = 4

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.98, 0.90, 0.10),
    "white": (0.95, 0.95, 0.95),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.65, 0.20, 0.90),
}
SHAPES = ("circle", "square", "triangle")
# Unit motion per direction in image coordinates (x to the right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Pixels per frame; the empty word is the plain "moving left".
SPEEDS: dict[str, float] = {"slowly": 0.5, "": 1.0, "quickly": 2.0}
# Plain dark backgrounds (not named in prompts).
BACKGROUNDS: tuple[tuple[float, float, float], ...] = (
    (0.02, 0.02, 0.02),
    (0.12, 0.12, 0.12),
    (0.04, 0.05, 0.16),
    (0.03, 0.12, 0.06),
    (0.14, 0.08, 0.04),
)
# Pixels: circle radius; squares and triangles of the same area. 3 to 5 tokens across, so that a circle, a square
# and a triangle differ in whole tokens, not in a few pixels inside one (radius 4 to 7 before). Measured after
# 60 minutes of training: cleaner outlines than with the smaller shapes, the kind not learned sooner (README).
RADIUS_RANGE = (5.5, 8.0)
MAX_SHAPES = 3
# One, two, three shapes drawn; a shape that finds no room apart from the others is left out (and out of the
# prompt), so small canvases hold fewer shapes. "Apart" is centres 0.9 x the sum of the circle radii apart, which
# lets the corners and vertices of squares and triangles (REACH: up to 1.56 radii) overlap another shape: a third
# of the multi-shape clips show a shape partly hidden (`placement_flaws`; a flaw kept because the shipped weights
# were trained on it). Mostly single shapes, whose prompt binds one colour to one kind (0.5, 0.3, 0.2 before;
# with logit-normal noise levels, the kind was used 7x more after 60 minutes: README).
SHAPE_COUNT_WEIGHTS = (0.8, 0.15, 0.05)
PLACEMENT_TRIES = 20

PROMPT_WORDS = frozenset({"a", "an", "and", "moving", *COLOURS, *SHAPES, *DIRECTIONS, *(w for w in SPEEDS if w)})


def article(word: str) -> str:
    """"an" before a vowel ("an orange"), else "a": prompts read as people write them."""
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Bucket:
    """One training size: `frames` x `height` x `width` pixels, drawn with probability proportional to `weight`."""

    frames: int
    height: int
    width: int
    weight: float

    @property
    def tokens(self) -> int:
        return self.frames * (self.height // PIXELS_PER_TOKEN) * (self.width // PIXELS_PER_TOKEN)


# Mostly short, small clips (cheap steps), with longer clips, larger and non-square canvases mixed in so the
# model keeps drawing clean shapes at the evaluation size (17 frames x 48 x 48 pixels = 17 x 12 x 12 tokens).
TRAIN_BUCKETS: tuple[Bucket, ...] = (
    Bucket(9, 32, 32, 0.40),
    Bucket(9, 32, 48, 0.05),
    Bucket(9, 48, 32, 0.05),
    Bucket(17, 32, 32, 0.15),
    Bucket(9, 48, 48, 0.15),
    Bucket(13, 40, 40, 0.10),
    Bucket(17, 48, 48, 0.10),
)
# Single frames: each step sees frames x as many distinct shapes for the same tokens, which is how the outline of a
# shape is learned fastest (motion still needs the video buckets). Joint image-video training, as Wan trains.
IMAGE_BUCKETS: tuple[Bucket, ...] = (Bucket(1, 32, 32, 0.6), Bucket(1, 48, 48, 0.4))


def train_buckets(image_share: float) -> tuple[Bucket, ...]:
    """`TRAIN_BUCKETS` drawn `1 - image_share` of the steps and `IMAGE_BUCKETS` `image_share` of them.

    The first bucket stays the base size that `batch_size_for` scales from.

    Example:
        >>> sum(b.weight for b in train_buckets(0.25))
        1.0
    """
    if not 0 <= image_share < 1:
        raise ValueError(f"image_share must be a fraction in [0, 1), got {image_share=}")
    if image_share == 0:
        return TRAIN_BUCKETS  # exactly the batches of runs made before image training existed

    def scaled(buckets: tuple[Bucket, ...], share: float) -> tuple[Bucket, ...]:
        total = sum(b.weight for b in buckets)
        return tuple(Bucket(b.frames, b.height, b.width, b.weight * share / total) for b in buckets)

    return scaled(TRAIN_BUCKETS, 1 - image_share) + scaled(IMAGE_BUCKETS, image_share)


@dataclass(frozen=True)
class Shape:
    """One moving shape: centre at frame `f` is `(x0 + f * vx, y0 + f * vy)` in pixels (x right, y down)."""

    kind: str
    colour: str
    radius: float
    x0: float
    y0: float
    vx: float
    vy: float


@dataclass(frozen=True)
class Clip:
    """Everything needed to render one video and to say what it shows."""

    frames: int
    height: int
    width: int
    background: tuple[float, float, float]
    shapes: tuple[Shape, ...]
    direction: str
    speed: str

    @property
    def objects(self) -> str:
        """The shapes alone ("a red circle and a blue square"): what a single frame can show."""
        return " and ".join(f"{article(s.colour)} {s.colour} {s.kind}" for s in self.shapes)

    @property
    def prompt(self) -> str:
        return " ".join(filter(None, (self.objects, "moving", self.direction, self.speed)))


def _check_size(frames: int, height: int, width: int) -> None:
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames=}")
    for name, value in (("height", height), ("width", width)):
        if value < 4 * PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN:
            raise ValueError(
                f"{name} must be a multiple of {PIXELS_PER_TOKEN} pixels and at least {4 * PIXELS_PER_TOKEN}, "
                f"got {name}={value}"
            )


# Distance from the centre to the farthest point of each shape, in radii (square: half diagonal; triangle: centroid
# to vertex), so that placement keeps corners and vertices on the canvas, not only the inscribed circle.
REACH = {"circle": 1.0, "square": 0.89 * math.sqrt(2.0), "triangle": 1.35 * 2 / math.sqrt(3.0)}


def _start(rng: np.random.Generator, length: int, reach: float, travel: float) -> float:
    """A start coordinate on one axis so that a shape reaching `reach` pixels from its centre and moving `travel`
    pixels stays inside when there is room; when there is not, it starts whole at the far edge and leaves the
    canvas on the way (in part or whole: `placement_flaws` counts how often)."""
    low, high = reach, length - reach
    if abs(travel) >= high - low:  # no room for the whole path
        return low if travel > 0 else high
    return float(rng.uniform(low, high - travel) if travel > 0 else rng.uniform(low - travel, high))


def check_shape_counts(shape_counts: tuple[float, ...]) -> None:
    """Raise `ValueError` unless `shape_counts` are `MAX_SHAPES` non-negative probabilities summing to 1."""
    if len(shape_counts) != MAX_SHAPES or min(shape_counts) < 0 or not math.isclose(sum(shape_counts), 1.0):
        raise ValueError(
            f"shape_counts must be {MAX_SHAPES} non-negative probabilities of 1..{MAX_SHAPES} shapes summing to 1, "
            f"got {shape_counts=}"
        )


def random_clip(
    rng: np.random.Generator,
    frames: int,
    height: int,
    width: int,
    shape_counts: tuple[float, ...] = SHAPE_COUNT_WEIGHTS,
) -> Clip:
    """A random clip description of the given size (pixels) drawn from `rng`.

    Args:
        rng (`numpy.random.Generator`): the only source of randomness.
        frames (`int`): number of frames.
        height (`int`): canvas height in pixels, a multiple of 4.
        width (`int`): canvas width in pixels, a multiple of 4.
        shape_counts (`tuple[float, ...]`, *optional*, defaults to `SHAPE_COUNT_WEIGHTS`): probabilities of
            drawing 1, 2, ... `MAX_SHAPES` shapes (summing to 1).

    Example:
        >>> import numpy as np
        >>> random_clip(np.random.default_rng(2), 9, 32, 32).prompt
        'a yellow circle moving left slowly'
    """
    _check_size(frames, height, width)
    check_shape_counts(shape_counts)
    count = int(rng.choice(np.arange(1, MAX_SHAPES + 1), p=shape_counts))
    direction = str(rng.choice(list(DIRECTIONS)))
    speed = str(rng.choice(list(SPEEDS)))
    ux, uy = DIRECTIONS[direction]
    step = SPEEDS[speed] * float(rng.uniform(0.85, 1.15))
    vx, vy = ux * step, uy * step
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    shapes: list[Shape] = []
    for colour in colours:
        kind = str(rng.choice(SHAPES))
        radius = float(rng.uniform(*RADIUS_RANGE))
        for _ in range(PLACEMENT_TRIES):  # shapes move together, so apart at the start is apart throughout
            x0 = _start(rng, width, REACH[kind] * radius, vx * (frames - 1))
            y0 = _start(rng, height, REACH[kind] * radius, vy * (frames - 1))
            if all(math.hypot(x0 - s.x0, y0 - s.y0) >= 0.9 * (radius + s.radius) for s in shapes):
                shapes.append(Shape(kind, str(colour), radius, x0, y0, vx, vy))
                break
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Clip(frames, height, width, background, tuple(shapes), direction, speed)


def _signed_distance(kind: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) from offsets `(dx, dy)` to the shape centred at 0."""
    if kind == "circle":
        return np.hypot(dx, dy) - radius
    if kind == "square":
        half = 0.89 * radius  # the area of the circle
        qx, qy = np.abs(dx) - half, np.abs(dy) - half
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    if kind == "triangle":
        # Equilateral triangle pointing up, centred on its centroid (Inigo Quilez's exact 2D distance).
        half_side = 1.35 * radius  # the area of the circle
        k = math.sqrt(3.0)
        px = np.abs(dx) - half_side
        py = -dy + half_side / k  # y up
        fold = px + k * py > 0
        px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
        px = px - np.clip(px, -2 * half_side, 0)
        return -np.hypot(px, py) * np.sign(py)
    raise ValueError(f"shape must be one of {SHAPES}, got {kind=}")


def render(clip: Clip) -> torch.Tensor:
    """The video of `clip` as float32 `(3, frames, height, width)` in [-1, 1], anti-aliased.

    Example:
        >>> import numpy as np
        >>> video = render(random_clip(np.random.default_rng(0), 5, 16, 16))
        >>> bool(video.min() >= -1 and video.max() <= 1)
        True
    """
    f = np.arange(clip.frames, dtype=np.float64)[:, None, None]
    y = np.arange(clip.height, dtype=np.float64)[None, :, None] + 0.5  # pixel centres
    x = np.arange(clip.width, dtype=np.float64)[None, None, :] + 0.5
    image = np.empty((3, clip.frames, clip.height, clip.width))
    image[:] = np.asarray(clip.background)[:, None, None, None]
    for shape in clip.shapes:
        distance = _signed_distance(
            shape.kind, x - (shape.x0 + f * shape.vx), y - (shape.y0 + f * shape.vy), shape.radius
        )
        coverage = np.clip(0.5 - distance, 0.0, 1.0)[None]
        image = image * (1 - coverage) + np.asarray(COLOURS[shape.colour])[:, None, None, None] * coverage
    return torch.from_numpy(image * 2 - 1).float()


# How single-frame training batches are prompted (`make_batch`, `train --image-prompts`).
IMAGE_PROMPTS = ("motion", "still")


def batch_size_for(bucket: Bucket, batch: int, base: Bucket = TRAIN_BUCKETS[0]) -> int:
    """Clips per step for `bucket`: `batch` at the base size, scaled to the same number of tokens elsewhere."""
    return max(1, round(batch * base.tokens / bucket.tokens))


def make_batch(
    seed: int,
    step: int,
    batch: int,
    buckets: tuple[Bucket, ...] = TRAIN_BUCKETS,
    shape_counts: tuple[float, ...] = SHAPE_COUNT_WEIGHTS,
    image_prompts: str = "motion",
) -> tuple[torch.Tensor, list[str]]:
    """The training batch of one step: videos `(B, 3, F, H, W)` in [-1, 1] and their prompts.

    The batch depends only on `(seed, step)`, so a resumed run sees exactly the batches it would have seen. One
    size per batch (drawn from `buckets` by weight); `batch` is the batch size at the first bucket and other
    sizes get the same number of tokens (at least one clip).

    Args:
        seed (`int`): run seed.
        step (`int`): training step.
        batch (`int`): clips per step at the base size `buckets[0]`.
        buckets (`tuple[Bucket, ...]`, *optional*, defaults to `TRAIN_BUCKETS`): sizes to draw from.
        shape_counts (`tuple[float, ...]`, *optional*): probabilities of drawing 1, 2, 3 shapes per clip
            (`random_clip`; a shape that finds no room is left out).
        image_prompts (`str`, *optional*, defaults to `"motion"`): prompts of single-frame batches. `"motion"`
            keeps the drawn motion ("a red circle moving left"), though one frame cannot show it; `"still"` names
            the shapes only ("a red circle"), so that the motion words are trained only where they predict
            something.

    Example:
        >>> videos, prompts = make_batch(seed=0, step=0, batch=4)
        >>> videos.shape[0] == len(prompts), videos.shape[1]
        (True, 3)
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch=}")
    if image_prompts not in IMAGE_PROMPTS:
        raise ValueError(f"image_prompts must be one of {IMAGE_PROMPTS}, got {image_prompts!r}")
    clips = _batch_clips(seed, step, batch, buckets, shape_counts)
    still = image_prompts == "still" and clips[0].frames == 1
    return torch.stack([render(c) for c in clips]), [c.objects if still else c.prompt for c in clips]


def _batch_clips(seed: int, step: int, batch: int, buckets: tuple[Bucket, ...], shape_counts) -> list[Clip]:
    """The clips `make_batch` renders, undrawn."""
    rng = np.random.default_rng([seed, step])
    weights = np.array([b.weight for b in buckets], dtype=np.float64)
    bucket = buckets[int(rng.choice(len(buckets), p=weights / weights.sum()))]
    return [
        random_clip(rng, bucket.frames, bucket.height, bucket.width, shape_counts)
        for _ in range(batch_size_for(bucket, batch, buckets[0]))
    ]


def _coverage(clip: Clip, shape: Shape, margin: int = 0) -> np.ndarray:
    """`(frames, height + 2 margin, width + 2 margin)` anti-aliased coverage of `shape`, `margin` pixels past each
    edge of the canvas (on the same pixel grid), as `render` draws it."""
    f = np.arange(clip.frames, dtype=np.float64)[:, None, None]
    y = np.arange(-margin, clip.height + margin, dtype=np.float64)[None, :, None] + 0.5
    x = np.arange(-margin, clip.width + margin, dtype=np.float64)[None, None, :] + 0.5
    distance = _signed_distance(shape.kind, x - (shape.x0 + f * shape.vx), y - (shape.y0 + f * shape.vy), shape.radius)
    return np.clip(0.5 - distance, 0.0, 1.0)


def placement_flaws(
    seed: int = 0, steps: int = 400, batch: int = 16, buckets: tuple[Bucket, ...] = TRAIN_BUCKETS
) -> dict:
    """How often the clips of `make_batch(seed, step, batch, buckets)`, steps `0 .. steps - 1`, break the two
    rules a prompt would suggest, counted in clips (the generator is kept as it is: the shipped weights were trained
    on it, see `docs/testbed/experiments.md`, "Known flaws of the training data").

    - `partly_hidden`, of `multi_shape`: two shapes share a pixel (more than half covered by each) in some frame.
      Spacing is by the circle radius (`random_clip`), so corners and vertices can reach under another shape.
    - `partly_off_canvas`: in some frame a shape has more than 2% of its area off the canvas. Placement keeps the
      whole path on the canvas only when it fits (`_start`); otherwise the shape leaves on its way.
    - `gone_by_last_frame`: a shape the prompt names has less than 1% of its area on the canvas in the last frame.
    - `by_bucket`: `"FxHxW"` -> `[clips, partly_off_canvas]`.

    Example:
        >>> flaws = placement_flaws(steps=2)
        >>> flaws["clips"] >= 2 and flaws["partly_hidden"] <= flaws["multi_shape"]
        True
    """
    counts = dict.fromkeys(("clips", "multi_shape", "partly_hidden", "partly_off_canvas", "gone_by_last_frame"), 0)
    by_bucket: dict[str, list[int]] = {}
    for step in range(steps):
        for clip in _batch_clips(seed, step, batch, buckets, SHAPE_COUNT_WEIGHTS):
            # Past the edge by as far as any shape can reach and travel, so each shape's whole area is counted.
            margin = math.ceil(max(REACH.values()) * RADIUS_RANGE[1] + 2 * max(SPEEDS.values()) * clip.frames) + 2
            inner = (slice(None), slice(margin, margin + clip.height), slice(margin, margin + clip.width))
            whole = [_coverage(clip, shape, margin) for shape in clip.shapes]
            area = [c.sum(axis=(1, 2)) for c in whole]
            shown = [c[inner].sum(axis=(1, 2)) for c in whole]
            off = any((s < 0.98 * a).any() for s, a in zip(shown, area))
            counts["clips"] += 1
            counts["partly_off_canvas"] += off
            counts["gone_by_last_frame"] += any(s[-1] < 0.01 * a[-1] for s, a in zip(shown, area))
            if len(whole) > 1:
                counts["multi_shape"] += 1
                counts["partly_hidden"] += any(
                    (np.minimum(whole[i], whole[j]) > 0.5).any()
                    for i in range(len(whole)) for j in range(i + 1, len(whole))
                )
            row = by_bucket.setdefault(f"{clip.frames}x{clip.height}x{clip.width}", [0, 0])
            row[0] += 1
            row[1] += off
    return {**counts, "by_bucket": by_bucket}
