"""Adapters keyed by transformer class, and finding the transformers inside a pipeline."""

from __future__ import annotations

import torch

from .base import ModelAdapter

_ADAPTERS: list[ModelAdapter] = []
# Pipelines keep their denoisers under these component names (Wan 2.2's second expert, Ideogram 4's model for the
# unconditional branch); any other component of a class diffsparse adapts is found too (`find_transformers`).
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2", "unconditional_transformer")


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    _ADAPTERS.append(adapter)
    return adapter


def adapter_for(transformer: torch.nn.Module) -> ModelAdapter:
    for adapter in _ADAPTERS:
        if isinstance(transformer, adapter.transformer_classes):
            return adapter
    supported = sorted(cls.__name__ for adapter in _ADAPTERS for cls in adapter.transformer_classes)
    raise ValueError(f"diffsparse has no adapter for {type(transformer).__name__}; supported: {supported}")


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module a `torch.compile(module)` wrapper holds (its forward calls the module, hooks included, and
    recompiles when they change); any other module itself."""
    return getattr(module, "_orig_mod", module) if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) else module


def _adapted(module: torch.nn.Module) -> bool:
    return any(isinstance(module, adapter.transformer_classes) for adapter in _ADAPTERS)


def find_transformers(pipe_or_transformer) -> tuple[dict[str, torch.nn.Module], object | None]:
    """`({component name: transformer}, scheduler or None)` for a pipeline or a bare transformer (compiled or
    not: a `torch.compile` wrapper gives the module inside it): the components named in `TRANSFORMER_COMPONENTS`,
    then every other component of a class diffsparse adapts (MiniMax-H3's `transformer_ref`, the model of its
    reference-to-video workflow), which would otherwise stay dense without a word. A transformer under several
    names (`WanPipeline(transformer=t, transformer_2=t)`) is found once, under the first: it is one model, whose
    processors and hook are installed once."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return {"transformer": _uncompiled(pipe_or_transformer)}, None
    named = [(name, getattr(pipe_or_transformer, name, None)) for name in TRANSFORMER_COMPONENTS]
    components = getattr(pipe_or_transformer, "components", None)
    others = [(name, component) for name, component in (components.items() if isinstance(components, dict) else ())
              if isinstance(component, torch.nn.Module) and _adapted(_uncompiled(component))]
    found = {}
    for name, component in named + others:
        if name in found or not isinstance(component, torch.nn.Module):
            continue
        module = _uncompiled(component)
        if all(module is not seen for seen in found.values()):
            found[name] = module
    if not found:
        raise ValueError(
            f"expected a diffusers pipeline with a `transformer` component or a transformer module, "
            f"got {type(pipe_or_transformer).__name__}"
        )
    return found, getattr(pipe_or_transformer, "scheduler", None)
