"""Qwen-Image (`QwenImageTransformer2DModel`): text-to-image and editing with reference images.

Every block's `attn` is joint self-attention over `[text, image]` (`QwenDoubleStreamAttnProcessor2_0`: the text
through `add_*_proj`, RoPE on both streams). Images are frames of one layout over the packed 2x2 latent patches
in row-major order, read from the transformer's `img_shapes`: the generated image is frame 0 and reference images
of its size (Qwen-Image-Edit) further frames; references of another size join the text in the layout's leading
span, kept whole, through the runtime's token order (`[text, image, references]` attended as
`[text, references, image]`). The pipelines pass `t / 1000` as the timestep, scaled back for the step schedule.

The text mask (`encoder_hidden_states_mask`) masks prompt padding as keys. A call whose prompts all use every text
token (one prompt per call, as the pipelines make CFG's two calls) runs on the call's layout; a batch of prompts of
different lengths has padding between each prompt's valid text and the image: each prompt is attended without its
padding (prompts of equal length together), on the layout with its own text span. A caller's mask whose valid text
is not leading (left-padded `prompt_embeds` with their `prompt_embeds_mask`; diffusers reads such masks "without
assuming contiguous masks") is attended the same way, each prompt without its masked tokens wherever they lie
(prompts with the same mask together): exact, since RoPE (on the text too) is applied before the tokens are picked
and every pattern keeps the text span whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenImageTransformer2DModel,
    apply_rotary_emb_qwen,
)

from ..patterns import VideoLayout
from .base import (
    ModelAdapter,
    SparseProcessor,
    attend_kept_tokens,
    attend_without_text_padding,
    call_argument,
    prefix_lengths,
    project_joint_output,
    project_qkv,
    references_with_text,
    valid_key_groups,
)
from .registry import register_adapter


def joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None):
    """`(query, key, value)` over `[text, image]` as `(B, S, heads, head_dim)`: the arithmetic of
    `QwenDoubleStreamAttnProcessor2_0` (per-head q/k norms per stream, complex RoPE on both)."""
    image = project_qkv(attn, hidden_states)
    text = project_qkv(attn, encoder_hidden_states, added=True)
    if image_rotary_emb is not None:
        image_freqs, text_freqs = image_rotary_emb
        image = (*(apply_rotary_emb_qwen(x, image_freqs, use_real=False) for x in image[:2]), image[2])
        text = (*(apply_rotary_emb_qwen(x, text_freqs, use_real=False) for x in text[:2]), text[2])
    return tuple(torch.cat(pair, dim=1) for pair in zip(text, image))


def _valid_text(mask: torch.Tensor, length: int) -> list[int] | list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompts' valid text under the `(B, text)` `mask`, in a `[text, image]` sequence of `length` tokens: each
    prompt's valid text length (`attend_without_text_padding`'s `lengths`) when its valid tokens are a prefix of its
    text, else `valid_key_groups`' `[(prompts, their valid key indices), ...]` (`attend_kept_tokens`'s `groups`)."""
    try:
        return prefix_lengths(mask, name="encoder_hidden_states_mask")
    except ValueError:
        return valid_key_groups(F.pad(mask.bool(), (0, length - mask.shape[1]), value=True))


class QwenImageSparseAttnProcessor(SparseProcessor, QwenDoubleStreamAttnProcessor2_0):
    """`QwenDoubleStreamAttnProcessor2_0` whose joint self-attention runs block-sparse when the runtime says so;
    dense calls run the original `__call__` unchanged."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        original = (attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                    image_rotary_emb)
        if encoder_hidden_states is None or self.stays_dense(attention_mask):
            return super().__call__(*original)
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        text_len = self.runtime.call_text_tokens()  # the whole call's (under context parallelism, a rank holds 1/n)
        length = self.runtime.call_layout().num_tokens  # likewise
        # Every layer of a call gets the same mask: read it once (on a GPU each read is a host sync).
        valid = [text_len] * query.shape[0] if encoder_hidden_states_mask is None else self.runtime.once_per_call(
            encoder_hidden_states_mask, lambda mask: _valid_text(self.whole_sequence(mask, text_len), length)
        )
        attend = None
        if not isinstance(valid[0], int):  # valid text that is not a prefix (a caller's left-padded prompt_embeds)
            def attend(q, k, v, heads=None):
                return attend_kept_tokens(self.runtime, self.layer, q, k, v, valid, heads)
        elif set(valid) != {text_len}:  # prompt padding (the pipelines make CFG's two calls one prompt each: none)
            def attend(q, k, v, heads=None):
                return attend_without_text_padding(self.runtime, self.layer, q, k, v, valid, text_len, heads)
        out = self.attend_joint(query, key, value, attend=attend)
        return project_joint_output(attn, out.flatten(2, 3).to(query.dtype), hidden_states.shape[1], text_first=True)


def image_shapes(img_shapes) -> list[tuple[int, int, int]]:
    """The first sample's `(frames, rows, cols)` per image from the transformer's `img_shapes` (a list per sample,
    or one list of shapes): every sample of a batch has the same images."""
    first = img_shapes[0]
    shapes = [first] if isinstance(first[0], int) else list(first)
    return [tuple(int(n) for n in shape) for shape in shapes]


class QwenImageAdapter(ModelAdapter):
    transformer_classes = (QwenImageTransformer2DModel,)
    family = "Qwen-Image"
    original_processor = QwenDoubleStreamAttnProcessor2_0
    sparse_processor = QwenImageSparseAttnProcessor
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        text_len = call_argument(args, kwargs, "encoder_hidden_states", 1).shape[1]
        # The pipelines pass `t / 1000`; the scheduler's timesteps, which the step clock matches, are `t`.
        timestep = call_argument(args, kwargs, "timestep", 3) * 1000
        shapes = image_shapes(call_argument(args, kwargs, "img_shapes", 4))
        (frames, rows, cols), references = shapes[0], shapes[1:]
        tokens = hidden_states.shape[1]
        if sum(math.prod(shape) for shape in shapes) != tokens:
            raise ValueError(f"`img_shapes` {shapes} do not add up to the {tokens} image tokens of this call")
        if all(shape[1:] == (rows, cols) for shape in references):
            frames += sum(shape[0] for shape in references)
            return VideoLayout(frames, rows, cols, text_len=text_len, text_position="start"), timestep
        # References of another size join the text's span.
        image_len = frames * rows * cols
        layout = VideoLayout(frames, rows, cols, text_len=text_len + tokens - image_len, text_position="start")
        return layout, timestep, references_with_text(text_len, image_len, tokens - image_len)


register_adapter(QwenImageAdapter())
