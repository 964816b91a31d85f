"""LongCat-Image (`LongCatImageTransformer2DModel`): FLUX.1's architecture (its own copy of `FluxAttnProcessor` on the
dual- and single-stream blocks, text first) for text-to-image (`LongCatImagePipeline`) and editing
(`LongCatImageEditPipeline`).

What differs is the position ids: LongCat numbers modalities in their first id (text 0, the generated image 1, the
edited image 2) and starts the images' rows and columns after the prompt. Shifted back (first id minus 1, rows and
columns from 0), they are FLUX.1's: the generated image is frame 0, an edited image of its size frame 1, one of
another size the text's span (`pipelines.flux`). The pipelines pass `t / 1000` as the timestep.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers import transformer_longcat_image
from diffusers.models.transformers.transformer_longcat_image import (
    LongCatImageAttnProcessor,
    LongCatImageTransformer2DModel,
)

from .flux import FluxAdapter, FluxCopyAttention
from .registry import register_adapter


class LongCatImageSparseAttnProcessor(FluxCopyAttention, LongCatImageAttnProcessor):
    """`LongCatImageAttnProcessor` whose joint self-attention runs block-sparse when the runtime says so; dense calls
    run the original `__call__` unchanged."""

    projections = staticmethod(transformer_longcat_image._get_qkv_projections)


class LongCatImageAdapter(FluxAdapter):
    transformer_classes = (LongCatImageTransformer2DModel,)
    family = "LongCat-Image"
    original_processor = LongCatImageAttnProcessor
    sparse_processor = LongCatImageSparseAttnProcessor
    # `forward(hidden_states, encoder_hidden_states, timestep, img_ids, ...)`: no pooled projections.
    timestep_position, img_ids_position = 2, 3

    def flux_ids(self, img_ids: torch.Tensor) -> torch.Tensor:
        ids = (img_ids[0] if img_ids.ndim == 3 else img_ids).clone()
        ids[:, 0] -= 1
        ids[:, 1:3] -= ids[:, 1:3].min(dim=0).values
        return ids


register_adapter(LongCatImageAdapter())
