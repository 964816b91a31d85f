"""`diffsparse eval`: quality and speed of sparse configurations against dense, over fixed prompts and seeds.

For every (prompt, seed) the dense video is generated once; each configuration then generates the same
(prompt, seed) and is scored against it. Self-attention time is measured with timing hooks on the
adapter's self-attention modules, in the dense and the sparse runs alike.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import itertools
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from diffusers.hooks import HookRegistry, ModelHook
from tqdm.auto import tqdm

from . import DiffsparseWarning
from .api import sparse
from .compare import (
    COMMAND_NAMES,
    check_call_kwargs_before_loading,
    check_config_fits,
    check_two_stage,
    fill_call_defaults,
    first_output,
    generation_kwargs,
    kept_warnings,
    load_pipeline_for,
    model_label,
    placement,
    said_when_made,
    sampler_label,
    scored_frames,
    scored_label,
    seeded_global_generator,
    shared_still,
    synchronize_accelerators,
)
from .config import SparseConfig, density_replaces_messages, resolve_step_count
from .metrics import lpips, lpips_missing_reason, lpips_weights, psnr, ssim
from .patterns import get_pattern
from .pipelines import adapter_for, find_transformers
from .runtime import sparse_steps, step_modes

PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle moving right")
_TIMER_HOOK = "diffsparse_attention_timer"


class _AttentionTimer(ModelHook):
    """Adds the wall time of each forward of its module to a shared counter (synchronising CUDA: the module's
    weights may sit on the CPU between calls, under offloading, so every device rather than theirs)."""

    def __init__(self, total: list[float]):
        super().__init__()
        self._total = total
        self._start = 0.0

    def pre_forward(self, module, *args, **kwargs):
        synchronize_accelerators()
        self._start = time.perf_counter()
        return args, kwargs

    def post_forward(self, module, output):
        synchronize_accelerators()
        self._total[0] += time.perf_counter() - self._start
        return output


def _attention_modules(pipe):
    transformers, _ = find_transformers(pipe)
    for transformer in transformers.values():
        for _, module in adapter_for(transformer).self_attention_modules(transformer):
            yield module


@dataclass
class EvalRow:
    pattern: str  # as configured: with a target density, its main parameter is solved per layout (`pattern_ran`)
    # What ran (`_pattern_ran`): with a target density, the solved instance of each layout; None if none ran sparse.
    pattern_ran: str | None
    target_density: float | None  # None: the pattern as written, or a row whose every call runs dense
    measured_density: float  # mean over the calls of the sparse steps, dense ones counting 1.0
    dense_steps: float
    dense_layers: int | list[int]  # SparseConfig.dense_layers: the first L blocks, or block indices
    correction: str | None
    order: str  # the token order the kernel saw
    psnr_db: float
    ssim: float
    lpips: float | None
    attention_time_ratio: float  # sparse / dense self-attention seconds
    end_to_end_ratio: float  # sparse / dense wall seconds
    # Added after the scores, so that the columns before them keep their places in eval.csv for existing readers.
    dense_last_steps: float  # SparseConfig.dense_last_steps, as dense_steps: as given
    correction_refresh: int  # SparseConfig.correction_refresh: 0 without a correction
    # diffsparse's warnings while this configuration ran ("nothing runs sparse", a density out of reach), which
    # otherwise reach stderr only; each text once.
    warnings: list[str] = field(default_factory=list)


def timed_generation(pipe, prompt, seed, args, first_frame=None) -> tuple[np.ndarray, float, float]:
    """`(frames, wall seconds, self-attention seconds)`; `first_frame`: image-to-video from that still."""
    kwargs = generation_kwargs(pipe, args, prompt, seed, first_frame)
    total = [0.0]
    modules = list(_attention_modules(pipe))
    for module in modules:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_AttentionTimer(total), _TIMER_HOOK)
    try:
        synchronize_accelerators()
        start = time.perf_counter()
        with seeded_global_generator(seed):
            frames = first_output(pipe(**kwargs))
        synchronize_accelerators()
        return frames, time.perf_counter() - start, total[0]
    finally:
        for module in modules:
            module._diffusers_hook.remove_hook(_TIMER_HOOK, recurse=False)


def run_eval(args) -> list[EvalRow]:
    """Every configuration of `args` (the `diffsparse eval` options; `args.order`: a `SparseConfig.order`, one
    order, a list or `None`) against dense, over the prompts (`eval_prompts`) and seeds; writes `eval.md` and
    `eval.csv` into `args.out`, from before the first video on and again after each configuration, so that a run
    that stops (out of memory, Ctrl-C) keeps the rows it finished and says in `eval.md` that it stopped, and why.
    An earlier run's `eval.md` and `eval.csv` there are replaced by that first write, once the model has loaded
    (as `compare` replaces its files): give each run its own `args.out` to keep both; other files are left."""
    check_two_stage(args)
    check_call_kwargs_before_loading(args)  # and --image
    prompts = eval_prompts(args)
    lpips_weights(args.lpips_weights, frame_size=(args.height, args.width))  # a missing file, too small: now
    # The warnings saying that a configuration runs as another, kept for the row that stands for it: the table's
    # readers never see stderr, and a row standing for several settings read as measured for one.
    notes: dict[SparseConfig, list[str]] = {}
    # Every configuration checked before loading the model too (a bad pattern name ended the run after it).
    configs = _distinct_runs(_grid(args, notes), notes=notes)
    pipe = load_pipeline_for(args)
    fill_call_defaults(args, pipe)
    check_two_stage(args, pipe)  # again: the frame count may have been the model's default
    # What `apply` refuses for this model (a `dense_layers` block it lacks): before any video, not at the
    # configuration's turn after the dense runs and the earlier configurations.
    for config in configs:
        check_config_fits(pipe, config)
    # Now that the model's blocks are known, dense layers covering all of them run as the dense pattern does.
    blocks = _self_attention_blocks(pipe)
    configs = _distinct_runs(configs, blocks=blocks, notes=notes)
    # Frames smaller than LPIPS takes: scored without it (or, with --lpips-weights, refused before generating).
    weights = lpips_weights(args.lpips_weights, frame_size=(args.height, args.width))
    cases = list(itertools.product(prompts, range(args.seed, args.seed + args.seeds)))
    scored = scored_frames(args)
    with_lpips = weights is not None
    rows, run_warnings, made, out, where = [], [], None, Path(args.out), placement(pipe)

    def write(status: str | None) -> str:
        return _write(rows, out, args, prompts, with_lpips, where, made, run_warnings=run_warnings, status=status)

    warm_ups = _warm_ups(configs)
    progress = tqdm(total=len(warm_ups) + len(cases) * (1 + len(configs)), desc="videos", unit="video")
    try:
        # Before the first video: an older run's tables in `out` read as this run's if it stops before its first row.
        write(_under_way(rows, configs))
        # Into `run_warnings` as they come: a run that stops keeps those of its warm-ups and dense videos too.
        with diffsparse_warnings(run_warnings):
            # `--two-stage`: every run of a case starts from the same still, sampled once, dense and untimed.
            stills = {case: shared_still(pipe, args, *case) if args.two_stage else None for case in cases}
            # Untimed warm-ups of both paths, so that the first timed video of either does not carry the process's
            # one-off costs (loading the compiled kernel, thread pools, lazy imports). Plans are not among them: each
            # configuration applies afresh and builds its own at its first case, as a user's first video does, and
            # that case's ratio includes it.
            run_steps = set()  # the step counts the sparse warm-ups' denoising runs resolved their dense steps for
            cold = {}  # correction -> the warning of its warm-up that ran nothing sparse
            for config in warm_ups:
                with sparse(pipe, config) if config is not None else contextlib.nullcontext() as handle:
                    timed_generation(pipe, *cases[0], args, stills[cases[0]])
                    if handle is not None:
                        run_steps.update(handle.run_step_counts)
                    # A correction's measuring call runs the kernel too (every block kept): that loads it as well.
                    if config is not None and not any(
                        r.sparse or r.measured for records in handle.stats().calls.values() for r in records
                    ):
                        cold[config.correction] = (
                            f"diffsparse: eval's sparse warm-up (pattern={config.pattern!r}, "
                            f"density={config.density!r}, every step and layer sparse) ran no call through the sparse "
                            "kernel on this model and size, so the first timed sparse video carries the one-off costs "
                            "of the sparse path (loading the kernel): its attention_time_ratio and end_to_end_ratio "
                            "are high"
                        )
                        warnings.warn(cold[config.correction], category=DiffsparseWarning, stacklevel=2)
                progress.update(1)
        # Now that the runs' step count is known, dense steps that keep the same steps dense (0 and 0.2 of 2 steps:
        # none) are one run too, and so are dense steps covering every step and the dense pattern, and a correction
        # refresh that never comes and `correction_refresh=0`. The count the runs resolved them for, not `--steps`: a
        # pipeline may run fewer (img2img's `strength`); where its runs differ (stages of their own counts) or are
        # unknown, nothing is merged on it.
        steps = next(iter(run_steps)) if len(run_steps) == 1 and None not in run_steps else None
        if steps is not None:
            merged = _distinct_runs(configs, steps=steps, blocks=blocks, notes=notes)
            progress.total -= len(cases) * (len(configs) - len(merged))
            configs = merged
        # The warm-up's warning belongs to the row whose first video is the first timed one on that sparse path.
        for correction, message in cold.items():
            first = next((config for config in configs if config.correction == correction
                          and _every_call_dense(config, steps, blocks) is None), None)
            if first is not None:
                notes.setdefault(first, []).append(message)
        dense = {}
        with diffsparse_warnings(run_warnings):
            for prompt, seed in cases:
                dense[prompt, seed] = timed_generation(pipe, prompt, seed, args, stills[prompt, seed])
                progress.update(1)
        # The size of the videos made, which the tables give: a pipeline rounds a frame count (Wan: 7 makes 5) or
        # works out a size the command left to it (`call_defaults`), whose LPIPS check could only come now.
        made = tuple(next(iter(dense.values()))[0].shape[:3])
        if (args.height, args.width) != made[1:]:
            weights = lpips_weights(args.lpips_weights, frame_size=made[1:])
            with_lpips = weights is not None
        write(_under_way(rows, configs))
        for config in configs:
            rows.append(_measure(pipe, config, cases, dense, stills, scored, weights, args, steps, blocks,
                                 notes.get(config, []), progress))
            if len(rows) < len(configs):  # the last one's tables come whole, just below
                write(_under_way(rows, configs))
        # Inside the `try`: stopped during this write, the last row was lost and eval.md said the run was going on.
        text = write(None)
    except BaseException as error:  # Ctrl-C too: the rows finished so far are what the run has to show
        stopped = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        try:
            write(f"Stopped early: {len(rows)} of {len(configs)} configurations measured, then {stopped}. The rows "
                  "below are those finished; the others are missing.")
        except (OSError, ValueError) as failure:  # the run's own error is the one to see
            note = f"diffsparse eval: the finished rows could not be written to {out}: {failure!r}"
            if hasattr(error, "add_note"):
                error.add_note(note)
            else:  # Python 3.10: no exception notes
                print(note, file=sys.stderr)
        else:
            print(f"diffsparse eval: stopped early; the rows finished ({len(rows)}) are in {out / 'eval.md'} and "
                  f"{out / 'eval.csv'}", file=sys.stderr)
        raise
    finally:
        progress.close()
    _print(text)
    print(f"wrote {out / 'eval.md'} and {out / 'eval.csv'}")
    return rows


def _under_way(rows: list[EvalRow], configs: list[SparseConfig]) -> str:
    return (f"Incomplete: {len(rows)} of {len(configs)} configurations measured so far. The run is still going, or "
            "was ended without a chance to say so (killed); the rows below are those finished.")


def _measure(pipe, config: SparseConfig, cases, dense, stills, scored, weights, args, steps: int | None,
             blocks: frozenset[int], notes: list[str], progress) -> EvalRow:
    """The row of `config`: every case generated under it, scored against its dense video; `notes`: the warnings
    that qualify the row from outside its run (the configurations it stands for)."""
    with_lpips = weights is not None
    scores, wall, attention = [], [], []
    with diffsparse_warnings() as kept, sparse(pipe, config) as handle:
        # Kept in the row: its correction_refresh column names a refresh that did not come.
        if steps is not None and _every_call_dense(config, steps, blocks) is None \
                and _refresh_never_comes(config, steps):
            warnings.warn(f"diffsparse: eval: {_refresh_reason((config,), steps)}", DiffsparseWarning,
                          stacklevel=2)
        for prompt, seed in cases:
            frames, seconds, attention_seconds = timed_generation(pipe, prompt, seed, args, stills[prompt, seed])
            reference, dense_seconds, dense_attention = dense[prompt, seed]
            frames, reference = frames[scored], reference[scored]
            scores.append(
                (
                    psnr(frames, reference),
                    ssim(frames, reference),
                    lpips(frames, reference, weights_path=weights) if with_lpips else None,
                )
            )
            wall.append(seconds / dense_seconds)
            attention.append(attention_seconds / dense_attention)
            progress.update(1)
        # A video identical to dense, which psnr_db leaves out (below), counts in ssim and lpips at 1.0 and 0: their
        # means are over different videos, which the row must say, or its PSNR reads as taken over its SSIM's.
        identical = sum(score[0] == float("inf") for score in scores)
        if 0 < identical < len(scores):
            others, counting = ("ssim and lpips", "1.0 and 0") if with_lpips else ("ssim", "1.0")
            warnings.warn(f"diffsparse: eval: {identical} of {len(scores)} videos identical to dense (infinite "
                          f"PSNR): psnr_db is the mean of the other {len(scores) - identical}, {others} of all "
                          f"{len(scores)}, an identical video counting {counting} there", DiffsparseWarning,
                          stacklevel=2)
        # Every case and every denoising run of each (a pipeline's chunks or stages), as the runtime counted
        # their steps.
        call_stats = handle.stats(since_apply=True)
        pattern_ran = _pattern_ran(config, handle, call_stats)
    return EvalRow(
        pattern=repr(config.resolved_pattern),
        pattern_ran=pattern_ran,
        # A row whose every call runs dense (the dense pattern, dense steps or layers covering the run) read
        # as run at a density it never used.
        target_density=None if _every_call_dense(config, steps, blocks) is not None else config.density,
        measured_density=call_stats.sparse_steps_density,
        dense_steps=config.dense_steps,
        dense_layers=config.dense_layers,
        correction=config.correction,
        dense_last_steps=config.dense_last_steps,
        correction_refresh=config.correction_refresh,
        order=" / ".join(repr(order) for order in config.resolved_orders),
        # A video identical to dense scores inf (every frame skipped, psnr's rule): with the others' that
        # made the row inf. So the finite ones are averaged, inf only when every video is; a NaN (a broken
        # run) is kept, and fmean makes the row NaN whatever the others.
        psnr_db=statistics.fmean([s[0] for s in scores if s[0] != float("inf")] or [float("inf")]),
        ssim=statistics.fmean(s[1] for s in scores),
        lpips=statistics.fmean(s[2] for s in scores) if with_lpips else None,
        attention_time_ratio=statistics.fmean(attention),
        end_to_end_ratio=statistics.fmean(wall),
        warnings=list(dict.fromkeys([*notes, *kept])),
    )


@contextlib.contextmanager
def diffsparse_warnings(kept: list[str] | None = None):
    """Inside, diffsparse's warnings (its `DiffsparseWarning`s: `compare.kept_warnings`) are shown and their texts,
    each once, end up in the list this yields (`kept`, when given), filled on leaving, also by an error: what a
    result file keeps for readers who never see stderr."""
    # No "always" filter: entering `catch_warnings` resets Python's once-per-place memory, so each configuration's
    # context shows its texts again, and one the user silenced (`-W ignore`) stays silent here too.
    with kept_warnings() as caught:
        kept = [] if kept is None else kept
        try:
            yield kept
        finally:  # a run that stops keeps what it was told so far
            kept.extend(dict.fromkeys(caught))


def _grid(args, notes: dict[SparseConfig, list[str]] | None = None) -> list[SparseConfig]:
    """Every combination of `args`' lists (`args.dense_last_steps`, `args.correction_refresh`: `[0]` when not
    given), as given. A correction refresh only matters with a correction, so a configuration without one runs, and
    is labelled, with `correction_refresh=0` whatever the list holds: made once, each refresh other than 0 in the
    list left out with a warning naming it (0 in the list or not), its text also added to `notes` under the
    configuration made; refreshes other than 0 with no correction at all are a `ValueError`, as `SparseConfig`
    refuses them. A pattern text giving a parameter the density sets is warned of too, as `compare` says it
    (`density_replaces_messages`), its text added to `notes`: the density wins."""
    refreshes = getattr(args, "correction_refresh", [0])
    if any(refreshes) and all(correction is None for correction in args.correction):
        raise ValueError(
            f"correction_refresh={next(r for r in refreshes if r)!r} has no effect without a correction: add one to "
            "the corrections (e.g. none,residual) or leave correction_refresh at 0"
        )
    # Without a correction, the refreshes the row (made and labelled with 0, what it runs) stands for: every one but
    # 0. Before, with no 0 in the list, the first was taken as the row's and left unsaid, though the row read 0.
    left_out = [r for r in refreshes if r != 0]
    configs, replacements_said = [], set()
    for name, density, dense_steps, dense_last_steps, dense_layers, correction in itertools.product(
        args.pattern, args.density, args.dense_steps, getattr(args, "dense_last_steps", [0]), args.dense_layers,
        args.correction,
    ):
        for refresh in refreshes if correction is not None else [0]:
            configs.append(SparseConfig(
                pattern=name,
                density=density,
                dense_steps=dense_steps,
                dense_last_steps=dense_last_steps,
                dense_layers=dense_layers,
                correction=correction,
                correction_refresh=refresh,
                block_size=args.block_size,
                order=getattr(args, "order", None),
            ))
            # `--pattern 'radial(decay=0.5)' --density 0.25` ran decay solved for 0.25 without a word, in a row
            # labelled with decay=0.5: said as `compare` says it, and kept in the row's warnings.
            # A pattern object's was said by `SparseConfig` just now, in the API's words: not again, but eval.md's
            # readers never saw stderr, so the row keeps that text too (as compare.json does).
            text = isinstance(name, str)
            for said in density_replaces_messages(configs[-1], COMMAND_NAMES) if text else said_when_made(configs[-1]):
                if notes is not None:
                    notes.setdefault(configs[-1], []).append(said)
                if text and said not in replacements_said:  # once, not for each dense-step or layer value beside it
                    replacements_said.add(said)
                    warnings.warn(said, category=DiffsparseWarning, stacklevel=2)
        for refresh in left_out if correction is None else []:
            message = (f"diffsparse: eval: {_settings(configs[-1])}, correction_refresh={refresh!r} runs as "
                       f"{_settings(configs[-1])}, correction_refresh=0 (correction_refresh={refresh!r} has no effect "
                       "without a correction): measured once, in that row")
            if notes is not None:
                notes.setdefault(configs[-1], []).append(message)
            warnings.warn(message, category=DiffsparseWarning, stacklevel=2)
    return configs


def _warm_ups(configs: list[SparseConfig]) -> list[SparseConfig | None]:
    """What the untimed warm-ups run: `None` (dense), then for each correction among the configurations whose
    pattern is not dense, the first such configuration with every step and layer sparse, measuring once."""
    # Not the first configuration as given: with its dense steps covering every step (or a dense pattern) it never
    # reached the kernel, and the first timed sparse video paid its one-off load. Its correction measuring once (a
    # measurement and sparse calls after it), not at every sparse step as `correction_refresh=1` does.
    sparse_paths = {}
    for config in configs:
        if config.resolved_pattern.name != "dense" and config.correction not in sparse_paths:
            sparse_paths[config.correction] = replace(config, dense_steps=0, dense_last_steps=0, dense_layers=0,
                                                      correction_refresh=0)
    return [None, *sparse_paths.values()]


def _dense_step_counts(config: SparseConfig, steps: int | None) -> tuple:
    """`(dense_steps, dense_last_steps)` as given, or with the run's step count `steps` known, as the steps they keep
    dense (as the runtime resolves them: a fraction rounds half up), every setting that keeps every step dense
    alike."""
    if steps is None:
        return config.dense_steps, config.dense_last_steps
    first, last = (resolve_step_count(value, steps) for value in (config.dense_steps, config.dense_last_steps))
    return (steps, 0) if first + last >= steps else (first, last)


def _self_attention_blocks(pipe) -> frozenset[int]:
    """The self-attention block indices of every transformer of `pipe`, which `SparseConfig.dense_layers` names."""
    transformers, _ = find_transformers(pipe)
    return frozenset(layer for transformer in transformers.values()
                     for layer, _ in adapter_for(transformer).self_attention_modules(transformer))


def _every_call_dense(config: SparseConfig, steps: int | None = None,
                      blocks: frozenset[int] | None = None) -> str | None:
    """Why every self-attention call of `config` runs the original processor, as the dense pattern's do: `"pattern"`
    (it is the dense pattern), `"steps"` (with the runs' step count `steps` known, its dense steps cover every step),
    `"layers"` (with the model's block indices `blocks` known, its dense layers cover every block); `None` if some
    call may run sparse. A correction changes none of these: it measures at the dense step before a sparse one
    (`SparseConfig.is_measure_step`), and with every step or block dense there is none; a dense layer's calls never
    reach it (`SparseRuntime._mode`)."""
    if config.resolved_pattern.name == "dense":
        return "pattern"
    if steps is not None and _dense_step_counts(config, steps) == (steps, 0):
        return "steps"
    # As `apply` judges it (`_warn_if_every_layer_dense`): every block of every transformer, however deep each is.
    if blocks and all(map(config.is_dense_layer, blocks)):
        return "layers"
    return None


def _run_key(config: SparseConfig, steps: int | None = None, blocks: frozenset[int] | None = None) -> tuple:
    """What decides a configuration's videos, so that two spellings of one run compare equal; `steps`: the runs'
    step count, once known (`_dense_step_counts`); `blocks`: the model's self-attention block indices, once known
    (`_self_attention_blocks`)."""
    if _every_call_dense(config, steps, blocks) is not None:
        # Every call runs the original processor (`SparseRuntime._mode`), whatever else is set: the dense pattern's
        # videos, which a second row would only generate again.
        return ("dense",)
    pattern = config.resolved_pattern
    layers = config.dense_layers
    # 2 and [0, 1] name the same blocks, 0 and [] none.
    layers = frozenset(range(layers)) if isinstance(layers, int) else frozenset(layers)
    if config.density is not None and pattern.density_sets is not None:
        default = next(f.default for f in fields(pattern) if f.name == pattern.density_sets)
        pattern = replace(pattern, **{pattern.density_sets: default})
    # A refresh that never comes in the runs measures once, as 0 does: the same videos.
    refresh = 0 if steps is not None and _refresh_never_comes(config, steps) else config.correction_refresh
    return (repr(pattern), config.density, _dense_step_counts(config, steps), layers, config.correction, refresh)


def _refresh_never_comes(config: SparseConfig, steps: int) -> bool:
    """Whether `config`'s correction refresh (other than 0) never measures again in a `steps`-step run, so that the
    run is `correction_refresh=0`'s. Foreseen with the runtime's own rule (`runtime.sparse_steps`) for one branch
    measuring at the schedule's first chance; no call measures earlier, and none is sparse later (another expert,
    another CFG branch, a chunk starting over measures later, where a refresh comes later still), so a refresh that
    does not come there comes nowhere. Never where nothing measures (every step dense): no refresh to speak of."""
    if not config.correction_refresh:
        return False
    once = step_modes(replace(config, correction_refresh=0), steps)
    return "measure" in once and sparse_steps(config, steps) == [step for step, mode in enumerate(once)
                                                                 if mode == "sparse"]


def _refresh_reason(configs: tuple[SparseConfig, ...], steps: int) -> str:
    """Why the refreshes of `configs` that never come in a `steps`-step run (`_refresh_never_comes`) do not, from the
    step the correction first measures at and the last sparse step after it; `""` if each comes."""
    never = list(dict.fromkeys(f"correction_refresh={config.correction_refresh!r}" for config in configs
                               if _refresh_never_comes(config, steps)))
    if not never:
        return ""
    modes = step_modes(replace(configs[0], correction_refresh=0), steps)
    measured = modes.index("measure")
    sparse = [step for step, mode in enumerate(modes) if mode == "sparse"]
    subject, verb = (never[0], "never comes") if len(never) == 1 else (" and ".join(never), "never come")
    if not sparse:
        return (f"{subject} {verb} in a {steps}-step run: the correction measures at step {measured}, the one step "
                "the schedule leaves sparse, so nothing runs sparse, whatever the refresh")
    return (f"{subject} {verb} in a {steps}-step run: the correction measures at step {measured} and the last sparse "
            f"step, {sparse[-1]}, is {sparse[-1] - measured} step{'s' if sparse[-1] - measured != 1 else ''} after "
            "it, so "
            f"{'it measures' if len(never) == 1 else 'each measures'} once, as correction_refresh=0 does")


_DENSE_PATTERN_REASON = ("a dense pattern runs every call dense, whatever its density, dense steps, dense layers and "
                         "correction")


def _same_run_reason(config: SparseConfig, other: SparseConfig, steps: int | None = None,
                     blocks: frozenset[int] | None = None) -> str:
    """Why `config` runs as `other` does (their `_run_key`s for `steps` and `blocks` are equal)."""
    if _every_call_dense(config, steps, blocks) is not None:
        return _every_call_dense_reason((other, config), steps, blocks)
    reasons = []
    # As written: a searched pattern's `keep` is already the density's in `resolved_pattern`.
    pattern, given = get_pattern(config.pattern), get_pattern(other.pattern)
    if repr(pattern) != repr(given):
        solved = [f.name for f in fields(pattern) if getattr(pattern, f.name) != getattr(given, f.name)]
        reasons.append(f"density={config.density!r} solves {', '.join(solved)} whatever it is given as")
    if repr(config.dense_layers) != repr(other.dense_layers):
        reasons.append(f"dense_layers={other.dense_layers!r} and dense_layers={config.dense_layers!r} name the same "
                       "blocks")
    if _dense_step_counts(config, None) != _dense_step_counts(other, None):
        first, last = _dense_step_counts(config, steps)
        kept = ("no step" if first + last == 0 else f"the first {first} and the last {last} steps")
        reasons.append(f"{_step_settings(other)} and {_step_settings(config)} keep {kept} of a {steps}-step run dense, "
                       "a fraction of the steps rounding half up")
    if config.correction_refresh != other.correction_refresh:
        reasons.append(_refresh_reason((other, config), steps))
    return "; ".join(reasons)


def _every_call_dense_reason(configs: tuple[SparseConfig, ...], steps: int | None,
                             blocks: frozenset[int] | None) -> str:
    """Why each of `configs` runs every call dense (`_every_call_dense`), grouped by reason."""
    why = {config: _every_call_dense(config, steps, blocks) for config in configs}
    reasons = []
    if "pattern" in why.values():
        reasons.append(_DENSE_PATTERN_REASON)
    # Each setting once: two densities under one dense-step setting keep every step dense for one reason.
    by_steps = list(dict.fromkeys(_step_settings(config) for config in configs if why[config] == "steps"))
    if by_steps:
        verb = "keeps" if len(by_steps) == 1 else "keep"
        reasons.append(f"{' and '.join(by_steps)} {verb} every step of a {steps}-step run dense, a fraction of the "
                       "steps rounding half up")
    by_layers = list(dict.fromkeys(f"dense_layers={config.dense_layers!r}" for config in configs
                                   if why[config] == "layers"))
    if by_layers:
        verb = "keeps" if len(by_layers) == 1 else "keep"
        reasons.append(f"{' and '.join(by_layers)} {verb} every self-attention block of the model dense "
                       f"({len(blocks)} blocks)")
    if by_steps or by_layers:
        reasons.append("every call runs the original processor, as the dense pattern's do, whatever the pattern, "
                       "density and correction")
    return "; ".join(reasons)


def _step_settings(config: SparseConfig) -> str:
    last = f", dense_last_steps={config.dense_last_steps!r}" if config.dense_last_steps != 0 else ""
    return f"dense_steps={config.dense_steps!r}{last}"


def _distinct_runs(configs: list[SparseConfig], steps: int | None = None, blocks: frozenset[int] | None = None,
                   notes: dict[SparseConfig, list[str]] | None = None) -> list[SparseConfig]:
    """`configs` with each run once. One pattern spelled twice under the same settings (`radial` and
    `radial(decay=1.0)`) is a `ValueError`: the lists themselves repeat a value. A configuration that the grid's
    product makes run as an earlier one (`dense` under each density and dense-step count; `radial(decay=0.5)` and
    `radial` at one density, which solves `decay`; dense layers `0` and `[]`; with the runs' step count `steps`
    known, dense steps `0` and `0.2` of 2 steps, both none, or first and last dense steps keeping the same steps
    dense, and dense steps covering every step, first and last together, which run as `dense` does whatever the
    pattern, density and correction, and a correction refresh that never comes in a run of that many steps, which
    runs as `correction_refresh=0` does (`_refresh_never_comes`); with the model's self-attention block indices
    `blocks` known, dense layers covering all of them, likewise) is left out with a warning naming the row that
    stands for it: refusing it left a dense control row beside a density sweep impossible to ask for, running it
    generated every video again for an identical row. With `notes` (configuration -> the warnings its row keeps),
    each such warning is added under the configuration that stands in, with those of the one left out."""
    literal, runs, kept = {}, {}, []
    for config in configs:
        # The pattern as written: `resolved_pattern` already holds a searched pattern's `keep` from the density, so
        # `searched` and `searched(keep=0.5)` at one density read as one pattern given twice.
        spelled = (repr(get_pattern(config.pattern)), config.density, config.dense_steps, config.dense_last_steps,
                   repr(config.dense_layers), config.correction, config.correction_refresh)
        if spelled in literal:
            raise ValueError(
                f"pattern={config.pattern!r} and pattern={literal[spelled].pattern!r} are the same pattern "
                f"({spelled[0]}) under the same other settings: give each configuration once"
            )
        literal[spelled] = config
        key = _run_key(config, steps, blocks)
        if key in runs:
            other = runs[key]
            message = (f"diffsparse: eval: {_settings(config)} runs as {_settings(other)} "
                       f"({_same_run_reason(config, other, steps, blocks)}): measured once, in that row")
            if notes is not None:
                notes.setdefault(other, []).extend([message, *notes.pop(config, [])])
            warnings.warn(message, category=DiffsparseWarning, stacklevel=2)
            continue
        runs[key] = config
        kept.append(config)
    return kept


def _settings(config: SparseConfig) -> str:
    refresh = f", correction_refresh={config.correction_refresh!r}" if config.correction_refresh != 0 else ""
    return (f"pattern={config.pattern!r}, density={config.density!r}, {_step_settings(config)}, "
            f"dense_layers={config.dense_layers!r}, correction={config.correction!r}{refresh}")


def _pattern_ran(config: SparseConfig, handle, call_stats) -> str | None:
    """The pattern that ran under `config`: `None` when no call ran sparse; without a target density, the
    configured one; with one, the instance solved for it on each layout the runs had (`"; "` between several), or
    for a data-dependent pattern, whose fits (per layer and video, each solved for the density) are not kept, a
    sentence saying so."""
    if not any(layer.sparse_calls for layer in call_stats.layers):
        return None
    pattern = config.resolved_pattern
    if config.density is None:
        return repr(pattern)
    if pattern.data_dependent:
        return f"{pattern.name} fitted per layer and video, each fit solved for the target density"
    solved = (repr(p) for runtime in handle.runtimes.values() for p in runtime.solved_patterns())
    return "; ".join(dict.fromkeys(solved))


def eval_prompts(args) -> list[str]:
    """The prompts `eval` runs: the first `args.prompts` of `args.prompt_file`'s lines (UTF-8, a byte-order mark
    allowed; blank lines and lines starting with `#` skipped; all of them by default; a prompt on two lines is a
    `ValueError`) or of the fixed `PROMPTS` (2 by default)."""
    source, available = "the fixed prompts", list(PROMPTS)
    prompt_file = args.prompt_file
    if prompt_file is not None:
        path = Path(prompt_file)
        if path.is_dir():  # "no such file" sent users looking for a path that is there
            raise ValueError(f"prompt_file={str(prompt_file)!r}: is a folder; give a text file of prompts, one a line")
        if not path.is_file():
            raise ValueError(f"prompt_file={str(prompt_file)!r}: no such file")
        try:
            # utf-8-sig: a BOM (Windows editors write one) would otherwise glue itself to the first line, a comment.
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:  # the codec's message named neither the option nor the file
            # utf-8-sig counts its offsets after a byte-order mark.
            offset = error.start + len(codecs.BOM_UTF8) * path.read_bytes().startswith(codecs.BOM_UTF8)
            raise ValueError(
                f"prompt_file={str(prompt_file)!r} (--prompt-file): not UTF-8 text "
                f"(byte {error.object[error.start]:#04x} at offset {offset}); save it as UTF-8"
            ) from None
        source = f"prompt_file={str(prompt_file)!r}"
        numbered = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
        numbered = [(number, line) for number, line in numbered if line and line[0] != "#"]
        lines_of = {}
        for number, line in numbered:
            lines_of.setdefault(line, []).append(number)
        # Run twice, a prompt counted double in every mean; the comma lists refuse a repeat the same way.
        repeated = {line: numbers for line, numbers in lines_of.items() if len(numbers) > 1}
        if repeated:
            said = "; ".join(f"{line!r} on lines {', '.join(map(str, numbers))}" for line, numbers in repeated.items())
            raise ValueError(f"{source}: each prompt must be given once, got {said}")
        available = [line for _, line in numbered]
        if not available:
            raise ValueError(f"{source} holds no prompt (one per line; blank lines and # comments are skipped)")
    count = args.prompts if args.prompts is not None else (len(available) if prompt_file is not None else 2)
    if count > len(available):
        raise ValueError(f"prompts={count}: there are {len(available)} in {source}")
    return available[:count]


def _fmt(value) -> str:
    """A markdown table cell: a `|` of its own (a composed pattern's, `a | b`) escaped, else it ends the cell."""
    if value is None:
        return "-"
    return (f"{value:.4g}" if isinstance(value, float) else str(value)).replace("|", "\\|")


def _write(rows: list[EvalRow], out: Path, args, prompts: list[str], with_lpips: bool, placement: str,
           made: tuple[int, int, int] | None, run_warnings: list[str] | None = None, status: str | None = None) -> str:
    """`eval.csv` and `eval.md` in `out`, in UTF-8; `made`: the frames, height and width of the videos generated
    (`None`: none yet); `run_warnings`: diffsparse's warnings of the warm-ups and the dense videos (those a row keeps
    too are said there only); `status`: said first in `eval.md` while the table is not this run's whole one. Returns
    `eval.md`'s text."""
    out.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(EvalRow)]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=names)
    writer.writeheader()
    # A JSON list: warnings hold commas, semicolons and quotes of their own.
    writer.writerows({**asdict(r), "warnings": json.dumps(r.warnings)} for r in rows)
    size = "video size not known yet" if made is None else f"{made[0]} frames {made[1]}x{made[2]}"
    header = (
        f"model: {model_label(args.model)}; {size}, "
        f"{args.steps} steps, {len(prompts)} prompts x {args.seeds} seeds from {args.seed}, block {args.block_size}, "
        f"{args.device}, "
        f"{placement}, "
        f"{sampler_label(args)}, scored on {scored_label(args)}"
    )
    # The table gives each row's count of warnings; their texts follow it, numbered by row.
    cells = [{**asdict(r), "warnings": len(r.warnings)} for r in rows]
    lines = [
        *([status, ""] if status is not None else []),
        header,
        "",
        "Prompts: " + "; ".join(f'"{prompt}"' for prompt in prompts),
        *(["", f"Image: {args.image}"] if getattr(args, "image", None) else []),
        *(["", f"Call arguments: {json.dumps(args.call_kwargs)}"] if getattr(args, "call_kwargs", None) else []),
        "",
        "| row | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
        *(f"| {i} | " + " | ".join(_fmt(v) for v in c.values()) + " |" for i, c in enumerate(cells, 1)),
    ]
    columns = (
        "pattern: as configured, its main parameter solved per layout when target_density is set; pattern_ran: what "
        "ran (with a target density, the instance solved on each layout; - when no call ran sparse). "
        "target_density: - for the pattern as written and for a row whose every call runs dense (the dense "
        "pattern, dense steps or layers covering the run), which has none to reach. "
        "measured_density: the mean block density over every self-attention call of the sparse steps (those "
        "dense_steps and dense_last_steps leave sparse), in every denoising run of every video, calls computed dense "
        "there (dense layers, correction measurements, masked calls) counting 1.0. dense_steps, dense_last_steps: "
        "the first and the last steps kept dense, as given (a step count, or a fraction of the steps); "
        "correction_refresh: the steps after which a correction measures again (0: once; 0 without a correction; "
        "one that never comes in the run measures once, as its row's warnings say). warnings: how many of "
        "diffsparse's warnings the row keeps, the configurations it stands for among them; their texts follow. "
        "psnr_db, ssim, lpips: means over the row's videos, but psnr_db leaves out a video identical to dense "
        "(infinite PSNR; inf only when every video is), which ssim and lpips count at 1.0 and 0: a row with some "
        "such videos says how many in its warnings."
    )
    timing = (
        "Time ratios (sparse / dense seconds) are single runs, dense timed once before the configurations: "
        "for speed, `diffsparse bench pipeline` times interleaved dense/sparse pairs."
    )
    lines += ["", columns, "", timing]
    for i, r in enumerate(rows, 1):
        lines += ["", f"Warnings of row {i}:", *(f"- {message}" for message in r.warnings)] if r.warnings else []
    in_rows = {message for r in rows for message in r.warnings}
    others = [message for message in dict.fromkeys(run_warnings or []) if message not in in_rows]
    if others:
        lines += ["", "Warnings of the warm-ups and the dense videos:", *(f"- {message}" for message in others)]
    if not with_lpips and made is not None:
        lines += ["", f"LPIPS not computed: {lpips_missing_reason(made[1:])}."]
    text = "\n".join(lines) + "\n"
    # The locale's encoding (ASCII under LC_ALL=C, cp1252 on Windows) failed on a prompt the file read as UTF-8,
    # after every video; each file replaced whole, so a run stopped while writing leaves the last one readable.
    _replace(out / "eval.csv", table.getvalue())
    _replace(out / "eval.md", text)
    return text


def _replace(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8", newline="")
    part.replace(path)


def _print(text: str) -> None:
    """`text` on stdout, what its encoding cannot hold escaped: the files are written by then, and a prompt a C
    locale's ASCII stdout cannot print failed the run after them."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding), end="")
