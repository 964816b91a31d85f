"""FLUX.1 (`FluxTransformer2DModel`): text-to-image, the Fill / Control variants (extra channels, same tokens), and
Kontext (image editing).

Images are one frame: the layout is `VideoLayout(1, h, w)` over the packed 2x2 latent patches in row-major
order, read from `img_ids`, with the text tokens first. Both kinds of block attend over `[text, image]`: the
dual-stream blocks get the text apart (`encoder_hidden_states`) and join it, the single-stream blocks get the
joined sequence. RoPE covers the whole joint sequence, as in the original. FLUX.1 Kontext appends the reference
image's tokens (their first id 1): when the reference has the output's size, the two images are two frames of
one layout (the reference is frame 1, so a pattern's temporal reach decides how far into it each token looks).
A reference of another size cannot be a frame: its tokens join the text in the layout's leading span, kept whole
(every image token attends all of them, and they attend everything), through the runtime's token order
(`[text, image, references]` attended as `[text, references, image]`). Image tokens that start with no full grid
of the output raise a `ValueError` rather than run on a wrong layout.
"""

from __future__ import annotations

import warnings

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from .. import DiffsparseWarning, outside_stacklevel
from ..patterns import VideoLayout
from .base import (
    ModelAdapter,
    SparseProcessor,
    call_argument,
    context_parallel_config,
    project_joint_output,
    references_with_text,
)
from .registry import register_adapter


