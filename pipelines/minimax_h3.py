"""MiniMax-H3 (`MiniMaxH3Transformer3DModel`; diffusers' modular `MiniMaxH3ModularPipeline`, with a `transformer` and a
`transformer_ref` for its reference workflow): joint video and audio generation over one packed sequence, text,
audio, conditioning and target video rows in any order, with full self-attention and 3D RoPE over every row's
`(t, h, w)` rotary position.

The layout: the target video (the video rows at the highest noise level) is the grid, read from its rows'
positions (ranked per axis: the pipeline's are floats, times spaced unevenly), which must cover a whole
`(t, h, w)` box; every other row (text, audio, conditioning images or video) joins the leading span, kept whole.
The runtime attends the rows in that order through its token order and hands the output back in the caller's.
A call that packs no video rows (text and audio only, a caller's own packing) has no layout: it runs the original
throughout, each layer counted dense without a warning (nothing sparse is lost), and takes no place among its
step's calls (`stats()` names it `"original"` outside a `cache_context`); so does a call the transformer refuses (a
`timestep` not 1-D, an index out of range), for it to raise its own error. So does, with a warning, a call whose
target is not told apart: the pipeline holds its conditioning video at `max(t, 0.999)`, so from t = 0.999 on (a
schedule's last steps where its final sigmas are under 0.001) those rows tie with the target, and the tied rows need
not be one box (the first keyframe sits on the target's first frame). Target rows listed twice in `video_indices`
are refused (`ValueError`). Layer `i` is `transformer_blocks[i].attn` (the text refiner's attention stays dense).
"""

from __future__ import annotations

import warnings

import torch
from diffusers.models.transformers.transformer_minimax_h3 import (
    MiniMaxH3AttnProcessor,
    MiniMaxH3Transformer3DModel,
    _apply_rotary_emb,
)

from .. import DiffsparseWarning, outside_stacklevel
from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, forward_input
from .registry import register_adapter


class MiniMaxH3SparseAttnProcessor(SparseProcessor, MiniMaxH3AttnProcessor):
    """`MiniMaxH3AttnProcessor` whose self-attention runs block-sparse when the runtime says so; dense calls run the
    original `__call__` unchanged."""

    def __call__(self, attn, hidden_states, rotary_emb=None, attention_mask=None):
        if self.stays_dense(attention_mask):  # the model passes no mask; a caller's is the original's to apply
            return super().__call__(attn, hidden_states, rotary_emb, attention_mask)
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if rotary_emb is not None:
            query, key = _apply_rotary_emb(query, *rotary_emb), _apply_rotary_emb(key, *rotary_emb)
        out = self.attend_video(query, key, value)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


