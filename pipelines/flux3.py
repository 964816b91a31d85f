"""FLUX.3 (`Flux3Transformer2DModel`, run by diffusers' `Flux3ModularPipeline`): text-to-image and image editing.

Three token modes: the generated image, the reference images of an edit, the text. Each first runs per-mode blocks
that attend within the mode alone, then single blocks attend over the joint `[text, image, references]`. The
sparse layers are the image's mode blocks (the image alone: `VideoLayout(1, rows, cols)`) and the single blocks,
numbered in that order; the text's and the references' mode blocks keep the original processor (text attention
is short, and references enter the joint blocks whole or as frames, below) and are not counted in `stats()`.

The image grid is read from `img_ids` (`(t, h, w, l)`, with h and w scaled by the pipeline's RoPE scale): any
row-major grid. References (`image_cond_ids`, one `l` per reference: -1, -2, ...) of the output's size are frames
1, 2, ... of the joint layout, as FLUX.2's are; of any other size they join the text's leading span, kept whole.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux3 import (
    Flux3AttnProcessor,
    Flux3Transformer2DModel,
    _get_qkv_projections,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, forward_input, references_with_text
from .registry import register_adapter


class Flux3SparseAttnProcessor(SparseProcessor, Flux3AttnProcessor):
    """`Flux3AttnProcessor` whose self-attention runs block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged. One class serves both kinds of sparse layer: a call over fewer tokens than the
    joint sequence is an image mode block's, over the generated image alone."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        if self.stays_dense(attention_mask):
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)
        self.check_not_parallel()
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in _get_qkv_projections(attn, hidden_states))
        # The original's arithmetic: q/k norms and RoPE in float32, one cast back.
        query, key = attn.norm_q(query.float()), attn.norm_k(key.float())
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key = query.to(value.dtype), key.to(value.dtype)
        layout = self.runtime.call_layout()
        if hidden_states.shape[1] == layout.num_tokens:
            # No `layout=` here: only the call's own layout carries read_call's token order, which puts references
            # of another size in the text's span.
            out = self.runtime.attention(self.layer, query, key, value)
        else:  # an image mode block's call: the image alone, in the model's order
            image = VideoLayout(1, layout.height, layout.width)
            out = self.runtime.attention(self.layer, query, key, value, layout=image)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def row_major_grid(ids: torch.Tensor) -> tuple[int, int] | None:
    """`(rows, cols)` when `(N, 4)` ids `(t, h, w, l)` are one row-major grid (one t and one l, every pair of the
    distinct h and w values once, in order), whatever the spacing of h and w; else `None`."""
    rows, cols = torch.unique(ids[:, 1]), torch.unique(ids[:, 2])
    if len(rows) * len(cols) != ids.shape[0] or (ids[:, 0] != ids[0, 0]).any() or (ids[:, 3] != ids[0, 3]).any():
        return None
    return (len(rows), len(cols)) if torch.equal(ids[:, 1:3], torch.cartesian_prod(rows, cols)) else None


def reference_grids(ids: torch.Tensor) -> list[tuple[int, int] | None]:
    """Each reference image's grid (`row_major_grid`, or `None`), the references being the runs of equal `l`."""
    _, counts = torch.unique_consecutive(ids[:, 3], return_counts=True)
    return [row_major_grid(reference) for reference in ids.split(counts.tolist())]


class Flux3Adapter(ModelAdapter):
    transformer_classes = (Flux3Transformer2DModel,)
    family = "FLUX.3"
    original_processor = Flux3AttnProcessor
    sparse_processor = Flux3SparseAttnProcessor
    attention_name = "attn"

    def self_attention_modules(self, transformer):
        blocks = [*transformer.mode_blocks["image"], *transformer.single_transformer_blocks]
        for index, block in enumerate(blocks):
            yield index, block.attn

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 1)
        # The pipeline passes `t / 1000`; the scheduler's timesteps, which the step clock matches, are `t`.
        timestep = call_argument(args, kwargs, "timestep", 2) * 1000
        img_ids = call_argument(args, kwargs, "img_ids", 3)
        references = forward_input(transformer, args, kwargs, "image_cond_ids")
        img_ids = (img_ids[0] if img_ids.ndim == 3 else img_ids).float().cpu()
        if img_ids.shape[0] != hidden_states.shape[1]:
            # The transformer fails on it too (its RoPE does not fit the tokens): say which argument is wrong, not
            # that diffsparse cannot read a grid.
            raise ValueError(
                f"FLUX.3's `img_ids` holds {img_ids.shape[0]} positions for {hidden_states.shape[1]} image tokens "
                "(`hidden_states`); the transformer takes one `(t, h, w, l)` id per image token"
            )
        grid = row_major_grid(img_ids)
        if grid is None:
            raise ValueError(
                f"diffsparse reads the FLUX.3 image grid from `img_ids`, but these {hidden_states.shape[1]} image "
                "tokens are not one row-major grid, so this call is not supported: `diffsparse.remove(pipe)`"
            )
        text_len = encoder_hidden_states.shape[1]
        if references is None:
            return VideoLayout(1, *grid, text_len=text_len, text_position="start"), timestep
        references = (references[0] if references.ndim == 3 else references).float().cpu()
        grids = reference_grids(references)
        if all(g == grid for g in grids):
            return VideoLayout(1 + len(grids), *grid, text_len=text_len, text_position="start"), timestep
        layout = VideoLayout(1, *grid, text_len=text_len + references.shape[0], text_position="start")
        return layout, timestep, references_with_text(text_len, grid[0] * grid[1], references.shape[0])


register_adapter(Flux3Adapter())
