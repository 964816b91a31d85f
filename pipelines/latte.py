"""Latte (`LatteTransformer3DModel`, `LattePipeline`): attention factorised into space and time.

Each of Latte's layers is a spatial block, whose self-attention `transformer_blocks[i].attn1` attends the tokens
of one frame (the frames are the batch: `B * F` sequences of `H x W` tokens, row-major), then a temporal block
attending each token position across the frames (`B * H * W` sequences of `F` tokens). The spatial
self-attention is what becomes sparse, as a one-frame layout: a pattern's spatial reach decides which blocks of the
frame stay (`window3d`'s spatial window, or `searched`; `radial`'s band covers a whole frame, so on one frame it
keeps every block). The temporal attention (sequences of 16 frames, nothing to skip), and the cross-attention to
the text stay untouched. Layer `i` is the spatial self-attention of layer `i`.
"""

from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.latte_transformer_3d import LatteTransformer3DModel

from ..patterns import VideoLayout
from .base import FrameSelfAttention, ModelAdapter, call_argument
from .registry import register_adapter


class LatteAdapter(ModelAdapter):
    transformer_classes = (LatteTransformer3DModel,)
    family = "Latte"
    original_processor = AttnProcessor2_0
    sparse_processor = FrameSelfAttention
    block_lists = ("transformer_blocks",)  # the spatial blocks; `temporal_transformer_blocks` stay dense

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        _, _, _, height, width = hidden_states.shape
        patch = transformer.config.patch_size
        return VideoLayout(1, height // patch, width // patch), timestep


register_adapter(LatteAdapter())
