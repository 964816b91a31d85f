"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): T2V, I2V, TI2V, and Wan 2.2's two experts; Wan VACE
(`WanVACETransformer3DModel`), Wan 2.2 Animate (`WanAnimateTransformer3DModel`), SkyReels-V2
(`SkyReelsV2Transformer3DModel`) and ChronoEdit (`ChronoEditTransformer3DModel`).

Self-attention is `blocks[i].attn1` over video tokens only (no text in the sequence), in frame-major
order after a `patch_size` patchify; cross-attention `attn2` stays untouched. VACE's control blocks attend over
the control video's tokens, patchified on the same grid.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_chronoedit import ChronoEditTransformer3DModel
from diffusers.models.transformers.transformer_chronoedit import WanAttnProcessor as ChronoEditWanAttnProcessor
from diffusers.models.transformers.transformer_skyreels_v2 import (
    SkyReelsV2AttnProcessor,
    SkyReelsV2Transformer3DModel,
)
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanTransformer3DModel,
    _get_qkv_projections,
)
from diffusers.models.transformers.transformer_wan_animate import WanAnimateTransformer3DModel
from diffusers.models.transformers.transformer_wan_animate import WanAttnProcessor as AnimateWanAttnProcessor
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformer3DModel

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, latent_grid
from .registry import register_adapter


def _apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved-pair RoPE, the same arithmetic as WanAttnProcessor so sparse and dense see equal q/k.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb=None):
    """`(query, key, value)` of a Wan self-attention as `(B, N, heads, head_dim)`, after q/k norms and RoPE.

    The same arithmetic as `WanAttnProcessor`, so anything computed from them (sparse attention, attention maps
    for analysis) sees exactly the scores the dense processor does.
    """
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = _apply_rotary(query, *rotary_emb)
        key = _apply_rotary(key, *rotary_emb)
    return query, key, value


class WanSparseSelfAttention(SparseProcessor):
    """The sparse path of a Wan self-attention, placed before a Wan processor class (Wan, Wan Animate, SkyReels-V2, ChronoEdit)
    whose `__call__` stays the dense path: dense calls run it unchanged, so they are bit-identical to the original
    (except the calls that measure `SparseConfig.correction`'s statistics: dense through diffsparse's kernel)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:  # cross-attention: not a layer diffsparse touches
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if self.stays_dense(attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb)
        hidden_states = self.attend_video(query, key, value)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class WanSparseAttnProcessor(WanSparseSelfAttention, WanAttnProcessor):
    """`WanAttnProcessor` whose self-attention runs block-sparse when the runtime says so."""


class WanAnimateSparseAttnProcessor(WanSparseSelfAttention, AnimateWanAttnProcessor):
    """Wan Animate's own copy of `WanAttnProcessor`, whose self-attention runs block-sparse when the runtime says so."""


def frame_causal_groups(mask: torch.Tensor, layout: VideoLayout) -> int | None:
    """Frames per group of the causal frame-block mask SkyReels-V2's transformer builds for asynchronous diffusion
    forcing (`num_frame_per_block`), read from a call's `(1, 1, N, N)` bool mask on `layout`; `None` for any other
    mask. The rows and the columns of each frame's first token are compared with `FrameCausal`'s definition (the
    mask is constant over each frame's tokens by construction; a full `N x N` comparison would cost a pass over a
    tensor the size of the attention matrix)."""
    n, per_frame = layout.num_tokens, layout.height * layout.width
    if mask.dtype != torch.bool or mask.numel() != n * n or mask.shape[-1] != n or layout.text_len:
        return None
    mask = mask.reshape(n, n)
    firsts = torch.arange(layout.frames, device=mask.device) * per_frame
    frames = int(mask[0, firsts].sum())
    if frames == 0:  # the first query sees no frame: not a causal mask (which always keeps a query's own frame)
        return None
    group = torch.arange(n, device=mask.device) // per_frame // frames
    rows = group[None, :] <= group[firsts, None]  # (frames, N): each frame's first query, every key
    columns = group[firsts][None, :] <= group[:, None]  # (N, frames): every query, each frame's first key
    if torch.equal(mask[firsts], rows) and torch.equal(mask[:, firsts], columns):
        return frames
    return None


