"""Allegro (`AllegroTransformer3DModel`): text-to-video.

Self-attention is `transformer_blocks[i].attn1` over video tokens only, frame-major after the per-frame 2D
`patch_size` patchify: one token frame per latent frame, whatever `patch_size_t` says (the model reads it only to
unpatchify its output); the cross-attention `attn2` stays untouched. The pipeline passes the 3D RoPE (frequencies
and grid positions, one temporal position per latent frame) to the transformer.
"""

from __future__ import annotations

from diffusers import AllegroTransformer3DModel
from diffusers.models.attention_processor import AllegroAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb_allegro

from ..patterns import VideoLayout
from .base import (
    ModelAdapter,
    SparseProcessor,
    attention_processor_output,
    call_argument,
    latent_grid,
)
from .registry import register_adapter


class AllegroSparseAttnProcessor(SparseProcessor, AllegroAttnProcessor2_0):
    """`AllegroAttnProcessor2_0` whose self-attention runs block-sparse when the runtime says so; dense calls run
    the original `__call__` unchanged."""

    # No diffusers plan; the original's class has no `_parallel_config`, so its own dense calls would attend only
    # a rank's share of the tokens under a user's plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb)
        if encoder_hidden_states is not None:  # cross-attention: not a layer diffsparse touches
            return super().__call__(*original)
        if self.normalises_input(attn):  # before, the sparse path skipped the norm (0.05 off the original)
            return super().__call__(*original)
        if self.stays_dense(attention_mask):  # a video padding mask is token-level: the original, counted dense
            return super().__call__(*original)
        self.check_not_parallel()
        query, key, value = (
            layer(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            for layer in (attn.to_q, attn.to_k, attn.to_v)
        )
        if image_rotary_emb is not None:
            query = apply_rotary_emb_allegro(query, image_rotary_emb[0], image_rotary_emb[1])
            key = apply_rotary_emb_allegro(key, image_rotary_emb[0], image_rotary_emb[1])
        out = self.attend_video(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return attention_processor_output(attn, out, hidden_states, query.dtype)


class AllegroAdapter(ModelAdapter):
    transformer_classes = (AllegroTransformer3DModel,)
    family = "Allegro"
    original_processor = AllegroAttnProcessor2_0
    sparse_processor = AllegroSparseAttnProcessor

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 2)
        # `pos_embed` patchifies each latent frame in 2D: `patch_size_t` does not merge frames into tokens.
        patch = transformer.config.patch_size
        return VideoLayout(*latent_grid(hidden_states, (1, patch, patch))), timestep


register_adapter(AllegroAdapter())
