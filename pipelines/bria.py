"""Bria 3.2 (`BriaTransformer2DModel`, `BriaPipeline`) and Bria FIBO (`BriaFiboTransformer2DModel`,
`BriaFiboPipeline`): FLUX.1's architecture and position ids (their own copies of `FluxAttnProcessor` on the dual- and
single-stream blocks, text first, the packed 2 x 2 latent grid read from `img_ids`) for text-to-image. Unlike FLUX's,
their pipelines pass the scheduler's timesteps as they are. FIBO's pipeline pads prompts of different lengths in one
call (CFG's prompt and negative prompt) to one length and masks the padding as keys: each prompt is attended without
it (`FluxCopyAttention`)."""

from __future__ import annotations

from diffusers.models.transformers import transformer_bria, transformer_bria_fibo
from diffusers.models.transformers.transformer_bria import BriaAttnProcessor, BriaTransformer2DModel
from diffusers.models.transformers.transformer_bria_fibo import BriaFiboAttnProcessor, BriaFiboTransformer2DModel

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


class BriaFiboSparseAttnProcessor(FluxCopyAttention, BriaFiboAttnProcessor):
    """`BriaFiboAttnProcessor` whose joint self-attention runs block-sparse when the runtime says so; dense calls run
    the original `__call__` unchanged."""

    projections = staticmethod(transformer_bria_fibo._get_qkv_projections)


class BriaFiboAdapter(BriaAdapter):
    transformer_classes = (BriaFiboTransformer2DModel,)
    family = "Bria FIBO"
    # Its dual-stream blocks use its own processor, its single-stream blocks Bria 3.2's.
    processor_pairs = ((BriaFiboAttnProcessor, BriaFiboSparseAttnProcessor), (BriaAttnProcessor, BriaSparseAttnProcessor))
    # `forward(hidden_states, encoder_hidden_states, text_encoder_layers, pooled_projections, timestep, img_ids, ...)`.
    timestep_position, img_ids_position = 4, 5


register_adapter(BriaAdapter())
register_adapter(BriaFiboAdapter())