def joint_qkv(attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, projections=_get_qkv_projections):
    """`(query, key, value)` over `[text, image]` as `(B, S, heads, head_dim)`: `FluxAttnProcessor`'s arithmetic
    (q/k norms per stream, RoPE over the joint sequence), also FLUX.2's dual-stream one with its own `projections`."""
    query, key, value, encoder_query, encoder_key, encoder_value = projections(attn, hidden_states, encoder_hidden_states)
    # By the head dim, not the head count (under tensor parallelism the projections hold this process's heads); the
    # plain `Attention` of some single-stream blocks (Bria FIBO's) knows only its inner dim and heads.
    head_dim = getattr(attn, "head_dim", None) or attn.inner_dim // attn.heads
    query, key, value = (x.unflatten(-1, (-1, head_dim)) for x in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        encoder_query, encoder_key, encoder_value = (
            x.unflatten(-1, (-1, head_dim)) for x in (encoder_query, encoder_key, encoder_value)
        )
        encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
        query, key, value = (
            torch.cat(pair, dim=1) for pair in ((encoder_query, query), (encoder_key, key), (encoder_value, value))
        )
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def mask_fits(mask: torch.Tensor | None, batch: int, tokens: int) -> bool:
    """Whether attention applies a `mask` read as the prompts' padding (`prompt_padding`) to a call of `batch` videos
    over `tokens` keys as the sparse path attends it: one row or one per video, one entry per key (or no mask). A
    mask of other rows (2 for 4 videos) or keys leaves the call to the original processor, which refuses it."""
    return mask is None or (mask.shape[0] in (1, batch) and mask.shape[-1] == tokens)


class DenseMaskWarning:
    """Mixin of a sparse processor that leaves the calls with some attention masks to the original processor
    (FLUX's, Chroma's): `_warn_dense_mask` says so, naming the family (`mask_family`), once per `apply`."""

    mask_family = "FLUX"

    def _warn_dense_mask(self, mask: torch.Tensor, why: str) -> None:
        # Asked once per transformer call (`once_per_call`) by the first layer to see the mask (by every layer where
        # each block makes its own, as Chroma's do), said once per `apply` (the flag on the runtime all its layers
        # share): the mask comes with every call, and a run gone wholly dense would show only as a missing speedup.
        if getattr(self.runtime, "_warned_dense_mask", False):
            return
        self.runtime._warned_dense_mask = True
        warnings.warn(
            f"diffsparse: {self.runtime.name}: {self.mask_family} self-attention calls with this attention_mask (shape "
            f"{tuple(mask.shape)}, {mask.dtype}) run the original processor (dense, counted dense in stats()) {why}",
            category=DiffsparseWarning,
            stacklevel=outside_stacklevel(),
        )

    def log_dense_mask(self, why: str) -> None:
        """Log this call dense for its mask without `runtime.log_dense`'s warning: `_warn_dense_mask` said why."""
        self.runtime.log_dense(self.layer, why=None)


class PromptMaskedJoint(DenseMaskWarning):
    """Mixin of the sparse processors of FLUX.1 and FLUX.2, whose callers may pass a mask through
    `joint_attention_kwargs={"attention_mask": ...}`: a boolean key mask of the prompt's padding is attended as the
    FLUX copies attend it (`FluxCopyAttention`); a mask of another kind, or any mask under context parallelism,
    runs the original processor, counted dense, said once (`DenseMaskWarning`); so does a mask whose rows or keys
    do not fit the call (`mask_fits`), for the original to refuse it."""

    def attend_masked_joint(self, attention_mask, qkv) -> torch.Tensor | None:
        """The `(B, S, heads * head_dim)` self-attention output of this `[text, image]` call, its query, key and
        value from `qkv()`, or `None` where the call runs the original processor (the runtime's schedule, or a mask
        as above)."""
        if attention_mask is not None and context_parallel_config(self) is not None:
            # Each rank holds a share of the sequence: the mask is not read against it.
            why = "under context parallelism"
            self.runtime.once_per_call(attention_mask, lambda mask: self._warn_dense_mask(mask, why))
            self.stays_dense(attention_mask)
            return None
        if not self.runtime.route(self.layer):
            return None
        text_len = self.runtime.call_text_tokens()
        valid = self.prompt_padding(attention_mask, text_len)
        if valid is False:
            return None
        query, key, value = qkv()
        if not mask_fits(attention_mask, *query.shape[:2]):
            return None  # the original raises its own error
        if valid:
            out = self.attend_prompts(query, key, value, valid, text_len)
        else:
            out = self.attend_joint(query, key, value)
        return out.flatten(2, 3).to(query.dtype)

    def read_prompt_mask(self, mask: torch.Tensor, text_len: int) -> list | None:
        valid = super().read_prompt_mask(mask, text_len)
        if valid is None:
            self._warn_dense_mask(mask, "as it is not a boolean (B, 1, 1, S) key mask of the prompt's padding")
        return valid


class FluxSparseAttnProcessor(PromptMaskedJoint, SparseProcessor, FluxAttnProcessor):
    """`FluxAttnProcessor` whose joint self-attention runs block-sparse when the runtime says so, a caller's mask
    as `PromptMaskedJoint` says.

    Dense calls go to the original `__call__` unchanged, so they are bit-identical to it (except the calls that
    measure `SparseConfig.correction`'s statistics: dense through diffsparse's kernel).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out = self.attend_masked_joint(
            attention_mask, lambda: joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb))
        if out is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            return out
        return project_joint_output(attn, out, hidden_states.shape[1], text_first=True)


class FluxCopyAttention(SparseProcessor):
    """The sparse path of a family's own copy of `FluxAttnProcessor` (LongCat-Image, Ovis-Image, Bria 3.2 and FIBO),
    placed before the copy's class, whose `__call__` stays the dense path; `projections`: the copy's module's
    `_get_qkv_projections`. A boolean key mask that masks each prompt's padding (Bria FIBO's, for prompts of
    different lengths in one call, wherever the tokenizer pads) leaves the padding out, prompts with the same mask
    together; a mask of another kind runs the original, counted dense (Chroma reads and attends its own mask:
    `read_prompt_mask`, `attend_prompts`), as does one whose rows or keys do not fit the call (`mask_fits`), for the
    original to refuse it. The families have no diffusers context parallel plan."""

    context_parallel = False
    projections = staticmethod(_get_qkv_projections)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        self.check_not_parallel()
        text_len = self.runtime.call_text_tokens()
        valid = self.prompt_padding(attention_mask, text_len)
        tokens = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        if valid is False or not mask_fits(attention_mask, hidden_states.shape[0], tokens):
            return super().__call__(*original)  # computes the mask, or raises its own error
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.projections)
        out = self.attend_prompts(query, key, value, valid, text_len).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        return project_joint_output(attn, out, hidden_states.shape[1], text_first=True)


def image_grid(img_ids: torch.Tensor) -> tuple[int, int, int] | None:
    """`(frames, rows, cols)` when `img_ids` (`(N, 3)` for FLUX.1, `(N, 4)` for FLUX.2, or with a batch dim) is
    `frames` full row-major grids of one size, each with one first id, increasing from frame to frame (FLUX's own
    image is frame 0; Kontext's reference image has first id 1, FLUX.2's references 10, 20, ...; VisualCloze numbers
    its rows of images, each row one grid, from 1), and any later id (FLUX.2's layer) zero; else `None`."""
    ids = (img_ids[0] if img_ids.ndim == 3 else img_ids).round().long().cpu()
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if ids.shape[0] % (rows * cols):
        return None
    frames = ids.shape[0] // (rows * cols)
    per_frame = ids[:, 0].reshape(frames, rows * cols)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1).reshape(-1, 2)
    one_grid = torch.equal(ids[:, 1:3], grid.repeat(frames, 1)) and not ids[:, 3:].any()
    increasing = (per_frame == per_frame[:, :1]).all() and (per_frame[1:, 0] > per_frame[:-1, 0]).all()
    return (frames, rows, cols) if one_grid and increasing and per_frame[0, 0] >= 0 else None


