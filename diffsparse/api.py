"""The public entry points: `apply`, `remove`, `sparse`, `stats`."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import DiffsparseWarning, outside_stacklevel
from .config import SparseConfig, resolve_step_count
from .pipelines import ModelAdapter, adapter_for, find_transformers
from .pipelines.base import SparseProcessor, context_parallel_config
from .runtime import (
    CallRecord,
    SparseContextHook,
    SparseRuntime,
    StepClock,
    StepScheduleWarning,
    _has_run_schedule,
    pipeline_timestep,
    register_context_hook,
    remove_context_hook,
    sparse_steps,
    tally,
)

_HANDLE_ATTR = "_diffsparse_handle"


@dataclass
class LayerStats:
    """Self-attention calls of one transformer block during the last denoising run, or since `apply`
    (`diffsparse.stats`)."""

    transformer: str
    layer: int
    dense_calls: int
    sparse_calls: int
    mean_density: float | None  # over sparse calls; None when there were none
    dense_step_calls: int = 0  # calls in the schedule's dense steps (counted in dense_calls)


@dataclass
class SparseStats:
    """What `diffsparse.stats` returns: per-block counts, and the raw call log of the last denoising run."""

    layers: list[LayerStats]
    calls: dict[str, list[CallRecord]]

    @property
    def mean_density(self) -> float:
        """Mean block density over the self-attention calls `layers` counts, dense calls counting as 1.0."""
        calls = sum(s.dense_calls + s.sparse_calls for s in self.layers)
        work = sum(s.dense_calls + s.sparse_calls * (s.mean_density or 0.0) for s in self.layers)
        return work / calls if calls else 1.0

    @property
    def sparse_density(self) -> float | None:
        """Mean block density over the sparse calls alone; `None` when there were none."""
        calls = sum(s.sparse_calls for s in self.layers)
        return sum(s.sparse_calls * s.mean_density for s in self.layers if s.sparse_calls) / calls if calls else None

    @property
    def sparse_steps_density(self) -> float:
        """Mean block density over the calls outside the schedule's dense steps, the dense ones among them (dense
        layers, correction measurements, masked calls) counting as 1.0: the attention work of the sparse steps."""
        calls = sum(s.dense_calls + s.sparse_calls - s.dense_step_calls for s in self.layers)
        work = sum(s.dense_calls - s.dense_step_calls + s.sparse_calls * (s.mean_density or 0.0) for s in self.layers)
        return work / calls if calls else 1.0

    def __str__(self) -> str:
        rows = [f"{'transformer':<14}{'layer':>6}{'dense':>8}{'sparse':>8}{'density':>10}"]
        for s in self.layers:
            density = "-" if s.mean_density is None else f"{s.mean_density:.3f}"
            rows.append(f"{s.transformer:<14}{s.layer:>6}{s.dense_calls:>8}{s.sparse_calls:>8}{density:>10}")
        rows.append(f"mean attention density (dense calls = 1.0): {self.mean_density:.3f}")
        rows.append(f"outside the dense steps (dense layers, masked calls = 1.0): {self.sparse_steps_density:.3f}")
        return "\n".join(rows)


class SparseHandle:
    """What `apply` installed on one pipeline or transformer; undone exactly by `remove`."""

    def __init__(self, config: SparseConfig, transformers: dict[str, torch.nn.Module], scheduler, pipeline=None):
        self.config = config
        self._transformers = transformers
        self._pipeline = None if pipeline is None else weakref.ref(pipeline)
        self._processors: list[tuple[ModelAdapter, torch.nn.Module, SparseProcessor]] = []  # what `_install` put
        # Processors set after `apply` (`set_processor`, `load_ip_adapter`), which `remove` left to the user: put
        # back (`sparse`, `suspended`, an `apply` refused), the handle leaves them too.
        # Weak (`_leave`): a processor the user dropped since is not kept alive here.
        self._left: dict[torch.nn.Module, Callable[[], object | None]] = {}
        self.installed = False  # between `_install` and `remove`
        # The step count of each denoising run since `apply`, as the dense steps were resolved for it (`None`:
        # unknown): a pipeline may run fewer steps than asked (img2img's `strength`), or stages of their own counts.
        self.run_step_counts: list[int | None] = []
        self.runtimes = {name: SparseRuntime(config, name) for name in transformers}
        # One clock for all experts: they share the scheduler, so a new pipeline call is noticed once.
        rises = {adapter_for(t).timesteps_rise for t in transformers.values()}
        self._clock = StepClock(scheduler, rising=True if True in rises else None if None in rises else False,
                                pipeline=pipeline)
        self._install()

    def _install(self, put_back: bool = False) -> None:
        """Sparse processors around the processors the transformers have now, and the context hooks (at `apply`,
        and with `put_back` again when a `sparse` or `suspended` block that took this handle off ends, or an `apply`
        that replaced it is refused)."""
        pipeline = None if self._pipeline is None else self._pipeline()
        made, self._layers = [], {}
        for name, transformer in self._transformers.items():
            adapter = adapter_for(transformer)
            modules = list(adapter.self_attention_modules(transformer))
            self._layers[name] = [layer for layer, _ in modules]
            made.append((name, transformer, adapter, {
                module: self._make_processor(adapter, module, name, layer, transformer, put_back)
                for layer, module in modules if self._left_on(module) is not module.processor
            }))
        _check_dense_layers(self.config.dense_layers, self._layers)
        # Only now that every layer of every transformer was accepted, swap: a refused layer leaves them untouched.
        swapped, hooked = [], []
        try:
            for name, transformer, adapter, processors in made:
                runtime = self.runtimes[name]
                for module, processor in processors.items():
                    swapped.append((adapter, module, module.processor, processor))
                    adapter.set_processor(module, processor)
                    processor.installed = True
                read_call = adapter.read_call
                if adapter.timestep_from_pipeline and pipeline is not None:
                    read_call = _with_pipeline_timestep(read_call, pipeline, self._clock)
                if adapter.timestep_over_train_timesteps:
                    read_call = _on_train_timesteps(read_call, self._clock)
                hook = SparseContextHook(runtime, self._clock, read_call, self._new_run, adapter.per_frame_steps,
                                         installed=processors.items())
                register_context_hook(transformer, hook)
                hooked.append(transformer)
                setattr(transformer, _HANDLE_ATTR, self)
        except BaseException:
            # A failure half-way (a hook of that name already there, a setter that raises) leaves the transformers as
            # they were, not half sparse with a hook that `remove` no longer knows of.
            for adapter, module, previous, processor in reversed(swapped):
                processor.installed = False
                if module.processor is processor:
                    adapter.set_processor(module, previous)
            for transformer in hooked:
                remove_context_hook(transformer)
            for transformer in self._transformers.values():
                if getattr(transformer, _HANDLE_ATTR, None) is self:
                    delattr(transformer, _HANDLE_ATTR)
            raise
        self._processors = [(adapter, module, processor) for adapter, module, _, processor in swapped]
        self.installed = True

    def _make_processor(self, adapter: ModelAdapter, module: torch.nn.Module, name: str, layer: int,
                        transformer: torch.nn.Module, put_back: bool) -> SparseProcessor:
        """The sparse processor of `layer` around `module`'s processor (`adapter.make_processor`). A handle put back
        on a family that does not shard, under context parallelism enabled since `apply`, goes back as it was: it
        refuses at its first sparse call (`check_not_parallel`), as it would have had it stayed on, rather than be
        lost where `make_processor` refuses a new one (`apply` under parallelism already enabled)."""
        runtime = self.runtimes[name]
        try:
            return adapter.make_processor(module.processor, runtime, layer, transformer)
        except NotImplementedError:
            if not put_back:
                raise
        original = module.processor
        if isinstance(original, SparseProcessor) and not original.installed:
            original = original.restored_original()  # as `make_processor` takes an orphan
        enabled = [holder for holder in (original, transformer)
                   if context_parallel_config(holder) is not None and "_parallel_config" in vars(holder)]
        configs = [holder._parallel_config for holder in enabled]
        for holder in enabled:
            holder._parallel_config = None
        try:
            processor = adapter.make_processor(original, runtime, layer, transformer)
        finally:
            for holder, config in zip(enabled, configs):
                holder._parallel_config = config
        # What `enable_parallelism` set on the processor this one replaces (on every processor that declares it),
        # which the sparse processor's check and its dense calls read.
        if configs:
            processor._parallel_config = configs[0]
        return processor

    def _modules(self) -> list[torch.nn.Module]:
        """The self-attention modules of this handle's transformers."""
        return [module for transformer in self._transformers.values()
                for _, module in adapter_for(transformer).self_attention_modules(transformer)]

    def new_run(self) -> None:
        """Make the next transformer call the first of a new denoising run: its stats, searches and correction
        statistics start afresh (the last run's stats stay readable until that call). A pipeline call starts one
        itself; a bare transformer only at a timestep larger than the last (smaller for MiniMax-H3, whose timestep
        rises; for Mochi, whose scheduler may run either way, against the direction of the run's first two distinct
        timesteps), so a model that denoises in one step, or a loop timing one step, calls this before each
        generation: else each call is one more CFG branch of the first one's step, reusing its searched blocks. On a
        bare Mochi transformer a run of one timestep (a warm-up call) has no direction yet: call this after it, or
        the next run's first timestep counts as its step 1."""
        self._clock.restart()

    def _new_run(self, num_steps: int | None = None) -> None:
        """A new denoising run of `num_steps` steps (`None`: unknown) started; the clock is shared, so once a run."""
        self.run_step_counts.append(num_steps)
        for runtime in self.runtimes.values():
            runtime.new_run()
        config = self.config
        if num_steps is None or config.resolved_pattern.name == "dense":  # "dense" is dense on purpose
            return
        # Valid configs (a count of steps fits any run), but ones that silently give no speedup on this run.
        if all(config.is_dense_step(step, num_steps) for step in range(num_steps)):
            first, last = (resolve_step_count(value, num_steps) for value in (config.dense_steps,
                                                                                config.dense_last_steps))
            warnings.warn(
                f"diffsparse: SparseConfig.dense_steps={config.dense_steps!r} and "
                f"dense_last_steps={config.dense_last_steps!r} keep every step of this {num_steps}-step run dense "
                f"({first} first, {last} last), so nothing runs sparse: lower them to leave some steps sparse",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )
        elif not sparse_steps(config, num_steps):
            if config.correction_refresh == 1:
                why = ("with correction_refresh=1 measures its statistics (dense) again at every sparse step, so "
                       f"nothing runs sparse in this {num_steps}-step run: set correction_refresh to 0 (measure "
                       "once) or more than 1")
            else:
                step = next(s for s in range(num_steps) if not config.is_dense_step(s, num_steps))
                why = (f"measures its statistics (dense) at the one step of this {num_steps}-step run that "
                       f"dense_steps={config.dense_steps!r} and dense_last_steps={config.dense_last_steps!r} leave "
                       f"sparse (step {step}, with no dense step before it to measure at), so nothing runs sparse: "
                       "run more steps, or leave the correction out")
            warnings.warn(f"diffsparse: SparseConfig.correction={config.correction!r} {why}", DiffsparseWarning,
                          stacklevel=outside_stacklevel())

    def _left_on(self, module: torch.nn.Module) -> object | None:
        """The user's processor `remove` left on `module` (`_leave`), if it is still alive."""
        kept = self._left.get(module)
        return None if kept is None else kept()

    def _leave(self, module: torch.nn.Module) -> None:
        """Keep `module`'s processor, the user's, out of the next `_install` (`_left`), by a weak reference where it
        takes one; one that does not (a class with `__slots__`) made `remove` fail half-way, for good."""
        processor = module.processor
        try:
            self._left[module] = weakref.ref(processor)
        except TypeError:
            self._left[module] = lambda: processor  # the module holds it anyway

    def remove(self) -> None:
        if not self.installed:  # replaced already (`apply` again): the hooks on the transformers are another's
            return
        for _, _, processor in self._processors:
            processor.installed = False
        for adapter, module, _ in self._processors:
            if not _put_back_original(adapter, module) and not isinstance(module.processor, SparseProcessor):
                # Set after `apply` (`set_processor`, `load_ip_adapter`, `fuse_qkv_projections()`): the user's
                # choice, kept, rather than overwritten by the processor that was there before `apply`.
                self._leave(module)
        for transformer in self._transformers.values():
            remove_context_hook(transformer)
            if getattr(transformer, _HANDLE_ATTR, None) is self:
                delattr(transformer, _HANDLE_ATTR)
        self._processors = []
        self.installed = False

    def stats(self, since_apply: bool = False) -> SparseStats:
        """`diffsparse.stats`: the last denoising run's calls, or with `since_apply` every call since this handle
        was made (`calls` holds the last run's log either way)."""
        layers = []
        for name, runtime in self.runtimes.items():
            if since_apply:
                totals = runtime.totals
            else:
                totals = {}
                for record in runtime.records:
                    tally(totals, record)
            for layer in sorted(totals):
                dense_calls, sparse_calls, density_sum, dense_step_calls = totals[layer]
                mean_density = density_sum / sparse_calls if sparse_calls else None
                layers.append(LayerStats(name, layer, dense_calls, sparse_calls, mean_density, dense_step_calls))
        return SparseStats(layers, {name: list(rt.records) for name, rt in self.runtimes.items()})


