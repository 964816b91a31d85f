"""JoyImage Edit (`JoyImageEditTransformer3DModel`, `JoyImageEditPipeline`): double-stream blocks whose `attn`
attends `[image, text]` jointly, the image's latents patchified in 3D (frame-major). An edit passes the reference
images and the target as items of one `(B, n, C, T, H, W)` tensor, all of one size, which the model lays out along
time with the target first: the target is layout frame 0 and each reference a further frame, so a pattern's
temporal reach decides how far into the references each token looks. The prompt, unmasked, is the trailing span.
Layer `i` is `double_blocks[i].attn`.

JoyImage Edit Plus (`JoyImageEditPlusTransformer3DModel`, `JoyImageEditPlusPipeline`): the same blocks over
`[target, references, padding, text]` rows of patches built by the pipeline (`shape_list` gives each item's grid),
references of any size, the padding and the prompt's padding masked as keys. References of the target's size are
further frames; if any has another size, all of them join the text in the trailing span. Each row is attended over
its valid keys (rows with the same mask together).
"""

from __future__ import annotations

import math

import torch
from diffusers.models.transformers.transformer_joyimage import (
    JoyImageAttnProcessor,
    JoyImageEditTransformer3DModel,
    _apply_rotary_emb,
)
from diffusers.models.transformers.transformer_joyimage_edit_plus import (
    JoyImageEditPlusAttnProcessor,
    JoyImageEditPlusTransformer3DModel,
    _apply_rotary_emb_batched,
)

from ..patterns import VideoLayout
from .base import (
    ModelAdapter,
    SparseProcessor,
    attend_kept_tokens,
    boolean_key_rows,
    call_argument,
    patched_grid,
    valid_key_groups,
)
from .registry import register_adapter


def stream_qkv(attn, x: torch.Tensor, stream: str, rotary=None, rope=_apply_rotary_emb):
    """`(query, key, value)` of one stream (`"img"` or `"txt"`) as `(B, S, heads, head_dim)`: its fused projection,
    q/k norms and RoPE (`rope(query, key, rotary)`), as `JoyImageAttnProcessor` computes them."""
    query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in getattr(attn, f"{stream}_attn_qkv")(x).chunk(3, -1))
    query, key = getattr(attn, f"{stream}_attn_q_norm")(query), getattr(attn, f"{stream}_attn_k_norm")(key)
    if rotary is not None:
        query, key = rope(query, key, rotary)
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


class JoyImageEditPlusSparseAttnProcessor(SparseProcessor, JoyImageEditPlusAttnProcessor):
    """`JoyImageEditPlusAttnProcessor` whose joint attention runs block-sparse when the runtime says so, each row over
    its valid keys; dense calls run the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, attention_mask=None):
        original = (attn, hidden_states, encoder_hidden_states, image_rotary_emb, attention_mask)
        if encoder_hidden_states is None or not self.runtime.route(self.layer):
            return super().__call__(*original)  # the original's error, or a dense call
        self.check_not_parallel()
        groups = None
        if attention_mask is not None:
            # Every block of a call gets the same mask: read it once (a host sync on a GPU).
            groups = self.runtime.once_per_call(attention_mask, read_key_mask)
            if groups is False:
                self.runtime.log_dense(self.layer, why="an attention_mask other than a boolean (B, 1, 1, S) key mask "
                                       "(the only kind the sparse path reads)")
                return super().__call__(*original)
        image = stream_qkv(attn, hidden_states, "img", image_rotary_emb, rope=_apply_rotary_emb_batched)
        text = stream_qkv(attn, encoder_hidden_states, "txt")
        query, key, value = (torch.cat(pair, dim=1) for pair in zip(image, text))
        if groups is None:
            out = self.runtime.attention(self.layer, query, key, value)
        else:
            out = attend_kept_tokens(self.runtime, self.layer, query, key, value, groups)
        image_out, text_out = out.flatten(2, 3).to(query.dtype).split(
            [hidden_states.shape[1], encoder_hidden_states.shape[1]], dim=1)
        return attn.img_attn_proj(image_out), attn.txt_attn_proj(text_out)


def read_key_mask(mask: torch.Tensor):
    """`valid_key_groups` of a boolean `(B, 1, 1, S)` key mask, or `False` for a mask of another kind."""
    keys = boolean_key_rows(mask)
    return False if keys is None else valid_key_groups(keys)


class JoyImageEditPlusAdapter(ModelAdapter):
    transformer_classes = (JoyImageEditPlusTransformer3DModel,)
    family = "JoyImage Edit Plus"
    original_processor = JoyImageEditPlusAttnProcessor
    sparse_processor = JoyImageEditPlusSparseAttnProcessor
    block_lists = ("double_blocks",)
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        patches = call_argument(args, kwargs, "hidden_states", 0)  # (B, max patches, C, pt, ph, pw)
        timestep = call_argument(args, kwargs, "timestep", 1)
        text = call_argument(args, kwargs, "encoder_hidden_states", 2)
        shape_list = call_argument(args, kwargs, "shape_list", 4)
        shapes = [tuple(shape) for shape in shape_list[0]]
        if any([tuple(shape) for shape in sample] != shapes for sample in shape_list):
            raise ValueError(
                "diffsparse attends a JoyImage Edit Plus batch on one layout: every sample needs the same target and "
                f"reference sizes (`shape_list`), got {shape_list}; call the pipeline once per set of sizes"
            )
        (frames, height, width), references = shapes[0], shapes[1:]
        trailing = patches.shape[1] - sum(math.prod(shape) for shape in shapes) + text.shape[1]  # padding, text
        if all(shape[1:] == (height, width) for shape in references):
            frames += sum(shape[0] for shape in references)
        else:  # references of another size join the padding and the text
            trailing += sum(math.prod(shape) for shape in references)
        return VideoLayout(frames, height, width, text_len=trailing, text_position="end"), timestep


register_adapter(JoyImageAdapter())
register_adapter(JoyImageEditPlusAdapter())