def output_grid_and_references(img_ids: torch.Tensor) -> tuple[tuple[int, int], int] | None:
    """`((rows, cols), references)` when `img_ids` start with the output image's full row-major grid (first id 0)
    followed by `references` tokens of reference images (first ids above 0, any sizes); else `None`."""
    ids = (img_ids[0] if img_ids.ndim == 3 else img_ids).round().long().cpu()
    later = (ids[:, 0] != 0).nonzero()
    output = int(later[0]) if len(later) else ids.shape[0]
    grid = image_grid(ids[:output]) if output else None
    if grid is None or grid[0] != 1 or not (ids[output:, 0] > 0).all():
        return None
    return grid[1:], ids.shape[0] - output


class FluxAdapter(ModelAdapter):
    transformer_classes = (FluxTransformer2DModel,)
    family = "FLUX"
    original_processor = FluxAttnProcessor
    sparse_processor = FluxSparseAttnProcessor
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    attention_name = "attn"

    # Where `forward` takes them when given by position (FLUX.2 has no `pooled_projections` before `timestep`).
    timestep_position, img_ids_position = 3, 4
    # The pipelines pass `t / timestep_scale`; the scheduler's timesteps, which the step clock matches, are `t`.
    timestep_scale = 1000

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", self.timestep_position)
        img_ids = self.flux_ids(call_argument(args, kwargs, "img_ids", self.img_ids_position))
        text_len, tokens = encoder_hidden_states.shape[1], hidden_states.shape[1]
        timestep = timestep * self.timestep_scale
        grid = image_grid(img_ids)
        if grid is not None and grid[0] * grid[1] * grid[2] == tokens:
            return VideoLayout(*grid, text_len=text_len, text_position="start"), timestep
        split = output_grid_and_references(img_ids)
        if split is None or split[0][0] * split[0][1] + split[1] != tokens:
            raise ValueError(
                f"diffsparse reads the {self.family} image grid from `img_ids`, but these {tokens} image tokens do "
                "not start with a row-major grid of the output image, so this call is not supported: "
                "`diffsparse.remove(pipe)`"
            )
        (rows, cols), references = split
        layout = VideoLayout(1, rows, cols, text_len=text_len + references, text_position="start")
        return layout, timestep, references_with_text(text_len, rows * cols, references)

    def flux_ids(self, img_ids: torch.Tensor) -> torch.Tensor:
        """The image ids in FLUX.1's convention (the generated image's first id 0, references' above, rows and
        columns from 0): as they are here; a family that numbers them otherwise maps them (LongCat-Image)."""
        return img_ids


register_adapter(FluxAdapter())
