"""HunyuanVideo (`HunyuanVideoTransformer3DModel`): text-to-video and its image-to-video variants.

Every block's `attn` is self-attention over one joint sequence: the video tokens in frame-major order after
the patchify, then the text tokens (the dual-stream blocks project the text with their own `add_*_proj`, the
single-stream blocks with the same weights). Prompts are padded to a fixed text length and the padding is
masked as keys (`attention_mask`, a valid prefix per video: the transformer rebuilds it so). The sparse path
attends each video over its valid prefix only, with the layout's text span cut to the valid tokens (every pattern
keeps text rows and columns whole); the padded text queries, whose outputs never reach a video token, attend
densely to the valid keys as in the original. A mask whose valid text is not leading (HunyuanImage without ByT5 and
Motif-Video pass the tokenizer's left padding through; `HunyuanJointAttention`) is attended with each video's text
moved valid first and the outputs put back. The text-only attention of the token refiner is untouched.

HunyuanVideo Framepack (`HunyuanVideoFramepackTransformer3DModel`, the same blocks and processor) puts the
history latents (4x, 2x and 1x patchified) in front of the video and the image embedding in front of the text:
`[history, video, image, text]`. The history is kept whole with the text: the adapter's token order attends the
sequence as `[video, history, image, text]`, whose trailing span is everything but the grid.
"""

from __future__ import annotations

import math

import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel, HunyuanVideoTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from ..patterns import VideoLayout
from .base import (
    JointVideoTextAttention,
    ModelAdapter,
    attend_valid_prefixes,
    call_argument,
    forward_input,
    latent_grid,
    patch_count,
    patch_size_3d,
    prefix_lengths,
    project_qkv,
)
from .registry import register_adapter


def joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None):
    """`(query, key, value)` over `[video, text]` as `(B, S, heads, head_dim)`: the arithmetic of
    `HunyuanVideoAttnProcessor2_0` (q/k norms, RoPE on the video tokens), for both kinds of block: the single-stream
    ones project the joined sequence with one set of weights, the dual-stream ones the text with `add_*_proj`."""
    text_len = encoder_hidden_states.shape[1]
    single_stream = attn.add_q_proj is None
    if single_stream:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    query, key, value = project_qkv(attn, hidden_states)
    if image_rotary_emb is not None:
        video = slice(0, -text_len) if single_stream else slice(None)
        rotated = [apply_rotary_emb(x[:, video], image_rotary_emb, sequence_dim=1) for x in (query, key)]
        if single_stream:
            rotated = [torch.cat([r, x[:, -text_len:]], dim=1) for r, x in zip(rotated, (query, key))]
        query, key = rotated
    if not single_stream:
        added = project_qkv(attn, encoder_hidden_states, added=True)
        query, key, value = (torch.cat([x, a], dim=1) for x, a in zip((query, key, value), added))
    return query, key, value