def _put_back_original(adapter: ModelAdapter, module: torch.nn.Module) -> bool:
    """Give `module` back the original under its sparse processor when no handle has that one installed (the
    handle being removed, or an orphan of an earlier one that diffusers put back: `unfuse_qkv_projections()`);
    `False`, leaving it as it is, when the module holds another processor."""
    processor = module.processor
    if not isinstance(processor, SparseProcessor) or processor.installed:
        return False
    adapter.set_processor(module, processor.restored_original())
    return True


def _check_dense_layers(dense_layers, layers: dict[str, list[int]]) -> None:
    """A listed block that no transformer has is a typo that would leave the block meant dense sparse (one that
    only some have is fine: the experts of a pipeline may differ in depth)."""
    present = {layer for indices in layers.values() for layer in indices}
    if isinstance(dense_layers, int) or not present:
        return
    missing = sorted(set(dense_layers) - present)
    if missing:
        raise ValueError(f"SparseConfig.dense_layers={list(dense_layers)!r}: no transformer has block {missing[0]} "
                         f"(self-attention blocks: {_blocks(layers)})")


def _blocks(layers: dict[str, list[int]]) -> str:
    """`layers` (self-attention block indices per transformer) for a message: "transformer 0..29, ..."."""
    return ", ".join(f"{name} {min(indices)}..{max(indices)}" for name, indices in layers.items() if indices)


