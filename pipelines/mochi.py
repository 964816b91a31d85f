"""Mochi 1 (`MochiTransformer3DModel`): text-to-video.

Each block's `attn1` is joint attention over `[video, text]`: the video tokens in frame-major order after the
spatial patchify, then the prompt's valid text tokens. The original attends each video over its valid tokens
(wherever the mask puts them: it selects them with `nonzero`) and returns their outputs packed first, the padded
text positions' outputs zero; the sparse path does the same, with the layout's text span cut to the valid tokens
(text rows and columns whole), videos with equal prompt masks in one call.
"""

from __future__ import annotations

import torch
from diffusers import MochiTransformer3DModel
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from ..patterns import VideoLayout
from .base import JointVideoTextAttention, ModelAdapter, call_argument, project_qkv
from .registry import register_adapter


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Mochi's interleaved-pair RoPE in float32, as MochiAttnProcessor2_0 computes it.
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], dim=-1).flatten(-2)


def joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None):
    """`(query, key, value)` over `[video, text]` (every text token, padding included) as `(B, S, heads,
    head_dim)`: `MochiAttnProcessor2_0`'s arithmetic (q/k norms per stream, RoPE on the video tokens)."""
    query, key, value = project_qkv(attn, hidden_states)
    if image_rotary_emb is not None:
        query, key = (_rotate(x, *image_rotary_emb) for x in (query, key))
    added = project_qkv(attn, encoder_hidden_states, added=True)
    return tuple(torch.cat([x, a], dim=1) for x, a in zip((query, key, value), added))


class MochiSparseAttnProcessor(JointVideoTextAttention, MochiAttnProcessor2_0):
    """`MochiAttnProcessor2_0` whose joint attention runs block-sparse when the runtime says so: a `(B, text)` mask,
    the padded text positions' outputs left at zero as in the original."""

    joint_qkv = staticmethod(joint_qkv)

    def attend_valid_keys(self, query, key, value, groups, keys):
        out = super().attend_valid_keys(query, key, value, groups, keys)
        # MochiAttnProcessor2_0 pads each sample's attention over its valid tokens with zeros at the end, so under
        # a mask that is not a prefix its valid text outputs land on the first text positions: a stable sort
        # of the masked tokens behind the valid ones moves them there.
        order = torch.argsort((~keys).to(torch.uint8), dim=1, stable=True)
        return out.gather(1, order[:, :, None, None].expand_as(out))


class MochiAdapter(ModelAdapter):
    transformer_classes = (MochiTransformer3DModel,)
    family = "Mochi"
    original_processor = MochiAttnProcessor2_0
    sparse_processor = MochiSparseAttnProcessor
    # The released scheduler inverts its sigmas (`invert_sigmas=True`: timesteps rise from 0 as denoising goes),
    # diffusers' default one does not: on a bare transformer each run's timesteps tell which way it goes.
    timesteps_rise = None

    def set_processor(self, module, processor):
        module.processor = processor  # MochiAttention is a plain module with a `processor` attribute, no setter

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 2)
        _, _, frames, height, width = hidden_states.shape
        p = transformer.config.patch_size
        layout = VideoLayout(
            frames, height // p, width // p, text_len=encoder_hidden_states.shape[1], text_position="end"
        )
        return layout, timestep


register_adapter(MochiAdapter())
