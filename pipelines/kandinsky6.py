"""Kandinsky 6 (`Kandinsky6Transformer3DModel`): text/image-to-video, with or without audio (TI2VA).

Each fused visual block (`visual_transformer_blocks[i]`) holds a video-only self-attention over the patchified video
tokens (`video_dec_block.self_attention`), made sparse. Everything else keeps the original processor: the text
encoder blocks, the audio self-attention (`audio_dec_block.self_attention`, 1D audio tokens), the cross-attentions
to the text and between video and audio (`va_cross_attention`, `av_cross_attention`). They all share one processor
class, `Kandinsky6AttnProcessor`: diffsparse installs its processor only on the video self-attentions, and a call
with `encoder_hidden_states` or an attention mask runs the original (the model passes neither to the video
self-attention).

Token layout: the latents arrive as `(B, T, H, W, C)` and are patchified frame-major (`flatten(1, 3)`), one layout
frame per token frame.

Reference image (image-to-video): the pipeline appends the clean reference latent as an extra LAST frame whose
temporal RoPE position is 0, the first frame's (`visual_rope_pos`, token type 1). Attended frame-major, a pattern
that decays with temporal distance would place the reference T frames away from the frame it conditions; the adapter
gives the runtime a token order that attends `[f0 .. f_{T-1}, reference]` as `[reference, f0 .. f_{T-1}]` (layout
frame 0 = the reference: next to frame 0, the generated frames kept contiguous and in order). It does so whenever
the last frame's temporal position equals the first's and the others increase. Non-decreasing positions (`arange`,
the default) already are frame-major; any other pattern keeps frame-major order too, the pattern's frame distances
then being frame indices rather than RoPE distances (no such pattern is made by the diffusers pipelines).

Timestep: the pipeline passes the scheduler's timestep `t.expand(batch)` (FlowMatchEuler or PiFlow, both on the
`[0, num_train_timesteps]` scale of `scheduler.timesteps`), so the step clock reads it directly.

Kandinsky 6 SR (`Kandinsky6SRTransformer3DModel`) is not supported: its self-attention is already sparse (NABLA,
a data-dependent block selection on flex attention, the way it was trained), on tokens in 8 x 8 spatial tiles.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import torch
from diffusers.models.transformers.transformer_kandinsky6 import (
    Kandinsky6AttnProcessor,
    Kandinsky6Transformer3DModel,
    apply_rotary,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, forward_input, patched_grid
from .registry import register_adapter


def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb=None, rotary_emb_kv=None):
    """`(query, key, value)` of a Kandinsky 6 self-attention as `(B, N, heads, head_dim)`: projections, per-head
    RMS norms, then RoPE (`rotary_emb` on the query, `rotary_emb_kv` on the key), as `Kandinsky6AttnProcessor`
    computes them."""
    query, key, value = (
        layer(hidden_states).reshape(*hidden_states.shape[:-1], attn.num_heads, -1)
        for layer in (attn.to_query, attn.to_key, attn.to_value)
    )
    query, key = attn.query_norm(query), attn.key_norm(key)
    if rotary_emb is not None:
        query = apply_rotary(query, rotary_emb).to(dtype=query.dtype)
    if rotary_emb_kv is not None:
        key = apply_rotary(key, rotary_emb_kv).to(dtype=key.dtype)
    return query, key, value


@lru_cache(maxsize=16)
def reference_first_order(temporal_positions: tuple[int, ...], frame_tokens: int) -> torch.Tensor | None:
    """Each model token's layout index when the last frame is a reference sharing the first frame's temporal
    position (the others increasing): that frame becomes layout frame 0, the others follow in order. `None` (keep
    frame-major order) for any other positions."""
    *video, last = temporal_positions
    if not video or last != video[0] or any(a >= b for a, b in pairwise(video)):
        return None
    layout_frame = torch.tensor([*range(1, len(temporal_positions)), 0])
    return (layout_frame[:, None] * frame_tokens + torch.arange(frame_tokens)).flatten()


class Kandinsky6SparseAttnProcessor(SparseProcessor, Kandinsky6AttnProcessor):
    """`Kandinsky6AttnProcessor` whose video self-attention runs block-sparse when the runtime says so."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, rotary_emb_kv=None, attn_mask=None
    ):
        original = (attn, hidden_states, encoder_hidden_states, rotary_emb, rotary_emb_kv, attn_mask)
        if encoder_hidden_states is not None:  # a cross-attention: not a layer diffsparse touches
            return super().__call__(*original)
        if self.stays_dense(attn_mask):
            return super().__call__(*original)
        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb, rotary_emb_kv)
        return attn.out_layer(self.attend_video(query, key, value).type_as(query).flatten(-2, -1))


class Kandinsky6Adapter(ModelAdapter):
    transformer_classes = (Kandinsky6Transformer3DModel,)
    family = "Kandinsky 6"
    original_processor = Kandinsky6AttnProcessor
    sparse_processor = Kandinsky6SparseAttnProcessor
    block_lists = ("visual_transformer_blocks",)
    attention_name = "video_dec_block.self_attention"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 3)
        layout = VideoLayout(*patched_grid(hidden_states.shape[1:4], transformer.config.patch_size))  # (B, T, H, W, C)
        visual_rope_pos = forward_input(transformer, args, kwargs, "visual_rope_pos")
        if visual_rope_pos is None:
            return layout, timestep
        order = reference_first_order(tuple(visual_rope_pos[0].tolist()), layout.height * layout.width)
        return (layout, timestep) if order is None else (layout, timestep, order)


register_adapter(Kandinsky6Adapter())
