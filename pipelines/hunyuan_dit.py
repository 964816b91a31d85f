"""HunyuanDiT (`HunyuanDiT2DModel`: HunyuanDiT 1.0-1.2, its ControlNet and PAG pipelines): each block's
self-attention `attn1` over the image's patches in row-major order with 2D RoPE, a one-frame layout without text
(the two prompts, CLIP-like BERT and mT5, enter through the cross-attention `attn2`, left as it is). Layer `i` is
`blocks[i].attn1`; the long skip connections between blocks do not touch attention.
"""

from __future__ import annotations

from diffusers.models.attention_processor import FusedHunyuanAttnProcessor2_0, HunyuanAttnProcessor2_0
from diffusers.models.transformers.hunyuan_transformer_2d import HunyuanDiT2DModel

from .base import SparseProcessor
from .pixart import PixArtAdapter
from .registry import register_adapter


class HunyuanDiTSparseAttention(SparseProcessor):
    """The sparse path of HunyuanDiT's image self-attention (RoPE on queries and keys as the original), placed before
    `HunyuanAttnProcessor2_0` or its fused version; cross-attention and dense calls run the original `__call__`
    unchanged."""

    context_parallel = False  # no diffusers plan, and `attend_frame` does not gather a split sequence

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb)
        if encoder_hidden_states is not None:  # cross-attention: not the runtime's to count
            return super().__call__(*original)
        if self.normalises_input(attn):
            return super().__call__(*original)
        if self.stays_dense(attention_mask):  # the model passes no mask here; a caller's is the original's to apply
            return super().__call__(*original)
        self.check_not_parallel()
        return self.attend_frame(attn, hidden_states, image_rotary_emb)


class HunyuanDiTSparseProcessor(HunyuanDiTSparseAttention, HunyuanAttnProcessor2_0):
    """`HunyuanAttnProcessor2_0` whose image self-attention runs block-sparse when the runtime says so."""


class FusedHunyuanDiTSparseProcessor(HunyuanDiTSparseAttention, FusedHunyuanAttnProcessor2_0):
    """`FusedHunyuanAttnProcessor2_0` (after `fuse_qkv_projections()`) whose image self-attention runs block-sparse
    when the runtime says so."""

    fused = True


class HunyuanDiTAdapter(PixArtAdapter):
    transformer_classes = (HunyuanDiT2DModel,)
    family = "HunyuanDiT"
    original_processor = HunyuanAttnProcessor2_0
    sparse_processor = HunyuanDiTSparseProcessor
    processor_pairs = (
        (HunyuanAttnProcessor2_0, HunyuanDiTSparseProcessor),
        (FusedHunyuanAttnProcessor2_0, FusedHunyuanDiTSparseProcessor),
    )
    block_lists = ("blocks",)
    timestep_position = 1


register_adapter(HunyuanDiTAdapter())
