"""LTX-Video (`LTXVideoTransformer3DModel`): text-to-video, image-to-video and multi-condition video.

Self-attention is `transformer_blocks[i].attn1` over video tokens only (text enters through the cross-attention
`attn2`, untouched). The pipelines pack the latents into a frame-major token sequence before the transformer and
pass the latent grid as `num_frames`, `height`, `width`; the layout is read from those, unless the call gives
each token's coordinates (`video_coords`), which the transformer's rotary embedding reads in their place and so
does diffsparse. LTXConditionPipeline passes only those, with the tokens of conditions placed after frame 0
(keyframes, clips) in front of the grid: the grid is read from the coordinates, and those condition tokens take
the layout's leading span that patterns keep whole (like CogVideoX's text). LTXI2VLongMultiPromptPipeline passes a
grid of 1 x 1 x 1 with the coordinates of a sliding window whose latents end with injected frames (the previous
window's tail, guidance and negative-index frames) given earlier times: the window is read as frames of one grid in
the order of its tokens, the injected frames its last ones.
"""

from __future__ import annotations

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, forward_input, leading_run
from .registry import register_adapter


def self_attention_qkv(attn, hidden_states: torch.Tensor, image_rotary_emb=None):
    """`(query, key, value)` of an LTX self-attention as `(B, N, heads, head_dim)`: the arithmetic of
    `LTXVideoAttnProcessor` (q/k RMS norms over the whole hidden size, then RoPE), so sparse and dense see equal
    scores."""
    query = attn.norm_q(attn.to_q(hidden_states))
    key = attn.norm_k(attn.to_k(hidden_states))
    value = attn.to_v(hidden_states)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb)
        key = apply_rotary_emb(key, image_rotary_emb)
    return tuple(x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))


class LTXSparseAttnProcessor(SparseProcessor, LTXVideoAttnProcessor):
    """`LTXVideoAttnProcessor` whose self-attention runs block-sparse when the runtime says so.

    Dense calls go to the original `__call__` unchanged, so they are bit-identical to it (except the calls that
    measure `SparseConfig.correction`'s statistics: dense through diffsparse's kernel).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is not None or self.stays_dense(attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = self_attention_qkv(attn, hidden_states, image_rotary_emb)
        out = self.attend_video(query, key, value).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def layout_from_coords(video_coords: torch.Tensor) -> VideoLayout:
    """The layout of an LTXConditionPipeline call from its `(B, 3, N)` token coordinates (time, y, x; every video
    of a batch has the same): the latent grid is the frame-major run that starts at the one token at the origin
    (0, 0, 0); the tokens before it are the conditions placed after frame 0, whose times are all later than 0. With
    the origin at the first token and again later (LTXI2VLongMultiPromptPipeline's window), every token is a frame of
    the grid, in token order. One read of the coordinates per call (a host sync on GPU)."""
    coords = video_coords[0].detach().float().cpu()
    origin = (coords == 0).all(dim=0).nonzero().flatten()
    if len(origin) > 1 and origin[0] == 0:
        # LTXI2VLongMultiPromptPipeline's window: frames in token order from the first, the frames injected at its
        # end placed at times already taken (the previous window's tail from 0), so the origin is there again.
        conditions = 0
    elif len(origin) != 1:
        raise ValueError(f"expected one token at the origin of `video_coords`, found {len(origin)}")
    else:
        conditions = int(origin[0])
    grid = coords[:, conditions:]
    # Frame-major: the first frame's tokens share time 0, the first row's tokens also y 0 (a run each).
    per_frame = leading_run(grid[0] == 0)
    width = leading_run((grid[0] == 0) & (grid[1] == 0))
    if grid.shape[1] % per_frame or per_frame % width:
        raise ValueError(f"`video_coords` hold no frame-major grid after {conditions} condition tokens")
    return VideoLayout(grid.shape[1] // per_frame, per_frame // width, width, text_len=conditions,
                       text_position="start")


class LTXAdapter(ModelAdapter):
    transformer_classes = (LTXVideoTransformer3DModel,)
    family = "LTX"
    original_processor = LTXVideoAttnProcessor
    sparse_processor = LTXSparseAttnProcessor

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 2)
        grid = [forward_input(transformer, args, kwargs, name) for name in ("num_frames", "height", "width")]
        coords = forward_input(transformer, args, kwargs, "video_coords")
        # The coordinates first: the transformer's rotary embedding reads them and ignores the grid arguments when
        # both are given (LTXI2VLongMultiPromptPipeline passes 1 x 1 x 1 beside the window's coordinates).
        if coords is not None:
            layout = layout_from_coords(coords)
        elif any(size is None for size in grid):
            raise ValueError(
                "diffsparse reads the LTX token grid from the transformer's `num_frames`, `height` and `width`, "
                "or from `video_coords`; this call gave neither"
            )
        else:
            frames, height, width = (int(size) for size in grid)
            p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
            layout = VideoLayout(frames // p_t, height // p, width // p)
        if layout.num_tokens != hidden_states.shape[1]:
            raise ValueError(
                f"the LTX transformer got {hidden_states.shape[1]} tokens for the layout {layout} "
                f"({layout.num_tokens} tokens); diffsparse cannot place the others, so this call is not supported: "
                "`diffsparse.remove(pipe)`"
            )
        return layout, timestep


register_adapter(LTXAdapter())
