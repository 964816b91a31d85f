"""Motif-Video (`MotifVideoTransformer3DModel`): text- and image-to-video.

HunyuanVideo's design: dual- and single-stream blocks whose `attn` runs over the joint `[video, image, text]`
sequence (RoPE on the video tokens), the prompt padding masked as keys (padded text queries attend the valid
keys). Both kinds of block hand the processor the video as `hidden_states` and `[image, text]` as
`encoder_hidden_states` (a single-stream block splits its joined sequence before the call), and the transformer
passes the tokenizer's mask through unchanged, so the padding lies wherever the tokenizer put it (Motif's Gemma
tokenizer pads on the left by default). Where a video's valid text tokens are not a prefix, its `[image, text]`
tokens are reordered valid first (a stable order per video) for the prefix path, and the outputs put back in
place: exact, since no text or image token gets RoPE and every pattern keeps the text span's rows and columns
whole. The last `num_decoder_layers` single-stream blocks are a decoder: its video tokens attend jointly with the
encoder's video tokens in place of the text, `[decoder video, encoder video]`, so those calls take the layout's
trailing span as the encoder's tokens, kept whole. The text cross-attention modules stay untouched.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.transformers.transformer_motif_video import (
    MotifVideoAttnProcessor2_0,
    MotifVideoTransformer3DModel,
)

from ..patterns import VideoLayout
from .base import (
    JointVideoTextAttention,
    ModelAdapter,
    attend_valid_prefixes,
    call_argument,
    forward_input,
    latent_grid,
    patch_size_3d,
    project_joint_output,
)
from .hunyuan_video import joint_qkv, valid_lengths
from .registry import register_adapter


class MotifVideoSparseAttnProcessor(JointVideoTextAttention, MotifVideoAttnProcessor2_0):
    """`MotifVideoAttnProcessor2_0` whose joint self-attention runs block-sparse when the runtime says so."""

    joint_qkv = staticmethod(joint_qkv)
    padded_queries = "dense"

    def valid_lengths(self, attention_mask, batch, video_len, length):
        return valid_lengths(attention_mask, batch, length)

    def read_text_mask(self, attention_mask, batch, video_len, length):
        """The prefix reading (`(lengths, None, None)`) of a mask whose valid keys lead each row; else `(None, (order,
        lengths), None)`: per video, `order` puts its valid tokens first (a stable sort of the key mask) and
        `lengths` counts them, for `attend_valid_keys`."""
        if attention_mask.dtype == torch.bool and attention_mask.numel() == batch * length:
            keys = attention_mask.reshape(batch, length)
            # The video and image keys are always valid (the transformer pads the mask with them), so a stable sort
            # moves only text tokens, within the layout's text span.
            order = torch.argsort((~keys).to(torch.uint8), dim=1, stable=True)
            if not torch.equal(order, torch.arange(length, device=order.device).expand_as(order)):
                return None, (order, self.valid_lengths(keys.gather(1, order), batch, video_len, length)), None
        # A prefix (right padding, no padding) takes the usual path; a mask of another kind is refused there.
        return super().read_text_mask(attention_mask, batch, video_len, length)

    def attend_valid_keys(self, query, key, value, groups, keys):
        """Each video with its valid text tokens moved first (`groups`: `read_text_mask`'s `(order, lengths)`),
        attended over its valid prefix, and the outputs put back in the model's order."""
        order, lengths = groups
        index = order[:, :, None, None]
        # No text token carries RoPE and every pattern keeps the text rows and columns whole, so attention commutes
        # with this reorder of the text: it is exact, not an approximation of the original's masked attention.
        query, key, value = (x.gather(1, index.expand_as(x)) for x in (query, key, value))
        out = attend_valid_prefixes(self.runtime, self.layer, query, key, value, lengths, self.padded_queries)
        return torch.empty_like(out).scatter_(1, index.expand_as(out), out)

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
