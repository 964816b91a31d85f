"""JoyImage Edit (`JoyImageEditTransformer3DModel`, `JoyImageEditPipeline`): double-stream blocks whose `attn`
attends `[image, text]` jointly, the image's latents patchified in 3D (frame-major). An edit passes the reference
images and the target as items of one `(B, n, C, T, H, W)` tensor, all of one size, which the model lays out along
time with the target first: the target is layout frame 0 and each reference a further frame, so a pattern's
temporal reach decides how far into the references each token looks. The prompt, unmasked, is the trailing span.
Layer `i` is `double_blocks[i].attn`.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_joyimage import (
    JoyImageAttnProcessor,
    JoyImageEditTransformer3DModel,
    _apply_rotary_emb,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, patched_grid
from .registry import register_adapter


def stream_qkv(attn, x: torch.Tensor, stream: str, rotary=None):
    """`(query, key, value)` of one stream (`"img"` or `"txt"`) as `(B, S, heads, head_dim)`: its fused projection,
    q/k norms and RoPE, as `JoyImageAttnProcessor` computes them."""
    query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in getattr(attn, f"{stream}_attn_qkv")(x).chunk(3, -1))
    query, key = getattr(attn, f"{stream}_attn_q_norm")(query), getattr(attn, f"{stream}_attn_k_norm")(key)
    if rotary is not None:
        query, key = _apply_rotary_emb(query, key, rotary)
    return query, key, value


class JoyImageSparseAttnProcessor(SparseProcessor, JoyImageAttnProcessor):
    """`JoyImageAttnProcessor` whose joint attention runs block-sparse when the runtime says so; dense calls run
    the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, **kwargs):
        original = (attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if encoder_hidden_states is None or not self.runtime.route(self.layer):
            return super().__call__(*original, **kwargs)  # the original's error, or a dense call
        self.check_not_parallel()
        image_freqs, text_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        image = stream_qkv(attn, hidden_states, "img", image_freqs)
        text = stream_qkv(attn, encoder_hidden_states, "txt", text_freqs)
        query, key, value = (torch.cat(pair, dim=1) for pair in zip(image, text))
        out = self.runtime.attention(self.layer, query, key, value).flatten(2, 3).to(query.dtype)
        image_out, text_out = out.split([hidden_states.shape[1], encoder_hidden_states.shape[1]], dim=1)
        return attn.img_attn_proj(image_out), attn.txt_attn_proj(text_out)


class JoyImageAdapter(ModelAdapter):
    transformer_classes = (JoyImageEditTransformer3DModel,)
    family = "JoyImage"
    original_processor = JoyImageAttnProcessor
    sparse_processor = JoyImageSparseAttnProcessor
    block_lists = ("double_blocks",)
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        latents = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        text = call_argument(args, kwargs, "encoder_hidden_states", 2)
        items = latents.shape[1] if latents.ndim == 6 else 1  # an edit's items, laid out along time
        frames, height, width = latents.shape[-3:]
        grid = patched_grid((items * frames, height, width), transformer.config.patch_size)
        return VideoLayout(*grid, text_len=text.shape[1], text_position="end"), timestep


register_adapter(JoyImageAdapter())
