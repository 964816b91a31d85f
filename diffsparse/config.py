"""`SparseConfig`: what the user asks for, validated once at construction."""

from __future__ import annotations

import ast
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from fractions import Fraction

import numpy as np

from . import DiffsparseWarning, outside_stacklevel
from .kernels import BACKENDS
from .patterns import Pattern, Searched, SearchedWindows, TokenOrder, get_pattern
from .patterns.base import as_pair
from .patterns.ordering import as_order
from .patterns.registry import parse_pattern_text

StepCount = int | float  # steps, or a fraction of the steps
CORRECTIONS = ("residual",)


def _check_step_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"SparseConfig.{name} must be an int >= 0 (a number of steps) or a float in [0, 1) "
            f"(a fraction of the steps), got {name}={value!r}"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"SparseConfig.{name} as an int must be >= 0, got {name}={value!r}")
    if isinstance(value, float) and not (0.0 <= value < 1.0):
        raise ValueError(f"SparseConfig.{name} as a float must be a fraction in [0, 1), got {name}={value!r}")


def _plain_number(value):
    """A number of another numeric type (numpy's, read from an array or a slider) as the Python int or float it
    stands for, so it passes the checks a Python number passes; anything else as it is (the checks name it)."""
    if type(value) in (bool, int, float):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float):  # np.float64 and other float subclasses: the value exactly
        return float(value)
    if isinstance(value, np.floating):
        # A narrower or wider numpy float as the shortest decimal that reads back as it, which the user gave:
        # np.float32(0.29) holds 0.28999999..., whose share of 50 steps rounded to 14 dense steps where 0.29 gives 15,
        # and density 0.3 compared unequal to 0.3. Not `str`: numpy's print options change it.
        return float(np.format_float_positional(value, unique=True, trim="-"))
    return float(value) if isinstance(value, numbers.Real) else value


def _hashable(value):
    if isinstance(value, list):
        return tuple(value)
    return frozenset(value) if isinstance(value, set) else value


def parse_dense_layers(text: str) -> int | list[int]:
    """`SparseConfig.dense_layers` from text, as the CLI and the demo take it: `"2"` -> the first 2 blocks,
    `"[0,3]"` -> blocks 0 and 3. The value is checked by `SparseConfig` itself (indices >= 0)."""
    text = text.strip()
    try:
        value = ast.literal_eval(text) if text.startswith("[") else int(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, int) or (isinstance(value, list) and all(type(i) is int for i in value)):
        return value
    raise ValueError(
        "SparseConfig.dense_layers as text must be a count of leading blocks ('2') or a bracketed list of block "
        f"indices ('[0,3]'), got {text!r}"
    )


def resolve_step_count(value: StepCount, num_steps: int) -> int:
    """Number of steps that `value` (an int, or a fraction of `num_steps`) stands for; fractions round half up, on
    the decimal the user wrote: 0.29 of 50 steps is 14.5, so 15 (in binary floating point 0.29 * 50 is just below)."""
    if isinstance(value, float):
        return math.floor(Fraction(str(float(value))) * num_steps + Fraction(1, 2))
    return value


def given_parameters(pattern: str | Pattern) -> tuple[str, dict]:
    """`pattern`'s name and the parameters it gives: a text's as typed (`"radial(decay=0.5)"` -> `("radial",
    {"decay": 0.5})`), an object's those that differ from their defaults (an object cannot tell a default given from
    one left out)."""
    if isinstance(pattern, str):
        return parse_pattern_text(pattern)
    given = {}
    for f in fields(pattern) if is_dataclass(pattern) else ():
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(pattern, f.name)
        try:
            # The default as the pattern holds it: Window3D's `stride=1` is held as (1, 1, 1).
            default = MISSING if default is MISSING else getattr(replace(pattern, **{f.name: default}), f.name)
        except ValueError:  # the default does not fit the other parameters given: this one is given too
            default = MISSING
        except TypeError:  # a subclass with an `__init__` of its own, which `replace` cannot call: as declared
            pass
        if default is MISSING or value != default:
            given[f.name] = value
    return pattern.name, given


