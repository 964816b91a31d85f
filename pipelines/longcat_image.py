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

from .base import SparseProcessor, project_joint_output
from .flux import FluxAdapter, joint_qkv
from .registry import register_adapter


class LongCatImageSparseAttnProcessor(SparseProcessor, LongCatImageAttnProcessor):
    """`LongCatImageAttnProcessor` whose joint self-attention runs block-sparse when the runtime says so; dense calls
    run the original `__call__` unchanged."""

    # LongCatImageTransformer2DModel has no diffusers context parallel plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.stays_dense(attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.check_not_parallel()
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                      projections=transformer_longcat_image._get_qkv_projections)
        out = self.runtime.attention(self.layer, query, key, value).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        return project_joint_output(attn, out, hidden_states.shape[1], text_first=True)


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