def _warn_if_every_layer_dense(config: SparseConfig, layers: dict[str, list[int]]) -> None:
    """A config whose `dense_layers` covers every block of every transformer is valid (the same config may go to a
    deeper model) but gives no sparse attention at all: said at `apply`, not found in the stats later."""
    present = [layer for indices in layers.values() for layer in indices]
    if not present or config.resolved_pattern.name == "dense" or not all(map(config.is_dense_layer, present)):
        return
    warnings.warn(
        f"diffsparse.apply: SparseConfig.dense_layers={config.dense_layers!r} keeps every self-attention block "
        f"dense ({_blocks(layers)}), so nothing runs sparse: leave some blocks out of dense_layers",
        category=DiffsparseWarning,
        stacklevel=outside_stacklevel(),
    )


def _on_train_timesteps(read_call, clock: StepClock):
    """`read_call` whose timestep, a share of the scheduler's `num_train_timesteps` (`t / num_train_timesteps`, as
    Lumina2's and PRX's pipelines pass it), is put back on the scale of `clock`'s scheduler now (1000, diffusers'
    default, where there is none), with the rounding the adapter says it carries (`diffsparse_rounding`)."""

    def read(transformer, args, kwargs):
        layout, timestep, *token_order = read_call(transformer, args, kwargs)
        config = getattr(clock._current_scheduler(), "config", None)
        scale = float(getattr(config, "num_train_timesteps", None) or 1000)
        scaled = timestep * scale
        if hasattr(timestep, "diffsparse_rounding"):
            scaled.diffsparse_rounding = timestep.diffsparse_rounding * scale
        return (layout, scaled, *token_order)

    return read


