"""What every model adapter tells the core: where self-attention is, and how to read a call's layout."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch

from ..patterns import VideoLayout

# (transformer, forward args, forward kwargs) -> (layout of the self-attention sequence, timestep)
ReadCall = Callable[[torch.nn.Module, tuple, dict], tuple[VideoLayout, torch.Tensor]]


class ModelAdapter(ABC):
    """One model family. Subclasses fill in the three methods and register with `register_adapter`.

    The runtime given to `make_processor` answers `route(layer) -> bool` (whether this call goes through the
    runtime: sparse, or dense while measuring a correction's statistics; `False` = run the original processor)
    and `attention(layer, q, k, v, layout=None) -> out` on `(B, S, H, D)` tensors (`layout` when the tensors are
    not the whole call's sequence, e.g. a valid prefix; `call_layout()` gives the call's); adapters need nothing
    else of it.
    """

    transformer_classes: tuple[type, ...] = ()

    @abstractmethod
    def self_attention_modules(self, transformer: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
        """`(layer index, attention module)` for every self-attention that may become sparse."""

    @abstractmethod
    def make_processor(self, original, runtime, layer: int):
        """A sparse processor that replaces `original` on layer `layer`."""

    @abstractmethod
    def read_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[VideoLayout, torch.Tensor]:
        """The token layout and timestep of one transformer forward, from its inputs."""


def call_argument(args: tuple, kwargs: dict, name: str, position: int):
    """A forward argument given either by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    raise ValueError(f"the transformer was called without `{name}` (keyword or positional argument {position})")
