"""The per-transformer runtime: when to be sparse (schedule), which plan to run (cache), what happened (stats).

One `SparseRuntime` serves every sparse processor of one transformer. A diffusers `ModelHook` on the
transformer sets the call context (step, token layout) before each forward; processors then ask
`route(layer)` whether to be sparse and call `attention(layer, q, k, v)`.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from .config import SparseConfig
from .kernels import BlockSparsePlan, block_sparse_attention, make_plan
from .patterns import IdentityOrder, Pattern, VideoLayout

HOOK_NAME = "diffsparse_context"
# Plans are per (pattern, layout): a static pattern needs one per resolution, a head-classifying pattern one
# per distinct head assignment (at most one per layer).
_PLAN_CACHE_SIZE = 64
# Contexts a bare transformer call runs in when no pipeline wrapped it in `cache_context`.
_DEFAULT_CONTEXT = CacheContext("default")


@dataclass
class CallRecord:
    """One self-attention call: which step, layer and CFG branch, dense or sparse, at what block density."""

    step: int
    layer: int
    branch: str
    sparse: bool
    density: float


@dataclass(frozen=True)
class _CachedPlan:
    """A plan with the token permutation it was built for (`None` for the model's own order)."""

    plan: BlockSparsePlan
    perm: torch.Tensor | None
    inverse: torch.Tensor | None


class _BranchState(BaseState):
    """Per CFG branch ("cond"/"uncond") state of the current call."""

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.step: int = 0
        self.num_steps: int | None = None
        self.layout: VideoLayout | None = None


class StepClock:
    """Turns a call's timestep into a step index, and notices when a new pipeline call starts.

    With a scheduler, the step is the timestep's position in `scheduler.timesteps`: the same for the cond and
    uncond calls and across Wan 2.2's two experts. `set_timesteps` makes a new tensor on every pipeline call,
    so a different tensor means a new call. Without one (a bare transformer), steps count distinct timesteps
    and a timestep larger than the last starts a new run (denoising only ever lowers it).
    """

    def __init__(self, scheduler=None):
        self._scheduler = scheduler
        self._timesteps_ref = None
        self._last_t: float | None = None
        self._step = -1

    def tick(self, timestep: torch.Tensor) -> tuple[int, int | None, bool]:
        """Returns `(step, num_steps, new_run)` for a call at `timestep`."""
        t = float(timestep.detach().float().max())
        timesteps = getattr(self._scheduler, "timesteps", None) if self._scheduler is not None else None
        if timesteps is not None and len(timesteps) > 0:
            new_run = self._timesteps_ref is None or self._timesteps_ref() is not timesteps
            if new_run:
                self._timesteps_ref = weakref.ref(timesteps)
                self._grid = timesteps.detach().float().cpu()
            step = int(torch.argmin((self._grid - t).abs()))
            return step, len(self._grid), new_run
        new_run = self._last_t is None or t > self._last_t
        if new_run:
            self._step = 0
        elif t != self._last_t:
            self._step += 1
        self._last_t = t
        return self._step, None, new_run


class SparseRuntime:
    """Schedule, plan cache and call log for one transformer's self-attention layers."""

    def __init__(self, config: SparseConfig, name: str):
        self.config = config
        self.name = name
        self.pattern = config.resolved_pattern
        self.block_sizes = config.block_sizes
        self.order = config.resolved_order
        self.state_manager = StateManager(_BranchState)
        self.records: list[CallRecord] = []
        # Head-classifying patterns (Sparse VideoGen): the layer's specialised pattern, chosen at its first
        # sparse call of a pipeline call from sampled q/k rows and reused for the remaining steps.
        self._layer_patterns: dict[tuple[int, VideoLayout], Pattern] = {}
        self._classifies = callable(getattr(self.pattern, "classify", None))
        self._plans: OrderedDict[tuple, _CachedPlan] = OrderedDict()
        self._always_dense = self.pattern.name == "dense"

    # -- context, set by the hook -------------------------------------------------------------
    def _state(self) -> _BranchState:
        return self.state_manager.get_state()

    def begin_call(self, layout: VideoLayout, step: int, num_steps: int | None) -> None:
        state = self._state()
        state.layout, state.step, state.num_steps = layout, step, num_steps

    def new_run(self) -> None:
        """A new pipeline call started: forget the last call's log (plans stay: they depend on shapes only)."""
        self.records.clear()
        self._layer_patterns.clear()

    # -- asked by processors ------------------------------------------------------------------
    def route(self, layer: int) -> bool:
        """Whether this call of `layer` runs sparse; dense calls are logged here."""
        state = self._state()
        sparse = not (
            self._always_dense
            or state.layout is None
            or self.config.is_dense_layer(layer)
            or self.config.is_dense_step(state.step, state.num_steps)
        )
        if not sparse:
            self.records.append(CallRecord(state.step, layer, self.state_manager.context.name, False, 1.0))
        return sparse

    def attention(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Block-sparse attention on `(B, S, H, D)` tensors (the diffusers processor layout)."""
        state = self._state()
        pattern = self._layer_pattern(layer, state.layout, query, key) if self._classifies else self.pattern
        cached = self.plan(state.layout, query.shape[2], query.device, pattern)
        if cached.perm is not None:
            query, key, value = (x.index_select(1, cached.perm) for x in (query, key, value))
        out = block_sparse_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cached.plan, backend=self.config.backend
        ).transpose(1, 2)
        if cached.perm is not None:
            out = out.index_select(1, cached.inverse)
        self.records.append(CallRecord(state.step, layer, self.state_manager.context.name, True, cached.plan.density))
        return out

    def _layer_pattern(self, layer: int, layout: VideoLayout, query: torch.Tensor, key: torch.Tensor) -> Pattern:
        pattern = self._layer_patterns.get((layer, layout))
        if pattern is None:
            generator = torch.Generator(device=query.device).manual_seed(layer)
            kinds = self.pattern.classify(query.transpose(1, 2), key.transpose(1, 2), layout, generator=generator)
            pattern = self._layer_patterns[(layer, layout)] = self.pattern.with_heads(kinds)
        return pattern

    def plan(
        self, layout: VideoLayout, heads: int, device: torch.device, pattern: Pattern | None = None
    ) -> _CachedPlan:
        """The cached plan for this layout; a new resolution builds a new one, never a stale reuse."""
        pattern = self.pattern if pattern is None else pattern
        key = (pattern, layout, heads, str(device))
        cached = self._plans.get(key)
        if cached is None:
            cached = self._build_plan(pattern, layout, heads, device)
            self._plans[key] = cached
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return cached

    def _build_plan(self, pattern: Pattern, layout: VideoLayout, heads: int, device: torch.device) -> _CachedPlan:
        if self.config.density is not None:
            pattern = pattern.at_density(layout, self.config.density, self.block_sizes, order=self.order)
        mask = pattern.block_mask(layout, self.block_sizes, order=self.order)
        if mask.shape[0] not in (1, heads):
            raise ValueError(f"pattern {pattern!r} gives masks for {mask.shape[0]} heads, but the model has {heads=}")
        n = layout.num_tokens
        plan = make_plan(mask.unsqueeze(0).to(device), n, n, self.block_sizes)
        if isinstance(self.order, IdentityOrder):
            return _CachedPlan(plan, None, None)
        return _CachedPlan(plan, self.order.permutation(layout).to(device), self.order.inverse(layout).to(device))


class SparseContextHook(ModelHook):
    """Sets the runtime's call context (step, layout) before each transformer forward.

    `read_call(module, args, kwargs) -> (layout, timestep)` is the model adapter's knowledge of where the
    latent grid and the timestep are in the transformer's inputs.
    """

    _is_stateful = True

    def __init__(self, runtime: SparseRuntime, clock: StepClock, read_call, on_new_run):
        super().__init__()
        self.runtime = runtime
        self.state_manager = runtime.state_manager
        self._clock = clock
        self._read_call = read_call
        self._on_new_run = on_new_run
        self._own_context = False

    def pre_forward(self, module, *args, **kwargs):
        # A bare call (no pipeline `cache_context`) still needs a context to key its branch state.
        self._own_context = self.state_manager._context is None
        if self._own_context:
            self.state_manager.set_context(_DEFAULT_CONTEXT)
        layout, timestep = self._read_call(module, args, kwargs)
        step, num_steps, new_run = self._clock.tick(timestep)
        if new_run:
            self._on_new_run()
        self.runtime.begin_call(layout, step, num_steps)
        return args, kwargs

    def post_forward(self, module, output):
        if self._own_context:
            self.state_manager.set_context(None)
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


def register_context_hook(transformer: torch.nn.Module, hook: SparseContextHook) -> None:
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)


def remove_context_hook(transformer: torch.nn.Module) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