def _with_pipeline_timestep(read_call, pipeline, clock: StepClock):
    """`read_call` whose timestep is the pipeline's `_current_timestep` (the scheduler's timestep it is denoising
    at, which diffusers pipelines set before each transformer call), or a modular pipeline's guider's (`set_state`
    gets it each step: Anima), when it has one: for families whose transformer gets the timestep on another scale
    than the scheduler's (Cosmos Predict 2 and 2.5; 1.0 passes the scheduler's own). A call while the pipeline is not
    denoising keeps its own timestep; one that is none of `clock`'s scheduler's is said once."""
    # Weakly, as `StepClock` holds it: the transformer's hook holds this function, and must not keep a pipeline the
    # user dropped alive.
    pipeline_ref = weakref.ref(pipeline)
    said = False

    def read(transformer, args, kwargs):
        nonlocal said
        layout, timestep, *token_order = read_call(transformer, args, kwargs)
        current = pipeline_timestep(pipeline_ref())
        if current is None and not said and _off_the_schedule(timestep, clock._current_scheduler()):
            # A 0-1 timestep against a grid in the thousands lands within the tolerance of its last step: the run
            # counted as one step, all dense, and the only warning said to lower dense_steps.
            said = True
            warnings.warn(
                f"diffsparse: {type(transformer).__name__} was called while the pipeline diffsparse was applied to is "
                f"not denoising (by another pipeline, directly, or after that pipeline was dropped), with a timestep "
                f"that is none of its scheduler's ({float(timestep.detach().float().max()):g}: Cosmos Predict 2 and "
                "2.5 pass sigma / (sigma + 1), on another scale), so the dense-step schedule cannot follow these "
                "calls; apply diffsparse to the pipeline that calls the transformer",
                StepScheduleWarning,
                stacklevel=outside_stacklevel(),
            )
        return (layout, timestep if current is None else current, *token_order)

    return read


