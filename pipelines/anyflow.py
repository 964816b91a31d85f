"""AnyFlow (`AnyFlowTransformer3DModel`, `AnyFlowPipeline`): Wan 2.1's backbone distilled into a flow-map model that
samples in any number of steps (typically 1-8), conditioned on the source timestep `t` and the target `r`.

Self-attention is `blocks[i].attn1` over video tokens only, frame-major after the `patch_size` patchify of
`(B, T, C, H, W)` latents (AnyFlow puts frames before channels); the cross-attention `attn2` stays untouched. The
pipeline passes one timestep per frame, on the scheduler's scale, with 0 on the clean context frames of a video
continuation: the step is read from the largest. With so few steps, a fraction of `dense_steps` rounds to whole
steps (0.2 of 4 steps: the first).

The chunk-wise autoregressive variant (`AnyFlowFARTransformer3DModel`) is not adapted: its causal attention already
runs a block mask of its own (flex attention) over a KV cache of compressed past frames.
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_anyflow import (
    AnyFlowAttnProcessor,
    AnyFlowTransformer3DModel,
    apply_rotary_emb,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, patched_grid
from .registry import register_adapter


def self_attention_qkv(attn, hidden_states, rotary_emb=None):
    """`(query, key, value)` of an AnyFlow self-attention as `(B, N, heads, head_dim)`: q/k RMS norms across all
    heads, then RoPE, the same arithmetic as `AnyFlowAttnProcessor`."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    # RoPE is applied as `(B, heads, N, head_dim)`, the layout its frequencies broadcast over.
    query, key, value = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
    if rotary_emb is not None:
        query = apply_rotary_emb(query, rotary_emb["query"])
        key = apply_rotary_emb(key, rotary_emb["key"])
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


class AnyFlowSparseAttnProcessor(SparseProcessor, AnyFlowAttnProcessor):
    """`AnyFlowAttnProcessor` whose self-attention runs block-sparse when the runtime says so."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None:  # not a layer diffsparse touches
            return super().__call__(*original)
        if self.stays_dense(attention_mask):  # the bidirectional model passes no mask; a caller's is the original's to apply
            return super().__call__(*original)
        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb)
        hidden_states = self.attend_video(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class AnyFlowAdapter(ModelAdapter):
    transformer_classes = (AnyFlowTransformer3DModel,)
    family = "AnyFlow"
    original_processor = AnyFlowAttnProcessor
    sparse_processor = AnyFlowSparseAttnProcessor
    block_lists = ("blocks",)

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        frames, _, height, width = hidden_states.shape[1:]  # (B, T, C, H, W)
        return VideoLayout(*patched_grid((frames, height, width), transformer.config.patch_size)), timestep


register_adapter(AnyFlowAdapter())