def density_replaces(config: SparseConfig) -> dict:
    """The parameters `config.pattern` gives (`given_parameters`) that `config.density` sets in their place, with
    the values given: the one the density is solved for per layout (`Pattern.density_sets`: radial's `decay`), and
    one the density sets outright where it differs (the searched patterns' `keep`, the density itself). Window3D's
    `window` and SpatialTemporal's extents are scaled by the density, not replaced: none. The one rule for the
    warning (`warn_density_replaces`) and the commands' label, for a text and an object alike."""
    if config.density is None:
        return {}
    written, ran = get_pattern(config.pattern), config.resolved_pattern
    own = {f.name for f in fields(ran)} if is_dataclass(ran) else set()
    return {name: value for name, value in given_parameters(config.pattern)[1].items()
            if name == written.density_sets or (name in own and getattr(ran, name) != getattr(written, name))}


# What the warning of a parameter the density replaces calls the settings in the Python API (`warn_density_replaces`'s
# `names`; the commands name their options, `compare.COMMAND_NAMES`).
API_NAMES = {
    "pattern_given": "SparseConfig.pattern={pattern!r}",
    "density_given": "density={density:g}",
    "no_density": "give density=None",
    "pattern_setting": "the pattern's arguments",
}


def density_replaces_messages(config: SparseConfig, names: dict[str, str]) -> list[str]:
    """The text of the warning for each parameter `config.pattern` gives that `config.density` sets in its place
    (`density_replaces`): the density wins, and `None` runs the pattern as written. `names`: what the message calls
    the settings (`API_NAMES`, `compare.COMMAND_NAMES`)."""
    written = get_pattern(config.pattern)
    messages = []
    for name, value in density_replaces(config).items():
        how = (f"{name} is solved for it on each layout where {name} changes the density"
               if name == written.density_sets else f"{name}={getattr(config.resolved_pattern, name)!r} runs")
        messages.append(
            f"diffsparse: {names['pattern_given'].format(pattern=config.pattern)} gives {name}={value!r}, and "
            f"{names['density_given'].format(density=config.density)} sets {name} too: the density wins ({how}), "
            f"so {name}={value!r} is replaced; {names['no_density']} to run the pattern as written, or leave {name} "
            f"out of {names['pattern_setting']}"
        )
    return messages


def warn_density_replaces(config: SparseConfig, names: dict[str, str], stacklevel: int = 1) -> None:
    """A `DiffsparseWarning` of each of `density_replaces_messages(config, names)`; `stacklevel` as `warnings.warn`'s,
    from the caller."""
    for message in density_replaces_messages(config, names):
        warnings.warn(message, category=DiffsparseWarning, stacklevel=stacklevel + 1)