class MiniMaxH3Adapter(ModelAdapter):
    transformer_classes = (MiniMaxH3Transformer3DModel,)
    family = "MiniMax-H3"
    original_processor = MiniMaxH3AttnProcessor
    sparse_processor = MiniMaxH3SparseAttnProcessor
    attention_name = "attn"
    timesteps_rise = True

    def read_call(self, transformer, args, kwargs):
        timestep, timestep_indices, positions, video_rows = (
            forward_input(transformer, args, kwargs, name)
            for name in ("timestep", "timestep_indices", "position_ids", "video_indices"))
        if not _rows_fit(timestep, timestep_indices, positions, video_rows):
            # The transformer refuses the call (an argument left out, a `timestep` not 1-D, which its time embedding
            # asserts, indices out of its AdaLN tables' range): no layout, so the original runs and raises its own
            # error, not an IndexError of this read.
            return None, _lowest_timestep(timestep)
        video_rows = video_rows.reshape(-1)  # `index_copy` takes one video row as a 0-d index too
        if len(video_rows) == 0:
            # No video rows (text and audio only, a caller's own packing): nothing to make sparse. No layout, so the
            # call runs the original throughout (each layer counted dense, unsaid) and takes no place among its
            # step's calls; its step is its noisiest rows' (the lowest timestep), as a target's would be.
            rows = timestep[timestep_indices]
            if rows.numel() or timestep.numel():
                return None, rows.min() if rows.numel() else timestep.min()  # an empty sequence: its timesteps
            # No value would be neutral for the step clock: 0 after higher timesteps starts a new run of a bare loop.
            raise ValueError(
                "diffsparse: this MiniMax-H3 call packs no rows and passes an empty `timestep` (shape (0,)), so it "
                "has no denoising step for diffsparse's step schedule; pass the step's timestep (the transformer "
                "reads none with no rows) or skip the empty call"
            )
        # The target: the video rows at the highest noise level, the lowest timestep (MiniMax-H3's timestep is
        # `1 - sigma`: conditioning rows, cleaner, sit higher).
        row_timesteps = timestep[timestep_indices[video_rows]]
        target = video_rows[row_timesteps == row_timesteps.min()]
        step_time = row_timesteps.min()
        # Every video row at one timestep from t = 0.999 on: the pipeline holds its conditioning video at
        # `max(t, 0.999)`, so there it ties with the target and the rows at the lowest timestep are both (the first
        # keyframe on the target's first frame's cells, references beside them).
        tied = bool(step_time >= _CONDITIONING_TIMESTEP and (row_timesteps == step_time).all())
        values, counts = torch.unique(target, return_counts=True)
        if len(values) != len(target) and not tied:
            # A target row would take two cells of the layout. (A conditioning row listed twice is the original's
            # to run: it stays one row of the leading span.)
            raise ValueError(
                f"diffsparse: MiniMax-H3's `video_indices` lists rows {values[counts > 1].tolist()[:8]} of the target "
                "video (the rows at the lowest timestep) more than once; each may be listed once (one "
                "`hidden_states` row per index)"
            )
        # Each axis's coordinates ranked: the pipeline's rotary positions are not integers (times spaced unevenly,
        # rows and columns centred and scaled), only ordered.
        ranks = (torch.unique(axis, return_inverse=True) for axis in positions[target].unbind(-1))
        (frames, t), (height, h), (width, w) = ((len(values), index) for values, index in ranks)
        cells = (t * height + h) * width + w
        if frames * height * width != len(target) or len(torch.unique(cells)) != len(target):
            # Tied (above), nothing tells the target apart: the call runs the original (counted dense), said, as a
            # step planned sparse runs dense. A target that is not one box beside rows at another timestep is
            # refused below.
            if tied:
                warnings.warn(
                    f"diffsparse: MiniMax-H3's conditioning video ties with the target at timestep "
                    f"{float(step_time):.4g} (held at {_CONDITIONING_TIMESTEP} or the target's, if higher), so the "
                    "target cannot be told apart: this call runs the original attention (dense, counted dense in "
                    "stats())",
                    DiffsparseWarning, stacklevel=outside_stacklevel(),
                )
                return None, step_time
            raise ValueError(
                f"diffsparse reads MiniMax-H3's target video (the {len(target)} video rows at the highest noise "
                f"level) as a grid, but their positions do not cover one whole (t, h, w) box (they take {frames} x "
                f"{height} x {width} distinct values); pack the target as a full grid of positions"
            )
        length = positions.shape[0]
        text_len = length - len(target)
        # Each row's index in the layout: the other rows first, in the caller's order, then the target's cells.
        order = torch.empty(length, dtype=torch.long, device=positions.device)
        others = torch.ones(length, dtype=torch.bool, device=positions.device)
        others[target] = False
        order[others] = torch.arange(text_len, device=positions.device)
        order[target] = text_len + cells
        layout = VideoLayout(frames, height, width, text_len=text_len, text_position="start")
        # The step is the target's timestep, as `MiniMaxH3Scheduler.timesteps` holds it (`1 - sigma`, rising).
        if torch.equal(order, torch.arange(length, device=order.device)):
            return layout, step_time
        return layout, step_time, order


# `MiniMaxH3ModularPipeline.keyframe_noise_aug`: the timestep the pipeline holds conditioning video rows at, or the
# target's where that is higher.
_CONDITIONING_TIMESTEP = 0.999


def _lowest_timestep(timestep) -> torch.Tensor:
    """The lowest of a refused call's timesteps, the step the same call mended would take; 0 where it gives none
    (the call raises either way)."""
    if isinstance(timestep, (torch.Tensor, int, float)) and torch.as_tensor(timestep).numel():
        return torch.as_tensor(timestep, dtype=torch.float32).min()
    return torch.zeros(())


def _rows_fit(timestep, timestep_indices, positions, video_rows) -> bool:
    """Whether a call's timesteps, rows and positions are as `MiniMaxH3Transformer3DModel.forward` takes them: a 1-D
    `timestep`, a `(seq_len, 3)` `position_ids`, a `(seq_len,)` integer `timestep_indices` indexing `timestep`, and
    `video_indices` (long, 0-d or 1-D) rows of the sequence. One host sync."""
    if not all(isinstance(x, torch.Tensor) for x in (timestep, timestep_indices, positions, video_rows)):
        return False
    length = positions.shape[0] if positions.ndim == 2 and positions.shape[-1] == 3 else -1
    if (timestep.ndim != 1 or timestep_indices.shape != (length,) or video_rows.ndim > 1
            or timestep_indices.dtype not in (torch.int32, torch.int64) or video_rows.dtype != torch.int64):
        return False
    outside = torch.cat([(timestep_indices < 0) | (timestep_indices >= len(timestep)),
                         ((video_rows < 0) | (video_rows >= length)).reshape(-1)])
    return not bool(outside.any())


register_adapter(MiniMaxH3Adapter())
