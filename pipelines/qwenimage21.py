"""Qwen-Image 2.1 (`QwenImage21Transformer2DModel`): one single-stream sequence, the prompt's text with the condition
images in the slots the vision-language encoder reserved for them, then the generated (target) image.

Attention is block-causal: the prefix (text and condition images) is causal, each image block bidirectional, and
the target image attends the whole sequence. With the pipeline's KV cache (the default) the first step computes
the whole sequence and stores the prefix's keys and values; later steps compute the target's queries only,
against the cached prefix and the target's own keys. The sparse path keeps the prefix's attention as the original
computes it (exact, one SDPA call per run of text or image tokens) and makes the target's rows sparse: the layout
is the target's grid behind the prefix as its leading span, kept whole, and the runtime attends the target's
queries alone (`video_queries`). Padded prompt keys are dropped from the keys rather than masked (the kernel masks
whole blocks only), which is the same attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    QwenImage21Transformer2DModel,
    _qwenimage21_prepare_qkv,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, valid_key_groups
from .registry import register_adapter

# Each image slot of the vision-language sequence stands for a 2 x 2 group of latent tokens.
_TOKENS_PER_IMAGE_SLOT = 4


def block_causal_prefix(query, key, value, segments, key_valid):
    """The prefix's outputs, `(B, prefix, H, D)`, under Qwen-Image 2.1's rule: each run `(start, end, is_text)` of
    text or condition-image tokens attends every key before `end`, a text run causally within itself (a token sees
    the tokens up to itself), an image run all of its own block; keys where `key_valid` (`(B, S)`) is false
    dropped."""
    outputs = []
    for start, end, is_text in segments:
        allowed = None
        if is_text:
            rows = torch.arange(start, end, device=query.device)[:, None]
            allowed = torch.arange(end, device=query.device)[None, :] <= rows
        if key_valid is not None:
            valid = key_valid[:, None, None, :end]
            allowed = valid if allowed is None else allowed & valid
        q, k, v = (x.transpose(1, 2) for x in (query[:, start:end], key[:, :end], value[:, :end]))
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2))
    return torch.cat(outputs, dim=1)


class QwenImage21SparseAttnProcessor(SparseProcessor, QwenImage21AttnProcessor):
    """`QwenImage21AttnProcessor` whose target-image rows run block-sparse when the runtime says so; dense calls run
    the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        if not self.runtime.route(self.layer):
            return super().__call__(attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                                    cache_write_slice, segments, key_valid)
        self.check_not_parallel()
        # The original's projections, norms, RoPE and cache bookkeeping (a cached call gets the prefix's keys back).
        query, key, value, _ = _qwenimage21_prepare_qkv(
            attn, hidden_states, rotary_emb, layer_cache, kv_cache_mode, cache_write_slice
        )
        prefix = self.runtime.call_layout().text_len
        # A cached call's key mask comes as `attention_mask` `(B, 1, 1, S)`, a whole call's as `key_valid` `(B, S)`;
        # every layer gets the same tensor, so its groups are read once per call (on a GPU each read is a host sync).
        mask = attention_mask if segments is None else key_valid
        groups = None if mask is None else self.runtime.once_per_call(mask, valid_key_groups)
        if segments is None:  # a cached call: the target's queries only
            out = self.attend_video_queries(query, key, value, groups)
        else:
            out = torch.cat([
                block_causal_prefix(query, key, value, segments, key_valid),
                self.attend_video_queries(query[:, prefix:], key, value, groups),
            ], dim=1)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class QwenImage21Adapter(ModelAdapter):
    transformer_classes = (QwenImage21Transformer2DModel,)
    family = "Qwen-Image 2.1"
    original_processor = QwenImage21AttnProcessor
    sparse_processor = QwenImage21SparseAttnProcessor
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        # The pipeline passes `t / 1000`; the scheduler's timesteps, which the step clock matches, are `t`.
        timestep = call_argument(args, kwargs, "timestep", 2) * 1000
        img_shapes = call_argument(args, kwargs, "img_shapes", 3)
        img_mask = call_argument(args, kwargs, "img_mask", 4)
        frames, height, width = img_shapes[0][-1]  # condition images first, the target last
        slots = int(img_mask[0].sum())
        length = img_mask.shape[1] - slots + slots * _TOKENS_PER_IMAGE_SLOT
        prefix = length - frames * height * width
        return VideoLayout(frames, height, width, text_len=prefix, text_position="start"), timestep


register_adapter(QwenImage21Adapter())
