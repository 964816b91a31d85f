"""Bria FIBO 2 (`BriaFibo2Transformer2DModel`, `BriaFibo2Pipeline`): Z-Image-style single-stream blocks over the
image and its conditions, the prompt turned into gist tokens by a Perceiver. Layers number the noise refiner's
`attention` (over `[image, context images]`) first, then the main blocks' (over `[gist, image, context images]`,
or `[image, context images, gist]` with the gist padding masked as keys when a batch's prompts get different gist
counts); the injection blocks' cross-attention to the text and the Perceiver stay untouched.

Context images (edits) of the image's size are further frames of the layout; if any has another size, all of them
join the gist in the layout's span (kept whole), the main blocks' `[gist, image, contexts]` attended as
`[gist, contexts, image]` through the runtime's token order.
"""

from __future__ import annotations

import dataclasses
import math

from diffusers.models.transformers.transformer_bria_fibo2 import (
    BriaFibo2AttnProcessor,
    BriaFibo2Transformer2DModel,
    compute_gist_count,
)

from ..patterns import VideoLayout
from .base import (
    NOT_THE_LAYOUT,
    ModelAdapter,
    SparseProcessor,
    attend_valid_prefixes,
    call_argument,
    forward_input,
    prefix_lengths,
    references_with_text,
)
from .registry import register_adapter
from .z_image import rotate


class BriaFibo2SparseAttnProcessor(SparseProcessor, BriaFibo2AttnProcessor):
    """`BriaFibo2AttnProcessor` whose self-attention runs block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        if encoder_hidden_states is not None or not self.runtime.route(self.layer):
            return super().__call__(*original)
        self.check_not_parallel()
        layout, length = self.runtime.call_layout(), hidden_states.shape[1]
        refiner = attention_mask is None and length < layout.num_tokens
        if length != layout.num_tokens and not refiner:  # not a sequence read_call described
            self.runtime.log_dense(self.layer, why=NOT_THE_LAYOUT)
            return super().__call__(*original)
        query, key, value = (p(hidden_states).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if freqs_cis is not None:
            query, key = rotate(query, freqs_cis), rotate(key, freqs_cis)  # Z-Image's RoPE
        if refiner:
            # `[image, context images]`: the layout's grid, the contexts of another size the trailing span.
            contexts = length - layout.num_video_tokens
            out = self.runtime.attention(self.layer, query, key, value, layout=dataclasses.replace(
                layout, text_len=contexts, text_position="end"))
        elif attention_mask is None:
            out = self.runtime.attention(self.layer, query, key, value)
        else:
            # `[image, contexts, gist]`, each row's gist padding masked as keys at its end (a valid prefix).
            mask = attention_mask.reshape(attention_mask.shape[0], -1)
            lengths = self.runtime.once_per_call(mask, prefix_lengths)
            out = attend_valid_prefixes(self.runtime, self.layer, query, key, value, lengths, padded_queries="zero")
        return attn.to_out[0](out.flatten(2, 3).type_as(query))


class BriaFibo2Adapter(ModelAdapter):
    transformer_classes = (BriaFibo2Transformer2DModel,)
    family = "Bria FIBO 2"
    original_processor = BriaFibo2AttnProcessor
    sparse_processor = BriaFibo2SparseAttnProcessor
    block_lists = ("noise_refiner", "layers")
    attention_name = "attention"

    def read_call(self, transformer, args, kwargs):
        latents = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        text = call_argument(args, kwargs, "encoder_hidden_states", 2)
        mask = forward_input(transformer, args, kwargs, "encoder_attention_mask")
        contexts = forward_input(transformer, args, kwargs, "context_latents") or []
        config = transformer.config
        patch = config.patch_size
        height, width = latents.shape[-2] // patch, latents.shape[-1] // patch
        # The gist counts as the model computes them: padded (and put last) when the prompts' counts differ.
        text_lengths = mask.sum(dim=1).tolist() if mask is not None else [text.shape[2]] * latents.shape[0]
        counts = compute_gist_count(text_lengths, config.min_num_gist_tokens, config.max_num_gist_tokens,
                                    config.gist_step, config.gist_min_text_len, config.gist_max_text_len)
        gist, gist_last = max(counts), min(counts) < max(counts)
        timestep = timestep * 1000  # the pipeline passes `t / 1000`; the scheduler's timesteps are `t`
        if all(c.shape[-2:] == latents.shape[-2:] for c in contexts):
            frames = 1 + len(contexts)
            return VideoLayout(frames, height, width, text_len=gist,
                               text_position="end" if gist_last else "start"), timestep
        span = sum(math.prod(c.shape[-2:]) // patch**2 for c in contexts)
        if gist_last:  # `[image, contexts, gist]`: the image, then the span
            return VideoLayout(1, height, width, text_len=span + gist, text_position="end"), timestep
        layout = VideoLayout(1, height, width, text_len=gist + span, text_position="start")
        return layout, timestep, references_with_text(gist, height * width, span)


register_adapter(BriaFibo2Adapter())