@dataclass(frozen=True)
class SparseConfig:
    r"""
    How diffsparse replaces dense self-attention. Validated at construction; `apply` never writes back into it.
    Frozen: assigning a field raises `dataclasses.FrozenInstanceError`, since the pattern is resolved and the values
    checked only at construction (an assigned field would be shown but not run, or run unchecked); make a changed
    copy with `dataclasses.replace(config, dense_steps=0)`, which validates it anew. A list given (`dense_layers`,
    `block_size`, `order`) is copied, so changing it afterwards leaves the config as validated; a config is hashable.

    Args:
        pattern (`str` or `Pattern`, *optional*, defaults to `"radial"`):
            The block-sparse pattern: a pattern object such as `diffsparse.patterns.Radial(decay=0.5)`, or a
            registered name (`"dense"`, `"radial"`, `"window3d"`, `"spatial_temporal"`, `"searched"`,
            `"searched_windows"`) for its
            default parameters, optionally with constructor keywords as Python literals
            (`"searched(refresh=4)"`). `"dense"` keeps the original
            processors' computation (bit-identical output) while still counting calls in `stats()`.
        density (`float`, *optional*, defaults to `None`):
            A target block density in (0, 1]: the pattern's main parameter is solved for it on each new token
            layout (`Pattern.at_density`, once per resolution, then cached), so one config aims at the same
            sparsity at any resolution. The nearest density the pattern reaches is taken, and on small layouts
            it can be far off: `"radial"` keeps frames one apart whole, so one or two frames (every image model)
            stay dense and 3 or 5 frames keep at least 0.78 or 0.53 (block 64, frames of 30 x 52 tokens); a
            warning says so, once per layout, when the reached density is more than `max(0.05, target / 4)` from
            the target. For `"searched"` it is the share of blocks the search keeps (`keep`; with
            `top_p`, the most it keeps), for `"searched_windows"` the layer's budget its windows share (`keep`).
            The density wins over a parameter the pattern gives that it sets (`density_replaces`): radial's
            `decay`, and a searched `keep` other than the density. A pattern object gives the parameters that
            differ from their defaults (it cannot tell a default given from one left out), and one the density
            replaces is a `DiffsparseWarning` when the config is made (again for each `dataclasses.replace` of
            it): `Radial(decay=0.5)` with `density=0.25` runs decay solved per layout, `Searched(keep=0.5)` runs
            keep=0.25. A pattern text is what the commands take, and they say it naming their options
            (`compare.warn_if_density_replaces`). Window3D's `window` and SpatialTemporal's extents are scaled by
            the density, not replaced. `None` uses the pattern's parameters as given.
        block_size (`int` or `(int, int)`, *optional*, defaults to `64`):
            Kernel block size in tokens, one int for queries and keys or `(block_q, block_k)`. Masks are decided
            per block; sequence lengths that are not a multiple are padded and the padding masked.
        dense_steps (`int` or `float`, *optional*, defaults to `0.2`):
            The first denoising steps that stay dense: an int counts steps, a float in [0, 1) is a fraction of
            the pipeline's `num_inference_steps` (rounded half up). Steps count from the first a call runs: with
            image- or video-to-video `strength` < 1, of the steps it runs. Where the step count is unknown (a bare
            transformer) an int, or `0.0`: no steps of any count; `apply` refuses any other, and any
            `dense_last_steps` other than 0.
        dense_last_steps (`int` or `float`, *optional*, defaults to `0`):
            The last denoising steps that stay dense, in the same two forms. Where the step count is unknown (a bare
            transformer) only `0` (or `0.0`): the last steps of a run of unknown length cannot be found, so `apply`
            refuses any other.
        dense_layers (`int` or list of `int`, *optional*, defaults to `0`):
            Transformer blocks whose self-attention stays dense: an int `L` means the first `L` blocks, a list
            names block indices.
        order (`TokenOrder` or list of `TokenOrder`, *optional*, defaults to `None`):
            The token order the kernel sees: `None` keeps the model's frame-major order, and
            `diffsparse.patterns.TileOrder((2, 8, 8))` permutes tokens so each kernel block is a 3D tile (best
            with `Window3D`). A list gives layer `i` the order `order[i % len(order)]` (VMoBA's partitions
            cycling across layers, e.g. `[None, TileOrder((1, 8, 8)), TileOrder((4, 4, 4))]`). Outputs always
            come back in the original order.
        backend (`str`, *optional*, defaults to `"auto"`):
            The kernel backend passed to `diffsparse.kernels.block_sparse_attention`.
        correction (`str`, *optional*, defaults to `None`):
            Softmax-statistics correction (Re-ttention). `"residual"`: at the last dense step before the sparse
            ones, each (layer, CFG branch, token layout, group of videos) measures, per head and query, the share
            of the softmax denominator its kept blocks hold, `rho = exp(lse_sparse - lse_full)`, and the part of the
            dense output the dropped blocks contribute, `residual = out_full - rho * out_sparse`; each later sparse
            call returns `rho * out_sparse + residual`. That measuring call is computed by the kernel with every
            block kept (the dense result to float rounding) plus one sparse pass. A (layer, branch) with no
            measurement yet for the current shape (Wan 2.2's second expert, or `dense_steps` resolving to 0) is
            measured at its first sparse-scheduled call, which then runs dense. Memory: one output-sized tensor per layer and
            branch (tokens x hidden size, in the model's dtype). `None` applies no correction. On the embedded
            20-step testbed it lowers PSNR by 2-5.5 dB (the residual goes stale within two steps; README), so
            measure it on your model before relying on it.
        correction_refresh (`int`, *optional*, defaults to `0`):
            With a correction, measure again every this many steps after the last measurement (that call runs
            dense); `0` measures once per generation and shape.

    Example:
        >>> import diffsparse
        >>> config = diffsparse.SparseConfig(pattern="radial", dense_steps=0.2, dense_layers=1)
        >>> config.is_dense_step(step=1, num_steps=10), config.is_dense_step(step=2, num_steps=10)
        (True, False)
    """

    pattern: str | Pattern = "radial"
    density: float | None = None
    block_size: int | tuple[int, int] = 64
    dense_steps: StepCount = 0.2
    dense_last_steps: StepCount = 0
    dense_layers: int | Sequence[int] = 0
    order: TokenOrder | list[TokenOrder | None] | tuple[TokenOrder | None, ...] | None = None
    backend: str = "auto"
    correction: str | None = None
    correction_refresh: int = 0
    _pattern: Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # The config's own copies: a caller's list changed after construction would otherwise change a frozen,
        # validated config (shown in its repr, refused only at use). Lists stay lists, so reprs and tables read as
        # the user wrote them.
        for name in ("block_size", "dense_layers", "order"):
            value = getattr(self, name)
            if isinstance(value, (list, set)):
                object.__setattr__(self, name, list(value) if isinstance(value, list) else set(value))
        for name in ("density", "block_size", "dense_steps", "dense_last_steps", "dense_layers", "correction_refresh"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                plain = [_plain_number(item) for item in value]
                if any(a is not b for a, b in zip(plain, value)):  # else as given (a namedtuple stays one)
                    object.__setattr__(self, name, set(plain) if isinstance(value, set) else
                                       frozenset(plain) if isinstance(value, frozenset) else
                                       plain if isinstance(value, list) else tuple(plain))
            else:
                object.__setattr__(self, name, _plain_number(value))
        try:
            pattern = get_pattern(self.pattern)
        except ValueError as error:
            raise ValueError(f"SparseConfig.pattern is invalid: {error}") from None
        object.__setattr__(self, "_pattern", pattern)  # derived, not given: past the frozen `__setattr__`
        if self.density is not None and (
            isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1
        ):
            raise ValueError(f"SparseConfig.density must be None or a number in (0, 1], got density={self.density!r}")
        _ = self.block_sizes  # validates
        if self.density is not None and not self._pattern.solves_density:
            # Found here, not at the first sparse call of a generation.
            raise ValueError(
                f"SparseConfig.density={self.density!r} needs a pattern with a parameter to solve for it (radial, "
                f"window3d, spatial_temporal, searched, searched_windows, dense); {self._pattern!r} has none: set its "
                f"parameters (for a combination, solve each part with at_density) and leave density=None"
            )
        if self.density is not None and isinstance(self._pattern, (Searched, SearchedWindows)):
            # A searched pattern's density is its `keep`, which the search itself needs: set here, not solved
            # per layout after the fact.
            object.__setattr__(self, "_pattern", self._pattern.at_density(None, self.density, self.block_sizes))
        _check_step_count("dense_steps", self.dense_steps)
        _check_step_count("dense_last_steps", self.dense_last_steps)
        _ = self._dense_layer_set  # validates
        if isinstance(self.order, (list, tuple)) and not self.order:
            raise ValueError(
                f"SparseConfig.order must name at least one order when it is a list, got order={self.order!r}")
        try:
            _ = self.resolved_orders
        except ValueError as error:
            raise ValueError(f"SparseConfig.order is invalid (order={self.order!r}): {error}") from None
        allowed = ("auto", *BACKENDS)
        if self.backend not in allowed:
            raise ValueError(f"SparseConfig.backend must be one of {allowed}, got backend={self.backend!r}")
        if self.correction is not None and self.correction not in CORRECTIONS:
            raise ValueError(
                f"SparseConfig.correction must be None or one of {CORRECTIONS}, got correction={self.correction!r}"
            )
        refresh = self.correction_refresh
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 0:
            raise ValueError(
                "SparseConfig.correction_refresh must be an int >= 0 (steps between measurements, 0 = once), "
                f"got correction_refresh={refresh!r}"
            )
        if refresh and self.correction is None:
            raise ValueError(
                f"SparseConfig.correction_refresh={refresh!r} has no effect without a correction: "
                f"set correction to one of {CORRECTIONS} or leave correction_refresh=0"
            )
        if not isinstance(self.pattern, str):
            # An object is given only through the Python API, where nothing else says it: `Radial(decay=0.5)` with
            # a density ran a solved decay without a word. A text is what the commands take, and they say it in
            # their options' names where their JSON and page keep it (`compare.warn_if_density_replaces`).
            warn_density_replaces(self, API_NAMES, stacklevel=outside_stacklevel())

    def __hash__(self) -> int:
        # The generated hash fails on a list field; hashing lists as tuples keeps equal configs' hashes equal.
        return hash(tuple(_hashable(getattr(self, f.name)) for f in fields(self) if f.compare))

    @property
    def resolved_pattern(self) -> Pattern:
        """The pattern object (a name resolved to its default instance)."""
        return self._pattern

    @property
    def resolved_orders(self) -> tuple[TokenOrder, ...]:
        """The token orders that the layers cycle through (one for every layer unless `order` is a list), `None`
        resolved to the frame-major `IdentityOrder()`."""
        orders = self.order if isinstance(self.order, (list, tuple)) else [self.order]
        return tuple(as_order(order) for order in orders)

    def layer_order(self, layer: int) -> TokenOrder:
        """The token order the kernel sees on layer `layer`."""
        orders = self.resolved_orders
        return orders[layer % len(orders)]

    @property
    def block_sizes(self) -> tuple[int, int]:
        """`(block_q, block_k)`."""
        return as_pair(self.block_size, "SparseConfig.block_size")

    @property
    def _dense_layer_set(self) -> frozenset[int] | int:
        value = self.dense_layers
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"SparseConfig.dense_layers as an int must be >= 0, got dense_layers={value!r}")
            return value
        if isinstance(value, (list, tuple, set, frozenset)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
        ):
            return frozenset(value)
        raise ValueError(
            "SparseConfig.dense_layers must be an int >= 0 (the first L blocks) or a list of block indices >= 0, "
            f"got dense_layers={value!r}"
        )

    def is_dense_layer(self, layer: int) -> bool:
        layers = self._dense_layer_set
        return layer < layers if isinstance(layers, int) else layer in layers

    def is_dense_step(self, step: int, num_steps: int | None) -> bool:
        """Whether denoising step `step` (0-based) of `num_steps` stays dense (`num_steps=None`: unknown)."""
        if num_steps is None:
            # A fraction 0.0 is no steps whatever the count, as dense_last_steps=0.0 is.
            if (isinstance(self.dense_steps, float) and self.dense_steps != 0) or self.dense_last_steps != 0:
                raise ValueError(
                    "The number of denoising steps is unknown (sparse attention was applied to a bare transformer, or "
                    "to a pipeline without a scheduler, as Echo's modular blocks with their own sigmas), so "
                    f"SparseConfig.dense_steps={self.dense_steps!r} / dense_last_steps={self.dense_last_steps!r} "
                    "cannot be resolved: give dense_steps as an int and dense_last_steps=0, or apply to a pipeline "
                    "with a scheduler."
                )
            return step < self.dense_steps
        first = resolve_step_count(self.dense_steps, num_steps)
        last = resolve_step_count(self.dense_last_steps, num_steps)
        return step < first or step >= num_steps - last

    def is_measure_step(self, step: int, num_steps: int | None) -> bool:
        """Whether `step` is the dense step right before a sparse one, where a correction takes its statistics."""
        if self.correction is None or not self.is_dense_step(step, num_steps):
            return False
        following = step + 1
        return (num_steps is None or following < num_steps) and not self.is_dense_step(following, num_steps)
