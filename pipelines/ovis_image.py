"""Ovis-Image (`OvisImageTransformer2DModel`, `OvisImagePipeline`): FLUX.1's architecture and position ids (its own
copy of `FluxAttnProcessor` on the dual- and single-stream blocks, text first, the packed 2 x 2 latent grid read
from `img_ids`) for text-to-image. The pipeline passes `t / 1000` as the timestep."""

from __future__ import annotations

from diffusers.models.transformers import transformer_ovis_image
from diffusers.models.transformers.transformer_ovis_image import OvisImageAttnProcessor, OvisImageTransformer2DModel

from .flux import FluxAdapter, FluxCopyAttention
from .registry import register_adapter


class OvisImageSparseAttnProcessor(FluxCopyAttention, OvisImageAttnProcessor):
    """`OvisImageAttnProcessor` whose joint self-attention runs block-sparse when the runtime says so; dense calls
    run the original `__call__` unchanged."""

    projections = staticmethod(transformer_ovis_image._get_qkv_projections)


class OvisImageAdapter(FluxAdapter):
    transformer_classes = (OvisImageTransformer2DModel,)
    family = "Ovis-Image"
    original_processor = OvisImageAttnProcessor
    sparse_processor = OvisImageSparseAttnProcessor
    # `forward(hidden_states, encoder_hidden_states, timestep, img_ids, ...)`: no pooled projections.
    timestep_position, img_ids_position = 2, 3


register_adapter(OvisImageAdapter())
