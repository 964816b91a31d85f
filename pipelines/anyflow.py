"""AnyFlow (`AnyFlowTransformer3DModel`, `AnyFlowPipeline`): Wan 2.1's backbone distilled into a flow-map model that
samples in any number of steps (typically 1-8), conditioned on the source timestep `t` and the target `r`.

Self-attention is `blocks[i].attn1` over video tokens only, frame-major after the `patch_size` patchify of
`(B, T, C, H, W)` latents (AnyFlow puts frames before channels); the cross-attention `attn2` stays untouched. The
pipeline passes one timestep per frame, on the scheduler's scale, with 0 on the clean context frames of a video
continuation: the step is read from the largest. With so few steps, a fraction of `dense_steps` rounds to whole
steps (0.2 of 4 steps: the first).

The chunk-wise autoregressive variant (`AnyFlowFARTransformer3DModel`, `AnyFlowFARPipeline`) generates chunk by
chunk: after each chunk a cache step writes its keys and values to a KV cache (older chunks at a coarser patch size,
the last `full_chunk_limit - 1` ones at full size), under a flex `BlockMask`; each denoising step of the next chunk
then computes only that chunk's queries, against `[compressed cache, full cache, chunk]`. Those steps are sparse:
the chunk is the layout's grid, the cached tokens its leading span, kept whole (every query attends all of them),
through the runtime's `video_queries`. Cache steps (and the uncached rollout of `use_kv_cache=False`, under its own
block mask) run the original processor and count as dense.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.transformers.transformer_anyflow import (
    AnyFlowAttnProcessor,
    AnyFlowTransformer3DModel,
    apply_rotary_emb,
)
from diffusers.models.transformers.transformer_anyflow_far import (
    AnyFlowCausalAttnProcessor,
    AnyFlowFARTransformer3DModel,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, forward_input, patched_grid
from .registry import register_adapter


def self_attention_qkv(attn, hidden_states, rotary_emb=None, cached=None):
    """`(query, key, value)` of an AnyFlow self-attention as `(B, N, heads, head_dim)`: q/k RMS norms across all
    heads, then RoPE, the same arithmetic as `AnyFlowAttnProcessor`. `cached`: FAR's cached `(keys, values)` as
    `(B, heads, M, head_dim)`, put before the chunk's (before RoPE, whose key frequencies cover both), the norms'
    float32 cast back as `AnyFlowCausalAttnProcessor` does."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if cached is not None:
        query, key = query.to(hidden_states.dtype), key.to(hidden_states.dtype)
    # RoPE is applied as `(B, heads, N, head_dim)`, the layout its frequencies broadcast over.
    query, key, value = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
    if cached is not None:
        key, value = (torch.cat([past, now], dim=2) for past, now in zip(cached, (key, value)))
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


def flex_padding(queries: int) -> int:
    """The zero tokens `AnyFlowCausalAttnProcessor` appends to `queries` tokens (and to the keys) to fill its flex
    block of 128."""
    return -queries % 128


class AnyFlowFARSparseAttnProcessor(SparseProcessor, AnyFlowCausalAttnProcessor):
    """`AnyFlowCausalAttnProcessor` whose KV-cached denoising steps run block-sparse when the runtime says so: the
    chunk's queries against the cached tokens (kept whole) and the chunk's own keys (the pattern's)."""

    # No diffusers plan, and the sparse path attends the chunk it holds: under a user's plan that would be a rank's
    # share (the original needs the flex backend, which diffusers' context parallelism does not take).
    context_parallel = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 kv_cache=None, kv_cache_flag=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, kv_cache, kv_cache_flag)
        # Cache steps and the uncached rollout carry the model's causal BlockMask: the original, counted dense.
        cached_step = kv_cache is not None and not kv_cache_flag["is_cache_step"]
        if encoder_hidden_states is not None or self.stays_dense(attention_mask) or not cached_step:
            return super().__call__(*original)
        self.check_not_parallel()
        # The cache's keys (index 0) and values (1): the compressed chunks', then the full ones'.
        cached = tuple(
            torch.cat([kv_cache["compressed_cache"][i, :, :, : kv_cache_flag["num_cached_compressed_tokens"]],
                       kv_cache["full_cache"][i, :, :, : kv_cache_flag["num_cached_full_tokens"]]], dim=2)
            for i in (0, 1)
        )
        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb, cached=cached)
        # The original pads q, k and v with zeros to a multiple of the flex block size, unmasked: every query also
        # attends those zero keys (logit 0, value 0). Attention does not depend on the keys' order, so they lead.
        padding = key.new_zeros(key.shape[0], flex_padding(query.shape[1]), *key.shape[2:])
        key, value = torch.cat([padding, key], dim=1), torch.cat([padding, value], dim=1)
        layout = self.runtime.call_layout()
        if key.shape[1] != layout.num_tokens:
            raise ValueError(
                f"AnyFlow FAR: this call attends {key.shape[1]} keys, but its layout {layout} (the chunk after the "
                "cache the adapter counted from `chunk_partition` and `kv_cache_flag`) has "
                f"{layout.num_tokens}: `diffsparse.remove(pipe)`"
            )
        out = self.runtime.attention(self.layer, query, key, value, video_queries=True)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


class AnyFlowFARAdapter(ModelAdapter):
    """AnyFlow FAR: a KV-cached denoising call's layout is its chunk's grid (the last of `chunk_partition`, full
    patch size) behind a leading span of the original's zero padding and the cached tokens, counted as the
    transformer counts them: the compressed chunks at `compressed_patch_size`, then up to `full_chunk_limit - 1`
    full ones."""

    transformer_classes = (AnyFlowFARTransformer3DModel,)
    family = "AnyFlow FAR"
    original_processor = AnyFlowCausalAttnProcessor
    sparse_processor = AnyFlowFARSparseAttnProcessor
    block_lists = ("blocks",)

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        chunks = list(call_argument(args, kwargs, "chunk_partition", 4))
        cache, flag = (forward_input(transformer, args, kwargs, name) for name in ("kv_cache", "kv_cache_flag"))
        if cache is None or flag is None or flag["is_cache_step"]:
            return None, timestep  # the cache step or the uncached rollout: the original, under its mask
        config = transformer.config
        frames, _, height, width = hidden_states.shape[1:]  # (B, T, C, H, W): the chunk being denoised
        total = 1 + flag["num_cached_chunks"]
        full = min(total, config.full_chunk_limit)
        compressed = total - full
        per_frame = {name: (height // p[1]) * (width // p[2])
                     for name, p in (("full", config.patch_size), ("compressed", config.compressed_patch_size))}
        cached = (sum(chunks[compressed : compressed + full - 1]) * per_frame["full"]
                  + sum(chunks[:compressed]) * per_frame["compressed"])
        grid = patched_grid((frames, height, width), config.patch_size)
        padding = flex_padding(math.prod(grid))
        return VideoLayout(*grid, text_len=padding + cached, text_position="start"), timestep


register_adapter(AnyFlowFARAdapter())
