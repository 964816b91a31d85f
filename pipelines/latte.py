"""Latte (`LatteTransformer3DModel`, `LattePipeline`): attention factorised into space and time.

Each of Latte's layers is a spatial block, whose self-attention `transformer_blocks[i].attn1` attends the tokens
of one frame (the frames are the batch: `B * F` sequences of `H x W` tokens, row-major), then a temporal block
attending each token position across the frames (`B * H * W` sequences of `F` tokens). The spatial
self-attention is what becomes sparse, as a one-frame layout: a pattern's spatial reach decides which blocks of the
frame stay (`window3d`'s spatial window, or `searched`; `radial`'s band covers a whole frame, so on one frame it
keeps every block). The temporal attention (sequences of 16 frames, nothing to skip), and the cross-attention to
the text stay untouched. Layer `i` is the spatial self-attention of layer `i`.
"""

from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.latte_transformer_3d import LatteTransformer3DModel

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, attention_processor_output, call_argument
from .registry import register_adapter


class LatteSparseAttnProcessor(SparseProcessor, AttnProcessor2_0):
    """`AttnProcessor2_0` on a Latte spatial self-attention, block-sparse over the frame when the runtime says so."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args)
        if encoder_hidden_states is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            return super().__call__(*original, **kwargs)  # not the self-attention Latte's spatial blocks compute
        if self.stays_dense(attention_mask):  # Latte passes no mask; a caller's is the original's to apply
            return super().__call__(*original, **kwargs)
        # `AttnProcessor2_0`'s projections and q/k norms (over the head dim), as `(B, S, heads, head_dim)`.
        query, key, value = (
            projection(hidden_states).unflatten(-1, (attn.heads, -1)) for projection in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return attention_processor_output(attn, self.attend_video(query, key, value), hidden_states, query.dtype)


class LatteAdapter(ModelAdapter):
    transformer_classes = (LatteTransformer3DModel,)
    family = "Latte"
    original_processor = AttnProcessor2_0
    sparse_processor = LatteSparseAttnProcessor
    block_lists = ("transformer_blocks",)  # the spatial blocks; `temporal_transformer_blocks` stay dense

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        _, _, _, height, width = hidden_states.shape
        patch = transformer.config.patch_size
        return VideoLayout(1, height // patch, width // patch), timestep


register_adapter(LatteAdapter())
