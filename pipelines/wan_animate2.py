"""Wan-Animate-2 (`WanAnimate2Transformer3DModel`; diffusers' modular `WanAnimate2ModularPipeline`): Wan blocks with
an in-context reference. A first call (`kv_cache_mode="extract"`) runs the reference video and caches each
self-attention's keys and values; each denoising call (`kv_cache_mode="cached"`) attends its generation tokens to
one another and each generation frame `f` also to reference frame `f - 1`, through a flex `BlockMask` built for the
full video (`origin_len`, `origin_area`).

Sparse path (denoising calls on the full video: `origin_len // 4 + 2` generation frames, one frame fewer of
reference, both of `origin_area`'s grid; other calls run the original, counted dense): the generation's attention
goes through the runtime on its own grid (`VideoLayout(frames, h, w)`, no text), each frame's attention to its
reference frame is computed densely (counted into the call's density), and the two are merged through their
log-sum-exps: exactly the original's softmax over both. The reference pass runs the original, so the cache holds
what the original stores. Layer `i` is `blocks[i].self_attn` (the unconditional branch skips block 9, as the
original does).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan_animate_2 import (
    WanAnimate2AttnProcessor,
    WanAnimate2Transformer3DModel,
    _get_qkv_projections,
    rope_apply,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, merge_attention, patched_grid
from .registry import register_adapter


class WanAnimate2SparseAttnProcessor(SparseProcessor, WanAnimate2AttnProcessor):
    """`WanAnimate2AttnProcessor` whose denoising calls run block-sparse over the generation (merged with the dense
    attention to the reference frames) when the runtime says so; the reference pass, dense calls and calls on
    another grid than the block mask's run the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, rotary_emb, grid_sizes, kv_cache, kv_cache_mode, rope_stride=1,
                 reference_rotary_emb=None, reference_grid_sizes=None, reference_rope_stride=1, attention_mask=None,
                 origin_latent_frames=None, origin_latent_hw=None):
        original = (attn, hidden_states, rotary_emb, grid_sizes, kv_cache, kv_cache_mode, rope_stride,
                    reference_rotary_emb, reference_grid_sizes, reference_rope_stride, attention_mask,
                    origin_latent_frames, origin_latent_hw)
        # The reference pass (every segment makes one, as the original so the cache holds what it stores) has no
        # layout (`read_call`): `route` counts it dense, unsaid, as the design of every run, not a caller's choice.
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        if kv_cache_mode != "cached" or not self.whole_video(hidden_states, grid_sizes, reference_grid_sizes,
                                                              origin_latent_frames, origin_latent_hw):
            self.runtime.log_dense(self.layer, why="a part of the video, or another grid than the one the block mask "
                                   "was built for (origin_latent_frames, origin_latent_hw)")
            return super().__call__(*original)
        self.check_not_parallel()
        # The original's projections, norms (over the whole width) and RoPE; the cached reference keys get theirs.
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        query, key = (rope_apply(x, grid_sizes, rotary_emb, rope_stride).type_as(value) for x in (query, key))
        reference_key, reference_value = kv_cache.get()
        reference_key = rope_apply(reference_key, reference_grid_sizes, reference_rotary_emb,
                                   reference_rope_stride).type_as(value)
        batch, frames, frame_len = query.shape[0], int(grid_sizes[0, 0]), origin_latent_hw
        # Frame f (from 1) over reference frame f - 1, the frames as a batch.
        by_frame = (frames - 1) * frame_len
        frame_q = query[:, frame_len:].unflatten(1, (frames - 1, frame_len)).flatten(0, 1)
        frame_k, frame_v = (x[:, :by_frame].unflatten(1, (frames - 1, frame_len)).flatten(0, 1)
                            for x in (reference_key, reference_value))
        reference_out, reference_lse = self.runtime.dense_attention(frame_q, frame_k, frame_v)
        out, lse = self.runtime.attention(self.layer, query, key, value, return_lse=True,
                                          outside_pairs=by_frame * frame_len)
        merged = merge_attention(out[:, frame_len:], lse[:, frame_len:], reference_out.unflatten(0, (batch, -1))
                                 .flatten(1, 2), reference_lse.unflatten(0, (batch, -1)).flatten(1, 2))
        out = torch.cat([out[:, :frame_len], merged.to(out.dtype)], dim=1)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def whole_video(hidden_states, grid_sizes, reference_grid_sizes, origin_frames, origin_hw) -> bool:
        """Whether a denoising call covers the video the block mask was built for, every sample alike: then the
        mask is exactly "all generation tokens, and frame f's reference frame f - 1"."""
        if reference_grid_sizes is None or origin_frames is None or origin_hw is None:
            return False
        if not (grid_sizes == grid_sizes[:1]).all() or not (reference_grid_sizes == reference_grid_sizes[:1]).all():
            return False
        frames, height, width = grid_sizes[0].tolist()
        reference_frames, reference_height, reference_width = reference_grid_sizes[0].tolist()
        return (
            frames == origin_frames + 1 and height * width == origin_hw and reference_frames == origin_frames
            and reference_height * reference_width == origin_hw and hidden_states.shape[1] == frames * origin_hw
        )


class WanAnimate2Adapter(ModelAdapter):
    transformer_classes = (WanAnimate2Transformer3DModel,)
    family = "Wan-Animate-2"
    original_processor = WanAnimate2AttnProcessor
    sparse_processor = WanAnimate2SparseAttnProcessor
    block_lists = ("blocks",)
    attention_name = "self_attn"

    def read_call(self, transformer, args, kwargs):
        latents = call_argument(args, kwargs, "hidden_states", 0)  # a list: one (C, F, H, W) per sample
        timestep = call_argument(args, kwargs, "timestep", 1)
        if call_argument(args, kwargs, "kv_cache_mode", 5) == "extract":
            # The reference pass (at the segment's first timestep in diffusers' loop) runs the original: no layout,
            # so it is no CFG branch of that step and the guider's calls keep their names ("call 0", "call 1").
            return None, timestep
        return VideoLayout(*patched_grid(latents[0].shape[1:], transformer.config.patch_size)), timestep


register_adapter(WanAnimate2Adapter())
