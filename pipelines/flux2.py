"""FLUX.2 (`Flux2Transformer2DModel`): text-to-image and editing with reference images.

As FLUX.1, images are frames of one layout over `[text, image]`, read from `img_ids` (time, row, column, layer):
the generated image is frame 0 and reference images of its size follow as frames 1, 2, ... (their times 10, 20,
...). Two processor classes: the dual-stream blocks' `Flux2AttnProcessor` (FLUX.1's arithmetic with FLUX.2's
projections) and the single-stream blocks' `Flux2ParallelSelfAttnProcessor`, whose one fused projection feeds
the attention and the MLP. The KV-cache processors of reference-image caching are other classes, refused.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
    _get_qkv_projections,
    apply_rotary_emb,
)

from .base import SparseProcessor, project_joint_output
from .flux import FluxAdapter, PromptMaskedJoint, joint_qkv
from .registry import register_adapter


class Flux2SparseAttnProcessor(PromptMaskedJoint, SparseProcessor, Flux2AttnProcessor):
    """`Flux2AttnProcessor` (dual-stream blocks) whose joint self-attention runs block-sparse when the runtime says
    so, a caller's mask as FLUX.1's (`PromptMaskedJoint`); dense calls run the original `__call__` unchanged."""

    mask_family = "FLUX.2"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            return super().__call__(*original)
        out = self.attend_masked_joint(attention_mask, lambda: joint_qkv(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb, projections=_get_qkv_projections))
        if out is None:
            return super().__call__(*original)
        return project_joint_output(attn, out, hidden_states.shape[1], text_first=True)


class Flux2SparseParallelSelfAttnProcessor(PromptMaskedJoint, SparseProcessor, Flux2ParallelSelfAttnProcessor):
    """`Flux2ParallelSelfAttnProcessor` (single-stream blocks) whose attention half runs block-sparse when the
    runtime says so, a caller's mask as FLUX.1's (`PromptMaskedJoint`); the MLP half and the joint output
    projection as the original computes them."""

    mask_family = "FLUX.2"

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        mlp = None  # the fused projection's MLP part, set where the attention runs here

        def qkv():
            nonlocal mlp
            projected = attn.to_qkv_mlp_proj(hidden_states)
            # The fused projection's QKV and MLP parts by their global ratio, as the original splits it (the same
            # under tensor parallelism, where each rank holds a proportional slice).
            qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
            local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
            fused_qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
            query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in fused_qkv.chunk(3, dim=-1))
            query, key = attn.norm_q(query), attn.norm_k(key)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            return query, key, value

        out = self.attend_masked_joint(attention_mask, qkv)
        if out is None:
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Flux2Adapter(FluxAdapter):
    """FLUX.2: FLUX.1's layout reading (text first, image frames from `img_ids`, `t / 1000` scaled back) with
    FLUX.2's two processor classes; layers number the dual-stream blocks first, then the single-stream ones."""

    transformer_classes = (Flux2Transformer2DModel,)
    family = "FLUX.2"
    timestep_position, img_ids_position = 2, 3
    original_processor = Flux2AttnProcessor
    sparse_processor = Flux2SparseAttnProcessor
    processor_pairs = (
        (Flux2AttnProcessor, Flux2SparseAttnProcessor),
        (Flux2ParallelSelfAttnProcessor, Flux2SparseParallelSelfAttnProcessor),
    )


register_adapter(Flux2Adapter())