def key_rows(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The `(B, S)` rows of HunyuanVideo's `(B, 1, 1, S)` boolean key mask; a `ValueError` for a mask of another
    kind."""
    if attention_mask.dtype != torch.bool or attention_mask.numel() != batch * length:
        raise ValueError(
            f"expected HunyuanVideo's boolean key mask of shape (B, 1, 1, S) = ({batch}, 1, 1, {length}), got "
            f"{tuple(attention_mask.shape)} {attention_mask.dtype}"
        )
    return attention_mask.reshape(batch, length)


def valid_lengths(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Per video, how many leading tokens are valid keys, from HunyuanVideo's `(B, 1, 1, S)` boolean key mask (made
    from the transformer's `encoder_attention_mask`): a `ValueError` where they are not a prefix."""
    if attention_mask is None:
        return [length] * batch
    return prefix_lengths(key_rows(attention_mask, batch, length), name="encoder_attention_mask")


class HunyuanJointAttention(JointVideoTextAttention):
    """The sparse path of HunyuanVideo's joint attention, placed before a processor class with its arithmetic
    (HunyuanVideo's and Framepack's, HunyuanImage's, Motif-Video's): its `(B, 1, 1, S)` boolean key mask, and padded
    text queries that attend to the valid keys, as in the original.

    Each video is attended over its valid prefix (`attend_valid_prefixes`). Where a video's valid text tokens are not
    leading (the transformer passes the tokenizer's mask through: HunyuanImage without the ByT5 tokens, Motif-Video,
    whose Gemma tokenizer pads on the left), its text tokens are first reordered valid first, a stable order, and the
    outputs put back in the model's order (`read_text_mask`, `attend_valid_keys`). That is exact, not an
    approximation of the original's masked attention: the reorder comes after `joint_qkv`, so each token's q and k
    already carry whatever RoPE the family gives it at its own position, and every pattern keeps the text span's rows
    and columns whole, so attention commutes with any order of the text tokens. The grid's tokens stay in place.
    """

    joint_qkv = staticmethod(joint_qkv)
    padded_queries = "dense"

    def valid_lengths(self, attention_mask, batch, video_len, length):
        return valid_lengths(attention_mask, batch, length)

    def read_text_mask(self, attention_mask, batch, video_len, length):
        """`(lengths, None, None)` when every video's valid keys are a prefix (`valid_lengths`), else `(None, (order,
        lengths), None)`: per video, `order` puts its valid text tokens first (a stable sort of the text keys; the
        first `video_len` tokens, which the transformers never mask, keep their places) and `lengths` counts its
        valid keys, for `attend_valid_keys`. A mask of another kind (`key_rows`), or one that masks any of the
        first `video_len` tokens (`valid_lengths`), is refused."""
        keys = key_rows(attention_mask, batch, length)
        text = torch.argsort((~keys[:, video_len:]).to(torch.uint8), dim=1, stable=True)
        if torch.equal(text, torch.arange(length - video_len, device=text.device).expand_as(text)):
            return self.valid_lengths(keys, batch, video_len, length), None, None
        grid = torch.arange(video_len, device=text.device).expand(batch, -1)
        order = torch.cat([grid, text + video_len], dim=1)
        return None, (order, self.valid_lengths(keys.gather(1, order), batch, video_len, length)), None

    def attend_valid_keys(self, query, key, value, groups, keys):
        """Each video with its valid text tokens moved first (`groups`: `read_text_mask`'s `(order, lengths)`),
        attended over its valid prefix, and the outputs put back in the model's order (exact: class docstring)."""
        order, lengths = groups
        index = order[:, :, None, None]
        query, key, value = (x.gather(1, index.expand_as(x)) for x in (query, key, value))
        out = attend_valid_prefixes(self.runtime, self.layer, query, key, value, lengths, self.padded_queries)
        return torch.empty_like(out).scatter_(1, index.expand_as(out), out)


class HunyuanVideoSparseAttnProcessor(HunyuanJointAttention, HunyuanVideoAttnProcessor2_0):
    """`HunyuanVideoAttnProcessor2_0` whose joint self-attention runs block-sparse when the runtime says so."""


class HunyuanVideoAdapter(ModelAdapter):
    transformer_classes = (HunyuanVideoTransformer3DModel,)
    family = "HunyuanVideo"
    original_processor = HunyuanVideoAttnProcessor2_0
    sparse_processor = HunyuanVideoSparseAttnProcessor
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 2)
        grid = latent_grid(hidden_states, patch_size_3d(transformer.config))
        return VideoLayout(*grid, text_len=encoder_hidden_states.shape[1], text_position="end"), timestep


# Framepack's history terms: the argument, and its patch (padded up to whole patches, except the 1x term).
_FRAMEPACK_HISTORY = (("latents_clean", (1, 2, 2)), ("latents_history_2x", (2, 4, 4)), ("latents_history_4x", (4, 8, 8)))


class HunyuanVideoFramepackAdapter(HunyuanVideoAdapter):
    """HunyuanVideo Framepack: `[history, video, image, text]`, attended as `[video, history, image, text]` (the
    layout's trailing span: history, image tokens and text, kept whole). A single video's prompt padding is cut
    off by the transformer itself, so its text span is the valid tokens; a batch keeps the padding, masked."""

    transformer_classes = (HunyuanVideoFramepackTransformer3DModel,)
    family = "HunyuanVideo Framepack"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 2)
        mask = call_argument(args, kwargs, "encoder_attention_mask", 3)
        image_embeds = call_argument(args, kwargs, "image_embeds", 5)
        grid = latent_grid(hidden_states, patch_size_3d(transformer.config))
        history = 0
        for name, kernel in _FRAMEPACK_HISTORY:
            latents = forward_input(transformer, args, kwargs, name)
            if latents is not None and forward_input(transformer, args, kwargs, f"indices_{name}") is not None:
                history += patch_count(latents.shape[2:], kernel, padded=kernel != (1, 2, 2))
        text = int(mask.sum()) if hidden_states.shape[0] == 1 else encoder_hidden_states.shape[1]
        video = math.prod(grid)
        layout = VideoLayout(*grid, text_len=history + image_embeds.shape[1] + text, text_position="end")
        # Model order [history, video, image, text] -> layout order [video, history, image, text].
        token_order = torch.cat([torch.arange(video, video + history), torch.arange(video),
                                 torch.arange(video + history, layout.num_tokens)])
        return layout, timestep, token_order


register_adapter(HunyuanVideoAdapter())
register_adapter(HunyuanVideoFramepackAdapter())
