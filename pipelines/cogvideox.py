"""CogVideoX 1.0 / 1.5 (`CogVideoXTransformer3DModel`): text-to-video, image-to-video, video-to-video.

Self-attention is `transformer_blocks[i].attn1` over one joint sequence: the text tokens first, then the video
tokens in frame-major order after the patchify (`patch_size` in space; CogVideoX 1.5 also `patch_size_t` in
time). Every pattern keeps the text rows and columns dense (`VideoLayout.text_len`), so only video-to-video
blocks are ever dropped. The pipelines batch CFG's two branches into one transformer call.
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from ..patterns import VideoLayout
from .base import ModelAdapter, call_argument
from .registry import register_adapter


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_rotary_emb=None):
    """`(query, key, value)` of a CogVideoX self-attention over `[text, video]`, as `(B, S, heads, head_dim)`.

    The same arithmetic as `CogVideoXAttnProcessor2_0` (q/k norms over the head dim, RoPE on the video part
    only), so the sparse path sees exactly the scores the dense processor does.
    """
    text_len = encoder_hidden_states.size(1)
    joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    query, key, value = (
        proj(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v)
    )
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        video_query = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
        video_key = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        query = torch.cat([query[:, :, :text_len], video_query], dim=2)
        key = torch.cat([key[:, :, :text_len], video_key], dim=2)
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


class CogVideoXSparseAttnProcessor(CogVideoXAttnProcessor2_0):
    """`CogVideoXAttnProcessor2_0` whose self-attention runs block-sparse when the runtime says so.

    Dense calls go to the original `__call__` unchanged, so they are bit-identical to it (except the calls that
    measure `SparseConfig.correction`'s statistics: dense through diffsparse's kernel).
    """

    def __init__(self, runtime, layer: int):
        super().__init__()
        self.runtime = runtime
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or not self.runtime.route(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text_len = encoder_hidden_states.size(1)
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self.runtime.attention(self.layer, query, key, value).flatten(2, 3).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_out


class CogVideoXAdapter(ModelAdapter):
    transformer_classes = (CogVideoXTransformer3DModel,)

    def self_attention_modules(self, transformer):
        for index, block in enumerate(transformer.transformer_blocks):
            yield index, block.attn1

    def make_processor(self, original, runtime, layer):
        # An exact type check: subclasses (e.g. the fused-QKV processor's relatives, LoRA or caching wrappers)
        # compute something else, and replacing them would silently change results.
        if type(original) is not CogVideoXAttnProcessor2_0:
            raise ValueError(
                f"layer {layer} of the CogVideoX transformer has processor {type(original).__name__}; diffsparse "
                "replaces only CogVideoXAttnProcessor2_0 (unfuse QKV projections and remove other processors, "
                "e.g. LoRA or caching ones, first)"
            )
        return CogVideoXSparseAttnProcessor(runtime, layer)

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 2)
        _, frames, _, height, width = hidden_states.shape  # CogVideoX latents are (B, F, C, H, W)
        p = transformer.config.patch_size
        p_t = transformer.config.patch_size_t or 1
        layout = VideoLayout(
            frames // p_t, height // p, width // p, text_len=encoder_hidden_states.shape[1], text_position="start"
        )
        return layout, timestep


register_adapter(CogVideoXAdapter())
