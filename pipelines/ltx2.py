"""LTX-2 (`LTX2VideoTransformer3DModel`): joint audio and video generation.

Each block holds a video self-attention `attn1` (made sparse), an audio self-attention `audio_attn1` (a 1D
sequence: untouched), text cross-attentions and audio-video cross-attentions (untouched). The video tokens arrive
packed frame-major; the pipelines pass the latent grid as `num_frames`, `height`, `width` (LTX-2.5's DFR pipeline
only the tokens' coordinates, from which it is read). LTX2ConditionPipeline appends keyframe tokens after the
grid: they take the layout's trailing span, which patterns keep whole; Echo's modular blocks put clean memory
frames before it: the leading span. LTX-2.3
checkpoints use `LTX2PerturbedAttnProcessor` (spatio-temporal guidance), whose perturbed batch elements take the
values instead of attention; both processor classes get the same sparse path.
"""

from __future__ import annotations

import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2AudioVideoAttnProcessor,
    LTX2PerturbedAttnProcessor,
    apply_interleaved_rotary_emb,
    apply_split_rotary_emb,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, forward_input, leading_run
from .registry import register_adapter

_ROTARY = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}


def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb=None, key_rotary_emb=None):
    """`(query, key, value)` of an LTX-2 self-attention as `(B, N, heads, head_dim)`, with the arithmetic of its
    processors (q/k RMS norms over the whole hidden size, then the module's kind of RoPE: `rotary_emb` on the
    queries, `key_rotary_emb` on the keys where given, else `rotary_emb`), so sparse and dense see equal scores."""
    query = attn.norm_q(attn.to_q(hidden_states))
    key = attn.norm_k(attn.to_k(hidden_states))
    value = attn.to_v(hidden_states)
    # As diffusers' processors: the keys are rotated only where the queries are, even when given their own RoPE.
    if rotary_emb is not None:
        rotate = _ROTARY[attn.rope_type]
        query = rotate(query, rotary_emb)
        key = rotate(key, rotary_emb if key_rotary_emb is None else key_rotary_emb)
    return tuple(x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))


