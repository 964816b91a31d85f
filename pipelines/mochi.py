"""Mochi 1 (`MochiTransformer3DModel`): text-to-video.

Each block's `attn1` is joint attention over `[video, text]`: the video tokens in frame-major order after the
spatial patchify, then the prompt's valid text tokens. The original attends each video over its valid prefix
and leaves the padded text positions' outputs at zero; the sparse path does the same, with the layout's text
span cut to the valid tokens (text rows and columns whole), videos with equal prompt lengths in one call.
"""

from __future__ import annotations

import torch
from diffusers import MochiTransformer3DModel
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from ..patterns import VideoLayout
from .base import ModelAdapter, attend_valid_prefixes, call_argument, prefix_lengths
from .registry import register_adapter


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Mochi's interleaved-pair RoPE in float32, as MochiAttnProcessor2_0 computes it.
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], dim=-1).flatten(-2)


def joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None):
    """`(query, key, value)` over `[video, text]` (every text token, padding included) as `(B, S, heads,
    head_dim)`: `MochiAttnProcessor2_0`'s arithmetic (q/k norms per stream, RoPE on the video tokens)."""
    video = [proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
    text = [
        proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    ]
    for streams, norms in ((video, (attn.norm_q, attn.norm_k)), (text, (attn.norm_added_q, attn.norm_added_k))):
        for i, norm in enumerate(norms):
            if norm is not None:
                streams[i] = norm(streams[i])
    if image_rotary_emb is not None:
        video[0], video[1] = (_rotate(x, *image_rotary_emb) for x in video[:2])
    return tuple(torch.cat([v, t], dim=1) for v, t in zip(video, text))


class MochiSparseAttnProcessor(MochiAttnProcessor2_0):
    """`MochiAttnProcessor2_0` whose joint attention runs block-sparse when the runtime says so.

    Dense calls go to the original `__call__` unchanged, so they are bit-identical to it (except the calls that
    measure `SparseConfig.correction`'s statistics: dense through diffsparse's kernel).
    """

    def __init__(self, runtime, layer: int):
        super().__init__()
        self.runtime = runtime
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        if not self.runtime.route(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        video_len = hidden_states.shape[1]
        lengths = [video_len + n for n in prefix_lengths(attention_mask)]
        out = attend_valid_prefixes(self.runtime, self.layer, query, key, value, lengths, padded_queries="zero")
        out = out.flatten(2, 3)
        hidden_states, encoder_hidden_states = out[:, :video_len], out[:, video_len:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class MochiAdapter(ModelAdapter):
    transformer_classes = (MochiTransformer3DModel,)

    def self_attention_modules(self, transformer):
        for index, block in enumerate(transformer.transformer_blocks):
            yield index, block.attn1

    def make_processor(self, original, runtime, layer):
        if type(original) is not MochiAttnProcessor2_0:
            raise ValueError(
                f"layer {layer} of the Mochi transformer has processor {type(original).__name__}; diffsparse replaces "
                "only MochiAttnProcessor2_0 (remove other processors, e.g. LoRA or caching ones, first)"
            )
        return MochiSparseAttnProcessor(runtime, layer)

    def set_processor(self, module, processor):
        module.processor = processor  # MochiAttention is a plain module with a `processor` attribute, no setter

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 2)
        _, _, frames, height, width = hidden_states.shape
        p = transformer.config.patch_size
        layout = VideoLayout(
            frames, height // p, width // p, text_len=encoder_hidden_states.shape[1], text_position="end"
        )
        return layout, timestep


register_adapter(MochiAdapter())
