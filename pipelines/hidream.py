"""HiDream-I1 (`HiDreamImageTransformer2DModel`, `HiDreamImagePipeline`): text-to-image with dual- and
single-stream blocks.

Both kinds of block attend over `[image, text]`: the image's patches in row-major order, then the T5 prompt, the
last chosen Llama layer's prompt and the block's own Llama layer (the same length in every block). A non-square
image's patches are padded to the model's `max_seq` with tokens whose keys the model zeroes (not masks: they keep
their weight at score 0, and their values); those pad tokens join the text in the layout's trailing span, kept
whole, so the sparse path attends them exactly as the original does. Layers number the dual-stream blocks first.
The pipeline passes the scheduler's timesteps. Latents already patchified by the caller (3D `hidden_states` with
masks) are refused with a `ValueError`.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_hidream_image import (
    HiDreamAttnProcessor,
    HiDreamImageTransformer2DModel,
    apply_rope,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument
from .registry import register_adapter


class HiDreamSparseAttnProcessor(SparseProcessor, HiDreamAttnProcessor):
    """`HiDreamAttnProcessor` whose self-attention runs block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged."""

    # HiDreamImageTransformer2DModel has no diffusers context parallel plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, hidden_states_masks=None, encoder_hidden_states=None, image_rotary_emb=None,
                 *args, **kwargs):
        original = (attn, hidden_states, hidden_states_masks, encoder_hidden_states, image_rotary_emb, *args)
        if not self.runtime.route(self.layer):
            return super().__call__(*original, **kwargs)
        self.check_not_parallel()
        dtype, batch = hidden_states.dtype, hidden_states.shape[0]
        head_dim = attn.inner_dim // attn.heads

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim)

        query = heads(attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype))
        key = heads(attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype))
        value = heads(attn.to_v(hidden_states))
        if hidden_states_masks is not None:
            key = key * hidden_states_masks.view(batch, -1, 1, 1)
        image_len = query.shape[1]
        if not attn.single:
            text_query = heads(attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype))
            text_key = heads(attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype))
            text_value = heads(attn.to_v_t(encoder_hidden_states))
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, text_query), (key, text_key),
                                                                     (value, text_value)))
        if query.shape[-1] == image_rotary_emb.shape[-3] * 2:
            query, key = apply_rope(query, key, image_rotary_emb)
        else:  # RoPE on the first half of the head dim
            (query_rope, query_rest), (key_rope, key_rest) = query.chunk(2, dim=-1), key.chunk(2, dim=-1)
            query_rope, key_rope = apply_rope(query_rope, key_rope, image_rotary_emb)
            query, key = torch.cat([query_rope, query_rest], dim=-1), torch.cat([key_rope, key_rest], dim=-1)
        out = self.runtime.attention(self.layer, query, key, value).flatten(2, 3).to(query.dtype)
        if attn.single:
            return attn.to_out(out)
        return attn.to_out(out[:, :image_len]), attn.to_out_t(out[:, image_len:])


class HiDreamAdapter(ModelAdapter):
    transformer_classes = (HiDreamImageTransformer2DModel,)
    family = "HiDream"
    original_processor = HiDreamAttnProcessor
    sparse_processor = HiDreamSparseAttnProcessor
    block_lists = ("double_stream_blocks", "single_stream_blocks")
    attention_name = "block.attn1"

    def read_call(self, transformer, args, kwargs):
        latents = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timesteps", 1)
        t5 = call_argument(args, kwargs, "encoder_hidden_states_t5", 2)
        llama = call_argument(args, kwargs, "encoder_hidden_states_llama3", 3)
        if latents.ndim != 4:
            raise ValueError(
                "diffsparse reads HiDream's image grid from (B, C, H, W) latents, got hidden_states of shape "
                f"{tuple(latents.shape)} (patchified by the caller): `diffsparse.remove(pipe)`"
            )
        patch = transformer.config.patch_size
        rows, cols = latents.shape[-2] // patch, latents.shape[-1] // patch
        # A non-square image is padded to `max_seq` patches (the model's own rule, `patchify`).
        image_tokens = rows * cols if latents.shape[-2] == latents.shape[-1] else transformer.max_seq
        # Every block's text: the T5 prompt, the last chosen Llama layer's and the block's own Llama layer's.
        text_len = t5.shape[1] + 2 * llama[0].shape[1]
        layout = VideoLayout(1, rows, cols, text_len=image_tokens - rows * cols + text_len, text_position="end")
        return layout, timestep


register_adapter(HiDreamAdapter())
