"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): text-to-image.

Images are one frame: the layout is `VideoLayout(1, h, w)` over the 2x2 latent patches in row-major order.
Every block's `attn` is joint attention over `[image, text]` (the text projected by the block's own
`add_*_proj`); SD 3.5's dual-attention blocks add `attn2`, self-attention over the image tokens alone. Both
can run sparse: block `i`'s `attn` is layer `i`, its `attn2` layer `num_layers + i`.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, project_joint_output, project_qkv
from .registry import register_adapter


def joint_qkv(attn, hidden_states, encoder_hidden_states=None):
    """`(query, key, value)` over `[image, text]` (or the image alone) as `(B, S, heads, head_dim)`: the
    arithmetic of `JointAttnProcessor2_0` (q/k norms per stream, no positional embedding)."""
    query, key, value = project_qkv(attn, hidden_states)
    if encoder_hidden_states is not None:
        added = project_qkv(attn, encoder_hidden_states, added=True)
        query, key, value = (torch.cat([x, a], dim=1) for x, a in zip((query, key, value), added))
    return query, key, value


class SD3SparseAttnProcessor(SparseProcessor, JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` whose attention runs block-sparse when the runtime says so.

    Dense calls go to the original `__call__` unchanged, so they are bit-identical to it (except the calls that
    measure `SparseConfig.correction`'s statistics: dense through diffsparse's kernel).
    """

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # Not `stays_dense(attention_mask)`: the original ignores the mask (its SDPA takes none), so a mask passed
        # through `joint_attention_kwargs` changes nothing there and must not turn the generation dense here.
        if not self.runtime.route(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        self.check_not_parallel()
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states)
        layout = self.runtime.call_layout()
        if encoder_hidden_states is None:  # SD 3.5's `attn2`: the image tokens alone
            layout = dataclasses.replace(layout, text_len=0)
        out = self.runtime.attention(self.layer, query, key, value, layout=layout).flatten(2, 3).to(query.dtype)
        # The last joint block (`context_pre_only`) has no `to_add_out`: its text output is returned unprojected.
        out, encoder_out = project_joint_output(attn, out, hidden_states.shape[1])
        return out if encoder_hidden_states is None else (out, encoder_out)


class SD3Adapter(ModelAdapter):
    transformer_classes = (SD3Transformer2DModel,)
    family = "SD3"
    original_processor = JointAttnProcessor2_0
    sparse_processor = SD3SparseAttnProcessor
    attention_name = "attn"

    def self_attention_modules(self, transformer):
        yield from super().self_attention_modules(transformer)  # every block's joint `attn`: layers 0 .. n - 1
        blocks = transformer.transformer_blocks
        for index, block in enumerate(blocks):
            if getattr(block, "attn2", None) is not None:
                yield len(blocks) + index, block.attn2

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 3)
        _, _, height, width = hidden_states.shape
        p = transformer.config.patch_size
        layout = VideoLayout(1, height // p, width // p, text_len=encoder_hidden_states.shape[1], text_position="end")
        return layout, timestep


register_adapter(SD3Adapter())
