"""Helios (`HeliosTransformer3DModel`): long videos generated chunk by chunk, each chunk conditioned on a
multi-term memory of the frames before it.

Self-attention is `blocks[i].attn1` over `[history, chunk]`: the short-, mid- and long-term history latents,
patchified at 1x, 2x and 4x the patch size (long first), then the current chunk's tokens in frame-major order. The
history is the layout's leading span, kept whole like text (every chunk token attends all of it), and the chunk is
the grid. Each chunk, and in `HeliosPyramidPipeline` each stage of a chunk, is its own denoising run (the
scheduler's timesteps are set anew), so `dense_steps` count within each (a fraction rounded against its own step
count) and `stats()` after a pipeline call covers the last one. Under context parallelism diffusers hands each
`attn1` call one rank's slice of the sequence: the memory is counted on the whole of it, and the sparse call is
sharded as Wan's (`SparseProcessor.attend_video`).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_helios import (
    HeliosAttnProcessor,
    HeliosTransformer3DModel,
    _get_qkv_projections,
    apply_rotary_emb_transposed,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, forward_input, latent_grid, patch_count
from .registry import register_adapter

# The memory terms in the order the transformer puts them in front of the chunk (each in front of the last), how
# many patches each of their tokens covers per axis, and the multiple Helios pads their latents up to first. The
# padding is diffusers' own constant, fixed for the released `(1, 2, 2)` patch size (one kernel there); at another
# patch size it is not the kernel, and the convolution drops what is left of a kernel past it.
_HISTORY_TERMS = (("short", 1, (1, 1, 1)), ("mid", 2, (2, 4, 4)), ("long", 4, (4, 8, 8)))


def history_tokens(transformer, args: tuple, kwargs: dict) -> int:
    """How many memory tokens the transformer puts in front of the chunk: a term counts when both its latents and
    its frame indices are given (by keyword or position); the mid and long terms are padded first, as Helios does
    (`pad_for_3d_conv`, to multiples of `(2, 4, 4)` and `(4, 8, 8)` whatever the patch size)."""
    patch_size = transformer.config.patch_size
    total = 0
    for name, scale, multiple in _HISTORY_TERMS:
        latents = forward_input(transformer, args, kwargs, f"latents_history_{name}")
        if latents is None or forward_input(transformer, args, kwargs, f"indices_latents_history_{name}") is None:
            continue
        sizes = (-(-n // m) * m for n, m in zip(latents.shape[2:], multiple))
        total += patch_count(sizes, [scale * p for p in patch_size], padded=False)
    return total


class HeliosSparseAttnProcessor(SparseProcessor, HeliosAttnProcessor):
    """`HeliosAttnProcessor` whose self-attention runs block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 original_context_length=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, original_context_length)
        if encoder_hidden_states is not None or self.stays_dense(attention_mask):
            return super().__call__(*original)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query = apply_rotary_emb_transposed(query, rotary_emb)
            key = apply_rotary_emb_transposed(key, rotary_emb)
        # Under context parallelism diffusers hands this call one rank's slice of `[history, chunk]` (and of the
        # RoPE): the memory is counted on the whole sequence, so each rank amplifies the memory keys it holds.
        first, length = self.sequence_shard(hidden_states.shape[1])
        history = length - original_context_length if attn.is_amplify_history else 0
        if history > first:  # the memory's keys, amplified by a learned scale
            scale = 1.0 + torch.sigmoid(attn.history_key_scale) * (attn.max_scale - 1.0)
            if attn.history_scale_mode == "per_head":
                scale = scale.view(1, 1, -1, 1)
            held = history - first
            key = torch.cat([key[:, :held] * scale, key[:, held:]], dim=1)
        out = self.attend_video(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class HeliosAdapter(ModelAdapter):
    transformer_classes = (HeliosTransformer3DModel,)
    family = "Helios"
    original_processor = HeliosAttnProcessor
    sparse_processor = HeliosSparseAttnProcessor
    block_lists = ("blocks",)

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        grid = latent_grid(hidden_states, transformer.config.patch_size)
        history = history_tokens(transformer, args, kwargs)
        return VideoLayout(*grid, text_len=history, text_position="start"), timestep


register_adapter(HeliosAdapter())