def _off_the_schedule(timestep: torch.Tensor, scheduler) -> bool:
    """Whether `timestep` is none of `scheduler`'s run timesteps (within a half-precision cast's rounding); `False`
    without a run's schedule, where steps count distinct timesteps as on a bare transformer. Relative, not
    `StepClock`'s quarter of the grid's spacing: that one asks which step is nearest and takes a 0-1 timestep for
    the last step of a grid in the thousands; this asks whether the call's own timestep is on the scheduler's scale."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0 or not _has_run_schedule(scheduler):
        return False
    grid = timesteps.detach().float().cpu()
    t = timestep.detach().float().cpu().flatten()
    near = (t[:, None] - grid[None, :]).abs() <= 1e-2 * grid.abs()[None, :] + 1e-3
    return not bool(near.any(dim=1).all())


def _handles(pipe_or_transformer) -> list[SparseHandle]:
    transformers, _ = find_transformers(pipe_or_transformer)
    handles = []
    for transformer in transformers.values():
        handle = getattr(transformer, _HANDLE_ATTR, None)
        if handle is not None and handle not in handles:
            handles.append(handle)
    return handles


def apply(pipe_or_transformer, config: SparseConfig | None = None) -> SparseHandle:
    r"""
    Install block-sparse self-attention on a diffusers pipeline (all its transformers) or a bare transformer.

    Applying again replaces the previous configuration. The pipeline is called exactly as before.

    Args:
        pipe_or_transformer (`DiffusionPipeline` or `torch.nn.Module`):
            A pipeline (or modular pipeline) with a `transformer` component (and Wan 2.2's `transformer_2`,
            Ideogram 4's `unconditional_transformer`, or any other component of a supported class, as MiniMax-H3's
            `transformer_ref`), or a transformer.
            On a bare transformer, steps count distinct timesteps of a run of unknown length, so `dense_steps`
            must be an int (or `0.0`) and `dense_last_steps` 0: `apply` refuses a config with any other.
        config (`SparseConfig`, *optional*):
            What to install; defaults to `SparseConfig()`.

    Returns:
        `SparseHandle`: with `.stats()` and `.remove()`.

    Example:
        >>> import diffsparse
        >>> from diffsparse.pipelines.tiny import tiny_wan_pipeline
        >>> pipe = tiny_wan_pipeline()
        >>> handle = diffsparse.apply(pipe, diffsparse.SparseConfig(pattern="radial", dense_steps=1))
        >>> diffsparse.remove(pipe)
    """
    config = SparseConfig() if config is None else config
    if not isinstance(config, SparseConfig):
        raise ValueError(f"config must be a diffsparse.SparseConfig, got {type(config).__name__}")
    transformers, scheduler = find_transformers(pipe_or_transformer)
    for transformer in transformers.values():
        adapter_for(transformer)  # an unsupported model is the first thing to report
    if scheduler is None:
        config.is_dense_step(0, None)  # a fraction needs the step count: say so now, not mid-generation
    pipeline = None if isinstance(pipe_or_transformer, torch.nn.Module) else pipe_or_transformer
    previous = _handles(pipe_or_transformer)
    _remove(pipe_or_transformer)  # what it leaves dense is said below, as this apply's
    try:
        handle = SparseHandle(config, transformers, scheduler, pipeline)
    except BaseException:  # a layer refused: what was applied before stays
        _put_back(previous)
        raise
    try:
        others = _left_dense(previous, transformers)
        if others:
            warnings.warn(
                f"diffsparse.apply: the sparse attention applied earlier together with this transformer is removed "
                f"from {', '.join(others)} too, which now run dense; apply to the whole pipeline (or to each "
                "transformer on its own) to keep them sparse",
                category=DiffsparseWarning,
                stacklevel=outside_stacklevel(),
            )
        _warn_if_every_layer_dense(config, handle._layers)
    except BaseException:
        # A warning raised as an error (`filterwarnings("error", category=DiffsparseWarning)`) refuses the config
        # as a refused layer does: the new handle comes off and what was applied before is back.
        handle.remove()
        _put_back(previous)
        raise
    return handle


def _put_back(previous: list[SparseHandle]) -> None:
    """Install again the `previous` handles an `apply` removed and then was refused."""
    for replaced in previous:
        replaced._install(put_back=True)


def _left_dense(previous: list[SparseHandle], transformers: dict[str, torch.nn.Module]) -> list[str]:
    """The transformers of the `previous` handles that are not among `transformers`: a handle is removed whole, so
    applying to one expert of a pipeline applied as a whole leaves the others dense."""
    return [name for replaced in previous for name, t in replaced._transformers.items()
            if all(t is not u for u in transformers.values())]


def remove(pipe_or_transformer) -> None:
    """Restore the original processors (the very same objects) and remove every diffsparse hook; a processor set on
    a module after `apply` (`set_processor`, `load_ip_adapter`) stays, and a sparse processor of an earlier handle
    that diffusers put back (`unfuse_qkv_projections()` after `remove`) gives way to its original.

    Example:
        >>> import diffsparse
        >>> from diffsparse.pipelines.tiny import tiny_wan_pipeline
        >>> pipe = tiny_wan_pipeline()
        >>> diffsparse.remove(pipe)  # a no-op when nothing is applied

    A handle comes off whole: `remove(pipe.transformer)` after `apply(pipe)` also takes it off Wan 2.2's
    `transformer_2`, with a warning naming it.
    """
    others = _left_dense(_handles(pipe_or_transformer), find_transformers(pipe_or_transformer)[0])
    _remove(pipe_or_transformer)  # first: a warning raised as an error still leaves nothing applied
    if others:
        warnings.warn(
            f"diffsparse.remove: the sparse attention applied together with this transformer is removed from "
            f"{', '.join(others)} too, which now run dense; apply again to the ones to keep sparse",
            category=DiffsparseWarning,
            stacklevel=outside_stacklevel(),
        )


def _remove(pipe_or_transformer) -> None:
    """`remove` without its warning (`apply` says what it leaves dense in its own words)."""
    for handle in _handles(pipe_or_transformer):
        handle.remove()
    for transformer in find_transformers(pipe_or_transformer)[0].values():
        try:
            adapter = adapter_for(transformer)
        except ValueError:  # a model diffsparse has no adapter for: nothing of it to put back
            continue
        for _, module in adapter.self_attention_modules(transformer):
            _put_back_original(adapter, module)


def stats(pipe_or_transformer, since_apply: bool = False) -> SparseStats:
    """Per transformer block: dense and sparse self-attention calls, and mean block density, of the last denoising
    run: the last pipeline call, or its last segment, chunk, section or stage where the pipeline sets the scheduler's
    timesteps anew for each (Wan Animate, Helios, Framepack). `since_apply=True`: every call since `apply` (all the
    segments of a generation when it was applied for that one; `.calls` still holds the last run's log).

    Example:
        >>> import diffsparse
        >>> from diffsparse.pipelines.tiny import tiny_wan_pipeline
        >>> pipe = tiny_wan_pipeline()
        >>> _ = diffsparse.apply(pipe, diffsparse.SparseConfig(pattern="radial", dense_steps=1))
        >>> diffsparse.stats(pipe).layers
        []
    """
    transformers, _ = find_transformers(pipe_or_transformer)
    if not _handles(pipe_or_transformer):
        raise ValueError("diffsparse is not applied to this pipeline or transformer; call diffsparse.apply first")
    # Each transformer of a pipeline under its component name, from whichever handle it has (the experts can be
    # applied one by one, a config each, and a handle of a lone transformer calls it "transformer"); a transformer
    # asked about alone under the name its handle gives it.
    layers, calls = [], {}
    for name, transformer in transformers.items():
        handle = getattr(transformer, _HANDLE_ATTR, None)
        if handle is None:
            continue
        own_name = next(key for key, module in handle._transformers.items() if module is transformer)
        label = own_name if isinstance(pipe_or_transformer, torch.nn.Module) else name
        part = handle.stats(since_apply)
        layers += [replace(s, transformer=label) for s in part.layers if s.transformer == own_name]
        calls[label] = part.calls[own_name]
    return SparseStats(layers, calls)


@contextlib.contextmanager
def sparse(pipe_or_transformer, config: SparseConfig | None = None):
    """`apply` on entry, `remove` on exit; what was applied before (`apply`, an outer `sparse` block) is put back on
    exit, the same handles, their stats going on.

    Example:
        >>> import diffsparse
        >>> from diffsparse.pipelines.tiny import tiny_wan_pipeline
        >>> pipe = tiny_wan_pipeline()
        >>> with diffsparse.sparse(pipe, diffsparse.SparseConfig(dense_steps=1)) as handle:
        ...     pass
    """
    previous = _handles(pipe_or_transformer)
    with suspended(pipe_or_transformer):
        handle = apply(pipe_or_transformer, config)
        try:
            # `suspended` took the earlier handles off before `apply`, which so does not see what they leave dense.
            # Inside the `try`: a warning raised as an error still ends the block as a block.
            others = _left_dense(previous, handle._transformers)
            if others:
                warnings.warn(
                    f"diffsparse.sparse: the sparse attention applied earlier together with this transformer is "
                    f"removed from {', '.join(others)} too for the block, which run dense inside it (it comes back "
                    "after the block); use the block on the whole pipeline (or apply to each transformer on its own) "
                    "to keep them sparse",
                    category=DiffsparseWarning,
                    stacklevel=outside_stacklevel(),
                )
            yield handle
        finally:
            handle.remove()


@contextlib.contextmanager
def suspended(pipe_or_transformer):
    """The pipeline's own attention inside, where diffsparse was applied to it: its handles are removed on entry and
    put back on exit, the same handles, their stats going on; unless something applied inside the block is still
    installed on one of a handle's transformers: that stays, rather than have the handle stacked on it, and a
    warning names the handle's other transformers, which then run dense. A handle comes off whole:
    `suspended(pipe.transformer)` after `apply(pipe)` runs Wan 2.2's `transformer_2` dense inside the block too.

    Example:
        >>> import diffsparse
        >>> from diffsparse.pipelines.tiny import tiny_wan_pipeline
        >>> pipe = tiny_wan_pipeline()
        >>> handle = diffsparse.apply(pipe, diffsparse.SparseConfig(dense_steps=1))
        >>> with diffsparse.suspended(pipe):
        ...     handle.installed
        False
        >>> handle.installed
        True
    """
    previous = _handles(pipe_or_transformer)
    for handle in previous:
        handle.remove()
    entered = {module: module.processor for handle in previous for module in handle._modules()}
    raised = False  # by the block itself: `sys.exc_info()` also holds an exception the caller's `except` is handling
    try:
        yield
    except BaseException:
        raised = True
        raise
    finally:
        # Per handle, not per block: the block's transformers alone would miss an apply inside it to a transformer
        # the handle also covered (Wan 2.2's other expert), which left that expert dense, unsaid, or stacked the
        # handle on the new one's processors (a ValueError blaming a LoRA).
        def applied(transformer):
            return getattr(transformer, _HANDLE_ATTR, None) is not None

        busy = [replaced for replaced in previous if any(map(applied, replaced._transformers.values()))]
        left = [name for replaced in busy for name, t in replaced._transformers.items() if not applied(t)]
        for replaced in (handle for handle in previous if handle not in busy):
            # A processor set inside the block (`set_processor`, an IP-Adapter, a `sparse` block's `remove` keeping
            # it) is the user's, as one set after `apply` is: the handle put back leaves it rather than refuse it.
            for module in replaced._modules():
                if module.processor is not entered.get(module) and not isinstance(module.processor, SparseProcessor):
                    replaced._leave(module)
            if not replaced.installed:
                replaced._install(put_back=True)
        if left:
            # After the put-back: raised as an error, it must not leave the handles the block did not touch off. Nor
            # replace an error the block is raising: then it is not raised.
            with contextlib.suppress(DiffsparseWarning) if raised else contextlib.nullcontext():
                warnings.warn(
                    f"diffsparse: the sparse attention applied before the block is not put back, since an apply "
                    f"inside it is still installed on a transformer it covered; {', '.join(left)} now "
                    f"{'runs' if len(left) == 1 else 'run'} dense: apply again (or to the whole pipeline) to make "
                    f"{'it' if len(left) == 1 else 'them'} sparse",
                    category=DiffsparseWarning,
                    stacklevel=outside_stacklevel(),
                )
