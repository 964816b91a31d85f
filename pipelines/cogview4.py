"""CogView4 (`CogView4Transformer2DModel`): text-to-image (`CogView4Pipeline`) and control (`CogView4ControlPipeline`,
its control latents joined along the channels: same tokens).

Every block's `attn1` is joint self-attention over `[text, image]` (`CogView4AttnProcessor`: the text stream
joined before the projections, RoPE on the image tokens only). Images are one frame: `VideoLayout(1, h, w)` over
the latent patches in row-major order, the text first. The pipelines pad the GLM prompt on the left to a multiple
of 16 tokens with pad tokens that stay unmasked (attended like the rest), so the whole text is the layout's
leading span. A call with an `attention_mask` (a text mask given through `attention_kwargs`, which the pipelines
never pass) runs the original processor, counted dense.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor, CogView4Transformer2DModel

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument
from .registry import register_adapter


class CogView4SparseAttnProcessor(SparseProcessor, CogView4AttnProcessor):
    """`CogView4AttnProcessor` whose joint self-attention runs block-sparse when the runtime says so; dense calls
    run the original `__call__` unchanged."""

    # CogView4Transformer2DModel has no diffusers context parallel plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if self.stays_dense(attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.check_not_parallel()
        text_len, dtype = encoder_hidden_states.shape[1], encoder_hidden_states.dtype
        joined = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (getattr(attn, name)(joined).unflatten(2, (attn.heads, -1)) for name in ("to_q", "to_k",
                                                                                                     "to_v"))
        # The original normalises (B, heads, S, D) tensors; the norms act on the head dim, so (B, S, heads, D) is alike.
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:
            query, key = (
                torch.cat([x[:, :text_len], apply_rotary_emb(x[:, text_len:], image_rotary_emb, use_real_unbind_dim=-2,
                                                             sequence_dim=1)], dim=1)
                for x in (query, key)
            )
        out = self.runtime.attention(self.layer, query, key, value).flatten(2, 3).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


class CogView4Adapter(ModelAdapter):
    transformer_classes = (CogView4Transformer2DModel,)
    family = "CogView4"
    original_processor = CogView4AttnProcessor
    sparse_processor = CogView4SparseAttnProcessor

    def read_call(self, transformer, args, kwargs):
        latents = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 2)
        patch = transformer.config.patch_size
        layout = VideoLayout(1, latents.shape[-2] // patch, latents.shape[-1] // patch, text_len=text.shape[1],
                             text_position="start")
        return layout, timestep


register_adapter(CogView4Adapter())
