"""PRX (`PRXTransformer2DModel`, `PRXPipeline` and the pixel-space `PRXPixelPipeline`): text-to-image where the
text only conditions. Each block's `attention` takes queries from the image alone and keys and values from
`[text, image]`: the T5Gemma prompt (padded to the tokenizer's length, the padding masked as keys), then the
image's patches in row-major order with 2D RoPE. The layout is the image's grid behind the prompt as its leading
span, and the runtime attends the image's queries alone (`video_queries`); masked prompt keys are dropped from the
keys rather than masked (the kernel masks whole blocks only), which is the same attention. Layer `i` is
`blocks[i].attention`.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_prx import PRXAttnProcessor2_0, PRXTransformer2DModel, apply_rope
from einops import rearrange

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, valid_key_groups
from .registry import register_adapter


class PRXSparseAttnProcessor(SparseProcessor, PRXAttnProcessor2_0):
    """`PRXAttnProcessor2_0` whose image rows run block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # The original's error (no text, or a mask other than the text's `(B, text_len)`), or a dense call.
        if (encoder_hidden_states is None or attention_mask is not None
                and tuple(attention_mask.shape) != (hidden_states.shape[0], encoder_hidden_states.shape[1])
                or not self.runtime.route(self.layer)):
            return super().__call__(*original, **kwargs)
        self.check_not_parallel()
        # The original's projections and norms over `(B, heads, S, head_dim)`, its RoPE on the image's q and k.
        img_q, img_k, img_v = rearrange(attn.img_qkv_proj(hidden_states), "b s (n h d) -> n b h s d", n=3, h=attn.heads)
        txt_k, txt_v = rearrange(attn.txt_kv_proj(encoder_hidden_states), "b s (n h d) -> n b h s d", n=2, h=attn.heads)
        img_q, img_k, txt_k = attn.norm_q(img_q), attn.norm_k(img_k), attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_q, img_k = apply_rope(img_q, image_rotary_emb), apply_rope(img_k, image_rotary_emb)
        query, key, value = (x.transpose(1, 2) for x in (img_q, torch.cat([txt_k, img_k], 2), torch.cat([txt_v, img_v], 2)))
        groups = None
        if attention_mask is not None:  # the text's key mask, `(B, text_len)`; every image key is valid
            image_valid = attention_mask.new_ones(attention_mask.shape[0], hidden_states.shape[1])
            groups = self.runtime.once_per_call(attention_mask, lambda mask: valid_key_groups(
                torch.cat([mask.bool(), image_valid.bool()], dim=1)))
        out = self.attend_video_queries(query, key, value, groups)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


class PRXAdapter(ModelAdapter):
    transformer_classes = (PRXTransformer2DModel,)
    family = "PRX"
    original_processor = PRXAttnProcessor2_0
    sparse_processor = PRXSparseAttnProcessor
    block_lists = ("blocks",)
    attention_name = "attention"
    # The pipelines pass `t / num_train_timesteps`; the scheduler's timesteps, which the step clock matches, are `t`.
    timestep_over_train_timesteps = True

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 2)
        patch = transformer.config.patch_size
        height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        layout = VideoLayout(1, height, width, text_len=encoder_hidden_states.shape[1], text_position="start")
        return layout, timestep


register_adapter(PRXAdapter())
