"""Krea 2 (`Krea2Transformer2DModel`, `Krea2Pipeline`): single-stream text-to-image.

Every block's `attn` attends over `[text, image]`: the fused prompt, then the image's packed patches, whose grid the
transformer's `position_ids` give (text rows zero, image rows `(0, h, w)`). The text fusion blocks (the prompt alone)
stay dense. The prompt's padding is masked as keys (a `(B, 1, 1, S)` boolean mask the model builds from
`encoder_attention_mask`). The pipelines pad inside their template, `[prompt | padding | suffix]`, so a prompt's
valid tokens are not a prefix: each prompt is attended over its valid keys wherever they lie, prompts with the same
mask together, on the layout with a text span of its valid tokens. Keys and values with fewer heads than the
queries are repeated as the original repeats them, and the output is gated as the original gates it. The pipeline
passes `t / num_train_timesteps` as the timestep.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_krea2 import Krea2AttnProcessor, Krea2Transformer2DModel

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument
from .registry import register_adapter


class Krea2SparseAttnProcessor(SparseProcessor, Krea2AttnProcessor):
    """`Krea2AttnProcessor` whose joint self-attention runs block-sparse when the runtime says so; dense calls run
    the original `__call__` unchanged."""

    # Krea2Transformer2DModel has no diffusers context parallel plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        original = (attn, hidden_states, attention_mask, image_rotary_emb)
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        self.check_not_parallel()
        text_len = self.runtime.call_layout().text_len
        valid = self.prompt_padding(attention_mask, text_len)
        if valid is False:
            return super().__call__(*original)
        query = attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))
        key, value = (projection(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
                      for projection in (attn.to_k, attn.to_v))
        gate = attn.to_gate(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # Grouped-query attention: each key and value head serves consecutive query heads.
        repeats = attn.num_heads // attn.num_kv_heads
        key, value = (x.repeat_interleave(repeats, dim=2) for x in (key, value))
        out = self.attend_prompts(query, key, value, valid, text_len)
        return attn.to_out[0](out.flatten(2, 3) * torch.sigmoid(gate))


class Krea2Adapter(ModelAdapter):
    transformer_classes = (Krea2Transformer2DModel,)
    family = "Krea 2"
    original_processor = Krea2AttnProcessor
    sparse_processor = Krea2SparseAttnProcessor
    attention_name = "attn"
    timestep_over_train_timesteps = True

    def read_call(self, transformer, args, kwargs):
        image = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 2)
        position_ids = call_argument(args, kwargs, "position_ids", 3)
        text_len, tokens = text.shape[1], image.shape[1]
        grid = position_ids[text_len:].round().long().cpu()
        rows, cols = int(grid[:, 1].max()) + 1, int(grid[:, 2].max()) + 1
        expected = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        if rows * cols != tokens or grid[:, 0].any() or not torch.equal(grid[:, 1:], expected):
            raise ValueError(
                f"diffsparse reads the Krea 2 image grid from `position_ids`, but these {tokens} image tokens are not a "
                "row-major grid, so this call is not supported: `diffsparse.remove(pipe)`"
            )
        # The pipeline passes `t / num_train_timesteps`: `t` as a share of them (`timestep_over_train_timesteps`).
        return VideoLayout(1, rows, cols, text_len=text_len, text_position="start"), timestep


register_adapter(Krea2Adapter())