class LTX2SparseSelfAttention(SparseProcessor):
    """The sparse path of LTX-2's video self-attention, placed before either LTX-2 processor class, whose
    `__call__` stays the dense path (bit-identical to the original on dense calls)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        # Named, not **kwargs: `LTX2Attention` passes only the arguments the processor's signature lists. Only the
        # perturbed-attention blocks (LTX-2.3) give the last two, and only its processor class takes them.
        perturbation = {} if perturbation_mask is None and all_perturbed is None else {
            "perturbation_mask": perturbation_mask, "all_perturbed": all_perturbed}
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)
        if encoder_hidden_states is not None:  # cross-attention: not a layer diffsparse touches
            return super().__call__(*original, **perturbation)
        if attention_mask is not None:
            # IC-LoRA's soft self-attention mask (reference tokens): token-level weights the kernel cannot apply
            # inside a block. The original runs.
            self.runtime.log_dense(self.layer, why="an attention_mask (such as IC-LoRA's soft mask of reference "
                                   "tokens: token-level weights, which the kernel does not apply inside a block)")
            return super().__call__(*original, **perturbation)
        if all_perturbed is None:
            all_perturbed = perturbation_mask is not None and bool(torch.all(perturbation_mask == 0))
        if all_perturbed:
            # Spatio-temporal guidance skips this block's attention (the values pass through): nothing to make
            # sparse and no attention computed, so the call is not counted either way.
            return super().__call__(*original, **perturbation)
        if not self.runtime.route(self.layer):
            return super().__call__(*original, **perturbation)
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query, key, value = self_attention_qkv(attn, hidden_states, query_rotary_emb, key_rotary_emb)
        out = self.attend_video(query, key, value).flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:  # the perturbed batch elements take their values
            out = torch.lerp(value.flatten(2, 3), out, perturbation_mask)
        if gate_logits is not None:  # LTX-2.3's per-head gates
            out = (out.unflatten(2, (attn.heads, -1)) * 2.0 * torch.sigmoid(gate_logits).unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


class LTX2SparseAttnProcessor(LTX2SparseSelfAttention, LTX2AudioVideoAttnProcessor):
    """`LTX2AudioVideoAttnProcessor` whose video self-attention runs block-sparse when the runtime says so."""


class LTX2SparsePerturbedAttnProcessor(LTX2SparseSelfAttention, LTX2PerturbedAttnProcessor):
    """`LTX2PerturbedAttnProcessor` (LTX-2.3) whose video self-attention runs block-sparse when the runtime says so."""


class LTX2Adapter(ModelAdapter):
    transformer_classes = (LTX2VideoTransformer3DModel,)
    family = "LTX-2"
    processor_pairs = (
        (LTX2AudioVideoAttnProcessor, LTX2SparseAttnProcessor),
        (LTX2PerturbedAttnProcessor, LTX2SparsePerturbedAttnProcessor),
    )
    original_processor = LTX2AudioVideoAttnProcessor

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 4)
        step_time = _step_time(timestep, forward_input(transformer, args, kwargs, "sigma"))
        tokens = hidden_states.shape[1]
        grid = [forward_input(transformer, args, kwargs, name) for name in ("num_frames", "height", "width")]
        coords = forward_input(transformer, args, kwargs, "video_coords")
        if any(size is None for size in grid):
            # LTX-2.5's DFR pipeline calls the transformer on temporal tiles with their coordinates only.
            if coords is None:
                raise ValueError(
                    "diffsparse reads the LTX-2 token grid from the transformer's `num_frames`, `height` and `width`, "
                    "or from `video_coords`; this call gave neither"
                )
            return grid_from_coords(coords), step_time
        frames, height, width = (int(size) for size in grid)
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        # Whole patches rounded up, as `prepare_video_coords` places the tokens (`arange` by the patch size): rounded
        # down, a side of partial patches read every frame a row short and the last frame as a trailing span.
        grid = tuple(-(-size // patch) for size, patch in zip((frames, height, width), (p_t, p, p)))
        grid_len = grid[0] * grid[1] * grid[2]
        if tokens < grid_len:
            # Also what context parallelism would give (one rank's shard); diffusers' own LTX-2 context
            # parallelism fails in its audio-video cross-attention (diffusers 0.42), so it is not supported here.
            raise ValueError(
                f"the LTX-2 transformer got {tokens} video tokens, fewer than its {frames} x {height} x {width} latent "
                f"grid holds in {' x '.join(map(str, grid))} patches of {p_t} x {p} x {p} ({grid_len}); diffsparse "
                "cannot place them: `diffsparse.remove(pipe)`"
            )
        # Appended keyframe (or reference) tokens: a trailing span kept whole, like text. Echo puts its clean memory
        # frames in front of the grid instead: a leading span, told apart by the tokens' coordinates (where those
        # cannot tell, by their timesteps).
        extra = tokens - grid_len
        position = "end" if not extra or coords is None else extra_tokens_position(coords, grid, extra, timestep)
        return VideoLayout(*grid, text_len=extra, text_position=position), step_time


def _step_time(timestep: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """The timestep of the step an LTX-2 call is at: the larger of its per-token `timestep`'s largest and the
    `sigma` every pipeline passes as the step's plain timestep ("used by LTX-2.3"). The per-token timestep alone
    (`t * (1 - conditioning_mask)`) holds none at `t` in a DFR temporal tile that a video condition covers (0, or
    `t * (1 - strength)`): it put the tile on the last step (sparse in step 0) and warned of timesteps off the
    schedule. Not the pipeline's `_current_timestep`, which LTX-2's pipelines leave set after a run (every call of
    the transformer after it, from `from_pipe` or a loop of one's own, read the run's last step). Echo's modular
    blocks pass its first video token's timestep as `sigma`, which may be a clean memory's 0: the larger one wins."""
    if not isinstance(sigma, torch.Tensor):
        return timestep
    return torch.maximum(timestep.detach().max(), sigma.detach().max().to(timestep.dtype))


def extra_tokens_position(video_coords: torch.Tensor, grid: tuple[int, int, int], extra: int,
                          timestep: torch.Tensor | None = None) -> str:
    """Where the `extra` tokens of an LTX-2 call besides its named `grid` are: `"start"` when the grid's worth of
    tokens from token `extra` reads as the grid (as `grid_from_coords` reads it) and that from token 0 does not
    (Echo's clean memory frames, at times of their own, prepended), else `"end"` (keyframes, IC-LoRA and HDR-LoRA
    references, appended). Where both read as the grid (a one-frame grid: Echo's memory slots are single frames too;
    a reference on the grid's own coordinates), the grid is the span whose first frame starts at time 0, where
    `prepare_video_coords` puts every grid's first frame (its causal shift is clamped at 0), while Echo's memory
    slots go where the user's `memory_position_offset` puts them (after the video by default, but before it or
    around 0 too). Where both or neither start at 0 (a memory slot or reference on the generated frame), the
    per-token `timestep` decides: `"start"` if the leading `extra` tokens are all clean (Echo gives its memory 0)
    and the rest all noisy, else (or without per-token timesteps) `"end"`."""
    def grid_from(start: int) -> bool:  # whether a grid's worth of tokens from `start` reads as it
        try:
            layout = grid_from_coords(video_coords[:, :, start : video_coords.shape[2] - extra + start])
        except ValueError:
            return False
        return (layout.frames, layout.height, layout.width) == grid

    if not grid_from(extra):
        return "end"
    if not grid_from(0):
        return "start"
    from_extra, from_0 = (bool(video_coords[0, 0, token, 0] == 0) for token in (extra, 0))  # at time 0
    if from_extra != from_0:
        return "start" if from_extra else "end"
    if not isinstance(timestep, torch.Tensor) or timestep.ndim < 2:
        return "end"
    # The transformer flattens the timestep to one per token of each batch element: `(B, N, 1)` is per-token too,
    # `(B, 1)` one for every token, which tells no span from another.
    timestep = timestep.flatten(1)
    if timestep.shape[1] != video_coords.shape[2]:
        return "end"
    return "start" if bool((timestep[:, :extra] == 0).all() and (timestep[:, extra:] != 0).all()) else "end"


def grid_from_coords(video_coords: torch.Tensor) -> VideoLayout:
    """The layout of an LTX-2 call from its `(B, 3, N, 2)` patch bounds (time, y, x; every video of a batch has
    the same): the grid is the frame-major run of whole frames from the first token (each frame the first one's
    rows and columns over the time span right after the previous frame's), the tokens after it a trailing span kept
    whole. One read of the coordinates per call (a host sync on GPU)."""
    starts = video_coords[0, :, :, 0].detach().float().cpu()  # (3, N)
    time_ends = video_coords[0, 0, :, 1].detach().float().cpu()
    first_frame = starts[0] == starts[0, 0]
    per_frame = leading_run(first_frame)
    width = leading_run(first_frame & (starts[1] == starts[1, 0]))
    if per_frame % width:
        raise ValueError(
            f"diffsparse reads the LTX-2 token grid from `video_coords` where the call names no num_frames/height/"
            f"width: their first frame's {per_frame} tokens are not whole rows of {width} (tokens must be "
            "frame-major, row by row, as LTX-2's pipelines order them); pass num_frames, height and width, or "
            "`diffsparse.remove(pipe)`"
        )
    positions = starts[1:, :per_frame]
    frames = 1
    while (frames + 1) * per_frame <= starts.shape[1]:
        block = starts[:, frames * per_frame : (frames + 1) * per_frame]
        # Grid frames tile time: each starts where the one before ends. An appended keyframe (DFR's generated
        # slots, the condition pipelines' keyframes) can be a whole frame of the same rows and columns at a later
        # time, but it is placed inside the video's span: it starts before the grid's last frame ends.
        if not (torch.equal(block[1:], positions) and (block[0] == time_ends[frames * per_frame - 1]).all()):
            break
        frames += 1
    return VideoLayout(frames, per_frame // width, width, text_len=starts.shape[1] - frames * per_frame,
                       text_position="end")


register_adapter(LTX2Adapter())
