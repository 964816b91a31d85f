"""Lumina-Image 2.0 (`Lumina2Transformer2DModel`, `Lumina2Pipeline`): single-stream text-to-image.

The noise refiner blocks attend over the image's patches alone (a one-frame layout, row-major), the context refiner
blocks over the prompt alone (left dense: a few hundred tokens at most), the main blocks over `[the prompt's valid
tokens, image]`: the prompt is the layout's leading span, kept whole. A batch whose prompts have different valid
lengths is padded at the end and masked: each prompt is attended over its own length, on the layout with its own
span (the padding's outputs are dropped by the model). The main blocks' keys and values may have fewer heads than
the queries (grouped-query attention), repeated as the original repeats them. The pipeline passes
`1 - t / num_train_timesteps` as the timestep, mapped back to the scheduler's `t` for the step schedule. A call
with proportional attention (`base_sequence_length`, which the model's blocks never pass) runs the original
processor, counted dense.
"""

from __future__ import annotations

from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0, Lumina2Transformer2DModel

from ..patterns import VideoLayout
from .base import (
    NOT_THE_LAYOUT,
    ModelAdapter,
    SparseProcessor,
    attend_valid_prefixes,
    call_argument,
    prefix_lengths,
)
from .registry import register_adapter


class Lumina2SparseAttnProcessor(SparseProcessor, Lumina2AttnProcessor2_0):
    """`Lumina2AttnProcessor2_0` whose self-attention runs block-sparse when the runtime says so, on the noise
    refiner blocks (the image) and the main blocks (the call's layout); dense calls run the original `__call__`
    unchanged."""

    # Lumina2Transformer2DModel has no diffusers context parallel plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, base_sequence_length)
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        self.check_not_parallel()
        layout, length = self.runtime.call_layout(), hidden_states.shape[1]
        image_only = length == layout.num_video_tokens
        supported = (
            encoder_hidden_states is hidden_states and base_sequence_length is None
            and (length == layout.num_tokens or (image_only and attention_mask is None))
        )
        if not supported:  # not a sequence read_call described, or a softmax scale the kernel is not given
            why = NOT_THE_LAYOUT if base_sequence_length is None else (
                "proportional attention (base_sequence_length: a softmax scale the kernel is not given)")
            self.runtime.log_dense(self.layer, why=why)
            return super().__call__(*original)
        batch, dtype = hidden_states.shape[0], hidden_states.dtype
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key, value = (x.unflatten(-1, (-1, query.shape[-1])) for x in (attn.to_k(hidden_states),
                                                                        attn.to_v(hidden_states)))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        # Grouped-query attention: each key and value head serves consecutive query heads.
        repeats = attn.heads // key.shape[2]
        key, value = (x.repeat_interleave(repeats, dim=2) for x in (key, value))
        if image_only:
            out = self.runtime.attention(self.layer, query, key, value, layout=VideoLayout(*layout.grid))
        else:
            # Every block of a call gets the same mask: read it once (a host sync on a GPU).
            lengths = [length] * batch if attention_mask is None else self.runtime.once_per_call(
                attention_mask, prefix_lengths
            )
            # A prompt's padding is masked as keys and dropped from the output: its queries reach nothing.
            out = attend_valid_prefixes(self.runtime, self.layer, query, key, value, lengths, padded_queries="zero")
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class Lumina2Adapter(ModelAdapter):
    transformer_classes = (Lumina2Transformer2DModel,)
    family = "Lumina2"
    original_processor = Lumina2AttnProcessor2_0
    sparse_processor = Lumina2SparseAttnProcessor
    block_lists = ("noise_refiner", "layers")
    attention_name = "attn"
    timestep_over_train_timesteps = True

    def read_call(self, transformer, args, kwargs):
        latents = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        prompt_mask = call_argument(args, kwargs, "encoder_attention_mask", 3)
        patch = transformer.config.patch_size
        # The longest prompt's valid tokens lead the joint sequence (shorter ones are padded at its end).
        text_len = int(prompt_mask.sum(dim=1).max())
        layout = VideoLayout(1, latents.shape[-2] // patch, latents.shape[-1] // patch, text_len=text_len,
                             text_position="start")
        # The pipeline passes `1 - t / num_train_timesteps`: `t` as a share of them (`timestep_over_train_timesteps`).
        return layout, 1 - timestep


register_adapter(Lumina2Adapter())
