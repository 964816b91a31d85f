"""Cosmos world models (`CosmosTransformer3DModel`): Cosmos 1.0 text/video-to-world, Cosmos Predict 2 text-to-image
and video-to-world, Cosmos Predict 2.5.

Self-attention is `transformer_blocks[i].attn1` over video tokens only, frame-major after the `patch_size`
patchify of `(B, C, T, H, W)` latents; the cross-attention `attn2` (text, and 2.5's image context) stays
untouched. The pipelines hand the transformer a timestep on another scale than the scheduler's (Cosmos 2:
`sigma / (sigma + 1)`, one per latent frame, the conditioning frames' lower), so the step schedule follows the
pipeline's own `_current_timestep`, which is on the scheduler's scale (`ModelAdapter.timestep_from_pipeline`).
"""

from __future__ import annotations

import torch
from diffusers import CosmosTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, latent_grid
from .registry import register_adapter


def self_attention_qkv(attn, hidden_states: torch.Tensor, image_rotary_emb=None):
    """`(query, key, value)` of a Cosmos self-attention as `(B, N, heads, head_dim)`: per-head q/k norms, then
    RoPE, as `CosmosAttnProcessor2_0` computes them (on `(B, heads, N, head_dim)`)."""
    query, key, value = (
        layer(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2) for layer in (attn.to_q, attn.to_k, attn.to_v)
    )
    query, key = attn.norm_q(query), attn.norm_k(key)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


class CosmosSparseAttnProcessor(SparseProcessor, CosmosAttnProcessor2_0):
    """`CosmosAttnProcessor2_0` whose self-attention runs block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged."""

    # No diffusers plan; the original's class has no `_parallel_config`, so its own dense calls would attend only
    # a rank's share of the tokens under a user's plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is not None or self.stays_dense(attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.check_not_parallel()
        query, key, value = self_attention_qkv(attn, hidden_states, image_rotary_emb)
        out = self.attend_video(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class CosmosAdapter(ModelAdapter):
    transformer_classes = (CosmosTransformer3DModel,)
    family = "Cosmos"
    original_processor = CosmosAttnProcessor2_0
    sparse_processor = CosmosSparseAttnProcessor
    timestep_from_pipeline = True

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        return VideoLayout(*latent_grid(hidden_states, transformer.config.patch_size)), timestep


register_adapter(CosmosAdapter())
