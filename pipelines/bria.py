"""Bria 3.2 (`BriaTransformer2DModel`, `BriaPipeline`): FLUX.1's architecture and position ids (its own copy of
`FluxAttnProcessor` on the dual- and single-stream blocks, text first, the packed 2 x 2 latent grid read from
`img_ids`) for text-to-image. Unlike FLUX's, its pipeline passes the scheduler's timesteps as they are."""

from __future__ import annotations

from diffusers.models.transformers import transformer_bria
from diffusers.models.transformers.transformer_bria import BriaAttnProcessor, BriaTransformer2DModel

from .flux import FluxAdapter, FluxCopyAttention
from .registry import register_adapter


class BriaSparseAttnProcessor(FluxCopyAttention, BriaAttnProcessor):
    """`BriaAttnProcessor` whose joint self-attention runs block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged."""

    projections = staticmethod(transformer_bria._get_qkv_projections)


class BriaAdapter(FluxAdapter):
    transformer_classes = (BriaTransformer2DModel,)
    family = "Bria"
    original_processor = BriaAttnProcessor
    sparse_processor = BriaSparseAttnProcessor
    timestep_scale = 1


register_adapter(BriaAdapter())
