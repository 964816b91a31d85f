"""What every model adapter tells the core: where self-attention is, and how to read a call's layout."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.hooks._helpers import AttentionProcessorRegistry
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from einops import rearrange

from ..patterns import HeadShard

# (transformer, forward args, forward kwargs) -> (layout of the self-attention sequence, timestep), or with a third
# element, each token's index in the layout when the model's tokens are in another order (`ModelAdapter.read_call`)
ReadCall = Callable[[torch.nn.Module, tuple, dict], tuple]

# `SparseRuntime.log_dense`'s `why` (each said once per `apply`) for the calls whose mask keeps them dense: a
# token-level mask (`SparseProcessor.stays_dense`), a mask that is not of the prompts' padding (`prompt_padding`), and
# the sequences a family's sparse path was not built for.
TOKEN_MASK = "a token-level attention_mask (which the kernel does not apply inside a block)"
NOT_PROMPT_PADDING = (
    "an attention_mask other than a boolean key mask of the prompts' padding (the only kind the sparse path reads)"
)
NOT_THE_LAYOUT = "a sequence that is not the layout read_call described"


class SparseProcessor:
    """Mixin placed before a family's own diffusers processor class (`class X(SparseProcessor, WanAttnProcessor)`):
    the runtime and layer index, and the original's attention backend and parallel config, kept so that
    `set_attention_backend` and context parallelism behave as before on the dense calls, which run the original
    `__call__` unchanged."""

    # Declared so that `enable_parallelism` after `apply` sets it on every sparse processor (diffusers sets it only
    # where the attribute exists), so that a family that does not shard sees it and refuses (`check_not_parallel`).
    _parallel_config = None

    # Whether the handle that made this processor has it installed (set by `apply`, cleared by `remove`). One that
    # is not is an orphan that diffusers put back after `remove`: `fuse_qkv_projections()` keeps the processors it
    # replaces and `unfuse_qkv_projections()` restores them. `make_processor` and `remove` take its `original`.
    installed = False

    def __init__(self, runtime, layer: int, original=None):
        super().__init__()
        self.runtime = runtime
        self.layer = layer
        self.original = original
        for name in ("_attention_backend", "_parallel_config"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def restored_original(self):
        """`original` as `remove` puts it back: with the attention backend and parallel config that
        `set_attention_backend` or `enable_parallelism` set on this processor while it was on the module, as the
        original would have had them without diffsparse."""
        for name in ("_attention_backend", "_parallel_config"):
            if hasattr(self.original, name) and hasattr(self, name):
                setattr(self.original, name, getattr(self, name))
        return self.original

    # The processor this one replaces projects through the one QKV weight `fuse_qkv_projections()` makes
    # (`to_qkv`, `to_added_qkv`: diffusers' `Fused...` processors); the sparse path then projects as it does.
    fused = False

    def stays_dense(self, attention_mask=None) -> bool:
        """Whether this self-attention call runs the original processor: when it carries a token-level
        `attention_mask`, which block boundaries need not follow and the kernel does not apply inside a block (the
        call is logged dense, so `stats()` counts it, and a warning says so once per `apply`: `log_dense_mask`), or
        when the runtime's schedule says so (no warning)."""
        if attention_mask is not None:
            self.log_dense_mask(TOKEN_MASK)
            return True
        return not self.runtime.route(self.layer)

    def normalises_input(self, attn) -> bool:
        """Whether `attn` normalises its input first (a `spatial_norm` or `group_norm`, which the sparse paths do
        not apply): the call then runs the original, logged dense, so `stats()` counts it and a warning says so."""
        if attn.spatial_norm is None and attn.group_norm is None:
            return False
        self.runtime.log_dense(self.layer, why="a group or spatial norm of their input (which the sparse path does "
                               "not apply)")
        return True

    def log_dense_mask(self, why: str) -> None:
        """Log this call dense for its `attention_mask` (`runtime.log_dense`, which warns the first time it is given
        `why`); a processor that says so in its own words (FLUX's families: `DenseMaskWarning`) logs it unsaid."""
        self.runtime.log_dense(self.layer, why=why)

    # Whether the sparse path gives one process's result under context parallelism: `True` where diffusers splits
    # the family's self-attention sequence contiguously and the adapter gathers it (`attend_video`, and FLUX's,
    # FLUX.2's and Qwen-Image's joint paths), under the family's diffusers plan or, for the families that have none
    # but a video-only sequence (Wan VACE, Wan Animate, SkyReels-V2, Kandinsky 5 and 6, AnyFlow), a plan of the
    # user's own. `False` elsewhere: refused at `apply` when parallelism is already enabled, else at the first
    # sparse call (`check_not_parallel`), rather than computing a wrong result.
    context_parallel = True

    def check_not_parallel(self) -> None:
        """For a family with `context_parallel = False`: refuse a call under context parallelism enabled after
        `apply`."""
        if context_parallel_config(self) is not None:
            raise NotImplementedError(not_parallel_message(type(self)))

    def prompt_padding(self, attention_mask, text_len: int):
        """The prompts' valid keys under a mask of their padding (`read_prompt_mask`, once per call), `None`
        without a mask, or `False` for a mask of another kind, which the caller leaves to the original processor
        (logged dense here)."""
        if attention_mask is None:
            return None
        # Every block of a call gets the same mask: read it once (a host sync on a GPU).
        valid = self.runtime.once_per_call(attention_mask, lambda mask: self.read_prompt_mask(mask, text_len))
        if valid is None:
            self.log_dense_mask(NOT_PROMPT_PADDING)
            return False
        return valid

    def read_prompt_mask(self, mask: torch.Tensor, text_len: int) -> list | None:
        """The prompts' valid keys under `mask`, or `None` when it is not a mask of the prompts' padding: by
        default a boolean key mask over `[text, image]` (`valid_text_key_groups`); a family whose mask means
        something else overrides this and `attend_prompts` (Chroma)."""
        return valid_text_key_groups(mask, text_len)

    def attend_prompts(self, query, key, value, valid: list | None, text_len: int) -> torch.Tensor:
        """`runtime.attention` on this layer for a `[text, image]` call whose prompts' valid keys are `valid`
        (`prompt_padding`): the call as it is when no key is masked, else each prompt without its padding
        (`attend_kept_tokens`)."""
        if not valid:
            return self.runtime.attention(self.layer, query, key, value)
        return attend_kept_tokens(self.runtime, self.layer, query, key, value, valid)

    def sequence_shard(self, local_length: int) -> tuple[int, int]:
        """`(index of this process's first token in the whole sequence, the whole sequence's length)` for a call
        holding `local_length` tokens: under context parallelism each rank holds its share of the call's
        sequence (`_shares`), in rank order; otherwise the call holds it all, `(0, local_length)`."""
        parallel = _context_parallel(self)
        if parallel is None:
            return 0, local_length
        group, degree, rank = parallel
        held = self._held(self._streams(degree, text_first=False), group, rank, local_length)
        return sum(held[:rank]), sum(held)

    def whole_sequence(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """`x` as the whole call holds it (`length` along `dim`): under context parallelism, where each rank
        holds its share of it in rank order (a text mask that diffusers splits per block), gathered from all ranks;
        else `x`."""
        parallel = _context_parallel(self)
        if parallel is None:
            return x
        group, degree, _ = parallel
        shares = _shares(length, degree)
        # Every rank sends the largest share's size (gloo gathers equal sizes only), then each part is cut back.
        sent = x.new_zeros(x.shape[:dim] + (shares[0],) + x.shape[dim + 1:])
        sent.narrow(dim, 0, x.shape[dim]).copy_(x)
        parts = [torch.empty_like(sent) for _ in shares]
        torch.distributed.all_gather(parts, sent, group=group)
        return torch.cat([part.narrow(dim, 0, share) for part, share in zip(parts, shares)], dim)

    def _streams(self, degree: int, text_first: bool) -> list[list[int]]:
        """Each stream's tokens on each rank (`[stream][rank]`): the call's text (`encoder_hidden_states`) and the
        rest when `text_first`, else the whole sequence, each split by diffusers' rule."""
        whole = self.runtime.call_layout().num_tokens
        text = self.runtime.call_text_tokens() if text_first else 0
        return [_shares(text, degree), _shares(whole - text, degree)] if text else [_shares(whole, degree)]

    def _held(self, streams: list[list[int]], group, rank: int, local_length: int) -> list[int]:
        """The tokens each rank holds of `streams` (`_streams`), checked against what every rank holds: a rank
        that raised alone would leave the others waiting in the all-to-all, so each rank sends its length and its
        share (one all-gather of two ints) and all raise together if any differ. Checked at a layer's first call on
        each split of the streams under each parallel config (a rank's length follows from the layout and diffusers'
        plan, the same at every later call): hit or miss is then the same on every rank, so all join the gather
        (diffusers warns against caching such a gather by the local length), and later calls add no collective."""
        held = [sum(per_rank) for per_rank in zip(*streams)]
        checked = getattr(self, "_checked_splits", None)
        if checked is None or checked[0] is not self._parallel_config:  # `is`: a config need not be hashable
            checked = self._checked_splits = (self._parallel_config, set())
        split = tuple(map(tuple, streams))
        if split in checked[1]:
            if held[rank] != local_length:  # the split changed since it was checked: only this rank can know
                raise ValueError(self._misplaced({rank: (local_length, held[rank])}))
            return held
        # On the CPU where the group has a CPU backend (gloo), as diffusers gathers its sizes: no device sync.
        backend = str(torch.distributed.get_backend(group))
        device = "cpu" if "cpu" in backend or "gloo" in backend else torch.accelerator.current_accelerator()
        sent = torch.tensor([local_length, held[rank]], device=device)
        parts = [torch.empty_like(sent) for _ in held]
        torch.distributed.all_gather(parts, sent, group=group)
        lengths = [tuple(part.tolist()) for part in parts]
        wrong = {other: (length, share) for other, (length, share) in enumerate(lengths) if length != share}
        if wrong:
            raise ValueError(self._misplaced(wrong))
        checked[1].add(split)
        return held

    def _misplaced(self, wrong: dict[int, tuple[int, int]]) -> str:
        """The error for ranks holding other lengths than their shares: `{rank: (its length, its share)}`."""
        ranks = "; ".join(f"rank {rank} holds {length} tokens, its share {share}"
                          for rank, (length, share) in sorted(wrong.items()))
        return (f"under context parallelism the ranks must hold their shares of the call's layout "
                f"{self.runtime.call_layout()} in {type(self).__name__}'s sequence, split as diffusers splits it "
                f"(`_shares`), but {ranks}: diffsparse cannot place them; use pattern='dense'")

    def _head_shares(self, heads: int, degree: int) -> list[int]:
        """Each rank's share of the `heads` heads after the all-to-all (`_shares`). Fewer heads than ranks is
        refused: a rank with none would fail in a per-head or fitted pattern while the others wait in the
        all-to-all or a fit's all-gather. Every rank holds every head before the exchange, so all raise together,
        before any collective of the call."""
        if heads < degree:
            config = context_parallel_config(self)
            raise ValueError(
                f"context parallelism over ring_degree={config.ring_degree} x ulysses_degree={config.ulysses_degree}"
                f" = {degree} ranks gives each rank a share of the attention heads, and {type(self).__name__} has "
                f"{heads}: diffsparse's sparse attention needs at least {degree} heads (one per rank); lower "
                f"ring_degree x ulysses_degree to at most {heads}, or use pattern='dense'"
            )
        return _shares(heads, degree)

    def attend_frame(self, attn, hidden_states: torch.Tensor, image_rotary_emb=None) -> torch.Tensor:
        """The sparse self-attention of `AttnProcessor2_0` and its copies: projections, q/k norms (over the head
        dim), RoPE `(cos, sin)` on queries and keys where the family gives one (HunyuanDiT), `attend_video`, the
        output projection."""
        query, key, value = project_qkv(attn, hidden_states, fused=self.fused)
        if image_rotary_emb is not None:
            query, key = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in (query, key))
        return attention_processor_output(attn, self.attend_video(query, key, value), hidden_states, query.dtype)

    def attend_video_queries(self, query, key, value, groups=None, outside_pairs: int = 0) -> torch.Tensor:
        """`runtime.attention` of the layout's video rows alone (`video_queries`) over the call's `[text, video]`
        keys, sparse; with `groups` (`valid_key_groups`), each group of videos over its valid keys only (padded
        prompt tokens left out: every video key must be valid), one call each, told its videos (`attention`'s
        `videos`). `outside_pairs`: per video, as
        `runtime.attention`'s (the text rows a processor attends densely itself)."""
        if groups is None:
            return self.runtime.attention(self.layer, query, key, value, video_queries=True,
                                          outside_pairs=outside_pairs)
        groups = groups_of_every_video(groups, query.shape[0], query.device, "attend_video_queries")
        layout = self.runtime.call_layout()
        out, parts = torch.empty_like(query), []
        for videos, kept in groups:
            group_layout = dataclasses.replace(layout, text_len=len(kept) - layout.num_video_tokens)
            k, v = (x[videos][:, kept] for x in (key, value))
            out[videos] = self.runtime.attention(self.layer, query[videos], k, v, layout=group_layout,
                                                 video_queries=True, outside_pairs=outside_pairs, parts=parts,
                                                 videos=videos)
        self.runtime.log_parts(parts)
        return out

    def attend_video(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """`runtime.attention` on this layer for a video-only sequence of `(B, S, H, D)` tensors, also under
        context parallelism (`attend_joint` without text)."""
        return self.attend_joint(query, key, value, text_first=False)

    def attend_joint(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_first: bool = True,
                     attend: Callable | None = None) -> torch.Tensor:
        """`runtime.attention` on this layer for the call's `(B, S, H, D)` sequence; with `text_first`, a joint
        `[text, image]` one whose text is the call's `encoder_hidden_states` (FLUX, FLUX.2, Qwen-Image).

        Under context parallelism (`transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=u,
        ring_degree=r))`) each of the n = u * r ranks holds its share (`_shares`: `1 / n`, or one token more on the
        first ranks with `ulysses_anything=True` or `ring_anything=True`) of every stream the model splits: of the
        video, or of the text and of the image, joined as `[its text, its image]`. An all-to-all gives each rank the
        whole sequence for its share of the heads (`H / n`; the first ranks one more when n does not divide H; fewer
        heads than ranks are refused, `_head_shares`), put back in the model's order (all text, then all image
        tokens), which it attends sparsely like one device (the layout and the plan are those of the whole call), and
        a second all-to-all returns its tokens.

        `attend(query, key, value, heads=None)`: what attends the whole sequence in the model's order (default:
        `runtime.attention`), for a family that attends a batch in groups (Qwen-Image's padded prompts).
        """
        if attend is None:
            def attend(q, k, v, heads=None):
                return self.runtime.attention(self.layer, q, k, v, heads=heads)

        parallel = _context_parallel(self)
        if parallel is None:
            return attend(query, key, value)
        group, degree, rank = parallel
        # Heads that do not divide over the ranks (ring attention does not need them to) are shared as tokens are.
        head_shares = self._head_shares(query.shape[2], degree)
        streams = self._streams(degree, text_first)
        held = self._held(streams, group, rank, query.shape[1])
        q, k, v = (_sequence_to_heads(x, group, held, head_shares) for x in (query, key, value))
        if len(streams) > 1:  # one stream (video only) is gathered in the model's order already
            order, inverse = _model_order(tuple(map(tuple, streams)), query.device)
            q, k, v = (x.index_select(1, order) for x in (q, k, v))
        out = attend(q, k, v, heads=HeadShard.in_group(rank, head_shares, group))
        if len(streams) > 1:
            out = out.index_select(1, inverse)
        return _heads_to_sequence(out, group, held, head_shares)


def _shares(length: int, degree: int) -> list[int]:
    """How diffusers' context parallelism splits `length` tokens over `degree` ranks, in rank order
    (`torch.tensor_split`: even shares, or with Ulysses or ring "anything" the first `length % degree` ranks one
    more)."""
    return [length // degree + (rank < length % degree) for rank in range(degree)]


@functools.lru_cache(maxsize=16)
def _model_order(streams: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(order, inverse)`: the index, in the tokens gathered from the ranks (rank by rank, each rank's streams in
    order), of each token in the model's order (stream by stream, each stream's ranks in order), and back;
    `streams[stream][rank]` tokens. Cached: every layer of every step of a resolution asks for the same."""
    degree = len(streams[0])
    held = [[stream[rank] for stream in streams] for rank in range(degree)]
    starts = torch.tensor([0] + [n for rank in held for n in rank]).cumsum(0)[:-1].view(degree, len(streams))
    order = torch.cat([
        torch.arange(int(starts[rank, s]), int(starts[rank, s]) + streams[s][rank])
        for s in range(len(streams)) for rank in range(degree)
    ])
    return order.to(device), torch.argsort(order).to(device)


class JointVideoTextAttention(SparseProcessor):
    """The sparse path of a joint `[video, text]` self-attention with padded prompts (HunyuanVideo, HunyuanVideo
    1.5, Mochi), placed before the family's processor class, whose `__call__` stays the dense path: dense calls run
    it unchanged, so they are bit-identical to it (except the calls that measure `SparseConfig.correction`'s
    statistics: dense through diffsparse's kernel). Each video is attended over its valid prefix
    (`attend_valid_prefixes`) or, where a row's valid text tokens are not leading (left padding, a caller's own
    mask) and the padded queries get zeros, over its valid tokens wherever they lie (`attend_valid_keys`).

    Subclasses give `joint_qkv` (a staticmethod: the family's q, k, v over `[video, text]`) and, where they differ
    from these defaults, `valid_lengths` (default: a `(B, text)` mask of the text tokens, `None` when a row's valid
    tokens are not a prefix), `padded_queries` (default `"zero"`: the original masks padded text queries too) and
    `attend_valid_keys` (default: each output at its token's position, zeros at the masked ones).
    """

    padded_queries = "zero"
    context_parallel = False

    def valid_lengths(self, attention_mask, batch: int, video_len: int, length: int) -> list[int] | None:
        try:
            return [video_len + n for n in prefix_lengths(attention_mask, name="encoder_attention_mask")]
        except ValueError:
            return None  # valid text tokens after masked ones: `attend_valid_keys` attends them where they lie

    def read_text_mask(self, attention_mask, batch: int, video_len: int, length: int):
        """`(lengths, None, None)` when every video's valid keys are a prefix (`valid_lengths`), else `(None,
        groups, keys)`: `valid_key_groups` and the `(B, S)` boolean valid keys of `[video, text]`."""
        lengths = self.valid_lengths(attention_mask, batch, video_len, length)
        if lengths is not None:
            return lengths, None, None
        if self.padded_queries != "zero":  # a family overriding valid_lengths refuses such masks itself
            raise ValueError(f"{type(self).__name__}.valid_lengths gave None for padded_queries='dense'")
        keys = F.pad(attention_mask.reshape(batch, -1).bool(), (video_len, 0), value=True)
        return None, valid_key_groups(keys), keys

    def attend_valid_keys(self, query, key, value, groups, keys: torch.Tensor) -> torch.Tensor:
        """Each group of videos over its valid keys (`attend_kept_tokens`), the masked tokens' outputs zero."""
        return attend_kept_tokens(self.runtime, self.layer, query, key, value, groups)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or not self.runtime.route(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.check_not_parallel()
        query, key, value = self.joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        video_len = hidden_states.shape[1]
        batch, length = query.shape[:2]
        # Every layer of a call gets the same mask: read it once (on a GPU each read is a host sync).
        lengths, groups, keys = self.runtime.once_per_call(
            attention_mask, lambda mask: self.read_text_mask(mask, batch, video_len, length)
        ) if attention_mask is not None else ([length] * batch, None, None)
        if lengths is None:
            out = self.attend_valid_keys(query, key, value, groups, keys)
        else:
            out = attend_valid_prefixes(self.runtime, self.layer, query, key, value, lengths, self.padded_queries)
        return project_joint_output(attn, out.flatten(2, 3).to(query.dtype), video_len)


class SparseFrameSelfAttention(SparseProcessor):
    """The sparse path of `AttnProcessor2_0` (or its fused version) on a self-attention over the tokens of one frame
    (Latte's spatial blocks, PixArt's `attn1`), placed before the processor class; cross-attention calls, other
    module kinds and dense calls run the original `__call__` unchanged."""

    context_parallel = False  # no diffusers plan, and `attend_frame` does not gather a split sequence

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args)
        if encoder_hidden_states is not None:
            return super().__call__(*original, **kwargs)  # cross-attention: not the runtime's to count
        if self.normalises_input(attn):  # before, uncounted: stats() showed no call of the layer
            return super().__call__(*original, **kwargs)
        if self.stays_dense(attention_mask):  # the models pass no mask here; a caller's is the original's to apply
            return super().__call__(*original, **kwargs)
        self.check_not_parallel()
        return self.attend_frame(attn, hidden_states)


class FrameSelfAttention(SparseFrameSelfAttention, AttnProcessor2_0):
    """`AttnProcessor2_0` on a self-attention over one frame's tokens, block-sparse when the runtime says so."""


class FusedFrameSelfAttention(SparseFrameSelfAttention, FusedAttnProcessor2_0):
    """`FusedAttnProcessor2_0` (after `fuse_qkv_projections()`) on a self-attention over one frame's tokens,
    block-sparse when the runtime says so."""

    fused = True


def not_parallel_message(processor_class: type) -> str:
    return (
        f"diffsparse runs sparse attention under context parallelism on the families diffusers gives a context "
        f"parallel plan (Wan, ChronoEdit, LTX-Video, Helios, MiniMax-H3, FLUX.1, FLUX.2, Qwen-Image) and, under a "
        f"plan of your own, on Wan VACE, Wan Animate, SkyReels-V2, Kandinsky 5 and 6 and AnyFlow, not on "
        f"{processor_class.__name__}; disable parallelism or use pattern='dense'"
    )


def context_parallel_config(processor_or_model):
    """The `ContextParallelConfig` that `enable_parallelism` gave this processor (or model), or `None`."""
    return getattr(getattr(processor_or_model, "_parallel_config", None), "context_parallel_config", None)


def _context_parallel(processor):
    """`(process group, degree, rank in it)` when diffusers' context parallelism reaches this processor, else
    `None`. diffusers splits the sequence over its ring and Ulysses ranks together (the flattened mesh, `tensor_split`
    shares with "anything"), so the sparse path takes all of them as one Ulysses group: one all-to-all over the
    `ring_degree * ulysses_degree` ranks gives each the whole sequence for its share of the heads. Under ring degrees
    that is not diffusers' ring exchange (each rank's queries against every rank's keys in turn) but gives each rank
    the same tokens' outputs."""
    config = context_parallel_config(processor)
    if config is None:
        return None
    group = config._flattened_mesh.get_group()
    return group, config.ring_degree * config.ulysses_degree, torch.distributed.get_rank(group)


def _all_to_all(x: torch.Tensor, group, send: list[int], receive: list[int]) -> torch.Tensor:
    """Rank r sends rows `send` (split sizes along dim 0, one per rank) to the ranks in order and receives rank j's
    `receive[j]` rows, stacked in rank order."""
    x = x.contiguous()
    out = x.new_empty((sum(receive), *x.shape[1:]))
    torch.distributed.all_to_all_single(out, x, output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


def _sequence_to_heads(x: torch.Tensor, group, held: list[int], head_shares: list[int]) -> torch.Tensor:
    """`(B, held[rank], H, D)` on each rank -> `(B, S, head_shares[rank], D)`: the whole sequence (rank by rank),
    this rank's slice of heads."""
    degree, local = len(held), x.shape[1]
    sent = _all_to_all(rearrange(_padded_heads(x, head_shares), "b s (n h) d -> (n s) b h d", n=degree), group,
                       [local] * degree, held)
    return rearrange(sent, "s b h d -> b s h d")[:, :, : head_shares[torch.distributed.get_rank(group)]]


def _heads_to_sequence(x: torch.Tensor, group, held: list[int], head_shares: list[int]) -> torch.Tensor:
    """The inverse of `_sequence_to_heads`: `(B, S, head_shares[rank], D)` -> `(B, held[rank], H, D)`."""
    degree, widest = len(held), head_shares[0]
    local = held[torch.distributed.get_rank(group)]
    if x.shape[2] < widest:
        x = F.pad(x, (0, 0, 0, widest - x.shape[2]))
    sent = _all_to_all(rearrange(x, "b s h d -> s b h d"), group, held, [local] * degree)
    out = rearrange(sent, "(n s) b h d -> b s (n h) d", n=degree)
    if widest * degree == sum(head_shares):
        return out
    kept = [rank * widest + i for rank, share in enumerate(head_shares) for i in range(share)]
    return out.index_select(2, torch.tensor(kept, device=out.device))


def _padded_heads(x: torch.Tensor, head_shares: list[int]) -> torch.Tensor:
    """`x`'s heads as one equal slice per rank, each rank's share (`head_shares`, in rank order) padded with zero
    heads to the largest, so that one all-to-all of one shape sends them; `x` itself when the shares are even."""
    heads, widest = x.shape[2], head_shares[0]
    if widest * len(head_shares) == heads:
        return x
    starts = [sum(head_shares[:rank]) for rank in range(len(head_shares))]
    index = [start + i if i < share else heads for start, share in zip(starts, head_shares) for i in range(widest)]
    with_zero = torch.cat([x, x.new_zeros(*x.shape[:2], 1, x.shape[3])], dim=2)
    return with_zero.index_select(2, torch.tensor(index, device=x.device))


class ModelAdapter(ABC):
    """One model family: subclasses name their attention modules and processors and read a call's layout, then
    register with `register_adapter`.

    The runtime given to a sparse processor answers `route(layer) -> bool` (whether this call goes through the
    runtime: sparse, or dense while measuring a correction's statistics; `False` = run the original processor)
    and `attention(layer, q, k, v, layout=None, video_queries=False) -> out` on `(B, S, H, D)` tensors (`layout`
    when the tensors are not the whole call's sequence, e.g. a valid prefix; `call_layout()` gives the call's;
    `video_queries`: the queries are the layout's video tokens only, after its text span, as Qwen-Image 2.1's
    KV-cached calls hold them); adapters need nothing else of it. Video-only sequences go through
    `SparseProcessor.attend_video`, which also shards them under context parallelism.
    """

    transformer_classes: tuple[type, ...] = ()
    family: str = ""  # the family's name in messages
    original_processor: type | None = None  # the diffusers processor class a sparse one may replace
    sparse_processor: type | None = None  # its `SparseProcessor` subclass
    # Families whose blocks use several processor classes (FLUX.2): `(original class, its sparse class)` pairs.
    processor_pairs: tuple[tuple[type, type], ...] = ()
    block_lists: tuple[str, ...] = ("transformer_blocks",)  # transformer attributes holding the blocks, in order
    attention_name: str = "attn1"  # the self-attention module of each block (a dotted path for nested ones)
    # The transformer gets the timestep on another scale than the scheduler's timesteps (Cosmos): applied to a
    # pipeline, the step clock reads the pipeline's `_current_timestep` instead of `read_call`'s timestep.
    timestep_from_pipeline: bool = False
    # `read_call`'s timestep is the pipeline's `t / scheduler.config.num_train_timesteps` (Lumina2, PRX): applied,
    # the step clock puts it back on the scale of the scheduler it follows (1000 where there is none); a fixed 1000
    # missed every step of a scheduler trained on another count.
    timestep_over_train_timesteps: bool = False
    # The transformer may get one timestep per latent frame, each frame at its own noise level (diffusion forcing):
    # applied to a pipeline, each frame follows the dense-step schedule on its own step (`SparseRuntime.begin_call`).
    per_frame_steps: bool = False
    # The timestep `read_call` gives rises as denoising goes (MiniMax-H3's `1 - sigma`): on a bare transformer (no
    # scheduler) a lower timestep than the last, not a higher one, starts a new run. `None`: it goes either way,
    # as the scheduler has it (Mochi's), and each run's first two distinct timesteps tell which.
    timesteps_rise: bool | None = False

    def self_attention_modules(self, transformer: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
        """`(layer index, attention module)` for every self-attention that may become sparse: the blocks of
        `block_lists` in order, numbered from 0."""
        blocks = [block for name in self.block_lists for block in getattr(transformer, name)]
        for index, block in enumerate(blocks):
            yield index, operator.attrgetter(self.attention_name)(block)

    def make_processor(self, original, runtime, layer: int, transformer=None):
        """A sparse processor that replaces `original` on layer `layer` of `transformer` (an orphan of a removed
        handle, `SparseProcessor.installed`, by its own original); anything but the family's own processor class is
        refused (a subclass, e.g. LoRA, IP-Adapter, caching or fused-QKV processors, computes something else, and
        replacing it would silently change results), and so is a family that does not shard under context
        parallelism already enabled."""
        if isinstance(original, SparseProcessor) and not original.installed:
            original = original.restored_original()  # an orphan of a removed handle stands for its original
        pairs = dict(self.processor_pairs or [(self.original_processor, self.sparse_processor)])
        sparse = pairs.get(type(original))
        if sparse is None:
            unfuse = "" if any(cls.fused for cls in pairs.values()) else ", and unfuse QKV projections"
            raise ValueError(
                f"layer {layer} of the {self.family} transformer has processor {type(original).__name__}; diffsparse "
                f"replaces only {' and '.join(cls.__name__ for cls in pairs)} (remove other processors first, e.g. "
                f"LoRA, IP-Adapter or caching ones{unfuse})"
            )
        # diffusers sets the config on the model, and on the processors only of classes that have the attribute
        # (not AttnProcessor2_0's, PixArt's, for one).
        enabled = (context_parallel_config(original), context_parallel_config(transformer))
        if not sparse.context_parallel and enabled != (None, None):
            raise NotImplementedError(not_parallel_message(sparse))
        _share_layer_skip_entry(type(original), sparse)
        return sparse(runtime, layer, original)

    @abstractmethod
    def read_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        """`(layout, timestep)` of one transformer forward, from its inputs; `(layout, timestep, token_order)` when
        the model's self-attention tokens are not in the layout's order, `token_order` holding each token's index
        in the layout (the runtime attends them in the layout's order and returns them in the model's). A timestep
        the adapter computes from one the pipeline rounded on the transformer's own scale may carry the Python
        attribute `diffsparse_rounding`, how far off that rounding can make it on the scheduler's scale, which the
        step clock matches within (`StepClock.tick`; Ideogram 4 reads `1 - t / 1000` back in float32)."""

    def set_processor(self, module: torch.nn.Module, processor) -> None:
        """Install `processor` on an attention `module` (diffusers' own setter; families without one override)."""
        module.set_processor(processor)


def _share_layer_skip_entry(original: type, sparse: type) -> None:
    """diffusers' layer-skip hooks (SkipLayerGuidance, PerturbedAttentionGuidance, `LayerSkipConfig`) find how to
    skip an attention module by its processor's exact class: the sparse class gets the original's entry, so the
    guiders that work on the original work under diffsparse (they raised "not registered")."""
    try:
        entry = AttentionProcessorRegistry.get(original)
    except ValueError:  # diffusers cannot skip the original either
        return
    AttentionProcessorRegistry.register(sparse, entry)


def project_qkv(attn, x: torch.Tensor, added: bool = False, fused: bool = False):
    """`(query, key, value)` of `x` as `(B, S, heads, head_dim)`: the module's projections, then its q/k norms over
    the head dim, as the joint-attention processors of diffusers compute them (`added`: the text stream's
    `add_*_proj` and `norm_added_*`; `fused`: the one projection `fuse_qkv_projections()` made of the three,
    `to_qkv` or `to_added_qkv`, as diffusers' fused processors use it). Split by the head dim, not the head count:
    under tensor parallelism the projections hold only this process's heads."""
    norms = ("norm_added_q", "norm_added_k") if added else ("norm_q", "norm_k")
    head_dim = attn.inner_dim // attn.heads
    if fused:
        projected = getattr(attn, "to_added_qkv" if added else "to_qkv")(x).chunk(3, dim=-1)
    else:
        projected = (getattr(attn, name)(x) for name in
                     (("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")))
    query, key, value = (part.unflatten(2, (-1, head_dim)) for part in projected)
    norm_q, norm_k = (getattr(attn, name, None) for name in norms)
    return (query if norm_q is None else norm_q(query)), (key if norm_k is None else norm_k(key)), value


def latent_grid(hidden_states: torch.Tensor, patch_size) -> tuple[int, int, int]:
    """`(frames, height, width)` in tokens of `(B, C, T, H, W)` latents patchified by `(p_t, p_h, p_w)`."""
    return patched_grid(hidden_states.shape[2:], patch_size)


def patched_grid(sizes, patch_size) -> tuple[int, int, int]:
    """`(frames, height, width)` in tokens of latents of `(T, H, W)` `sizes` patchified by `(p_t, p_h, p_w)` (a
    partial patch dropped, as a strided convolution does)."""
    frames, height, width = (n // p for n, p in zip(sizes, patch_size))
    return frames, height, width


def patch_count(sizes, kernel, padded: bool) -> int:
    """How many tokens a patchify with `kernel` (stride = kernel) makes of latents of `(T, H, W)` `sizes`; `padded`:
    the latents are padded up to whole patches first (the compressed history terms of Helios and Framepack), else
    a partial patch is dropped, as a strided convolution does."""
    return math.prod(-(-n // k) if padded else n // k for n, k in zip(sizes, kernel))


def references_with_text(text_len: int, image_len: int, reference_len: int) -> torch.Tensor:
    """The token order of `[text, image, references]` attended as `[text, references, image]` (each model token's
    index in the layout): reference images that cannot be frames of the image's grid join the text's leading
    span, kept whole (FLUX, Qwen-Image)."""
    return torch.cat([
        torch.arange(text_len),
        torch.arange(text_len + reference_len, text_len + reference_len + image_len),
        torch.arange(text_len, text_len + reference_len),
    ])


def patch_size_3d(config) -> tuple[int, int, int]:
    """`(p_t, p_h, p_w)` of a config with an int `patch_size` (space) and `patch_size_t` (time; missing or `None`:
    1), as CogVideoX, HunyuanVideo and Motif-Video give them."""
    p_t = getattr(config, "patch_size_t", None) or 1
    return p_t, config.patch_size, config.patch_size


def leading_run(flags: torch.Tensor) -> int:
    """How many leading entries of a boolean vector are true (token-coordinate reading: LTX, LTX-2)."""
    false = (~flags).nonzero()
    return int(false[0]) if len(false) else len(flags)


@functools.cache
def forward_parameters(model_class: type) -> list[str]:
    """The names of `model_class.forward`'s parameters a call can give by position, after `self`, in order (up to
    `*args` or the first keyword-only one)."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = []
    for parameter in list(inspect.signature(model_class.forward).parameters.values())[1:]:
        if parameter.kind not in positional:
            break
        names.append(parameter.name)
    return names


def forward_input(model: torch.nn.Module, args: tuple, kwargs: dict, name: str):
    """The forward argument `name` of this call of `model`, given by keyword or by position (found in the forward's
    signature), or `None` when the call leaves it out."""
    if name in kwargs:
        return kwargs[name]
    parameters = forward_parameters(type(model))
    index = parameters.index(name) if name in parameters else len(args)
    return args[index] if index < len(args) else None


def half_precision(timestep: torch.Tensor) -> bool:
    """Whether `timestep` is a floating tensor coarser than float32 (bfloat16, float16): a pipeline cast it to the
    latents' dtype, so the step clock must allow for its rounding."""
    return timestep.is_floating_point() and torch.finfo(timestep.dtype).eps > torch.finfo(torch.float32).eps


def call_argument(args: tuple, kwargs: dict, name: str, position: int):
    """A forward argument given either by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    raise ValueError(f"the transformer was called without `{name}` (keyword or positional argument {position})")


def project_joint_output(attn, out: torch.Tensor, video_len: int, text_first: bool = False):
    """`(video, text)` outputs of a joint attention `out` of shape `(B, S, hidden)`: split at the video tokens,
    then the module's output projections where it has them (`to_out` for the video stream, `to_add_out` for the
    text; the last block of some models, and single-stream blocks, lack one or both), as the originals do."""
    text_len = out.shape[1] - video_len
    video, text = (out[:, text_len:], out[:, :text_len]) if text_first else (out[:, :video_len], out[:, video_len:])
    if getattr(attn, "to_out", None) is not None:
        video = attn.to_out[1](attn.to_out[0](video.contiguous()))
    if getattr(attn, "to_add_out", None) is not None:
        text = attn.to_add_out(text.contiguous())
    return video, text


def attention_processor_output(attn, out: torch.Tensor, hidden_states: torch.Tensor, dtype: torch.dtype):
    """How diffusers' `Attention` processors end (`AttnProcessor2_0` and its copies: Latte's blocks, Allegro): the
    `(B, S, heads, head_dim)` attention output in `dtype` through `to_out`, plus the input `hidden_states` where the
    module has a residual connection, over its `rescale_output_factor`."""
    out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(dtype)))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """The attention of queries over two disjoint sets of keys, from each set's output and log-sum-exp of scores
    (`runtime.attention(..., return_lse=True)`, `runtime.dense_attention`): the softmax over their union."""
    total = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - total) + out_b * torch.exp(lse_b - total)


def prefix_lengths(mask: torch.Tensor, name: str = "the attention mask") -> list[int]:
    """Per row of a `(B, n)` key mask (bool or 0/1), how many leading entries are valid; a `ValueError` naming the
    mask (`name`, the field the caller gave) and the first row whose valid entries are not a prefix (padding must
    come last, as the text encoders' tokenizers put it)."""
    valid = mask.bool()
    lengths = valid.sum(dim=1)
    prefix = torch.arange(valid.shape[1], device=valid.device) < lengths[:, None]
    if not torch.equal(valid, prefix):
        row = int((valid != prefix).any(dim=1).nonzero()[0])
        raise ValueError(
            f"diffsparse needs each row of {name} to be a prefix: its valid tokens first, then the padding; row "
            f"{row} has a masked token before a valid one (left padding?). Pad on the right, or use pattern='dense'"
        )
    return lengths.tolist()


def attend_valid_prefixes(runtime, layer: int, query, key, value, lengths: list[int], padded_queries: str):
    """Sparse attention of each video of a `(B, S, H, D)` batch over its first `lengths[b]` tokens (video first,
    then its valid text; the layout's text span cut to match), videos with equal lengths in one runtime call, told
    its videos (`attention`'s `videos`: a fitted pattern's fit is reused for the same videos only).

    `padded_queries`: what the original computes for the padded text queries, whose outputs never reach a video
    token: `"dense"` (attention over the valid keys) or `"zero"`.
    """
    if padded_queries not in ("dense", "zero"):
        raise ValueError(f"padded_queries must be 'dense' or 'zero', got {padded_queries=}")
    length = query.shape[1]
    call_layout = runtime.call_layout()
    if set(lengths) == {length}:  # no padding anywhere (the usual single prompt): the call's own layout, no copies
        return runtime.attention(layer, query, key, value)
    # Prefixes are cut in the layout's token order (Framepack's history moved behind the video, before the text).
    query, key, value = (runtime.to_layout_order(x) for x in (query, key, value))
    out, parts = torch.zeros_like(query), []
    for valid in sorted(set(lengths)):
        indices = [i for i, n in enumerate(lengths) if n == valid]
        videos = torch.tensor(indices, device=query.device)
        layout = dataclasses.replace(call_layout, text_len=valid - (length - call_layout.text_len))
        # A group holding every video needs no gathered copy of q, k, v: a slice along the sequence is a view.
        whole = len(videos) == len(lengths)
        q, k, v = ((x if whole else x.index_select(0, videos))[:, :valid] for x in (query, key, value))
        # The group's videos told: a fit made on other videos (another group, the other branch's) is not reused.
        out[videos, :valid] = runtime.attention(layer, q, k, v, layout=layout, parts=parts, videos=indices)
        if valid < length and padded_queries == "dense":
            padded = (query if whole else query.index_select(0, videos))[:, valid:].transpose(1, 2)
            tail = torch.nn.functional.scaled_dot_product_attention(padded, k.transpose(1, 2), v.transpose(1, 2))
            out[videos, valid:] = tail.transpose(1, 2)
    runtime.log_parts(parts)
    return runtime.to_model_order(out)


def attend_without_text_padding(runtime, layer: int, query, key, value, lengths: list[int], text_len: int,
                                heads=None) -> torch.Tensor:
    """Sparse attention of a `(B, S, H, D)` batch of `[text, image]` sequences whose first `text_len` tokens are
    each prompt's valid text (`lengths[b]` tokens) then its padding (masked keys, between its valid text and the
    image: Qwen-Image's text mask): each prompt's padding is left out of its sequence, prompts of equal length in
    one runtime call on the call's layout with that text span (`attend_kept_tokens`). `heads`: as
    `runtime.attention`'s."""
    device, length = query.device, query.shape[1]
    groups = [
        (torch.tensor([i for i, n in enumerate(lengths) if n == valid], device=device),
         torch.cat([torch.arange(valid, device=device), torch.arange(text_len, length, device=device)]))
        for valid in sorted(set(lengths))
    ]
    return attend_kept_tokens(runtime, layer, query, key, value, groups, heads=heads)


def attend_kept_tokens(runtime, layer: int, query, key, value, groups, heads=None) -> torch.Tensor:
    """Sparse attention of a `(B, S, H, D)` batch of `[text, image]` (or `[image, text]`) sequences, each group of
    videos over its kept tokens only: `groups` is `[(videos, kept token indices), ...]` (as `valid_key_groups` gives
    them), the kept tokens every image token and some of the text span, so their indices are the same in the model's
    order and the layout's. One runtime call per group, on the call's layout with the text span cut to the kept
    text, told its videos (`attention`'s `videos`). The tokens left out (padding, which no kept token attends) get
    zero outputs. `heads`: as `runtime.attention`'s. Groups read from a mask of one row (one video) stand for every
    video of the batch, as attention broadcasts such a mask; groups of any other number of videos than the batch's
    (a mask of 2 rows for 4 videos, which attention refuses), or keeping fewer tokens than the image's or more than
    the call's (a mask over another number of tokens), raise a `ValueError` rather than leave videos or tokens out."""
    batch, length = query.shape[:2]
    groups = groups_of_every_video(groups, batch, query.device, "attend_kept_tokens")
    query, key, value = (runtime.to_layout_order(x) for x in (query, key, value))
    call_layout = runtime.call_layout()
    out, parts = torch.zeros_like(query), []
    for videos, kept in groups:
        if not call_layout.num_video_tokens <= len(kept) <= length:
            raise ValueError(
                f"attend_kept_tokens needs each group to keep every one of the {call_layout.num_video_tokens} image "
                f"tokens and at most the call's {length} tokens, got a group keeping {len(kept)}: the key mask it "
                f"was read from must have one entry per token of the call ({length})"
            )
        q, k, v = (x.index_select(0, videos).index_select(1, kept) for x in (query, key, value))
        layout = dataclasses.replace(call_layout, text_len=len(kept) - call_layout.num_video_tokens)
        out[videos[:, None], kept] = runtime.attention(layer, q, k, v, layout=layout, heads=heads, parts=parts,
                                                       videos=videos)
    runtime.log_parts(parts)
    return runtime.to_model_order(out)


def valid_key_groups(mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """`[(videos, their valid key indices), ...]`, one entry per distinct row of a boolean key mask (`(B, S)` or
    `(B, 1, 1, S)`); `None` when every key is valid."""
    mask = mask.reshape(mask.shape[0], -1).bool()
    if bool(mask.all()):
        return None
    masks, inverse = torch.unique(mask, dim=0, return_inverse=True)
    return [((inverse == index).nonzero()[:, 0], row.nonzero()[:, 0]) for index, row in enumerate(masks)]


def boolean_key_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """The `(B, S)` rows of a boolean `(B, 1, 1, S)` key mask (one row per video, broadcast over heads and queries),
    or `None` for a mask of another kind."""
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1:3] != (1, 1):
        return None
    return mask[:, 0, 0]


def groups_of_every_video(groups: list, batch: int, device, caller: str) -> list:
    """`valid_key_groups`' groups for a batch of `batch` videos: groups read from a mask of one row (one video)
    stand for every video, as attention broadcasts such a mask; groups of any other number of videos than the
    batch's (a mask of 2 rows for 4 videos, which attention refuses) raise a `ValueError` naming `caller`, rather
    than leave videos without output."""
    if batch > 1 and len(groups) == 1 and len(groups[0][0]) == 1:
        return [(torch.arange(batch, device=device), groups[0][1])]
    # Counted, not compared (a host sync on a GPU at every layer): `valid_key_groups` gives each row of its mask
    # to one group, so its groups hold every video once exactly when the mask has a row per video.
    held = sum(len(videos) for videos, _ in groups)
    if held != batch:
        raise ValueError(
            f"{caller} needs groups holding each of the batch's {batch} videos once, got groups of {held} videos: "
            f"the key mask they were read from must have 1 or {batch} rows"
        )
    return groups


def valid_text_key_groups(mask: torch.Tensor, text_len: int) -> list | None:
    """`valid_key_groups` of a `(B, 1, 1, S)` boolean key mask over `[text, image]` whose masked keys are each
    prompt's padding, wherever it lies in the first `text_len` tokens (after the prompt as most tokenizers put it,
    before it under left padding, before a template's suffix as Krea 2's pipelines put it); `[]` when no key is
    masked; `None` for a mask of another kind (an image key masked, not boolean, no key past the text: a mask of the
    text alone, which attention refuses): the original computes it, or raises its own error. The caller checks the
    mask's rows and keys against the call's (`attend_kept_tokens` refuses groups that do not fit it)."""
    keys = boolean_key_rows(mask)
    # Some image key at all: `all()` of an empty slice is true, and would read a text-long mask as the text's.
    if keys is None or keys.shape[1] <= text_len or not keys[:, text_len:].all():
        return None
    return valid_key_groups(keys) or []
