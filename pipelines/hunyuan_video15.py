"""HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`): text-to-video and image-to-video.

Every block is dual-stream: `attn` over one joint sequence, the video tokens in frame-major order after the
patchify, then the text. The transformer puts each prompt's valid tokens first (image, ByT5, then MLLM tokens)
and the padding after them, and its processor masks the padding as keys and as queries, so the padded text
queries get zeros from the attention (then the text output projection), as in Mochi. The sparse path attends
each video over its valid prefix only, the layout's text span cut to the valid tokens. The text-only attention
of the token refiner is untouched.
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15AttnProcessor2_0,
    HunyuanVideo15Transformer3DModel,
)

from ..patterns import VideoLayout
from .base import JointVideoTextAttention, ModelAdapter, call_argument, latent_grid, patch_size_3d
from .hunyuan_video import joint_qkv
from .registry import register_adapter


class HunyuanVideo15SparseAttnProcessor(JointVideoTextAttention, HunyuanVideo15AttnProcessor2_0):
    """`HunyuanVideo15AttnProcessor2_0` whose joint self-attention runs block-sparse when the runtime says so: the
    arithmetic of HunyuanVideo's dual-stream blocks (q/k norms, RoPE on the video, text appended); a `(B, text)`
    mask that the original applies to keys and queries (padded text queries get zeros)."""

    joint_qkv = staticmethod(joint_qkv)


class HunyuanVideo15Adapter(ModelAdapter):
    transformer_classes = (HunyuanVideo15Transformer3DModel,)
    family = "HunyuanVideo 1.5"
    original_processor = HunyuanVideo15AttnProcessor2_0
    sparse_processor = HunyuanVideo15SparseAttnProcessor
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        # The joint text: the MLLM prompt, the ByT5 glyph prompt and the image embedding's tokens (zeroed and
        # masked in text-to-video), reordered by the transformer but not shortened.
        text_len = sum(
            call_argument(args, kwargs, name, position).shape[1]
            for name, position in (("encoder_hidden_states", 2), ("encoder_hidden_states_2", 5), ("image_embeds", 7))
        )
        grid = latent_grid(hidden_states, patch_size_3d(transformer.config))
        return VideoLayout(*grid, text_len=text_len, text_position="end"), timestep


register_adapter(HunyuanVideo15Adapter())
