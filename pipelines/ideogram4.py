"""Ideogram 4 (`Ideogram4Transformer2DModel`, `Ideogram4Pipeline`): a single-stream DiT over one packed sequence per
row, `[left padding, text, image]` as the pipeline builds it, the image's patches in row-major order last. Each
block's `attention` applies a block-diagonal mask from the rows' segment ids: the padding attends only itself, text
and image attend each other. The sparse path attends each row's text and image on the layout (`[text, image]`,
the text the leading span, kept whole), rows with the same padding together, and leaves the padding's outputs,
which the model never reads, at zero. The pipeline's unconditional transformer (the image alone) is a second
model of the class: sparse the same way. Layer `i` is `layers[i].attention`.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ideogram4 import (
    OUTPUT_IMAGE_INDICATOR,
    Ideogram4AttnProcessor,
    Ideogram4Transformer2DModel,
    _rotate_half,
)

from ..patterns import VideoLayout
from .base import (
    ModelAdapter,
    SparseProcessor,
    attend_kept_tokens,
    call_argument,
    half_precision,
    valid_key_groups,
)
from .registry import register_adapter


def segment_groups(mask: torch.Tensor, text_len: int):
    """`valid_key_groups` of the text-and-image segment of each row under a `(B, 1, S, S)` boolean segment mask, or
    `False` for a mask of another kind (several segments of text and image, an image token outside the segment):
    the original applies it."""
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1:
        return False
    valid = mask[:, 0, -1]  # the last image token's row: its segment
    if not valid[:, text_len:].all() or not torch.equal(mask[:, 0], valid[:, :, None] == valid[:, None, :]):
        return False
    return valid_key_groups(valid)


class Ideogram4SparseAttnProcessor(SparseProcessor, Ideogram4AttnProcessor):
    """`Ideogram4AttnProcessor` whose self-attention runs block-sparse when the runtime says so, each row over its
    text and image; dense calls run the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, attention_mask, image_rotary_emb):
        original = (attn, hidden_states, attention_mask, image_rotary_emb)
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        self.check_not_parallel()
        groups = None
        if attention_mask is not None:
            text_len = self.runtime.call_layout().text_len
            # Every block of a call gets the same mask: read it once (a host sync on a GPU).
            groups = self.runtime.once_per_call(attention_mask, lambda mask: segment_groups(mask, text_len))
            if groups is False:
                self.runtime.log_dense(self.layer, why="an attention_mask other than one text-and-image segment per "
                                       "row (a boolean (B, 1, S, S) segment mask, the only kind the sparse path reads)")
                return super().__call__(*original)
        query, key, value = (p(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))
                             for p in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        cos, sin = (x.unsqueeze(2) for x in image_rotary_emb)
        query, key = (x * cos + _rotate_half(x) * sin for x in (query, key))
        if groups is None:
            out = self.runtime.attention(self.layer, query, key, value)
        else:
            out = attend_kept_tokens(self.runtime, self.layer, query, key, value, groups)
        return attn.to_out[0](out.flatten(2, 3))


class Ideogram4Adapter(ModelAdapter):
    transformer_classes = (Ideogram4Transformer2DModel,)
    family = "Ideogram 4"
    original_processor = Ideogram4AttnProcessor
    sparse_processor = Ideogram4SparseAttnProcessor
    block_lists = ("layers",)
    attention_name = "attention"
    timestep_over_train_timesteps = True

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        positions = call_argument(args, kwargs, "position_ids", 3)
        indicator = call_argument(args, kwargs, "indicator", 5)
        image = indicator == OUTPUT_IMAGE_INDICATOR
        tokens = int(image[0].sum())
        length = hidden_states.shape[1]
        if not image[:, length - tokens:].all() or image[:, :length - tokens].any():
            raise ValueError("diffsparse runs Ideogram 4 on the pipeline's packing, each row's image tokens last; got "
                             "image tokens elsewhere (`indicator`)")
        rows, cols = (positions[0, length - tokens:, axis] for axis in (1, 2))
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        grid = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"), -1).flatten(0, 1)
        if height * width != tokens or not torch.equal(
            torch.stack([rows - rows.min(), cols - cols.min()], -1).cpu(), grid
        ):
            raise ValueError("diffsparse runs Ideogram 4 on a row-major image grid (`position_ids`); got another order")
        layout = VideoLayout(1, height, width, text_len=length - tokens, text_position="start")
        # The pipeline passes `1 - t / num_train_timesteps` (per sample, or per token); the scheduler's timesteps
        # are `t`: this gives `t / num_train_timesteps`, which the step clock scales by its scheduler's count
        # (`timestep_over_train_timesteps`). Read back in float32: the modular pipeline passes it in the
        # transformer's dtype, where `1 - timestep` there rounds `t` again (bfloat16: 4 apart near 1000, more than
        # the gaps of the 2048 x 2048 schedule there, so 48 steps read step 11 as 12). The pipeline's rounding goes
        # with it, for the step clock to match the scheduler's timesteps within (`StepClock.tick`).
        read = 1 - timestep.float()
        if half_precision(timestep):
            read.diffsparse_rounding = torch.finfo(timestep.dtype).eps * float(timestep.abs().max())
        return layout, read


register_adapter(Ideogram4Adapter())
