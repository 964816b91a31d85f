"""NucleusMoE-Image (`NucleusMoEImageTransformer2DModel`, `NucleusMoEImagePipeline`): a mixture-of-experts DiT where
the text only conditions. Each block's `attn` takes its queries from the image alone (Qwen-Image's packed 2 x 2
patches, row-major) and its keys and values from `[image, text]`, the prompt's padding masked as keys. Key order
does not change attention, so the sparse path hands the runtime the keys as `[text, image]`: the image's grid behind
the prompt as its leading span, attended with the image's queries alone (`video_queries`), padded prompt keys
dropped rather than masked. Several images in one sequence (`img_shapes`' nested form, as Qwen-Image's), all of
one size, are frames of the layout, as the model's RoPE numbers them. Images of different sizes in one sequence
(which diffusers runs, each image on its own grid) make no one grid, and each of them is queries: such calls run
the original processor, counted dense (`SparseRuntime.log_dense`: said once per `apply` where the settings would
have run them sparse); their layout (the first image's grid, the other images behind the prompt in the leading span)
only lets the step schedule decide first whether the call would have run sparse. Layer `i` is
`transformer_blocks[i].attn`.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.transformers.transformer_nucleusmoe_image import (
    NucleusMoEAttnProcessor2_0,
    NucleusMoEImageTransformer2DModel,
    _apply_rotary_emb_nucleus,
)

from ..patterns import VideoLayout
from .base import NOT_PROMPT_PADDING, ModelAdapter, SparseProcessor, call_argument, valid_key_groups
from .qwenimage import image_shapes
from .registry import register_adapter

# `SparseRuntime.log_dense`'s `why` for the calls whose sequence holds images of different sizes.
MIXED_SIZES = "images of different sizes in one sequence (`img_shapes`' nested form: their queries make no one grid)"


class NucleusMoESparseAttnProcessor(SparseProcessor, NucleusMoEAttnProcessor2_0):
    """`NucleusMoEAttnProcessor2_0` whose image rows run block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 cached_txt_key=None, cached_txt_value=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, cached_txt_key,
                    cached_txt_value)
        cached = cached_txt_key is not None and cached_txt_value is not None
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        if self.runtime.call_layout().num_video_tokens != hidden_states.shape[1]:
            # Images of different sizes (`read_call` laid out the first one's grid alone).
            self.runtime.log_dense(self.layer, why=MIXED_SIZES)
            return super().__call__(*original)
        if encoder_hidden_states is None and not cached:  # the image alone: not the call's layout
            self.runtime.log_dense(self.layer, why="keys and values of the image alone (no text, nor cached text: "
                                   "not the layout read_call described)")
            return super().__call__(*original)
        self.check_not_parallel()
        groups = None
        if attention_mask is not None:  # read before projecting: a mask of another kind runs the original
            image_len = hidden_states.shape[1]
            key_len = image_len + (cached_txt_key if cached else encoder_hidden_states).shape[1]
            groups = self.runtime.once_per_call(
                attention_mask, lambda mask: _text_first_key_groups(mask, image_len, key_len))
            if groups is False:
                self.log_dense_mask(NOT_PROMPT_PADDING)
                return super().__call__(*original)
        # The original's projections, norms, RoPE (on the image's q and k and the text's k) and grouped heads.
        head_dim = attn.inner_dim // attn.heads
        img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        img_key, img_value = (p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if img_freqs is not None:
            query, img_key = (_apply_rotary_emb_nucleus(x, img_freqs, use_real=False) for x in (query, img_key))
        if cached:
            txt_key, txt_value = cached_txt_key, cached_txt_value
        else:
            txt_key, txt_value = (p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                                  for p in (attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_k is not None:
                txt_key = attn.norm_added_k(txt_key)
            if txt_freqs is not None:
                txt_key = _apply_rotary_emb_nucleus(txt_key, txt_freqs, use_real=False)
        groups_of_heads = attn.heads // img_key.shape[2]
        key, value = (torch.cat([t, i], dim=1).repeat_interleave(groups_of_heads, dim=2)
                      for t, i in ((txt_key, img_key), (txt_value, img_value)))
        out = self.attend_video_queries(query, key, value, groups).flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def _text_first_key_groups(mask: torch.Tensor, image_len: int, key_len: int):
    """`valid_key_groups` of the `[text, image]` keys under a boolean `(B, image + text)` or `(B, 1, 1, image +
    text)` key mask of the model's `[image, text]` order (the one the transformer builds from
    `encoder_hidden_states_mask`: every image key valid, the prompt's padding not); `False` for a mask of another
    kind (a float or token-level one, passed through `attention_kwargs`), which the original applies and the sparse
    path cannot (it read them as this one: wrong results, or an error)."""
    rows = mask[:, 0, 0] if mask.ndim == 4 and mask.shape[1:3] == (1, 1) else mask
    if mask.dtype != torch.bool or rows.ndim != 2 or rows.shape[1] != key_len or not bool(rows[:, :image_len].all()):
        return False
    return valid_key_groups(torch.cat([rows[:, image_len:], rows[:, :image_len]], dim=1))


class NucleusMoEImageAdapter(ModelAdapter):
    transformer_classes = (NucleusMoEImageTransformer2DModel,)
    family = "NucleusMoE-Image"
    original_processor = NucleusMoEAttnProcessor2_0
    sparse_processor = NucleusMoESparseAttnProcessor
    attention_name = "attn"
    timestep_over_train_timesteps = True

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        shapes = call_argument(args, kwargs, "img_shapes", 1)
        text = call_argument(args, kwargs, "encoder_hidden_states", 2)
        # The pipeline passes `t / num_train_timesteps`: `t` as a share of them (`timestep_over_train_timesteps`).
        timestep = call_argument(args, kwargs, "timestep", 4)
        # The first sample's images (diffusers' RoPE reads only those): one shape, a list of one per sample, or
        # Qwen-Image's nested form, a list of a sample's images per sample.
        images = image_shapes([shapes] if isinstance(shapes, tuple) else shapes)
        tokens = hidden_states.shape[1]
        if sum(math.prod(shape) for shape in images) != tokens:
            raise ValueError(f"`img_shapes` {shapes} do not match the {tokens} image tokens of this call")
        (frames, rows, cols), others = images[0], images[1:]
        text_len = text.shape[1]
        if any(shape[1:] != (rows, cols) for shape in others):
            # Images of different sizes: the first one's grid, the others behind the prompt in the leading span. The
            # processor sees the grid is not all the image's queries and runs the original (`log_dense`), so the
            # schedule still decides first whether the call would have run sparse, and only such a call is said.
            layout = VideoLayout(frames, rows, cols, text_len=text_len + tokens - frames * rows * cols,
                                 text_position="start")
            return layout, timestep
        # Several images of one size: frames of one layout, as the model's RoPE numbers them.
        frames += sum(shape[0] for shape in others)
        return VideoLayout(frames, rows, cols, text_len=text_len, text_position="start"), timestep


register_adapter(NucleusMoEImageAdapter())
