"""The per-transformer runtime: when to be sparse (schedule), which plan to run (cache), what happened (stats).

One `SparseRuntime` serves every sparse processor of one transformer. A diffusers `ModelHook` on the
transformer sets the call context (step, token layout) before each forward; processors then ask
`route(layer)` whether to be sparse and call `attention(layer, q, k, v)`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import math
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.context_parallel import (
    _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE,
    ContextParallelInput,
    EquipartitionSharder,
    PartitionAnythingSharder,
)
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode

from . import DiffsparseWarning, outside_stacklevel
from .config import SparseConfig
from .kernels import BlockSparsePlan, block_sparse_attention, make_plan
from .patterns import DenseQueryFrames, FrameCausal, HeadShard, IdentityOrder, Pattern, TokenOrder, VideoLayout
from .pipelines.base import forward_input, forward_parameters, half_precision

HOOK_NAME = "diffsparse_context"
# Shown by torch.compile where it cannot trace these functions (`fullgraph=True`, which allows no graph break).
_EAGER_REASON = (
    "diffsparse runs its step clock, block planning and sparse kernel eagerly between compiled graphs (a graph break "
    "around each transformer call and each sparse attention call), so it cannot run under fullgraph=True: compile "
    "with fullgraph=False (torch.compile(transformer), transformer.compile_repeated_blocks(fullgraph=False))"
)


def _eager(fn):
    """`torch.compiler.disable(fn)`, with `_EAGER_REASON` in torch.compile's error where torch takes a reason."""
    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        return torch.compiler.disable(fn, reason=_EAGER_REASON)
    return torch.compiler.disable(fn)

# Plans are per (pattern, layout): a static pattern needs one per resolution, a head-classifying pattern one
# per distinct head assignment (at most one per layer). The plans of the current run's fits come on top
# (`SparseRuntime._cached`).
_PLAN_CACHE_SIZE = 64
# Calls at one timestep outside any schedule (a bare transformer) beyond which no guidance explains them (CFG gives
# two, a few guiders three or four): a one-step model or a timing loop that never starts a new run.
_MANY_CALLS_PER_STEP = 8


@dataclass
class CallRecord:
    """One self-attention call: which step, layer and CFG branch, dense or sparse, at what block density.

    `measured`: a dense call that also took the statistics of `SparseConfig.correction`.
    `dense_step`: the call fell in one of the schedule's dense steps (`SparseConfig.dense_steps` /
    `dense_last_steps`), as the runtime counted steps then (each stage of a multi-stage pipeline has its own count).
    """

    step: int
    layer: int
    branch: str
    sparse: bool
    density: float
    measured: bool = False
    dense_step: bool = False


def tally(totals: dict[int, list], record: CallRecord) -> None:
    """Counts `record` into per-layer `[dense calls, sparse calls, sum of the sparse calls' densities, calls in the
    schedule's dense steps]`."""
    counts = totals.setdefault(record.layer, [0, 0, 0.0, 0])
    if record.sparse:
        counts[1] += 1
        counts[2] += record.density
    else:
        counts[0] += 1
    counts[3] += record.dense_step


@dataclass(frozen=True)
class _Statistics:
    """What a correction measured for one (layer, CFG branch, layout, videos), in the kernel's token order."""

    step: int
    rho: torch.Tensor  # (B, N, H, 1): the kept blocks' share of the softmax denominator
    residual: torch.Tensor  # (B, N, H, D): out_full - rho * out_sparse


@dataclass(frozen=True)
class _CachedPlan:
    """A plan with the token permutation it was built for (`None` for the model's own order). Under a causal
    frame-group mask whose groups do not fill whole blocks, one plan per group instead: `groups` holds
    `(start, stop, plan)` for the group's queries `[start, stop)` attending the keys `[0, stop)` (in the kernel's
    token order), and `plan` is `None`."""

    plan: BlockSparsePlan | None
    perm: torch.Tensor | None
    inverse: torch.Tensor | None
    density: float  # kept blocks over all blocks of the whole sequence
    groups: tuple[tuple[int, int, BlockSparsePlan], ...] = ()


@dataclass
class _CallSnapshot:
    """`SparseRuntime.snapshot`: a call's branch (cache context) and state, and the fits and statistics it sees."""

    context: CacheContext | None
    state: _BranchState
    statistics: dict
    layer_patterns: dict
    fitted_at: dict


class _BranchState(BaseState):
    """Per CFG branch ("cond"/"uncond") state of the current call."""

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.step: int = 0
        self.num_steps: int | None = None
        self.layout: VideoLayout | None = None
        # Frames per causal group when the call's self-attention carries `FrameCausal`'s mask (`allow_frame_causal`).
        self.frame_causal: int = 0
        # With one timestep per frame (diffusion forcing, `begin_call`'s `frame_steps`): the frames still in their
        # own dense steps; `None`: the call's step decides for all.
        self.dense_frames: tuple[int, ...] | None = None
        self.read_once: tuple[tuple, object] | None = None  # `SparseRuntime.once_per_call`'s last answer
        # When the model's tokens are not in the layout's order: (layout index of each model token, its inverse).
        self.token_order: tuple[torch.Tensor, torch.Tensor] | None = None
        # Under diffusers' tensor parallelism: (process group, this process's rank in it); each process's
        # projections hold its slice of the heads.
        self.tensor_parallel: tuple[object, int] | None = None
        # The length of the call's `encoder_hidden_states` (dim 1): the text stream that joint models put before
        # their image tokens; `None` when the call has none.
        self.text_tokens: int | None = None


class StepScheduleWarning(DiffsparseWarning):
    """A call's timestep is none of the scheduler's: the step schedule (`dense_steps`) cannot be followed."""


def pipeline_timestep(pipeline) -> torch.Tensor | None:
    """The timestep `pipeline` is denoising at, on its scheduler's scale and at full precision: the `_current_timestep`
    diffusers pipelines set before each transformer call, or a modular pipeline's guider's (`set_state` gets it each
    step: Anima); `None` when it has neither, when there is no pipeline, or when it is not running (`_in_call`)."""
    current = getattr(pipeline, "_current_timestep", None)
    if current is None:
        current = getattr(getattr(pipeline, "guider", None), "_timestep", None)
    # The stack walk last: only a timestep there is to read can be stale (most calls' pipelines keep none).
    return None if current is None or not _in_call(pipeline) else torch.as_tensor(current)


