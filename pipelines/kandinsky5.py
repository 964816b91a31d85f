"""Kandinsky 5 (`Kandinsky5Transformer3DModel`): text-to-video, image-to-video, text-to-image, image-to-image.

The text tokens run through their own blocks first; each visual block then has a video-only self-attention
(`visual_transformer_blocks[i].self_attention`, made sparse) and a cross-attention to the text (untouched). The
latents arrive as `(B, T, H, W, C)` and are patchified frame-major, except when the pipeline passes
`sparse_params` with `to_fractal` (checkpoints with `attention_type="nabla"`, Kandinsky's own sparse attention):
the tokens are then ordered in 8 x 8 spatial tiles per frame. The adapter gives that order to the runtime
(`read_call`'s token order), which attends the tokens in frame-major order (then applies `SparseConfig.order`
itself) and returns them in the model's. Dense calls run the original processor, NABLA included when the
pipeline asks for it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers.models.transformers.transformer_kandinsky import (
    Kandinsky5AttnProcessor,
    Kandinsky5Transformer3DModel,
    fractal_flatten,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, forward_input, patched_grid
from .registry import register_adapter


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    # Kandinsky 5's RoPE arithmetic, its rounding through bfloat16 included, so sparse and dense see equal scores.
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    return (rope * pairs).sum(dim=-1).reshape(*x.shape).to(torch.bfloat16).type_as(x)


def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb=None):
    """`(query, key, value)` of a Kandinsky 5 self-attention as `(B, N, heads, head_dim)`: per-head RMS norms in
    float32, then RoPE, as `Kandinsky5AttnProcessor` computes them."""
    query, key, value = (
        layer(hidden_states).unflatten(-1, (attn.num_heads, -1)) for layer in (attn.to_query, attn.to_key, attn.to_value)
    )
    query = attn.query_norm(query.float()).type_as(query)
    key = attn.key_norm(key.float()).type_as(key)
    if rotary_emb is not None:
        query, key = _rotate(query, rotary_emb), _rotate(key, rotary_emb)
    return query, key, value


@lru_cache(maxsize=16)
def fractal_order(frames: int, height: int, width: int) -> torch.Tensor:
    """The frame-major index of the token at each position of Kandinsky's tiled ("fractal") order, from the
    model's own `fractal_flatten` applied to the indices."""
    index = torch.arange(frames * height * width).view(1, frames, height, width, 1)
    return fractal_flatten(index, index, (1, frames, height, width), block_mask=True)[0].flatten()


class Kandinsky5SparseAttnProcessor(SparseProcessor, Kandinsky5AttnProcessor):
    """`Kandinsky5AttnProcessor` whose visual self-attention runs block-sparse when the runtime says so."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        if encoder_hidden_states is not None or not self.runtime.route(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, rotary_emb, sparse_params)
        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb)
        return attn.out_layer(self.attend_video(query, key, value).flatten(-2, -1))


class Kandinsky5Adapter(ModelAdapter):
    transformer_classes = (Kandinsky5Transformer3DModel,)
    family = "Kandinsky 5"
    original_processor = Kandinsky5AttnProcessor
    sparse_processor = Kandinsky5SparseAttnProcessor
    block_lists = ("visual_transformer_blocks",)
    attention_name = "self_attention"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 2)
        layout = VideoLayout(*patched_grid(hidden_states.shape[1:4], transformer.config.patch_size))  # (B, T, H, W, C)
        sparse_params = forward_input(transformer, args, kwargs, "sparse_params")
        if sparse_params is not None and sparse_params.get("to_fractal"):
            return layout, timestep, fractal_order(layout.frames, layout.height, layout.width)
        return layout, timestep


register_adapter(Kandinsky5Adapter())
