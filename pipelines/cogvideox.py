"""CogVideoX 1.0 / 1.5 (`CogVideoXTransformer3DModel`): text-to-video, image-to-video, video-to-video; ConsisID
(`ConsisIDTransformer3DModel`), CogVideoX's blocks with face identity conditioning.

Self-attention is `transformer_blocks[i].attn1` over one joint sequence: the text tokens first, then the video
tokens in frame-major order after the patchify (`patch_size` in space; CogVideoX 1.5 also `patch_size_t` in
time). Every pattern keeps the text rows and columns dense (`VideoLayout.text_len`), so only video-to-video
blocks are ever dropped. The pipelines batch CFG's two branches into one transformer call. After
`transformer.fuse_qkv_projections()` (diffusers' fused processor, one QKV projection) the sparse path projects
through the fused weights as that processor does.
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel, ConsisIDTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, latent_grid, patch_size_3d, project_qkv
from .registry import register_adapter


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_rotary_emb=None,
              fused: bool = False):
    """`(query, key, value)` of a CogVideoX self-attention over `[text, video]`, as `(B, S, heads, head_dim)`.

    The same arithmetic as `CogVideoXAttnProcessor2_0` (q/k norms over the head dim, RoPE on the video part
    only; with `fused`, `FusedCogVideoXAttnProcessor2_0`'s one QKV projection), so the sparse path sees exactly the
    scores the dense processor does.
    """
    text_len = encoder_hidden_states.size(1)
    query, key, value = project_qkv(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1), fused=fused)
    if image_rotary_emb is not None:
        query, key = (
            torch.cat([x[:, :text_len], apply_rotary_emb(x[:, text_len:], image_rotary_emb, sequence_dim=1)], dim=1)
            for x in (query, key)
        )
    return query, key, value


class CogVideoXSparseAttention(SparseProcessor):
    """The sparse path of CogVideoX's self-attention, placed before the family's processor class (the plain one, or
    the one `fuse_qkv_projections()` installs, `fused`), whose `__call__` stays the dense path: dense calls run it
    unchanged, so they are bit-identical to it (except the calls that measure `SparseConfig.correction`'s
    statistics: dense through diffsparse's kernel).
    """

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if self.stays_dense(attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.check_not_parallel()
        text_len = encoder_hidden_states.size(1)
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.fused)
        out = self.runtime.attention(self.layer, query, key, value).flatten(2, 3).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_out


class CogVideoXSparseAttnProcessor(CogVideoXSparseAttention, CogVideoXAttnProcessor2_0):
    """`CogVideoXAttnProcessor2_0` whose self-attention runs block-sparse when the runtime says so."""


class FusedCogVideoXSparseAttnProcessor(CogVideoXSparseAttention, FusedCogVideoXAttnProcessor2_0):
    """`FusedCogVideoXAttnProcessor2_0` (after `transformer.fuse_qkv_projections()`) whose self-attention runs
    block-sparse when the runtime says so."""

    fused = True


class CogVideoXAdapter(ModelAdapter):
    transformer_classes = (CogVideoXTransformer3DModel,)
    family = "CogVideoX"
    original_processor = CogVideoXAttnProcessor2_0
    sparse_processor = CogVideoXSparseAttnProcessor
    processor_pairs = (
        (CogVideoXAttnProcessor2_0, CogVideoXSparseAttnProcessor),
        (FusedCogVideoXAttnProcessor2_0, FusedCogVideoXSparseAttnProcessor),
    )

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 2)
        # CogVideoX latents are (B, F, C, H, W); only CogVideoX 1.5 patches time.
        grid = latent_grid(hidden_states.transpose(1, 2), patch_size_3d(transformer.config))
        return VideoLayout(*grid, text_len=encoder_hidden_states.shape[1], text_position="start"), timestep


class ConsisIDAdapter(CogVideoXAdapter):
    """ConsisID (identity-preserving CogVideoX 5B I2V): CogVideoX's blocks and processor; the face features reach
    the video through perceiver cross-attention modules between blocks, which stay untouched."""

    transformer_classes = (ConsisIDTransformer3DModel,)
    family = "ConsisID"


register_adapter(CogVideoXAdapter())
register_adapter(ConsisIDAdapter())
