"""HunyuanImage 2.1 (`HunyuanImageTransformer2DModel`): text-to-image, and its refiner.

HunyuanVideo's blocks on images: every block's `attn` over `[image, text]`, the dual-stream blocks projecting the
text with their own weights, the single-stream ones the joined sequence; the text is the MLLM tokens and, with the
ByT5 glyph encoder, its tokens, the padding masked as keys. With ByT5 the transformer puts each prompt's valid tokens
first; without it (the refiner, any model with `text_embed_2_dim=None`) it passes the tokenizer's mask through, so a
left-padded prompt reaches the attention with its padding in front. The sparse path is HunyuanVideo's
(`hunyuan_video.HunyuanJointAttention`: each image over its valid prefix, a prompt whose valid tokens are not leading
moved valid first and put back, exactly); images are one frame (the refiner's 5D latents, frames of them). The
text-only token refiner is untouched.
"""

from __future__ import annotations

from diffusers import HunyuanImageTransformer2DModel
from diffusers.models.transformers.transformer_hunyuanimage import HunyuanImageAttnProcessor

from ..patterns import VideoLayout
from .base import ModelAdapter, call_argument, forward_input, patched_grid
from .hunyuan_video import HunyuanJointAttention
from .registry import register_adapter


class HunyuanImageSparseAttnProcessor(HunyuanJointAttention, HunyuanImageAttnProcessor):
    """`HunyuanImageAttnProcessor` (HunyuanVideo's arithmetic) whose joint self-attention runs block-sparse when the
    runtime says so."""


class HunyuanImageAdapter(ModelAdapter):
    transformer_classes = (HunyuanImageTransformer2DModel,)
    family = "HunyuanImage"
    original_processor = HunyuanImageAttnProcessor
    sparse_processor = HunyuanImageSparseAttnProcessor
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        text = call_argument(args, kwargs, "encoder_hidden_states", 2)
        sizes, patch = hidden_states.shape[2:], tuple(transformer.config.patch_size)
        grid = patched_grid(sizes, patch) if len(sizes) == 3 else patched_grid((1, *sizes), (1, *patch))
        text_len = text.shape[1]
        glyphs = forward_input(transformer, args, kwargs, "encoder_hidden_states_2")
        if glyphs is not None and transformer.context_embedder_2 is not None:  # the ByT5 tokens join the MLLM's
            text_len += glyphs.shape[1]
        return VideoLayout(*grid, text_len=text_len, text_position="end"), timestep


register_adapter(HunyuanImageAdapter())
