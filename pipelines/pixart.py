"""PixArt-α and PixArt-Σ (`PixArtTransformer2DModel`): each block's self-attention `attn1` over the image's patches
in row-major order, a one-frame layout without text (the prompt enters through the cross-attention `attn2`, left
as it is). Layer `i` is block `i`'s self-attention.
"""

from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

from ..patterns import VideoLayout
from .base import FrameSelfAttention, FusedFrameSelfAttention, ModelAdapter, call_argument
from .registry import register_adapter


class PixArtAdapter(ModelAdapter):
    transformer_classes = (PixArtTransformer2DModel,)
    family = "PixArt"
    original_processor = AttnProcessor2_0
    sparse_processor = FrameSelfAttention
    # `fuse_qkv_projections()` puts diffusers' fused processor on every attention module.
    processor_pairs = ((AttnProcessor2_0, FrameSelfAttention), (FusedAttnProcessor2_0, FusedFrameSelfAttention))
    timestep_position = 2  # the forward's positional index of `timestep`

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", self.timestep_position)
        patch = transformer.config.patch_size
        return VideoLayout(1, hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch), timestep


register_adapter(PixArtAdapter())
