"""EasyAnimate (`EasyAnimateTransformer3DModel`): text-to-video, image-to-video (inpainting latents on channels)
and control-to-video.

Every block's `attn1` is self-attention over one joint sequence: the text tokens first (the prompt embedding, then
the T5 one when the checkpoint has it), then the video tokens in frame-major order after the spatial patchify (no
temporal patch). MMDiT blocks project the text with their own `add_*_proj`, the others with the video's weights;
RoPE covers the video tokens only. Every pattern keeps the text rows and columns whole.
"""

from __future__ import annotations

import torch
from diffusers import EasyAnimateTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_easyanimate import EasyAnimateAttnProcessor2_0

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, forward_input, project_joint_output, project_qkv
from .registry import register_adapter


def joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None):
    """`(query, key, value)` over `[text, video]` as `(B, S, heads, head_dim)`, the arithmetic of
    `EasyAnimateAttnProcessor2_0` (per-head q/k norms, RoPE on the video tokens)."""
    text_len = encoder_hidden_states.shape[1]
    if attn.add_q_proj is None:
        query, key, value = project_qkv(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1))
    else:
        video = project_qkv(attn, hidden_states)
        text = project_qkv(attn, encoder_hidden_states, added=True)
        query, key, value = (torch.cat(pair, dim=1) for pair in zip(text, video))
    if image_rotary_emb is not None:
        query, key = (
            torch.cat([x[:, :text_len], apply_rotary_emb(x[:, text_len:], image_rotary_emb, sequence_dim=1)], dim=1)
            for x in (query, key)
        )
    return query, key, value


class EasyAnimateSparseAttnProcessor(SparseProcessor, EasyAnimateAttnProcessor2_0):
    """`EasyAnimateAttnProcessor2_0` whose joint self-attention runs block-sparse when the runtime says so; dense
    calls run the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or self.stays_dense(attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.check_not_parallel()
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self.runtime.attention(self.layer, query, key, value).flatten(2, 3).to(query.dtype)
        return project_joint_output(attn, out, hidden_states.shape[1], text_first=True)


class EasyAnimateAdapter(ModelAdapter):
    transformer_classes = (EasyAnimateTransformer3DModel,)
    family = "EasyAnimate"
    original_processor = EasyAnimateAttnProcessor2_0
    sparse_processor = EasyAnimateSparseAttnProcessor

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        text = call_argument(args, kwargs, "encoder_hidden_states", 3)
        text_t5 = forward_input(transformer, args, kwargs, "encoder_hidden_states_t5")
        text_len = text.shape[1] + (0 if text_t5 is None else text_t5.shape[1])
        _, _, frames, height, width = hidden_states.shape
        p = transformer.config.patch_size
        return VideoLayout(frames, height // p, width // p, text_len=text_len, text_position="start"), timestep


register_adapter(EasyAnimateAdapter())
