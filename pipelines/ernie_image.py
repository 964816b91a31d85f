"""ERNIE-Image (`ErnieImageTransformer2DModel`, `ErnieImagePipeline`): a single-stream DiT over `[image, text]`,
the image's patches in row-major order then the prompts padded to the longest one. The model keeps its sequence
first (`(S, B, hidden)`) and hands each block's `self_attention` the batch-first view; the padding is masked as
keys, so each prompt's valid tokens end a valid prefix of the sequence. Layer `i` is `layers[i].self_attention`.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ernie_image import (
    ErnieImageSingleStreamAttnProcessor,
    ErnieImageTransformer2DModel,
)

from ..patterns import VideoLayout
from .base import (
    ModelAdapter,
    SparseProcessor,
    attend_valid_prefixes,
    boolean_key_rows,
    call_argument,
    prefix_lengths,
    project_qkv,
)
from .registry import register_adapter


def rotate_half_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """ERNIE-Image's RoPE on `(B, S, heads, head_dim)`: the first `angles.shape[-1]` dims rotated in halves (the
    second half against the first), the rest passed through, as its processor computes it."""
    rotated, passed = x[..., :angles.shape[-1]], x[..., angles.shape[-1]:]
    first, second = rotated.chunk(2, dim=-1)
    turned = torch.cat((-second, first), dim=-1)
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    return torch.cat((rotated * cos + turned * sin, passed), dim=-1)


class ErnieImageSparseAttnProcessor(SparseProcessor, ErnieImageSingleStreamAttnProcessor):
    """`ErnieImageSingleStreamAttnProcessor` whose self-attention runs block-sparse when the runtime says so, each
    prompt over its valid tokens; dense calls run the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, attention_mask=None, freqs_cis=None):
        original = (attn, hidden_states, attention_mask, freqs_cis)
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        self.check_not_parallel()
        length = hidden_states.shape[1]
        lengths = [length] * hidden_states.shape[0]
        if attention_mask is not None:
            # Every block of a call gets the same mask: read it once (a host sync on a GPU).
            lengths = self.runtime.once_per_call(attention_mask, read_valid_prefixes)
            if lengths is None:  # not the model's own mask of the prompts' padding: the original applies it
                self.runtime.log_dense(self.layer, why="an attention_mask other than the model's own mask of the "
                                       "prompts' padding (each row's valid prefix, the only kind the sparse path "
                                       "reads)")
                return super().__call__(*original)
        query, key, value = project_qkv(attn, hidden_states)
        if freqs_cis is not None:
            query, key = rotate_half_rope(query, freqs_cis), rotate_half_rope(key, freqs_cis)
        # A prompt's padding is masked as keys; its queries reach only its own (padding) outputs, which the model
        # drops: left at zero.
        out = attend_valid_prefixes(self.runtime, self.layer, query, key, value, lengths, padded_queries="zero")
        return attn.to_out[0](out.flatten(2, 3).to(query.dtype))


def read_valid_prefixes(mask: torch.Tensor) -> list[int] | None:
    """Each sample's valid prefix length under a boolean `(B, 1, 1, S)` key mask, or `None` for a mask of another
    kind."""
    keys = boolean_key_rows(mask)
    if keys is None:
        return None
    try:
        return prefix_lengths(keys)
    except ValueError:
        return None


class ErnieImageAdapter(ModelAdapter):
    transformer_classes = (ErnieImageTransformer2DModel,)
    family = "ERNIE-Image"
    original_processor = ErnieImageSingleStreamAttnProcessor
    sparse_processor = ErnieImageSparseAttnProcessor
    block_lists = ("layers",)
    attention_name = "self_attention"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        text = call_argument(args, kwargs, "text_bth", 2)
        patch = transformer.config.patch_size
        height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        return VideoLayout(1, height, width, text_len=text.shape[1], text_position="end"), timestep


register_adapter(ErnieImageAdapter())
