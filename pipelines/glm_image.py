"""GLM-Image (`GlmImageTransformer2DModel`, `GlmImagePipeline`): the diffusion decoder behind GLM-Image's
autoregressive prior. Each block's `attn1` attends the joint `[text, image]` sequence, the glyph prompt first (kept
whole), then the image's patches in row-major order with RoPE. Layer `i` is `transformer_blocks[i].attn1`.

Image editing caches the condition images' keys and values: a first transformer call per condition image writes
them (`kv_caches` in mode "write"; run densely here, so the cache holds what the original would), then each
denoising call reads them (mode "read"), its keys and values `[condition images, text, image]`. Those calls are
sparse on a layout whose leading span holds the condition images and the text, kept whole: the image's queries go
through the runtime (`video_queries`), the text's attend every key densely (counted into the call's density). The
unconditional call skips the cache (mode "skip"): a plain joint call.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor, GlmImageTransformer2DModel

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, project_qkv
from .registry import register_adapter


class GlmImageSparseAttnProcessor(SparseProcessor, GlmImageAttnProcessor):
    """`GlmImageAttnProcessor` whose joint attention runs block-sparse when the runtime says so; dense calls, calls
    with an attention mask and calls writing the condition images' cache run the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 kv_cache=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, kv_cache)
        mode = None if kv_cache is None else kv_cache.mode
        # The condition image's own pass: its cache is what the original stores. Before the schedule is asked: the
        # edit runs this pass before its scheduler has timesteps, where asking warns that steps cannot be counted.
        if mode == "write":
            self.runtime.log_dense(self.layer, why=None)  # by design, every edit: counted, not said
            return super().__call__(*original)
        if self.stays_dense(attention_mask):  # the pipelines pass no mask; a caller's is the original's to apply
            return super().__call__(*original)
        self.check_not_parallel()
        text_len = encoder_hidden_states.shape[1]
        query, key, value = project_qkv(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1))
        query, key = query.to(encoder_hidden_states.dtype), key.to(encoder_hidden_states.dtype)
        if image_rotary_emb is not None:
            query, key = (
                torch.cat([x[:, :text_len], apply_rotary_emb(x[:, text_len:], image_rotary_emb, sequence_dim=1,
                                                             use_real_unbind_dim=-2)], dim=1)
                for x in (query, key)
            )
        if mode == "read":
            key, value = kv_cache.get(key, value)
        condition_len = key.shape[1] - query.shape[1]
        if condition_len == 0:
            out = self.runtime.attention(self.layer, query, key, value)
        else:
            # The condition images join the text's leading span; the text's queries attend every key densely.
            layout = self.runtime.call_layout()
            layout = dataclasses.replace(layout, text_len=layout.text_len + condition_len)
            text_out, _ = self.runtime.dense_attention(query[:, :text_len], key, value)
            image_out = self.runtime.attention(self.layer, query[:, text_len:], key, value, layout=layout,
                                               video_queries=True, outside_pairs=text_len * key.shape[1])
            out = torch.cat([text_out, image_out], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
        encoder_out, out = out.split([text_len, out.shape[1] - text_len], dim=1)
        return out, encoder_out


class GlmImageAdapter(ModelAdapter):
    transformer_classes = (GlmImageTransformer2DModel,)
    family = "GLM-Image"
    original_processor = GlmImageAttnProcessor
    sparse_processor = GlmImageSparseAttnProcessor

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 1)
        # The pipeline passes `t - 1`; the scheduler's timesteps, which the step clock matches, are `t`.
        timestep = call_argument(args, kwargs, "timestep", 4) + 1
        patch = transformer.config.patch_size
        height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        return VideoLayout(1, height, width, text_len=text.shape[1], text_position="start"), timestep


register_adapter(GlmImageAdapter())
