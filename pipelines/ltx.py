"""LTX-Video (`LTXVideoTransformer3DModel`): text-to-video and image-to-video.

Self-attention is `transformer_blocks[i].attn1` over video tokens only (text enters through the cross-attention
`attn2`, untouched). The pipelines pack the latents into a frame-major token sequence before the transformer and
pass the latent grid as `num_frames`, `height`, `width`; the layout is read from those. Calls that carry other
tokens (the conditioning pipeline's extra frames, with `video_coords` instead of a grid) raise a `ValueError`
rather than run on a wrong layout.
"""

from __future__ import annotations

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, context_parallel_config
from .registry import register_adapter


def self_attention_qkv(attn, hidden_states: torch.Tensor, image_rotary_emb=None):
    """`(query, key, value)` of an LTX self-attention as `(B, N, heads, head_dim)`: the arithmetic of
    `LTXVideoAttnProcessor` (q/k RMS norms over the whole hidden size, then RoPE), so sparse and dense see equal
    scores."""
    query = attn.norm_q(attn.to_q(hidden_states))
    key = attn.norm_k(attn.to_k(hidden_states))
    value = attn.to_v(hidden_states)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb)
        key = apply_rotary_emb(key, image_rotary_emb)
    return tuple(x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))


class LTXSparseAttnProcessor(SparseProcessor, LTXVideoAttnProcessor):
    """`LTXVideoAttnProcessor` whose self-attention runs block-sparse when the runtime says so.

    Dense calls go to the original `__call__` unchanged, so they are bit-identical to it (except the calls that
    measure `SparseConfig.correction`'s statistics: dense through diffsparse's kernel).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or not self.runtime.route(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = self_attention_qkv(attn, hidden_states, image_rotary_emb)
        out = self.attend_video(query, key, value).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class LTXAdapter(ModelAdapter):
    transformer_classes = (LTXVideoTransformer3DModel,)
    family = "LTX"
    original_processor = LTXVideoAttnProcessor
    sparse_processor = LTXSparseAttnProcessor

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 2)
        grid = [kwargs.get(name, args[i] if len(args) > i else None) for i, name in
                ((4, "num_frames"), (5, "height"), (6, "width"))]
        if any(size is None for size in grid):
            raise ValueError(
                "diffsparse reads the LTX token grid from the transformer's `num_frames`, `height` and `width`; this "
                "call gave none (e.g. LTXConditionPipeline's `video_coords`), so this pipeline is not supported yet: "
                "use LTXPipeline or LTXImageToVideoPipeline, or `diffsparse.remove(pipe)`"
            )
        frames, height, width = (int(size) for size in grid)
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        layout = VideoLayout(frames // p_t, height // p, width // p)
        # Under context parallelism diffusers may split the tokens before this hook sees them: one rank's shard.
        cp = context_parallel_config(transformer)
        shards = 1 if cp is None else cp.ulysses_degree * cp.ring_degree
        if layout.num_tokens not in (hidden_states.shape[1], hidden_states.shape[1] * shards):
            raise ValueError(
                f"the LTX transformer got {hidden_states.shape[1]} tokens for a {frames}x{height}x{width} latent grid "
                f"(patch {p_t}x{p}x{p}: {layout.num_tokens} tokens); diffsparse cannot place the extra tokens "
                "(conditioning frames?), so this pipeline is not supported yet: `diffsparse.remove(pipe)`"
            )
        return layout, timestep


register_adapter(LTXAdapter())