def _in_call(pipeline) -> bool:
    """Whether `pipeline.__call__` is running on this thread. A run that raised (a callback, an interrupt by
    exception, an out-of-memory error) leaves the pipeline's `_current_timestep` (and a guider's timestep) set: read
    when another pipeline, or the user's own loop, later drives the same transformer, every call took that stale
    timestep as its own (Cosmos: all on one step, all dense, unwarned)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__" and _frame_self(frame) is pipeline:
            return True
        frame = frame.f_back
    return False


def _frame_self(frame):
    """The running `frame`'s local `self`, leaving no copy of its locals behind. Before Python 3.13 `f_locals`
    copies a function frame's locals into a dict the frame keeps until their next read: left there, it kept the
    pipeline step's tensors (the previous latents, the noise prediction) alive until the next transformer call, and
    the last step's through the VAE decode. Emptied, except while a tracer (a debugger) is at that frame: the
    tracer's return writes the dict back into the locals, and an empty one would unbind them; and left whole where
    other code holds it (`env = locals()` in that frame is this same dict: it would lose its keys). `locals()` and
    `f_locals` fill it afresh at their next read, so emptying it loses nothing of the frame."""
    if sys.version_info >= (3, 13):  # a view of the locals (PEP 667), no copy
        return frame.f_locals.get("self")
    local_vars = frame.f_locals
    value = local_vars.get("self")
    # References: the frame's, `local_vars`, getrefcount's argument; one more is someone else's.
    unheld = sys.getrefcount(local_vars) <= 3
    if unheld and frame.f_trace is None and frame.f_code.co_flags & inspect.CO_OPTIMIZED:
        local_vars.clear()
    return value


def _denoising_timesteps(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """`scheduler.timesteps` as float32 on the CPU, without a terminal timestep at sigma 0: LTX's Euler ancestral RF
    sampler, given sigmas, lists one as long as its sigmas, and its pipelines loop over `timesteps[:-1]` (every other
    scheduler has one sigma more than timesteps, the terminal 0 among the sigmas alone)."""
    grid = timesteps.detach().float().cpu()
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and len(sigmas) == len(grid) > 1 and float(sigmas[-1]) == 0:
        return grid[:-1]
    return grid


def _repeated_runs(grid: torch.Tensor) -> dict[int, int]:
    """For each run of equal timesteps in `grid`, its first position -> its last (an order-2 sampler's `t1, t1`, a
    schedule whose sigmas round to one timestep twice)."""
    values, runs = grid.tolist(), {}
    first = 0
    for position in range(1, len(values) + 1):
        if position == len(values) or values[position] != values[first]:
            if position - 1 > first:
                runs[first] = position - 1
            first = position
    return runs


def _has_run_schedule(scheduler) -> bool:
    """Whether `scheduler.timesteps` are a run's: a diffusers scheduler's `set_timesteps` sets `num_inference_steps`,
    which before it is `None` (DDIM, DPM-Solver, UniPC, Euler) or unset (the flow-matching Eulers), its timesteps
    the training grid (1000 of them) rather than any run's. Heun, KDPM2, LMS, IPNDM and the flow-map Euler (AnyFlow)
    start with a schedule set in their constructor, so their training grid passes for a run's (a 1000-step run is
    not told apart from it). An object without `set_timesteps` (a stand-in with timesteps alone) is taken at its
    word."""
    return not hasattr(scheduler, "set_timesteps") or getattr(scheduler, "num_inference_steps", None) is not None


class StepClock:
    """Turns a call's timestep into a step index, and notices when a new denoising run starts (a pipeline call, or
    each segment, chunk or stage of pipelines that set the scheduler's timesteps anew for each).

    With a scheduler (the pipeline's at each call, when a pipeline is given), the step is the timestep's position
    in `scheduler.timesteps`: the same for the cond and uncond calls and across Wan 2.2's two experts. A scheduler
    of `order` 2 (Heun, KDPM2: two transformer calls per step, so `2 N - 1` timesteps for N steps) counts its
    steps, not its timesteps; a terminal timestep at sigma 0 that the loop never runs (LTX's Euler ancestral RF
    sampler given sigmas) is not a step. A timestep the pipeline cast to the latents' half-precision dtype (most
    do), or one an adapter read back in float32 from a timestep rounded on the transformer's own scale (the tensor's
    `diffsparse_rounding` says how far off that can be: Ideogram 4's modular blocks), is matched within that
    rounding, through the pipeline's own full-precision `_current_timestep` where the rounding could make it another
    step's, else the scheduler's `step_index` where that is one of the timesteps within the rounding, else the
    nearest. Where the timesteps list one value at consecutive positions (DPM-Solver's exponential sigmas end in
    two 0s; PNDM's, with or without `skip_prk_steps`), the scheduler's own count of its steps (`step_index`, PNDM's
    `counter`) tells them apart.
    `set_timesteps` makes a new tensor on every pipeline call, so a different tensor means a new call. Steps count
    from the run's first: an image- or video-to-video call with `strength` < 1 skips the schedule's first steps
    (`int(num_inference_steps * strength)` run), and its step 0 is the first it runs, of that many. Two timesteps
    in a run far from every one of the scheduler's (the transformer given them on another scale, by a pipeline the
    family's adapter does not know) get a `StepScheduleWarning`, instead of every call silently counting as the
    nearest step. Without a scheduler (a bare
    transformer), steps count distinct timesteps and a timestep larger than the last starts a new run (denoising
    only ever lowers it; with `rising`, for models whose timestep rises as denoising goes, a smaller one does; with
    `rising=None`, for models whose scheduler may run either way, the run's first two distinct timesteps tell which
    way it goes); so do the calls made while the scheduler has no run's timesteps yet (`_has_run_schedule`: before
    the pipeline's first `set_timesteps`), whose `num_steps` is then `None`. `restart` makes the next call start a
    new run.
    """

    def __init__(self, scheduler=None, rising: bool | None = False, pipeline=None):
        self._scheduler = scheduler
        # `pipe.scheduler = OtherScheduler.from_config(...)` after `apply` (how diffusers users change samplers)
        # must be followed: the pipeline's scheduler is read at each call. Weakly: the transformer that holds this
        # clock must not keep a pipeline the user dropped alive.
        self._pipeline = None if pipeline is None else weakref.ref(pipeline)
        self._rising = rising
        self._run_rises: bool | None = None  # with `rising=None`, which way this run's timesteps went (once known)
        self._timesteps_ref = None
        self._last_t: float | None = None
        self._step = -1
        self._off_grid: set[float] = set()  # this run's timesteps that are none of the scheduler's
        self._order = 1  # the scheduler's transformer calls per step (`_step_at`)
        # The scheduler step this run starts at: 0, unless the pipeline skips the first ones (image- or
        # video-to-video with `strength` < 1 runs the last `int(num_inference_steps * strength)`).
        self._run_start: int | None = None
        # Runs started so far: Wan 2.2's experts share this clock but each has its own hook, and only the first call
        # of a run is told `new_run`, so a hook tells a run it has not seen by this.
        self.runs = 0

    def frame_steps(self, timestep: torch.Tensor, frames: int) -> tuple[int, ...] | None:
        """Each frame's own step, for a call whose `timestep` is one per frame (`(B, frames)`, equal over the batch)
        on a scheduler's timesteps (after `tick`); `None` otherwise."""
        grid = getattr(self, "_grid", None)
        if grid is None or self._timesteps_ref is None or timestep.ndim != 2 or timestep.shape[1] != frames:
            return None
        per_frame = timestep.detach().float().cpu()
        if not bool((per_frame == per_frame[:1]).all()):
            return None
        start = self._run_start or 0
        positions = torch.argmin((grid[None, :] - per_frame[0, :, None]).abs(), dim=1).tolist()
        return tuple(max(self._step_at(position) - start, 0) for position in positions)

    def _step_at(self, position: int) -> int:
        """The step of the grid's `position`: a scheduler of order 2 runs a step's second call at the next step's
        timestep (Heun: `t0, t1, t1, t2, t2, ...`; KDPM2 an interpolated one), so `t1`'s calls count as step 1."""
        return (position + self._order - 1) // self._order

    def _repeated_position(self, scheduler, position: int, candidates=None, run_start: bool = False) -> int:
        """Which of the grid's equal timesteps from `position` on (or of `candidates`, the positions a rounded timestep
        may be at) a call is at: the scheduler's count of its `step` calls (`step_index`, PNDM's `counter`, or before
        the first its `begin_index`, for equal timesteps only), where that points at one of them, else `position` (a
        scheduler without that count, or a pipeline stepping copies of it: SkyReels-V2's diffusion forcing). The
        timestep alone cannot tell them apart: taking the first merged DPM-Solver's last two steps (its exponential
        sigmas end in two 0s), so `dense_last_steps` missed the last. Among `candidates` a `begin_index` is no count: a
        loop stepping a copy of the scheduler leaves it at the run's start, which would pull every early step of a
        bfloat16 run (6 within its rounding near t = 1000 at shift 7) onto step 0; except at the run's first call
        (`run_start`), which is at that start: FLUX's image-to-image pipelines keep no `_current_timestep`, and at
        `strength` < 1 their first bfloat16 timestep can be nearer the step before (28 steps at 2048 px, strength 0.9),
        which counted the run one step longer and its second step as step 2."""
        index = getattr(scheduler, "step_index", None)
        if index is None and not hasattr(scheduler, "step_index"):
            # PNDM keeps no `step_index` but counts its `step` calls in `counter` (reset by `set_timesteps`): from
            # the run's first position (a loop over the schedule from a later timestep starts it at 0 there), the
            # loop's position. Without it its repeated timesteps were one step each, numbered by their first place,
            # so the run's steps had gaps (0, 1, 1, 3, ... of 6 at 5 steps with `skip_prk_steps`) and a step a
            # correction planned to measure at never came. Its 0 says nothing, as a `begin_index` among rounded
            # candidates does not: a loop stepping a copy leaves it there (and the run's first call has no start yet).
            counter = getattr(scheduler, "counter", None)
            if isinstance(counter, int) and counter > 0 and self._run_start is not None and self._order == 1:
                index = self._run_start + counter
        if index is None and (candidates is None or run_start):
            index = getattr(scheduler, "begin_index", None)
        if candidates is None:
            candidates = range(position, self._repeats[position] + 1)
        if isinstance(index, int) and index in candidates:
            return index
        return position

    def _current_scheduler(self):
        """The pipeline's scheduler now, or the one given when there is no pipeline (or it is gone)."""
        pipeline = None if self._pipeline is None else self._pipeline()
        scheduler = None if pipeline is None else getattr(pipeline, "scheduler", None)
        return self._scheduler if scheduler is None else scheduler

    def restart(self) -> None:
        """Make the next call the first of a new run, whatever its timestep (`SparseHandle.new_run`)."""
        self._timesteps_ref = None
        self._last_t = None

    def tick(self, timestep: torch.Tensor) -> tuple[int, int | None, bool]:
        """Returns `(step, num_steps, new_run)` for a call at `timestep` (a new run also counts in `runs`)."""
        step, num_steps, new_run = self._tick(timestep)
        self.runs += new_run
        return step, num_steps, new_run

    def _tick(self, timestep: torch.Tensor) -> tuple[int, int | None, bool]:
        t = float(timestep.detach().float().max())
        scheduler = self._current_scheduler()
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        if timesteps is not None and len(timesteps) > 0 and _has_run_schedule(scheduler):
            # A call without a schedule after this run (a fresh scheduler swapped in) starts its own run.
            self._last_t = None
            new_run = self._timesteps_ref is None or self._timesteps_ref() is not timesteps
            if new_run:
                self._timesteps_ref = weakref.ref(timesteps)
                self._grid = _denoising_timesteps(scheduler, timesteps)
                self._order = max(int(getattr(scheduler, "order", 1) or 1), 1)
                self._off_grid = set()
                self._run_start = None
                self._repeats = _repeated_runs(self._grid)
                self._integer_grid = bool((self._grid == self._grid.round()).all())
                gaps = (self._grid[1:] - self._grid[:-1]).abs()
                gaps = gaps[gaps > 0]
                # Within a quarter of the grid's smallest spacing, a timestep is the scheduler's.
                self._tolerance = (float(gaps.min()) if len(gaps) else max(abs(float(self._grid[0])), 1.0)) / 4
            # How far rounding can have moved the timestep: an adapter that reads it back in float32 from one the
            # pipeline rounded on the transformer's own scale says so as the tensor's `diffsparse_rounding`
            # (Ideogram 4's modular pipeline passes `1 - t / 1000` in bfloat16: up to 1000 * 2^-9 off in `t`, near
            # t = 0 too, where a rounding on the scheduler's scale is tiny).
            rounding = float(getattr(timestep, "diffsparse_rounding", 0.0))
            # Truncated to an integer from a grid that is not (Helios' pyramid and modular loops pass
            # `t.to(torch.int64)`): up to 1 below `t`, nearer the next step where a shifted schedule's steps are under
            # 2 apart, which put calls there with a warning of timesteps off the schedule. The grid's timesteps that
            # truncate to it are its candidates.
            truncated = not timestep.is_floating_point() and not self._integer_grid
            if half_precision(timestep):
                # Cast to the latents' bfloat16 or float16 (and maybe scaled there: FLUX's t / 1000), the timestep
                # is off by up to a few roundings, more than the grid's spacing near t = 1000 with a large shift
                # (HunyuanVideo's 7: 2.9 apart, bfloat16 spacing 4 there).
                rounding += 2 * torch.finfo(timestep.dtype).eps * abs(t)
            elif truncated:
                rounding += 1.0
            tolerance = self._tolerance + rounding
            if rounding:
                # The pipeline's own timestep, where it is this one at full precision, tells the neighbours apart.
                precise = pipeline_timestep(None if self._pipeline is None else self._pipeline())
                if precise is not None and precise.numel() == 1 and abs(float(precise) - t) <= tolerance:
                    t, rounding = float(precise), 0.0
            position = int(torch.argmin((self._grid - t).abs()))
            on_grid = abs(float(self._grid[position]) - t) <= tolerance
            if on_grid and rounding and truncated:
                # The nearest may be the next step's (with no count to say otherwise: a loop stepping a copy of the
                # scheduler), where a timestep truncating to it is this step's.
                near = (self._grid.trunc() == t).nonzero().flatten().tolist()
                on_grid = bool(near)
                if near:
                    position = self._repeated_position(scheduler, near[0], near, run_start=self._run_start is None)
            elif on_grid and rounding:
                # Else the nearest of the timesteps within the rounding may be a neighbour's (bfloat16 gives
                # `1 - t / 1000` one value for two steps 1.8 apart near t = 10): the scheduler's count of its steps
                # tells them apart, where it points at one of them.
                near = ((self._grid - t).abs() <= tolerance).nonzero().flatten().tolist()
                position = self._repeated_position(scheduler, position, near, run_start=self._run_start is None)
            elif on_grid and position in self._repeats:
                position = self._repeated_position(scheduler, position)
            step = self._step_at(position)
            if on_grid:
                # The highest noise level of the run so far: its first denoising step (a pass outside the steps,
                # at timestep 0, can come before it).
                self._run_start = step if self._run_start is None else min(self._run_start, step)
            # One call off the grid is a pass outside the steps (a KV cache written at timestep 0: GLM-Image,
            # AnyFlow FAR); a second timestep off it means the steps themselves are on another scale.
            if len(self._off_grid) < 2 and not on_grid:
                self._off_grid.add(t)
                if len(self._off_grid) == 2:
                    warnings.warn(
                        f"diffsparse: transformer calls at timesteps {sorted(self._off_grid)} match none of the "
                        f"scheduler's timesteps (nearest to {t:g}: {float(self._grid[position]):g}, step {step} of "
                        f"{self._step_at(len(self._grid) - 1) + 1}), so the step schedule (dense_steps, "
                        "dense_last_steps, correction) is not followed: either the transformer is called outside "
                        "the pipeline (a loop of one's own with its own scheduler, timed against the timesteps of "
                        "the pipeline's scheduler: make that one the pipeline's scheduler, or apply to the "
                        "transformer alone), or by a pipeline with another scheduler than the one it was applied "
                        "through (one made with from_pipe(..., scheduler=...): diffsparse.apply on it), or the "
                        "pipeline gives it its timestep on another scale than the scheduler's (please report the "
                        "pipeline)",
                        StepScheduleWarning, stacklevel=outside_stacklevel(),
                    )
            start = self._run_start or 0
            return max(step - start, 0), self._step_at(len(self._grid) - 1) + 1 - start, new_run
        # The next call on a schedule starts a run of its own, not this one's (or the last scheduled one's).
        self._timesteps_ref = None
        rises = self._run_rises if self._rising is None else self._rising
        new_run = self._last_t is None or (rises is not None and (t < self._last_t if rises else t > self._last_t))
        if new_run:
            self._step, self._run_rises = 0, None
        elif t != self._last_t:
            self._run_rises = t > self._last_t if rises is None else rises
            self._step += 1
        self._last_t = t
        return self._step, None, new_run


def step_mode(config: SparseConfig, step: int, num_steps: int | None, measured_at: int | None,
              dense: bool | None = None) -> str:
    """What a sparse layer's call at `step` of a `num_steps`-step run does: `"dense"` (the original processor),
    `"measure"` (dense, taking `SparseConfig.correction`'s statistics) or `"sparse"`; `measured_at`: the step the
    call's branch measured the statistics it can use at (`None`: none). `dense`: whether the call is in a dense step,
    where something other than its step decides (each frame's own steps); by default `config.is_dense_step`.
    The runtime's calls follow this rule (`SparseRuntime._mode`) and `sparse_steps` foresees a run with it."""
    if config.is_dense_step(step, num_steps) if dense is None else dense:
        return "measure" if config.is_measure_step(step, num_steps) else "dense"
    if config.correction is None:
        return "sparse"
    refresh = config.correction_refresh
    if measured_at is None or (refresh > 0 and step - measured_at >= refresh):
        return "measure"
    return "sparse"


def out_of_reach(target: float, reached: float) -> bool:
    """Whether a reached density is far enough from the target one to say so: more than max(0.05, target / 4).
    Solved densities move in steps, so some gap is ordinary: the testbed's 17x12x12 layout reaches 0.220 for 0.25
    and 0.483 for 0.5, Wan 480p (21x30x52, block 64) 0.141 for 0.1, which a quarter of the target alone would flag;
    the 0.05 floor spares those, while one frame (1.0 for 0.25), 3 or 5 frames (0.78, 0.53 for 0.25) and the
    testbed at 0.1 (0.203) are flagged."""
    return abs(reached - target) > max(0.05, 0.25 * target)


def step_modes(config: SparseConfig, num_steps: int) -> list[str]:
    """`step_mode` of each step of a `num_steps`-step run, for one branch whose statistics nothing else invalidates
    (each measurement the last one the next steps see)."""
    modes, measured_at = [], None
    for step in range(num_steps):
        modes.append(step_mode(config, step, num_steps, measured_at))
        measured_at = step if modes[-1] == "measure" else measured_at
    return modes


def sparse_steps(config: SparseConfig, num_steps: int) -> list[int]:
    """The steps of a `num_steps`-step run in which a sparse layer's calls run sparse (`step_modes`): none where
    `dense_steps` and `dense_last_steps` cover the run, and with a correction none either where each sparse step
    measures (`correction_refresh=1`, or one sparse step with no dense step before it to measure at)."""
    return [step for step, mode in enumerate(step_modes(config, num_steps)) if mode == "sparse"]


class SparseRuntime:
    """Schedule, plan cache and call log for one transformer's self-attention layers."""

    def __init__(self, config: SparseConfig, name: str):
        self.config = config
        self.name = name
        self.pattern = config.resolved_pattern
        self.block_sizes = config.block_sizes
        self.state_manager = StateManager(_BranchState)
        self.records: list[CallRecord] = []  # the current denoising run's calls
        # Between `begin_call` and `end_call` (the transformer's forward): its attention modules can also be called
        # by another model that shares them (Z-Image's ControlNet runs the transformer's own refiner blocks), which
        # gets the original.
        self.in_transformer_call = False
        # Per layer, every call since `apply` (across runs, as counts: constant memory for long-lived pipelines):
        # `[dense calls, sparse calls, sum of the sparse calls' densities, calls in dense steps]` (`tally`).
        self.totals: dict[int, list] = {}
        # Data-dependent patterns (Sparse VideoGen's head kinds, searched blocks): the layer's specialised
        # pattern (`Pattern.fit`), one per video of the batch, chosen at its first sparse call of a pipeline call
        # and reused for the remaining steps (until steps start over: `begin_call`). Keyed by `_layer_pattern`'s
        # slot: (layer, layout, videos (`_videos_key`), frames per causal group, first query computed, pairs outside
        # the layout).
        self._layer_patterns: dict[tuple, tuple[Pattern, ...]] = {}
        self._fitted_at: dict[tuple, int] = {}  # the step each was fitted at
        self._fits = self.pattern.data_dependent
        # Searched patterns (`searched`, `searched_windows`): their `keep` is the density, spent by the search itself
        # (their own `at_density` only confirms it), not solved after the fit as `spatial_temporal`'s is.
        self._searches = self._fits and type(self.pattern).at_density is not Pattern.at_density
        self._plans: OrderedDict[tuple, _CachedPlan] = OrderedDict()
        self._always_dense = self.pattern.name == "dense"
        # Per (layer, CFG branch, layout, videos (`_videos_key`)): videos of one call attended on different layouts
        # (prompts with different valid lengths, HunyuanVideo and Mochi) each keep their own, and so do groups of
        # other videos on one layout (`attend_kept_tokens`' groups of a call, or another group in the other branch).
        self._statistics: dict[tuple[int, str, VideoLayout, int | tuple[int, ...]], _Statistics] = {}
        self._last_step: int | None = None  # of the run's last call with a layout (`begin_call`)
        self._observers: list = []
        # Per (layout, frames per causal group): `FrameCausal(frames).whole_blocks` (None where the kernel's blocks
        # cannot carry the mask), and the groups' token ranges (`_frame_groups`).
        self._causal_blocks: dict[tuple[VideoLayout, int], torch.Tensor | None] = {}
        self._groups: dict[tuple[VideoLayout, int], tuple[tuple[int, int], ...] | None] = {}
        self._solved: dict[tuple, Pattern] = {}  # `_at_density`
        self._warned_density: set[tuple[Pattern, VideoLayout]] = set()  # `_at_density`: said once per layout
        self._warned_dense_calls: set[str] = set()  # `log_dense`: each reason said once
        self._warned_causal_work: set[tuple[VideoLayout, int]] = set()  # `_build_plan`: per-group work above dense
        self._reach_checked: set[tuple[Pattern, VideoLayout]] = set()  # `_at_density`: fits checked once per layout
        self._checked_every_block: set[tuple[Pattern, VideoLayout]] = set()  # `_warn_if_every_block_kept`
        # Recomputing a call for gradient checkpointing (`replaying`): nothing logged, nothing learnt kept.
        self._replaying = False
        try:
            config.is_dense_step(0, None)
            self._needs_step_count = False
        except ValueError:  # `dense_steps` a fraction, or `dense_last_steps`: `_uncounted`
            self._needs_step_count = True
        self._warned_uncounted = False

    # -- context, set by the hook -------------------------------------------------------------
    def _state(self) -> _BranchState:
        return self.state_manager.get_state()

    def begin_call(
        self,
        layout: VideoLayout,
        step: int,
        num_steps: int | None,
        token_order: torch.Tensor | None = None,
        frame_steps: tuple[int, ...] | None = None,
        tensor_parallel: tuple[object, int] | None = None,
        text_tokens: int | None = None,
    ) -> None:
        """`token_order`: when the model's tokens are not in the layout's order, each one's index in the layout
        (a permutation of `range(layout.num_tokens)`); `attention` then gathers them into the layout's order and
        returns its output in the model's.

        `frame_steps`: each frame's own step, when the frames are at different noise levels (diffusion forcing) and
        the adapter schedules them apart (`ModelAdapter.per_frame_steps`): the queries of the frames in their dense
        steps attend every key, the others the pattern's; the call is dense when every frame is. Without it (or
        with `SparseConfig.correction`, whose statistics are per call) `step` decides for the whole call.

        `tensor_parallel`: `(process group, rank)` when the model runs under diffusers' tensor parallelism, whose
        column-sharded projections give each rank consecutive heads in rank order: `attention` then treats its
        tensors as that rank's heads (`heads`), as one process would treat them.

        `text_tokens`: the length of the call's text stream (`encoder_hidden_states`), whole (`call_text_tokens`)."""
        if token_order is not None and token_order.shape != (layout.num_tokens,):
            raise ValueError(
                f"token_order must hold one layout index per token of {layout} ({layout.num_tokens}), got shape "
                f"{tuple(token_order.shape)}"
            )
        if layout is not None:
            if step == 0 < (self._last_step or 0):
                # Steps starting over within a run are a new denoising pass over other content (a SkyReels-V2 long
                # video's chunks, which step copies of a scheduler set once): the fits and statistics of the last
                # pass are not this one's, and their steps, later than this one's, would hold off every refresh.
                # Only a return to step 0: a pass outside the steps (a KV cache written at timestep 0, read as a
                # late step) followed by the step it serves must not drop them at every step.
                self._forget_fits()
            self._last_step = step
        state = self._state()
        state.layout, state.step, state.num_steps = layout, step, num_steps
        state.frame_causal = 0
        state.dense_frames = None
        if frame_steps is not None and self.config.correction is None:
            state.dense_frames = tuple(f for f, s in enumerate(frame_steps) if self.config.is_dense_step(s, num_steps))
        state.read_once = None
        state.token_order = None if token_order is None else (token_order, torch.argsort(token_order))
        state.tensor_parallel = tensor_parallel
        state.text_tokens = text_tokens
        self.in_transformer_call = True

    def end_call(self) -> None:
        """The transformer's forward returned: until the next `begin_call`, its attention modules called by another
        model that shares them run the original (`route`)."""
        self.in_transformer_call = False

    def snapshot(self) -> _CallSnapshot:
        """What this call's attention depends on, for `replaying` it after the call ended."""
        return _CallSnapshot(self.state_manager._context, copy.copy(self._state()), dict(self._statistics),
                             dict(self._layer_patterns), dict(self._fitted_at))

    @contextlib.contextmanager
    def replaying(self, snapshot: _CallSnapshot):
        """Run the attention calls inside as in the call `snapshot` was taken in, when that call has ended: gradient
        checkpointing recomputes a block in the backward pass, and the recomputation must take the forward's
        path (sparse or dense, plan, fit, correction statistics) or torch stops at the mismatch. Nothing is
        logged, and what the recomputation learns (fits, statistics) is dropped after it. Outside a backward pass
        (the forward itself), nothing changes."""
        if torch._C._current_graph_task_id() == -1:
            yield
            return
        saved = (self.state_manager._context, self._statistics, self._layer_patterns, self._fitted_at,
                 self.in_transformer_call, self._replaying)
        self.state_manager._context = snapshot.context
        live = self._state()
        fields = dict(vars(live))
        vars(live).update(vars(snapshot.state))
        self._statistics, self._layer_patterns, self._fitted_at = (
            dict(snapshot.statistics), dict(snapshot.layer_patterns), dict(snapshot.fitted_at))
        self.in_transformer_call = self._replaying = True
        try:
            yield
        finally:
            vars(live).clear()
            vars(live).update(fields)
            (self.state_manager._context, self._statistics, self._layer_patterns, self._fitted_at,
             self.in_transformer_call, self._replaying) = saved

    def new_run(self) -> None:
        """A new denoising run started: forget the last run's log and fits (plans stay: they depend on shapes only)."""
        self.records.clear()
        self._forget_fits()
        self._last_step = None

    def _forget_fits(self) -> None:
        """Drop what the last denoising pass learnt of its content (plans stay: they depend on shapes only)."""
        self._layer_patterns.clear()
        self._fitted_at.clear()
        self._statistics.clear()

    # -- asked by processors ------------------------------------------------------------------
    @_eager  # a read of the tensor's values, once per call: eager (see SparseContextHook.pre_forward)
    def once_per_call(self, source: torch.Tensor, read):
        """`read(source)`, computed once per transformer call for the tensor every layer gets (a padding mask):
        later layers reuse the answer instead of reading the tensor again, which on a GPU is a host sync each."""
        state = self._state()
        # Keyed by where the tensor's data lives rather than by the tensor object: under context parallelism
        # diffusers hands each block a new view of the same slice of the call's mask (Qwen-Image).
        key = (source.data_ptr(), source.shape, source.stride(), source.device)
        if state.read_once is None or state.read_once[0] != key:
            state.read_once = (key, read(source))
        return state.read_once[1]

    def call_text_tokens(self) -> int | None:
        """The length of the current transformer call's `encoder_hidden_states` (the whole call's, also under context
        parallelism, where each process holds a slice of it), or `None` when it has none."""
        return self._state().text_tokens

    def call_layout(self) -> VideoLayout | None:
        """The token layout of the current transformer call, as the adapter's `read_call` gave it."""
        return self._state().layout

    @_eager  # see SparseContextHook.pre_forward
    def route(self, layer: int) -> bool:
        """Whether this call of `layer` goes through `attention` (sparse, or measuring a correction's statistics).

        Calls that stay with the original processor are logged here; a call from outside the transformer's forward
        (another model sharing the module) stays with it unlogged.
        """
        if not self.in_transformer_call:  # another model calling a module it shares: not this transformer's call
            if torch._C._current_graph_task_id() != -1:
                # Inside a backward pass: a checkpoint recomputing a block after the transformer call ended, not
                # through the model's `_gradient_checkpointing_func` (which `SparseContextHook` makes replay the
                # call). The original would run here, not the sparse path the forward took, and torch would stop
                # at the mismatch with an error that does not say why.
                raise RuntimeError(
                    f"diffsparse: {self.name}'s attention is recomputed during the backward pass by a checkpoint "
                    "other than the model's own gradient checkpointing (enable_gradient_checkpointing(), which "
                    "diffsparse replays), after the transformer call whose sparse plan it needs ended"
                )
            return False
        if _attention_scores_skipped():
            # A guider's perturbed pass (PerturbedAttentionGuidance, a LayerSkipConfig with `skip_attention_scores`)
            # replaces this call's attention by its values through the original's SDPA: the original runs it, and
            # it stays out of the stats as PAG pipelines' own processors do.
            return False
        mode = self._mode(layer)
        if mode == "dense":
            self._log_dense(layer)  # the schedule's own choice: nothing to warn about
        return mode != "dense"

    def log_dense(self, layer: int, *, why: str | None) -> None:
        """Log a call of `layer` that runs the original processor because the sparse path cannot compute it exactly
        (not the schedule's choice, which `route` logs itself), so `stats()` counts it dense; `why` says what
        about the call keeps it dense, as a phrase following "self-attention calls with", e.g. "a token-level
        attention_mask (which the kernel does not apply inside a block)" or "a softmax scale other than
        1 / sqrt(head_dim) (which the kernel is not given)"; `None` where nothing is to be added: a pass the model
        makes as the original by design in every run (GLM-Image's write of a condition image's key-value cache),
        nothing a caller could change, or a call whose processor said why in its own words (FLUX's families'
        `DenseMaskWarning`): counted, not said.

        The first such call with a given `why` that the runtime would have run sparse warns (`DiffsparseWarning`),
        once per reason for this runtime (one transformer of one `apply`: a pipeline with two, as Wan 2.2's experts,
        says it for each), however many steps and layers it covers: a run gone wholly or partly dense would
        otherwise show only as a missing speedup. A call the settings make dense anyway (the dense pattern, a dense
        step or layer) is counted, not said: nothing sparse was lost; a correction's measuring step is said (its
        statistics are not taken, so the next step measures again instead of running sparse). A call from outside
        the transformer's forward (another model sharing the module) is neither logged nor said."""
        if not self.in_transformer_call:
            return
        self._log_dense(layer)
        if why is not None and why not in self._warned_dense_calls and not self._dense_anyway(layer):
            self._warned_dense_calls.add(why)
            warnings.warn(
                f"diffsparse: {self.name}: self-attention calls with {why} run the original processor (dense, counted "
                "dense in stats())",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )

    def _dense_anyway(self, layer: int) -> bool:
        """Whether the settings make this call of `layer` dense whatever it carries (`_mode`, without its
        `StepScheduleWarning` where the run's step count is not known yet: then nothing says it is dense)."""
        state = self._state()
        if self._always_dense or self.config.is_dense_layer(layer):
            return True
        if state.num_steps is None and self._needs_step_count:
            return False
        return self._mode(layer) == "dense"

    def _log_dense(self, layer: int) -> None:
        """Log a dense call of `layer` in the transformer's forward, without a warning: the schedule's (`route`), or
        one whose caller has said why in its own words (`allow_frame_causal`)."""
        if not self.in_transformer_call:
            return
        state = self._state()
        self._log(CallRecord(state.step, layer, self.state_manager.context.name, False, 1.0))

    @_eager  # see SparseContextHook.pre_forward
    def allow_frame_causal(self, layer: int, frames: int) -> bool:
        """For a call `route` sent to `attention` whose self-attention mask is `FrameCausal(frames)`'s (SkyReels-V2's
        asynchronous diffusion forcing): whether `attention` applies that mask exactly, so the call may go on. It
        does when every kernel block of the call's layout, in the kernel's token order, is wholly allowed or wholly
        masked (one kernel call, the pattern's allowed blocks only), or else when that order keeps each group's
        tokens together (one kernel call per group: its queries against the keys up to its end). Data-dependent
        patterns are fitted on the masked attention (`Pattern.fit`'s `within`). Otherwise (or with
        `SparseConfig.correction`, whose dense measurement knows no mask) the call is logged dense, the caller runs
        the original processor, and a warning says why, once per layout."""
        state = self._state()
        layout, order = state.layout, self.config.layer_order(layer)
        key = (layout, frames, order)
        first = key not in self._causal_blocks
        whole = self._frame_causal_blocks(layout, frames, order) is not None
        grouped = not whole and self._frame_groups(layout, frames, order) is not None
        if (whole or grouped) and self.config.correction is None:
            state.frame_causal = frames
            return True
        if first:
            if whole or grouped:
                why = f"SparseConfig.correction={self.config.correction!r} measures dense attention without the mask"
            else:
                why = (
                    f"the {order!r} order mixes the groups' tokens (tiles across group boundaries); tiles of "
                    f"a frame count dividing {frames}, or frame-major order, keep them apart"
                )
            warnings.warn(
                f"diffsparse: {self.name}: self-attention with a causal mask over groups of {frames} frames on "
                f"{layout} runs the original processor (dense): {why}",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )
        self._log_dense(layer)  # said above, once per layout
        return False

    def _frame_causal_blocks(self, layout: VideoLayout, frames: int, order: TokenOrder) -> torch.Tensor | None:
        key = (layout, frames, order)
        if key not in self._causal_blocks:
            self._causal_blocks[key] = FrameCausal(frames).whole_blocks(layout, self.block_sizes, order=order)
        return self._causal_blocks[key]

    def _frame_groups(
        self, layout: VideoLayout, frames: int, order: TokenOrder
    ) -> tuple[tuple[int, int], ...] | None:
        """`(start, stop)` of each causal group of `frames` frames in the kernel's token order, or `None` when the
        order interleaves groups (or the sequence holds text): a group's queries then cannot attend a prefix."""
        key = (layout, frames, order)
        if key not in self._groups:
            bounds = FrameCausal(frames).group_bounds(layout, order)
            self._groups[key] = None if bounds is None else tuple(itertools.pairwise(bounds))
        return self._groups[key]

    def _dense_step(self, state: _BranchState) -> bool:
        """Whether the call is in a dense step of the schedule: its step's, or every frame's own (`frame_steps`)."""
        if state.dense_frames is not None:
            return len(state.dense_frames) == state.layout.frames
        return self._uncounted(state) or self.config.is_dense_step(state.step, state.num_steps)

    def _uncounted(self, state: _BranchState) -> bool:
        """Whether the call cannot follow the schedule: its run's step count is unknown (a call through a pipeline
        before it set its scheduler's timesteps, `StepClock`) and the config needs one (a fraction in `dense_steps`,
        or `dense_last_steps`). Such a call runs dense, said once with a `StepScheduleWarning`: the schedule is not
        followed."""
        if state.num_steps is not None or not self._needs_step_count:
            return False
        if not self._warned_uncounted:
            self._warned_uncounted = True
            warnings.warn(
                f"diffsparse: {self.name} was called before its pipeline set its scheduler's timesteps (outside "
                "the pipeline, a pass before its denoising loop, or another pipeline sharing the transformer with a "
                "scheduler of its own: one made with from_pipe(..., scheduler=...), which needs diffsparse.apply "
                "on it), so the run's step count is unknown and "
                f"SparseConfig.dense_steps={self.config.dense_steps!r} / dense_last_steps="
                f"{self.config.dense_last_steps!r} cannot be resolved: such calls run dense. Give dense_steps as "
                "an int and dense_last_steps=0 (steps then count distinct timesteps, as on a bare transformer), or "
                "set the pipeline scheduler's timesteps first",
                StepScheduleWarning, stacklevel=outside_stacklevel(),
            )
        return True

    def _log(self, record: CallRecord) -> None:
        if self._replaying:
            return
        state = self._state()
        record.dense_step = state.layout is not None and self._dense_step(state)
        self.records.append(record)
        tally(self.totals, record)

    @_eager  # see SparseContextHook.pre_forward
    def log_parts(self, parts: list) -> None:
        """Log the records that `attention(..., parts=parts)` collected as one call of their layer: sparse if any
        part was, its density over all their query-key pairs (a dense part's at 1), so `stats()` counts a layer call
        attended in groups once, at the density of the whole batch."""
        if not parts:
            return
        records = [record for record, _ in parts]
        total = sum(weight for _, weight in parts)
        density = sum(record.density * weight for record, weight in parts) / total if total else 1.0
        first = records[0]
        sparse = any(record.sparse for record in records)
        self._log(CallRecord(first.step, first.layer, first.branch, sparse, density, measured=not sparse))

    def add_observer(self, observer) -> None:
        """Call `observer(record, query, key, value, out, causal_groups=...)` after every call that `attention`
        computes, with the `CallRecord` and the `(B, S, H, D)` tensors in the layout's token order (the model's, unless
        its adapter gives a `token_order`) (diagnostics, e.g. `diffsparse.trace`). `causal_groups`: `None`, or under a
        causal frame-group mask (`allow_frame_causal`) the `(start, stop)` token range of each group in that order,
        whose queries attend the keys `[0, stop)` only: the attention `out` computed. Observers live until `remove`."""
        self._observers.append(observer)

    def _mode(self, layer: int, shape: torch.Size | None = None, layout: VideoLayout | None = None,
              videos: int | tuple[int, ...] | None = None) -> str:
        """`"dense"` (the original processor), `"measure"` (dense, taking statistics) or `"sparse"`; `videos`: the
        `_videos_key` of a call that fits or corrects (its fit's slot and its statistics' key), with its `shape`.
        Without it (`route`, which only asks whether the call is dense) no statistics are looked up."""
        state = self._state()
        layout = state.layout if layout is None else layout
        if self._always_dense or state.layout is None or self.config.is_dense_layer(layer) or self._uncounted(state):
            return "dense"
        measured_at, stats = None, None
        if self.config.correction is not None and videos is not None:
            stats = self._statistics.get((layer, self.state_manager.context.name, layout, videos))
        if stats is not None:
            # A data-dependent pattern that searched again after the measurement keeps other blocks: the residual
            # of the old ones would count blocks twice and miss others (1.07 off dense where a fresh one is exact).
            fits = (layer, layout, videos, state.frame_causal)
            refitted = max((at for slot, at in self._fitted_at.items() if slot[:4] == fits), default=-1)
            if (shape is None or stats.residual.shape == shape) and refitted <= stats.step:
                measured_at = stats.step
        return step_mode(self.config, state.step, state.num_steps, measured_at, dense=self._dense_step(state))

    @_eager  # see SparseContextHook.pre_forward
    def attention(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: VideoLayout | None = None,
        heads: HeadShard | None = None,
        video_queries: bool = False,
        return_lse: bool = False,
        outside_pairs: int = 0,
        parts: list | None = None,
        videos: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Block-sparse attention on `(B, S, H, D)` tensors (the diffusers processor layout).

        `layout`: the token layout of these tensors when it is not the call's (`begin_call`), e.g. a batch whose
        videos carry different numbers of valid text tokens, attended in groups (HunyuanVideo).
        `heads`: which of the model's heads the tensors hold, when only some (context parallelism; under
        tensor parallelism the call's context says so itself), so a pattern with one mask per head gives these heads
        theirs and a fit shared over the layer's heads sees all.
        The call's own tensors are taken in the model's token order: the adapter's `token_order`, if it gave one,
        puts them in the layout's order and the output back in the model's.
        `video_queries`: the queries (and so the output) are the layout's video tokens only, the keys and values the
        whole sequence, its text span first: a model that attends the prefix's queries elsewhere or not at all (a
        cache of the prefix's keys and values, Qwen-Image 2.1). Not with a token order or a causal frame-group mask.
        `return_lse`: also return the float32 log-sum-exp of the scaled scores the output is over, `(B, S, H, 1)`,
        for a caller that merges this output with attention over other keys (Chroma's masked prompt padding); under
        `SparseConfig.correction` the corrected output's, estimated as the kept scores' less `log(rho)`.
        `outside_pairs`: query-key pairs of the same attention that the caller computes densely outside these
        tensors; the call's record then counts them (its density is over the layout's pairs and these).
        `parts`: a list that collects this call's record instead of the log, for a processor that attends one layer
        call in several runtime calls (groups of videos, padded prompts): `log_parts` then logs them as one call.
        `videos`: which videos of the layer call the tensors hold, their indices in its batch (a sequence of ints or a
        1-D tensor, one per video of the tensors, in their order), for such a processor's group of videos; default:
        all of the call's videos, in order. A data-dependent pattern's fit made on a group is reused for the same
        videos only: not for another group of the call, nor for the other CFG branch's group of other videos on the
        same layout; so are `SparseConfig.correction`'s statistics (per CFG branch). A tensor is read on the host (a
        sync on a GPU) only by a runtime that fits or corrects.
        """
        state = self._state()
        start = 0
        if video_queries:
            start = self._video_queries_start(layout or state.layout, layout is None and state.token_order is not None,
                                              state.frame_causal)
        if heads is None and state.tensor_parallel is not None:
            group, rank = state.tensor_parallel
            heads = HeadShard.in_group(rank, query.shape[2], group)
        given_layout, layout = layout, state.layout if layout is None else layout
        if key.shape[1] != layout.num_tokens or query.shape[1] != layout.num_tokens - start:
            # An adapter's layout that is not the sequence it attends: said in its terms, not the kernel plan's
            # ("q and k lengths must match the plan's"); before a token order reorders them to the layout's length.
            raise ValueError(
                f"diffsparse: {self.name}: the call's layout {layout} holds {layout.num_tokens} tokens, but the "
                f"attention got {query.shape[1]} queries and {key.shape[1]} keys; the adapter read this call's "
                "token layout wrongly (please report it with the model's config and input sizes); pattern='dense' "
                "runs the original meanwhile"
            )
        token_order = self._token_order(query.device) if given_layout is None else None
        if token_order is not None:
            query, key, value = (x.index_select(1, token_order[1]) for x in (query, key, value))
        branch = self.state_manager.context.name
        pattern = self.pattern
        # Which videos of the layer call these are: a fit and a correction's statistics are kept for them alone.
        videos = self._videos_key(query.shape[0], videos) if self._fits or self.config.correction is not None else None
        if self._fits:
            # A fit reads the whole sequence's queries; it is told which ones the call computes (`queries_from`) and
            # the text's rows are kept whole whatever it finds, so zeros stand in for the queries the call does not
            # hold.
            fit_query = query
            if start:
                fit_query = torch.cat([query.new_zeros(query.shape[0], start, *query.shape[2:]), query], dim=1)
            pattern = self._layer_pattern(layer, layout, fit_query, key, value, state.frame_causal, heads,
                                          start, outside_pairs, videos)
        head_range = None if heads is None else (heads.first, heads.total)
        cached = self.plan(
            layout, query.shape[2], query.device, pattern, head_range, state.frame_causal, state.dense_frames or (),
            start, self.config.layer_order(layer), outside_pairs,
        )
        inputs = (query, key, value)
        if cached.perm is not None:
            # The text span maps to itself, so the video queries' order is the video part of the keys' order.
            query = query.index_select(1, cached.perm[start:] - start)
            key, value = (x.index_select(1, cached.perm) for x in (key, value))
        mode = self._mode(layer, query.shape, layout, videos)
        if mode == "measure":
            out, lse = self._measure((layer, branch, layout, videos), state.step, query, key, value, cached.plan)
        elif cached.groups:
            # Each causal group's queries attend every key up to the group's end: the mask, exactly.
            outs, lses = zip(*(
                self._attend(query[:, a:b], key[:, :b], value[:, :b], plan, return_lse) for a, b, plan in cached.groups
            ))
            out, lse = torch.cat(outs, dim=1), (torch.cat(lses, dim=1) if return_lse else None)
        else:
            out, lse = self._attend(query, key, value, cached.plan, return_lse=return_lse)
            if self.config.correction is not None:
                stats = self._statistics[(layer, branch, layout, videos)]
                out = torch.addcmul(stats.residual, stats.rho, out).type_as(out)
                if return_lse:  # rho: the kept scores' share of the whole denominator, as measured
                    lse = lse - torch.log(stats.rho.clamp_min(torch.finfo(stats.rho.dtype).tiny))
        if cached.perm is not None:
            inverse = cached.inverse[start:] - start
            out = out.index_select(1, inverse)
            lse = None if lse is None else lse.index_select(1, inverse)
        sparse = mode == "sparse"
        density = cached.density if sparse else 1.0
        pairs = query.shape[1] * key.shape[1]
        if outside_pairs:
            density = (density * pairs + outside_pairs) / (pairs + outside_pairs)
        record = CallRecord(state.step, layer, branch, sparse, density, measured=not sparse)
        if parts is None:
            self._log(record)
        else:
            parts.append((record, query.shape[0] * (pairs + outside_pairs)))
        if self._observers and not self._replaying:
            # The mask the call computed under, so an observer's reference is the same attention, not the unmasked.
            groups = self._frame_groups(layout, state.frame_causal, IdentityOrder()) if state.frame_causal else None
            for observer in self._observers:
                observer(record, *inputs, out, causal_groups=groups)
        if token_order is not None:
            out = out.index_select(1, token_order[0])
            lse = None if lse is None else lse.index_select(1, token_order[0])
        return (out, lse) if return_lse else out

    @staticmethod
    def _video_queries_start(layout: VideoLayout, token_order: bool, frame_causal: int) -> int:
        """Where the video queries start in `layout` (`attention(..., video_queries=True)`); a `ValueError` for the
        calls that cannot have queries on the video tokens alone."""
        if layout.text_len and layout.text_position != "start":
            raise ValueError(f"video_queries needs the text span first, got {layout}")
        if token_order or frame_causal:
            raise ValueError("video_queries cannot be combined with a token order or a causal frame-group mask")
        return layout.video_start

    def _token_order(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The call's token order and its inverse on `device` (moved there once per call)."""
        state = self._state()
        if state.token_order is not None and state.token_order[0].device != device:
            state.token_order = tuple(index.to(device) for index in state.token_order)
        return state.token_order

    def to_layout_order(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, S, ...)` tensors of the call's whole sequence, from the model's token order to the layout's (as is
        when the adapter gave no token order): for processors that cut the sequence into prefixes themselves and
        pass `attention` explicit layouts, which it takes in the layout's order."""
        token_order = self._token_order(x.device)
        return x if token_order is None else x.index_select(1, token_order[1])

    def to_model_order(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_layout_order`."""
        token_order = self._token_order(x.device)
        return x if token_order is None else x.index_select(1, token_order[0])

    def _attend(self, query, key, value, plan: BlockSparsePlan, return_lse: bool = False):
        """The kernel on `(B, S, H, D)` tensors: `(out, lse)`, `lse` as `(B, S, H, 1)` or `None` unless asked."""
        result = block_sparse_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            plan,
            return_lse=return_lse,
            backend=self.config.backend,
        )
        if not return_lse:
            return result.transpose(1, 2), None
        out, lse = result
        return out.transpose(1, 2), lse.transpose(1, 2).unsqueeze(-1)

    @staticmethod
    def _videos_key(batch: int, videos: Sequence[int] | torch.Tensor | None) -> int | tuple[int, ...]:
        """Which videos of the layer call a runtime call's `batch` are (`attention`'s `videos`), as the fits are
        keyed: the batch size where they are the call's first ones in order (all of them by default),
        else their indices."""
        if videos is None:
            return batch
        videos = tuple(int(i) for i in (videos.tolist() if isinstance(videos, torch.Tensor) else videos))
        if len(videos) != batch:
            raise ValueError(f"videos must give one index per video of the tensors' batch ({batch}), got {videos}")
        return batch if videos == tuple(range(batch)) else videos

    def _measure(self, slot: tuple, step, query, key, value, plan: BlockSparsePlan):
        """Dense attention `(out, lse)` that also records `SparseConfig.correction`'s statistics for later sparse
        calls, under `slot`: (layer, CFG branch, layout, videos (`_videos_key`))."""
        dense_plan = self._dense_plan(plan, query.device)
        out_full, lse_full = self._attend(query, key, value, dense_plan, return_lse=True)
        out_sparse, lse_sparse = self._attend(query, key, value, plan, return_lse=True)
        # Kept scores are a subset of all scores, so lse_sparse <= lse_full and rho is in (0, 1].
        rho = torch.exp(lse_sparse - lse_full)
        residual = out_full.float() - rho * out_sparse.float()
        # Detached: statistics are constants of later calls, not part of this call's autograd graph (training).
        residual = residual.to(out_full.dtype).detach()
        self._statistics[slot] = _Statistics(step, rho.detach(), residual)
        return out_full, lse_full

    def _dense_plan(self, plan: BlockSparsePlan, device: torch.device) -> BlockSparsePlan:
        """A plan with every block kept, the same lengths and block sizes as `plan`."""
        return self._every_block(plan.q_len, plan.kv_len, (plan.block_q, plan.block_k), device)

    def _every_block(self, q_len: int, kv_len: int, block_sizes: tuple[int, int], device) -> BlockSparsePlan:
        """A plan keeping every block of `q_len` queries over `kv_len` keys (cached with the others)."""
        nq, nk = (math.ceil(n / b) for n, b in zip((q_len, kv_len), block_sizes))

        def build() -> _CachedPlan:
            dense = make_plan(torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device), q_len, kv_len, block_sizes)
            return _CachedPlan(dense, None, None, dense.density)

        return self._cached(("every block", q_len, kv_len, *block_sizes, str(device)), build).plan

    def dense_attention(self, query, key, value) -> tuple[torch.Tensor, torch.Tensor]:
        """`(out, lse)` of dense attention on `(B, S, H, D)` tensors (queries and keys of any lengths) through the
        configured kernel, `lse` as `attention(..., return_lse=True)` gives it: for a processor merging attention
        over keys a layout does not hold (Chroma's masked prompt padding). Logs nothing: the processor's
        `attention` call counts these pairs (`outside_pairs`)."""
        return self._attend(query, key, value, self._every_block(query.shape[1], key.shape[1], self.block_sizes,
                                                                 query.device), return_lse=True)

    def _layer_pattern(
        self, layer: int, layout: VideoLayout, query, key, value, frame_causal: int = 0, shard: HeadShard | None = None,
        queries_from: int = 0, outside_pairs: int = 0, videos: int | tuple[int, ...] | None = None,
    ) -> tuple[Pattern, ...]:
        """The layer's fitted patterns, one per video of the batch (one for all when they are equal).

        Each video is fitted on its own queries, keys and values (with the same generator seed), so a video's
        blocks, and so its result, do not depend on what else shares its batch: a batch of prompts gives each
        the video it gets alone. The fit is kept per (layer, layout, videos), not per CFG branch: where the
        pipeline calls the transformer once per branch (Wan), the branches share the fit of whichever runs first
        (the cond call), video by video, unless their batch sizes differ; where it batches the branches into one
        call (PixArt), each half of the batch is videos of their own, each fitted on its own tensors. `videos`:
        `attention`'s, as `_videos_key` gives it (default: the batch size, the call's whole batch): a processor that
        attends a layer call in groups of videos (`attend_valid_prefixes`, `attend_kept_tokens`) reuses a fit for
        the same videos only, never another group's, nor the other branch's group of other videos on the same
        layout. The fit is made at the layer's first call that reaches `attention`: its first sparse step, or with
        `SparseConfig.correction` the measuring step before it (the last dense step). Under a causal frame-group
        mask (`frame_causal`, `allow_frame_causal`) the fit measures the masked attention. Calls of one layer that
        compute other query rows (`queries_from`) or leave other pairs outside (`outside_pairs`) have fits of their
        own: a search is over the blocks of the rows computed, at the density their outside pairs leave.
        """
        batch = query.shape[0]
        slot = (layer, layout, batch if videos is None else videos, frame_causal, queries_from, outside_pairs)
        patterns = self._layer_patterns.get(slot)
        step = self._state().step
        every = self.pattern.refit_every
        if patterns is None or (every and step - self._fitted_at[slot] >= every):
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))
            unfitted = self.pattern
            target = self._density_target(layout, queries_from, outside_pairs)
            if target != self.config.density and self._searches:
                # A searched pattern's `keep` is the density, which its search needs (`SparseConfig` sets it): the
                # search keeps what the call's outside pairs leave the layout (`_at_density`).
                unfitted = unfitted.at_density(layout, target, self.block_sizes)
            # The searched patterns' `keep` is over the blocks of the queries the call computes, as a static
            # pattern's density is solved (`_at_density`): else the text rows of a `video_queries` call, kept whole,
            # took their blocks out of the video rows' budget, then were left out of the call (0.21 for 0.3).
            # Given only when set: a custom pattern's `fit` written before `q_tokens` existed keeps working.
            span = {"q_tokens": (queries_from, layout.num_tokens)} if queries_from else {}
            patterns = tuple(
                unfitted.fit(
                    q[i : i + 1], k[i : i + 1], v[i : i + 1], layout, self.block_sizes,
                    order=self.config.layer_order(layer),
                    generator=torch.Generator(device=query.device).manual_seed(layer),
                    within=FrameCausal(frame_causal) if frame_causal else None, shard=shard, **span,
                )
                for i in range(batch)
            )
            if all(p == patterns[0] for p in patterns[1:]):
                patterns = patterns[:1]  # one mask for the whole batch
            if self.config.density is None:
                # A fit can keep every block too: `spatial_temporal` on one or two frames, where its spatial kind
                # holds every key, classifies every head spatial. Checked on the first fit of each layout only.
                self._warn_if_every_block_kept(patterns[0], layout, self.config.layer_order(layer),
                                               span.get("q_tokens"), checked_as=self.pattern)
            self._layer_patterns[slot] = patterns
            self._fitted_at[slot] = step
        return patterns

    def solved_patterns(self) -> list[Pattern]:
        """The instances `SparseConfig.density` was solved into so far, one per layout (and token order, query
        range, outside pairs), in the order they were first solved; empty without a density and for fitted
        patterns (fitted anew for each layer and run, not kept)."""
        return list(self._solved.values())

    def plan(
        self,
        layout: VideoLayout,
        heads: int,
        device: torch.device,
        pattern: Pattern | tuple[Pattern, ...] | None = None,
        head_range: tuple[int, int] | None = None,
        frame_causal: int = 0,
        dense_frames: tuple[int, ...] = (),
        queries_from: int = 0,
        order: TokenOrder | None = None,
        outside_pairs: int = 0,
    ) -> _CachedPlan:
        """The cached plan for this layout; a new resolution builds a new one, never a stale reuse.

        `pattern`: the runtime's pattern (`None`), or a tuple of one pattern per video of the batch (fitted
        patterns), whose masks then stack along the plan's batch dim (a 1-tuple serves every video).
        `head_range`: `(first head, the model's heads)` when the `heads` attended are a slice of the model's.
        `frame_causal`: frames per group of a `FrameCausal` mask the plan keeps only the allowed blocks of
        (`allow_frame_causal`); `0`: none. `dense_frames`: frames whose queries keep every key (`begin_call`).
        `queries_from`: the plan's queries are the tokens from this one on, its keys all of them (`attention`'s
        `video_queries`). `order`: the token order the kernel sees (default: layer 0's, `SparseConfig.layer_order`).
        `outside_pairs`: pairs of the call computed densely outside the layout (`attention`'s), which
        `SparseConfig.density` counts: the layout is solved for what the call's density leaves it.
        """
        patterns = (self.pattern,) if pattern is None else pattern if isinstance(pattern, tuple) else (pattern,)
        order = self.config.layer_order(0) if order is None else order
        if self.config.density is None:  # the pattern's own parameters: outside pairs change nothing
            outside_pairs = 0
        return self._cached(
            (patterns, layout, heads, head_range, frame_causal, dense_frames, queries_from, order, outside_pairs,
             str(device)),
            lambda: self._build_plan(patterns, layout, heads, device, order, head_range, frame_causal, dense_frames,
                                     queries_from, outside_pairs),
        )

    def _at_density(
        self, pattern: Pattern, layout: VideoLayout, order: TokenOrder, queries_from: int = 0, outside_pairs: int = 0
    ) -> Pattern:
        """`pattern` solved for `SparseConfig.density` on `layout` (over the blocks of the queries from
        `queries_from` on, those a `video_queries` call computes). A static pattern is solved once per layout: its
        plans that differ only in their causal groups or dense frames (a diffusion-forcing wave makes a new set of
        early frames every few rows) share the solution, whose bisection costs far more than the masks.
        `outside_pairs` (`attention`'s) run dense whatever the solution, so the layout gets the density that leaves
        the whole call at the target: else Chroma's masked prompt padding ran dense on top of a layout solved for
        the target alone (0.40 for 0.25)."""
        q_tokens = (queries_from, layout.num_tokens) if queries_from else None
        target = self._density_target(layout, queries_from, outside_pairs)

        def solve() -> Pattern:
            return pattern.at_density(layout, target, self.block_sizes, order=order, q_tokens=q_tokens)

        if self._fits:  # fitted anew for each layer and run: nothing to share (its `keep` is the density asked)
            solved = solve()
            # Judged on the layout's first fit, for the configured pattern: a density per fit (0.2 s for
            # spatial_temporal at Wan 480p) on every layer of every run would cost more than the warning is worth.
            if (self.pattern, layout) not in self._reach_checked:
                self._reach_checked.add((self.pattern, layout))
                self._warn_if_out_of_reach(self.pattern, solved, layout, order, q_tokens, outside_pairs, first_fit=True)
            return solved
        key = (pattern, layout, order, queries_from, outside_pairs)
        if key not in self._solved:
            self._solved[key] = solve()
            self._warn_if_out_of_reach(pattern, self._solved[key], layout, order, q_tokens, outside_pairs)
        return self._solved[key]

    def _density_target(self, layout: VideoLayout, queries_from: int = 0, outside_pairs: int = 0) -> float | None:
        """The density the layout is solved for: `SparseConfig.density`, less what `outside_pairs` (computed densely
        outside the layout, `attention`'s) take of the whole call's."""
        target = self.config.density
        if not outside_pairs or target is None:
            return target
        pairs = (layout.num_tokens - queries_from) * layout.num_tokens
        # At least one key block per query row: `at_density` takes no target <= 0, and gives the pattern's sparsest
        # where the outside pairs leave less (`_warn_if_out_of_reach` then says how far the call is off).
        floor = 1 / math.ceil(layout.num_tokens / self.block_sizes[1])
        return max((target * (pairs + outside_pairs) - outside_pairs) / pairs, floor)

    def _warn_if_out_of_reach(
        self, pattern: Pattern, solved: Pattern, layout: VideoLayout, order: TokenOrder, q_tokens,
        outside_pairs: int = 0, first_fit: bool = False,
    ) -> None:
        """Warn, once per (pattern, layout), when the solved density is far from `SparseConfig.density`: the nearest
        density a pattern reaches can be far off on a small layout (`Radial` keeps neighbouring frames whole, so a
        single image or two frames stay dense whatever the target), which would only show up as a missing
        speedup. With `outside_pairs`, the density judged is the whole call's, as `stats()` reports it. `first_fit`:
        `solved` is the first layer's fit on the layout (the others fit their own heads: `spatial_temporal`'s
        kinds differ by layer), and the warning says so.

        A searched pattern (`solved` is one layer's search) keeps at most its budget by design (`top_p`, windows
        under the layer's budget), so only a denser one is said: the blocks every pattern keeps (text rows and
        columns, each query block's diagonal) or its sparsest windows are more than the target. Before, fitted
        patterns were not checked, and a search on a layout with a quarter of text ran at 0.50 for 0.25 without a
        word."""
        if (pattern, layout) in self._warned_density:
            return
        target = self.config.density
        reached = solved.density(layout, self.block_sizes, order, q_tokens)
        outside = ""
        if outside_pairs:
            pairs = (layout.num_tokens - (q_tokens or (0,))[0]) * layout.num_tokens
            reached = (reached * pairs + outside_pairs) / (pairs + outside_pairs)
            outside = f" with the {outside_pairs} query-key pairs the call computes densely outside it"
        if not out_of_reach(target, reached) or (self._searches and reached < target):
            return
        self._warned_density.add((pattern, layout))
        if self._searches:
            why = (f"the least it keeps there (text rows and columns, each query block's diagonal"
                   f"{'' if pattern.name == 'searched' else ', its smallest windows'}) comes to {reached:.3f}")
            others = "A smaller SparseConfig.block_size (fewer tokens in each of those blocks)"
            if pattern.name != "searched":
                others = '"searched" (whose blocks need not be windows) or a smaller SparseConfig.block_size'
        else:
            why = f"the nearest density it reaches there is {reached:.3f}"
            others = '"searched" (whose `keep` is the density)'
            if pattern.name != "window3d":
                others = f'"window3d" (whose windows shrink within a frame too) or {others}'
        warnings.warn(
            f"diffsparse: {self.name}: SparseConfig.density={target} is out of reach of {pattern!r} on {layout}"
            f"{outside}: {why}, so {'the first layer fitted on ' if first_fit else ''}this layout runs "
            f"{'denser' if reached > target else 'sparser'} than asked. "
            f"{others} may come closer",
            category=DiffsparseWarning,
            stacklevel=outside_stacklevel(),
        )

    def _warn_if_every_block_kept(
        self, pattern: Pattern, layout: VideoLayout, order: TokenOrder, q_tokens, checked_as: Pattern | None = None
    ) -> None:
        """Warn, once per (pattern, layout), when a pattern on its own parameters (no `SparseConfig.density`) keeps
        every block of the layout: the call then runs dense through the sparse kernel, slower than the original
        (1.27x SDPA's time for a FLUX image of 48 x 48 tokens, CPU), which would only show up as a missing speedup.
        The default `radial` keeps frame distance 0 whole, so on an image (one frame) it keeps everything.
        `checked_as`: the pattern the once-per-layout memory is kept under, for a fitted `pattern` (a new instance
        per layer and run): the configured one."""
        # A layout within one key block has no block to leave out, whatever the pattern: nothing to suggest.
        one_block = layout.num_tokens <= self.block_sizes[1]
        checked = (checked_as or pattern, layout)
        if pattern.name == "dense" or one_block or checked in self._checked_every_block:
            return
        self._checked_every_block.add(checked)
        # Edge blocks count whole, so "every block" is a density of 1 up to rounding.
        if pattern.density(layout, self.block_sizes, order, q_tokens) < 0.999:
            return
        others = 'pattern="searched"'
        if pattern.name != "window3d":
            others = f'pattern="window3d" (whose windows shrink within a frame too) or {others}'
        warnings.warn(
            f"diffsparse: {self.name}: {pattern!r} keeps every block on {layout}, so this layout runs dense, at the "
            f"sparse kernel's cost (slower than the original attention): SparseConfig {others}, with a density "
            "to say how many blocks to keep, leaves blocks out there",
            category=DiffsparseWarning,
            stacklevel=outside_stacklevel(),
        )

    def _cached(self, key: tuple, build) -> _CachedPlan:
        """The plan cache (least recently used out first): `_PLAN_CACHE_SIZE` plans, and one more for each fit the
        run holds (`_layer_patterns`)."""
        cached = self._plans.get(key)
        if cached is None:
            cached = self._plans[key] = build()
            # Each fit's plan is used once per step, in the layers' order: a fixed size below the run's fits (60
            # layers x 2 CFG layouts) would evict every plan just before its next use and rebuild all at each step.
            # A new run drops its fits, and the cache shrinks back as it fills.
            while len(self._plans) > _PLAN_CACHE_SIZE + len(self._layer_patterns):
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return cached

    def _build_plan(
        self,
        patterns: tuple[Pattern, ...],
        layout: VideoLayout,
        heads: int,
        device: torch.device,
        order: TokenOrder,
        head_range: tuple[int, int] | None = None,
        frame_causal: int = 0,
        dense_frames: tuple[int, ...] = (),
        queries_from: int = 0,
        outside_pairs: int = 0,
    ) -> _CachedPlan:
        if self.config.density is not None:
            patterns = tuple(self._at_density(p, layout, order, queries_from, outside_pairs) for p in patterns)
        elif not self._fits:  # fits are checked once per layout as they are made (`_layer_pattern`)
            for pattern in patterns:
                self._warn_if_every_block_kept(pattern, layout, order,
                                               (queries_from, layout.num_tokens) if queries_from else None)

        rows = DenseQueryFrames(dense_frames) if dense_frames else None

        def stacked(allowed=None, **tokens) -> torch.Tensor:
            """The patterns' block masks (between the token ranges `q_tokens`, `k_tokens` when given), the rows of
            `dense_frames` whole."""
            whole_rows = None if rows is None else rows.block_mask(layout, self.block_sizes, order=order, **tokens)
            masks = []
            for pattern in patterns:
                mask = pattern.block_mask(layout, self.block_sizes, order=order, **tokens)
                if head_range is not None and mask.shape[0] == head_range[1] != heads:
                    # One mask per head of the model; a pattern fitted on these heads' own q, k has `heads` already.
                    mask = mask[head_range[0] : head_range[0] + heads]
                if mask.shape[0] not in (1, heads):
                    raise ValueError(
                        f"pattern {pattern!r} gives masks for {mask.shape[0]} heads, but the model has {heads=}"
                    )
                if whole_rows is not None:
                    mask = mask | whole_rows
                if allowed is not None:
                    mask = mask & allowed
                masks.append(mask if len(patterns) == 1 else mask.expand(heads, *mask.shape[1:]))
            return torch.stack(masks).to(device)

        n = layout.num_tokens
        perm = (None, None)
        if not isinstance(order, IdentityOrder):
            perm = (order.permutation(layout).to(device), order.inverse(layout).to(device))
        if queries_from:
            plan = make_plan(stacked(q_tokens=(queries_from, n), k_tokens=(0, n)), n - queries_from, n,
                             self.block_sizes, q_offset=queries_from)
            return _CachedPlan(plan, *perm, plan.density)
        allowed = self._frame_causal_blocks(layout, frame_causal, order) if frame_causal else None
        if not frame_causal or allowed is not None:
            plan = make_plan(stacked(allowed), n, n, self.block_sizes)
            return _CachedPlan(plan, *perm, plan.density)
        groups = self._frame_groups(layout, frame_causal, order)
        if groups is None:
            raise ValueError(
                f"FrameCausal({frame_causal}) on {layout} neither fills whole blocks of {self.block_sizes} nor keeps "
                f"its groups apart in {order!r} order: allow_frame_causal refuses such calls"
            )
        parts = tuple(
            (a, b, make_plan(stacked(q_tokens=(a, b), k_tokens=(0, b)), b - a, b, self.block_sizes, q_offset=a))
            for a, b in groups
        )
        # The kernel's work against the whole call's: each group computes its partial edge blocks whole, so where
        # groups are short against a block this passes 1 (two groups of 32 tokens at block 64: 2.0), more work than
        # dense attention; counted as it is, and said once per layout and group size (each step's dense frames
        # make a new plan).
        blocks = math.ceil(n / self.block_sizes[0]) * math.ceil(n / self.block_sizes[1])
        density = sum(plan.density * plan.num_q_blocks * plan.num_kv_blocks for _, _, plan in parts) / blocks
        if density > 1 and (layout, frame_causal) not in self._warned_causal_work:
            self._warned_causal_work.add((layout, frame_causal))
            sizes = sorted({b - a for a, b in groups})
            warnings.warn(
                f"diffsparse: {self.name}: the causal groups of {frame_causal} frames on {layout} ({sizes} tokens) "
                f"are cut into blocks of {self.block_sizes} group by group, each group's partial blocks computed "
                f"whole: {density:.3g}x the blocks of dense attention. A block size dividing the groups' length "
                "keeps whole blocks (one kernel call)",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )
        return _CachedPlan(None, *perm, density, parts)


def _attention_scores_skipped() -> bool:
    """Whether diffusers' layer-skip hook has the current attention module's scores replaced (its torch function
    mode turns the original's `scaled_dot_product_attention` into the values, which the sparse kernel would not)."""
    return any(isinstance(mode, AttentionScoreSkipFunctionMode)
               for mode in torch.overrides._get_current_function_mode_stack())


class SparseContextHook(ModelHook):
    """Sets the runtime's call context (step, layout) before each transformer forward.

    `read_call(module, args, kwargs) -> (layout, timestep)` or `(layout, timestep, token_order)` is the model
    adapter's knowledge of where the latent grid and the timestep are in the transformer's inputs (and, when its
    tokens are not in the layout's order, where each one is in the layout: `SparseRuntime.begin_call`).
    `on_new_run(num_steps)`: called at the first call of each denoising run (`num_steps`: `None` when unknown).
    `per_frame_steps`: a call with one timestep per frame gives the runtime each frame's step
    (`ModelAdapter.per_frame_steps`). `installed`: `(attention module, sparse processor)` pairs, to warn once when
    any of them was replaced after `apply` (those layers then run without sparse attention).
    """

    _is_stateful = True

    def __init__(self, runtime: SparseRuntime, clock: StepClock, read_call, on_new_run, per_frame_steps=False,
                 installed=()):
        super().__init__()
        self._installed = tuple(installed)
        self._warned_replaced = False
        self.runtime = runtime
        self.state_manager = runtime.state_manager
        self._clock = clock
        self._per_frame_steps = per_frame_steps
        self._read_call = read_call
        self._on_new_run = on_new_run
        self._own_context = False
        self._took_place = False  # the current call is named by its place among its step's calls
        self._in_forward = False
        self._last_step: int | None = None
        self._last_run = 0  # the clock's `runs` at this hook's last named call
        self._call_in_step = 0
        self._warned_many_calls = False
        self._checkpointing: list[tuple[torch.nn.Module, object]] = []  # (module, its own checkpointing function)
        self.module_forward = None  # the registry's wrapper of the module's forward (`register_context_hook`)

    # Under torch.compile the step clock, planning and kernel dispatch run eagerly (`_eager` on the
    # hook and on the processors' two runtime calls): tracing them would only break the graph at every
    # data-dependent op (4x the graphs, 4x the first call's compile time on the tiny Wan) and guard on Python state.
    @_eager
    def _abandon_call(self):
        """Close a forward that raised (an out-of-memory error, an interrupt), whose `post_forward` never runs: else
        the calls after it would inherit its branch name ("call 0") and share that branch's state, and a module the
        transformer shares with another model (Z-Image's ControlNet) would take that model's calls for its own."""
        if self._in_forward:
            self._call_in_step -= self._took_place  # its place among the step's calls is free again
            self._close_call()

    @_eager
    def pre_forward(self, module, *args, **kwargs):
        # A failed call that `new_forward` did not close (an exception that escaped it) is closed here, before this
        # call.
        self._abandon_call()
        self._in_forward = True
        try:
            self._replay_checkpoints(module)
            return self._begin(module, args, kwargs)
        except BaseException:  # a call the adapter refused
            self._abandon_call()
            raise

    def _begin(self, module, args, kwargs):
        self._warn_if_replaced()
        whole_args, whole_kwargs = _whole_call(module, args, kwargs)
        layout, timestep, *token_order = self._read_call(module, whole_args, whole_kwargs)
        text = forward_input(module, whole_args, whole_kwargs, "encoder_hidden_states")
        step, num_steps, new_run = self._clock.tick(timestep)
        if new_run:
            self._on_new_run(num_steps)
        # A call outside any pipeline `cache_context` (a bare transformer; pipelines whose guidance runs the CFG
        # branches one call after another without naming them: modular pipelines, Kandinsky 5) is named by its
        # place among its step's calls, "call 0", "call 1", ...: each branch keeps its own state (a correction's
        # statistics) instead of every branch sharing one.
        self._own_context = self.state_manager._context is None
        self._took_place = self._own_context and layout is not None
        if self._own_context:
            # The clock's run count, not `new_run`: that is told to the first expert's hook alone, and the second's,
            # first called at the step it last ran in the run before, carried on counting its places ("call 2") there.
            same_step = self._clock.runs == self._last_run and step == self._last_step
            if not same_step:
                self._call_in_step, self._last_step, self._last_run = -1, step, self._clock.runs
            # A call the adapter gives no layout runs the original throughout (a pass that fills a KV cache, as
            # Wan-Animate-2's reference pass at the segment's first timestep): no CFG branch, so it takes no place
            # among its step's calls, which would shift every branch's name (and state) in that step.
            self._call_in_step += self._took_place
            if num_steps is None and self._call_in_step == _MANY_CALLS_PER_STEP:
                self._warn_many_calls(float(timestep.detach().float().max()))
            name = f"call {self._call_in_step}" if layout is not None else "original"
            self.state_manager.set_context(CacheContext(name))
        frame_steps = None
        if self._per_frame_steps and layout is not None:
            frame_steps = self._clock.frame_steps(timestep, layout.frames)
        self.runtime.begin_call(
            layout, step, num_steps, *token_order, frame_steps=frame_steps, tensor_parallel=_tensor_parallel(module),
            text_tokens=text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else None,
        )
        return args, kwargs

    def _warn_many_calls(self, t: float) -> None:
        if self._warned_many_calls:
            return
        self._warned_many_calls = True
        warnings.warn(
            f"diffsparse: {self.runtime.name} got more than {_MANY_CALLS_PER_STEP} calls at timestep {t:g} without a "
            "scheduler to time them, more than guidance gives one step: they count as one step of one run, each "
            "call its own CFG branch with its own state (so the first call's searched blocks serve the others, a "
            "correction measures at every call and keeps each call's statistics). A bare transformer starts a new "
            "run only at a larger timestep, which a one-step model or a loop timing one step never gives: call "
            "handle.new_run() (on the handle diffsparse.apply returned) before each generation",
            category=DiffsparseWarning,
            stacklevel=outside_stacklevel(),
        )

    def _warn_if_replaced(self) -> None:
        # Once per transformer. PAG pipelines put their own processors (diffusers' `PAG...` classes) on the perturbed
        # layers for each call and restore ours after it: those are not replacements.
        if self._warned_replaced or not self._installed:
            return
        replaced = [(module, processor) for module, processor in self._installed if module.processor is not processor]
        if not replaced or all(type(module.processor).__name__.startswith("PAG") for module, _ in replaced):
            return
        self._warned_replaced = True
        now = type(replaced[0][0].processor).__name__
        if len(replaced) == len(self._installed):
            warnings.warn(
                f"diffsparse: every self-attention processor `apply` installed on {self.runtime.name} was replaced "
                f"after it (now {now}; e.g. by fuse_qkv_projections() or set_attn_processor()): it runs without "
                "sparse attention; call diffsparse.apply again (it takes diffusers' fused processors; another "
                "processor it refuses: put the family's own back first)",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )
        else:
            layers = [processor.layer for _, processor in replaced]
            warnings.warn(
                f"diffsparse: the self-attention processors `apply` installed on layers {layers} of "
                f"{self.runtime.name} were replaced after it (now {now}; e.g. by set_attn_processor()): those layers "
                "run without sparse attention, uncounted in stats(); call diffsparse.apply again (it takes diffusers' "
                "fused processors; another processor it refuses: put the family's own back first)",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )

    def new_forward(self, module, *args, **kwargs):
        # The forward itself (traced under torch.compile), closed at once when it raises.
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self._abandon_call()
            raise

    @_eager
    def post_forward(self, module, output):
        self._close_call()
        return output

    def _replay_checkpoints(self, transformer: torch.nn.Module) -> None:
        """For this call, give the modules that checkpoint blocks (`enable_gradient_checkpointing()`, when grad is
        on) a checkpointing function whose recomputation replays the call (`SparseRuntime.replaying`)."""
        if not torch.is_grad_enabled():
            return
        for module in transformer.modules():
            own = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(module, "gradient_checkpointing", False) and callable(own):
                self._checkpointing.append((module, own))
                module._gradient_checkpointing_func = functools.partial(_checkpoint_replaying, own, self.runtime)

    def _close_call(self):
        for module, own in self._checkpointing:
            module._gradient_checkpointing_func = own
        self._checkpointing.clear()
        self.runtime.end_call()
        if self._own_context:
            self.state_manager.set_context(None)
            self._own_context = False
        self._in_forward = self._took_place = False

    def reset_state(self, module):
        self.state_manager.reset()
        return module


@_eager  # training under torch.compile: the checkpointed blocks run eagerly, as the replay needs
def _checkpoint_replaying(checkpoint, runtime: SparseRuntime, block, *args, **kwargs):
    """`checkpoint(block, *args, **kwargs)` (the model's gradient checkpointing function) whose recomputation of
    `block`, in the backward pass, replays the call this forward belongs to."""
    snapshot = runtime.snapshot()

    def replayed(*inner_args, **inner_kwargs):
        with runtime.replaying(snapshot):
            return block(*inner_args, **inner_kwargs)

    return checkpoint(replayed, *args, **kwargs)


def _tensor_parallel(transformer: torch.nn.Module) -> tuple[object, int] | None:
    """`(process group, rank)` when diffusers' tensor parallelism shards this transformer (`enable_parallelism(
    config=TensorParallelConfig(tp_degree=n))`, or `from_pretrained(..., parallel_config=...)`), else `None`.
    Read at each call, so parallelism enabled before or after `apply` is seen."""
    config = getattr(getattr(transformer, "_parallel_config", None), "tensor_parallel_config", None)
    mesh = getattr(config, "_mesh", None)
    if mesh is None or mesh.size() == 1:
        return None
    return mesh.get_group(), mesh.get_local_rank()


def _whole_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's inputs as its caller gave them. diffusers' context parallelism may split some at the
    transformer's entry (a `_cp_plan` entry for `""`: FLUX, FLUX.2, LTX-Video); when its hook runs before this one
    (parallelism enabled after `apply`: the hook registered last runs first), those are gathered back here, so the
    adapter reads the whole call's layout. The forward still gets this process's slices."""
    registry = getattr(module, "_diffusers_hook", None)
    split = _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE.format("")
    order = registry._hook_order if registry is not None else []
    if split not in order or order.index(split) < order.index(HOOK_NAME):
        return args, kwargs
    hook = registry.get_hook(split)
    config, mesh = hook.parallel_config, hook.parallel_config._flattened_mesh
    # What diffusers split with `tensor_split` (Ulysses or ring "anything") it gathers with its size exchange.
    uneven = getattr(config, "ulysses_anything", False) or getattr(config, "ring_anything", False)
    unshard = PartitionAnythingSharder.unshard_anything if uneven else EquipartitionSharder.unshard
    args, kwargs = list(args), dict(kwargs)
    parameters = forward_parameters(type(module))
    for name, plan in hook.metadata.items():
        value = forward_input(module, args, kwargs, name)
        # diffusers leaves a tensor of another rank than the plan expects whole (it warns).
        if not isinstance(plan, ContextParallelInput) or plan.split_output or not isinstance(value, torch.Tensor) \
                or (plan.expected_dims is not None and value.ndim != plan.expected_dims):
            continue
        value = unshard(value, plan.split_dim, mesh)
        if name in kwargs:
            kwargs[name] = value
        else:
            args[parameters.index(name)] = value
    return tuple(args), kwargs


def register_context_hook(transformer: torch.nn.Module, hook: SparseContextHook) -> None:
    # Under accelerate's hooks (`enable_model_cpu_offload()` before `apply`) the registry wraps what accelerate
    # calls, `_old_forward`: each pipeline call ends in `maybe_free_model_hooks()`, whose removal of accelerate's
    # hooks puts `_old_forward` back as the forward, so a registry wrapped around accelerate's forward instead would
    # be dropped after the first call, and every later call ran dense without a word.
    accelerated = getattr(transformer, "_hf_hook", None) is not None and hasattr(transformer, "_old_forward")
    if accelerated:
        outer, transformer.forward = transformer.forward, transformer._old_forward
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)
    hook.module_forward = transformer.forward
    if accelerated:
        transformer._old_forward, transformer.forward = transformer.forward, outer


def remove_context_hook(transformer: torch.nn.Module) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(HOOK_NAME)
    if hook is None:
        return
    outer, last = transformer.forward, registry._hook_order[-1] == HOOK_NAME
    registry.remove_hook(HOOK_NAME, recurse=False)
    # accelerate's hooks (`enable_model_cpu_offload()`, `enable_sequential_cpu_offload()`, a `device_map`; added
    # after `apply`, or before it: `register_context_hook`) wrap the registry's forward, kept as `_old_forward`; the
    # registry, removing its last hook, puts the module's own forward back over them, which would drop the
    # offloading. Keep their wrapper, around what is left.
    if last and outer is not hook.module_forward and getattr(transformer, "_old_forward", None) is hook.module_forward:
        transformer._old_forward = transformer.forward
        transformer.forward = outer