class SkyReelsV2SparseAttnProcessor(WanSparseSelfAttention, SkyReelsV2AttnProcessor):
    """SkyReels-V2's copy of `WanAttnProcessor`, whose self-attention runs block-sparse when the runtime says so,
    also under asynchronous diffusion forcing's causal frame-block mask, applied exactly
    (`SparseRuntime.allow_frame_causal`)."""

    def stays_dense(self, attention_mask=None) -> bool:
        if attention_mask is None:
            return super().stays_dense()
        layout = self.runtime.call_layout()
        frames = None if layout is None else self.runtime.once_per_call(
            attention_mask, lambda mask: frame_causal_groups(mask, layout)
        )
        if frames is None:
            return super().stays_dense(attention_mask)
        return not (self.runtime.route(self.layer) and self.runtime.allow_frame_causal(self.layer, frames))


class ChronoEditSparseAttnProcessor(WanSparseSelfAttention, ChronoEditWanAttnProcessor):
    """ChronoEdit's copy of `WanAttnProcessor`, whose self-attention runs block-sparse when the runtime says so."""


class WanAdapter(ModelAdapter):
    transformer_classes = (WanTransformer3DModel,)
    family = "Wan"
    original_processor = WanAttnProcessor
    sparse_processor = WanSparseAttnProcessor
    block_lists = ("blocks",)

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        return VideoLayout(*latent_grid(hidden_states, transformer.config.patch_size)), timestep


class WanVACEAdapter(WanAdapter):
    """Wan VACE: the main `blocks` are layers `0 .. num_layers - 1` as in Wan (so `dense_layers` means the same
    blocks), the control `vace_blocks` follow as `num_layers + i` (they run first in each call). Their control
    tokens lie on the video's grid (the transformer pads them to the video's count), so one layout serves both."""

    transformer_classes = (WanVACETransformer3DModel,)
    family = "Wan VACE"
    block_lists = ("blocks", "vace_blocks")


class WanAnimateAdapter(WanAdapter):
    """Wan 2.2 Animate: Wan's blocks (with its own copy of the processor class); the reference image's latent is
    the first frame of the sequence, the pose video's frames follow it. The face adapters' cross-attention to
    the motion tokens stays untouched."""

    transformer_classes = (WanAnimateTransformer3DModel,)
    family = "Wan Animate"
    original_processor = AnimateWanAttnProcessor
    sparse_processor = WanAnimateSparseAttnProcessor


class SkyReelsV2Adapter(WanAdapter):
    """SkyReels-V2 (Wan 2.1's architecture, trained for diffusion forcing): timesteps may be one per frame (the
    call's step is the largest; each frame follows the dense-step schedule on its own step: `per_frame_steps`); in
    asynchronous diffusion forcing (`causal_block_size > 1`) every self-attention call carries a causal frame-block
    mask, which the sparse path applies exactly (`SparseRuntime.allow_frame_causal`)."""

    transformer_classes = (SkyReelsV2Transformer3DModel,)
    per_frame_steps = True
    family = "SkyReels-V2"
    original_processor = SkyReelsV2AttnProcessor
    sparse_processor = SkyReelsV2SparseAttnProcessor


class ChronoEditAdapter(WanAdapter):
    """ChronoEdit (Wan 2.1 I2V's architecture, image editing as a short video): the input image is frame 0 and the
    edited image the last frame; with temporal reasoning the frames between are imagined for the first steps, then
    dropped, so one generation runs on two layouts (every plan and search is per layout)."""

    transformer_classes = (ChronoEditTransformer3DModel,)
    family = "ChronoEdit"
    original_processor = ChronoEditWanAttnProcessor
    sparse_processor = ChronoEditSparseAttnProcessor


register_adapter(WanAdapter())
register_adapter(WanVACEAdapter())
register_adapter(WanAnimateAdapter())
register_adapter(SkyReelsV2Adapter())
register_adapter(ChronoEditAdapter())
