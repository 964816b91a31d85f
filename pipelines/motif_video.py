"""Motif-Video (`MotifVideoTransformer3DModel`): text- and image-to-video.

HunyuanVideo's design: dual- and single-stream blocks whose `attn` runs over the joint `[video, image, text]`
sequence (RoPE on the video tokens), the prompt padding masked as keys (padded text queries attend the valid
keys). Both kinds of block hand the processor the video as `hidden_states` and `[image, text]` as
`encoder_hidden_states` (a single-stream block splits its joined sequence before the call), and the transformer
passes the tokenizer's mask through unchanged, so the padding lies wherever the tokenizer put it (Motif's Gemma
tokenizer pads on the left by default). The sparse path is HunyuanVideo's (`hunyuan_video.HunyuanJointAttention`,
the same arithmetic): where a video's valid text tokens are not a prefix, its `[image, text]` tokens are reordered
valid first (a stable order per video) for the prefix path, and the outputs put back in place, exactly (the reorder
comes after RoPE, and every pattern keeps the text span's rows and columns whole). The last `num_decoder_layers`
single-stream blocks are a decoder: its video tokens attend jointly with the encoder's video tokens in place of the
text, `[decoder video, encoder video]`, so those calls take the layout's trailing span as the encoder's tokens, kept
whole. The text cross-attention modules stay untouched.
"""

from __future__ import annotations

import dataclasses

from diffusers.models.transformers.transformer_motif_video import (
    MotifVideoAttnProcessor2_0,
    MotifVideoTransformer3DModel,
)

from ..patterns import VideoLayout
from .base import (
    ModelAdapter,
    call_argument,
    forward_input,
    latent_grid,
    patch_size_3d,
    project_joint_output,
)
from .hunyuan_video import HunyuanJointAttention, joint_qkv
from .registry import register_adapter


class MotifVideoSparseAttnProcessor(HunyuanJointAttention, MotifVideoAttnProcessor2_0):
    """`MotifVideoAttnProcessor2_0` whose joint self-attention runs block-sparse when the runtime says so: the
    encoder blocks as HunyuanVideo's (`HunyuanJointAttention`, left-padded prompts included), the decoder blocks'
    calls, which carry no mask, over `[decoder video, encoder video]`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attention_mask is not None:
            # Padded prompts: each video over its valid text tokens, wherever the tokenizer put them (the encoder
            # blocks; decoder calls carry no mask).
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if not self.runtime.route(self.layer):
            return MotifVideoAttnProcessor2_0.__call__(
                self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        self.check_not_parallel()
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        # The trailing span is whatever this block joins to the video: the text, or the encoder's video tokens.
        layout = dataclasses.replace(self.runtime.call_layout(), text_len=encoder_hidden_states.shape[1])
        out = self.runtime.attention(self.layer, query, key, value, layout=layout).flatten(2, 3).to(query.dtype)
        return project_joint_output(attn, out, hidden_states.shape[1])


class MotifVideoAdapter(ModelAdapter):
    transformer_classes = (MotifVideoTransformer3DModel,)
    family = "Motif-Video"
    original_processor = MotifVideoAttnProcessor2_0
    sparse_processor = MotifVideoSparseAttnProcessor
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        text = call_argument(args, kwargs, "encoder_hidden_states", 2)
        image = forward_input(transformer, args, kwargs, "image_embeds")
        grid = latent_grid(hidden_states, patch_size_3d(transformer.config))
        text_len = text.shape[1] + (0 if image is None else image.shape[1])
        return VideoLayout(*grid, text_len=text_len, text_position="end"), timestep


register_adapter(MotifVideoAdapter())
