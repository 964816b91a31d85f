"""Sparse VideoGen's two head kinds: spatial heads (nearby frames) and temporal heads (same place, all frames)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .base import Pattern
from .causal import FrameCausal
from .layout import VideoLayout

KINDS = ("spatial", "temporal")
# The repr's one letter per head, which `heads` also takes.
_LETTERS = {kind[0].upper(): kind for kind in KINDS}
# Elements per vectorised chunk of the token-level reference.
_CHUNK_ELEMENTS = 1 << 18
# float32 elements per head chunk of `classify` (key copy or sampled probabilities): 64 MB.
_CLASSIFY_CHUNK = 1 << 24


def _check_count(owner: str, name: str, value, low: int, allowed: str) -> None:
    # The upper bound keeps counts inside torch's int64 (a larger one covers any layout anyway).
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < 2**31:
        raise ValueError(f"{owner}.{name} must be {allowed}, below 2**31, got {name}={value!r}")


def _window_start(pos, size: int, window: int):
    """First key of the `window` keys of a query at `pos` along an axis of `size`: the window is centred on the
    query and pushed inside `[0, size)` (NATTEN's rule, as in [`Window3D`] with `stride=1`). Non-decreasing in
    `pos`, so the windows of a run of queries cover one run of keys."""
    return (pos - window // 2).clamp(0, size - window)


def _gap(a0, a1, b0, b1):
    """Smallest `|x - y|` for `x` in `[a0, a1]`, `y` in `[b0, b1]`."""
    return torch.maximum(a0 - b1, b0 - a1).clamp(min=0)


def _far(a0, a1, b0, b1):
    """Largest `|x - y|` for `x` in `[a0, a1]`, `y` in `[b0, b1]`."""
    return torch.maximum(a1 - b0, b1 - a0)


@dataclass(frozen=True, repr=False)
class SpatialTemporal(Pattern):
    r"""
    Sparse VideoGen ([Xi et al., 2025](https://arxiv.org/abs/2502.01776)), name `"spatial_temporal"`: each head
    is either *spatial* (it attends within nearby frames) or *temporal* (it attends to the same place in every
    frame), and a few sampled query rows decide which, per head ([`~SpatialTemporal.classify`]).

    For a query at (frame `i`, row `r`, column `c`) and a key at (`j`, `r'`, `c'`):

    - spatial head: kept iff `|i - j| <= frames` (a plain band of frames, clipped at the first and last frame);
    - temporal head: kept in *every* frame iff `r'` is in the row window and `c'` in the column window of the
      query. Each window holds `min(2 * width + 1, size)` positions, centred on the query and pushed inside
      the frame (NATTEN's rule, as [`Window3D`]): a border query keeps as many keys as a central one,
      `frames * min(2 width + 1, height) * min(2 width + 1, width)`.

    With `heads` (one kind per head) the masks are per head, `(H, ...)`. Without it (`heads=None`, "not
    classified yet") every head gets one shared mask, the **union** of both kinds: a safe superset of either
    choice, used until `classify` has run (e.g. at the dense warm-up steps).

    Token order: in frame-major order a spatial head is a band of whole frames around the diagonal, block-sparse
    at any block size. A temporal head's query block (a few rows of one frame) keeps, in every frame, the same
    rows plus `width` rows either side, about `(block_q + block_k + 2 * width * W) / (H * W)` of the keys (about
    `2 * block / tokens_per_frame` for small `width`): block-sparse only where a frame holds many blocks.
    Measured block densities at the defaults (`frames=1, width=1`): on the testbed's 17 x 12 x 12 latents at
    block 64 (a frame of 144 tokens, about two blocks) a temporal head keeps 0.954 of the blocks, nearly dense,
    against 0.203 for a spatial head; at Wan 2.1 480p's 21 x 30 x 52 at block 128, 0.232 against 0.145. Sparse
    VideoGen permutes temporal heads position-major so that their keys become one contiguous band; that is *not*
    done here: one token order (frame-major or a [`TileOrder`]) is used per attention call and shared by all
    heads, so per-head permutations would need per-head gathers of `q`, `k`, `v` and outputs. Block masks are
    exact in any order: the rule is a product of per-axis rules, so a pair of token boxes is tested axis by axis.

    Text tokens follow the shared rule of [`Pattern`].

    Args:
        frames (`int`, *optional*, defaults to `1`): frame radius of spatial heads, `>= 0` (`0`: own frame
            only). Scaled by [`~Pattern.at_density`], together with `width`.
        width (`int`, *optional*, defaults to `1`): row/column radius of temporal heads, `>= 0` (`0`: the same
            position only): a `(2 * width + 1)**2` window.
        heads (`tuple[str, ...]` or `str`, *optional*, defaults to `None`): one kind per head, `"spatial"` or
            `"temporal"`, or a string of one letter per head, `S` or `T` (as the repr writes them: `"STT"`);
            `None` gives one shared mask, the union of both kinds. A list or string is turned into a tuple of kinds.
        num_samples (`int`, *optional*, defaults to `32`): query rows sampled by [`~SpatialTemporal.classify`],
            `>= 1`. It does not change the masks.

    Example:
        >>> from diffsparse.patterns import SpatialTemporal, VideoLayout
        >>> pattern = SpatialTemporal()
        >>> pattern
        spatial_temporal(frames=1, width=1)
        >>> layout = VideoLayout(frames=8, height=16, width=16)
        >>> pattern.block_mask(layout, 128).shape  # not classified: one shared mask (the union)
        torch.Size([1, 16, 16])
        >>> per_head = pattern.with_heads(["spatial", "temporal", "temporal"])
        >>> per_head
        spatial_temporal(frames=1, width=1, heads='STT')
        >>> per_head.block_mask(layout, 128).shape
        torch.Size([3, 16, 16])
    """

    frames: int = 1
    width: int = 1
    heads: tuple[str, ...] | None = None
    num_samples: int = 32

    name = "spatial_temporal"

    def __post_init__(self):
        _check_count("SpatialTemporal", "frames", self.frames, 0, "an int >= 0 (frame radius of spatial heads)")
        _check_count("SpatialTemporal", "width", self.width, 0, "an int >= 0 (row/column radius of temporal heads)")
        _check_count("SpatialTemporal", "num_samples", self.num_samples, 1, "an int >= 1 (sampled query rows)")
        heads = self.heads
        if heads is not None:
            if isinstance(heads, str):
                if not heads or set(heads) - set(_LETTERS):
                    raise ValueError(
                        f"SpatialTemporal.heads as a string must be one letter per head, S (spatial) or T "
                        f"(temporal), got heads={heads!r}"
                    )
                heads = tuple(_LETTERS[letter] for letter in heads)
            if not isinstance(heads, (tuple, list)) or not heads:
                raise ValueError(
                    f"SpatialTemporal.heads must be None, a non-empty tuple of kinds from {KINDS} or a string of S "
                    f"and T, got heads={heads!r}"
                )
            for i, kind in enumerate(heads):
                if kind not in KINDS:
                    raise ValueError(f"SpatialTemporal.heads[{i}] must be one of {KINDS}, got heads[{i}]={kind!r}")
            object.__setattr__(self, "heads", tuple(heads))

    @property
    def num_heads(self) -> int:
        return 1 if self.heads is None else len(self.heads)

    def __repr__(self) -> str:
        extra = "" if self.heads is None else f", heads={''.join(kind[0].upper() for kind in self.heads)!r}"
        if self.num_samples != 32:
            extra += f", num_samples={self.num_samples!r}"
        return f"{self.name}(frames={self.frames!r}, width={self.width!r}{extra})"

    def with_heads(self, kinds) -> SpatialTemporal:
        r"""
        A copy with one kind per head (validated like the constructor's `heads`).

        Args:
            kinds (`tuple[str, ...]`, `list[str]` or `None`): `"spatial"` or `"temporal"` per head, e.g. the
                result of [`~SpatialTemporal.classify`]; `None` goes back to the shared union mask.

        Example:
            >>> SpatialTemporal(frames=2).with_heads(("temporal", "spatial"))
            spatial_temporal(frames=2, width=1, heads='TS')
        """
        return replace(self, heads=kinds)

    # The two kinds --------------------------------------------------------------------------------------------

    def _combine(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        """`(H or 1, *shape)` from the two kinds' `(*shape)` answers: the union without heads, else per head."""
        if self.heads is None:
            return (spatial | temporal)[None]
        is_temporal = torch.tensor([kind == "temporal" for kind in self.heads], device=spatial.device)
        return torch.where(is_temporal.view(-1, *([1] * spatial.dim())), temporal, spatial)

    def _windows(self, layout: VideoLayout):
        """Per spatial axis (rows, columns): the axis size and the temporal window there (clipped to the axis)."""
        return [(size, min(2 * self.width + 1, size)) for size in layout.grid[1:]]

    def _axis_keeps(self, layout: VideoLayout, rows: torch.Tensor):
        """For the video query tokens `rows` (frame-major numbering): which key frames a spatial head keeps and
        which key rows and columns a temporal head keeps, `(len(rows), F)`, `(len(rows), H)`, `(len(rows), W)`
        bool on the device of `rows`. Both kinds are products of these per-axis rules."""
        tpf, w = layout.tokens_per_frame, layout.width
        device = rows.device
        frames = torch.arange(layout.frames, device=device)
        keeps = [(rows[:, None] // tpf - frames).abs() <= self.frames]
        for (size, window), query_pos in zip(self._windows(layout), ((rows // w) % layout.height, rows % w)):
            start = _window_start(query_pos, size, window)[:, None]
            key_pos = torch.arange(size, device=device)
            keeps.append((start <= key_pos) & (key_pos < start + window))
        return keeps

    def _kind_masks(self, layout: VideoLayout, rows: torch.Tensor):
        """`(spatial, temporal)`, `(len(rows), V)` bool each: the video keys the two kinds keep for the video
        query tokens `rows`."""
        frame_keep, row_keep, col_keep = self._axis_keeps(layout, rows)
        frame, row, col = (c.to(rows.device) for c in layout.video_coordinates())
        return frame_keep[:, frame], row_keep[:, row] & col_keep[:, col]

    def _video_token_mask(self, layout):
        v = layout.num_video_tokens
        out = torch.empty(self.num_heads, v, v, dtype=torch.bool)
        step = max(1, _CHUNK_ELEMENTS // v)
        for a in range(0, v, step):
            rows = torch.arange(a, min(a + step, v))
            out[:, a : a + len(rows)] = self._combine(*self._kind_masks(layout, rows))
        return out

    def _axis_runs(self, layout, q, k):
        """Per spatial axis: the first and last window start of the query boxes, the window, the key bounds."""
        for axis, (size, window) in zip((1, 2), self._windows(layout)):
            first = _window_start(q[2 * axis], size, window)
            last = _window_start(q[2 * axis + 1], size, window)
            yield first, last, window, k[2 * axis], k[2 * axis + 1]

    def _box_any(self, layout, q, k):
        shape = torch.broadcast_shapes(*(bound.shape for bound in (*q, *k)))
        spatial = (_gap(q.t0, q.t1, k.t0, k.t1) <= self.frames).expand(shape)
        temporal = torch.ones(shape, dtype=torch.bool)
        for first, last, window, k0, k1 in self._axis_runs(layout, q, k):
            # The queries' windows cover keys [first, last + window - 1]: does that run meet [k0, k1]?
            temporal = temporal & (first <= k1) & (k0 <= last + window - 1)
        return self._combine(spatial, temporal)

    def _box_all(self, layout, q, k):
        shape = torch.broadcast_shapes(*(bound.shape for bound in (*q, *k)))
        spatial = (_far(q.t0, q.t1, k.t0, k.t1) <= self.frames).expand(shape)
        temporal = torch.ones(shape, dtype=torch.bool)
        for first, last, window, k0, k1 in self._axis_runs(layout, q, k):
            # Every query's window holds [k0, k1]: the last window starts by k0, the first ends after k1.
            temporal = temporal & (last <= k0) & (k1 <= first + window - 1)
        # Without heads this is sound, not exact (a pair set can be covered by the two kinds together).
        return self._combine(spatial, temporal)

    def _density_knob(self, layout):
        # Scale both extents, 2 * frames + 1 frames and 2 * width + 1 positions, by x (as Window3D scales its
        # window), from a single frame / position up to the whole canvas.
        caps = (2 * layout.frames - 1, 2 * max(layout.height, layout.width) - 1)
        sizes = (2 * self.frames + 1, 2 * self.width + 1)

        def make(x):
            frames, width = (
                (min(cap, max(1, math.floor(size * x + 0.5))) - 1) // 2 for size, cap in zip(sizes, caps)
            )
            return replace(self, frames=frames, width=width)

        return make, 0.0, float(max(cap / size for cap, size in zip(caps, sizes)) + 1), ()

    # Classification -------------------------------------------------------------------------------------------

    def _sample_rows(self, num_video: int, generator: torch.Generator | None) -> torch.Tensor:
        if self.num_samples >= num_video:
            return torch.arange(num_video)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        rows = torch.randperm(num_video, generator=generator, device=generator.device)[: self.num_samples]
        return rows.sort().values.cpu()

    def _sampled_mass(self, query, key, layout, generator=None, within=None) -> torch.Tensor:
        """`(H, 2)` float32 on the CPU: per head, the attention mass (sum of softmax probabilities over video
        keys) inside the spatial and the temporal mask, averaged over the sampled rows and the batch."""
        if not isinstance(layout, VideoLayout):
            raise ValueError(f"layout must be a VideoLayout, got {layout=}")
        for name, x in (("query", query), ("key", key)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must be a (B, H, N, D) tensor, got {name} of shape {shape}")
        if query.shape != key.shape:
            raise ValueError(
                f"query and key must have the same shape (B, H, N, D), got {tuple(query.shape)} and "
                f"{tuple(key.shape)}"
            )
        n, v = query.shape[2], layout.num_video_tokens
        if n == layout.num_tokens:  # the whole sequence: keep the video tokens only
            vs = layout.video_start
            query, key = query[:, :, vs : vs + v], key[:, :, vs : vs + v]
        elif n != v:
            raise ValueError(
                f"query and key must hold the layout's video tokens (N={v}) or all its tokens (N="
                f"{layout.num_tokens}) in frame-major order, got N={n} for {layout}"
            )
        b, h, _, d = query.shape
        rows = self._sample_rows(v, generator).to(query.device)
        frame_keep, row_keep, col_keep = (keep.to(torch.float32) for keep in self._axis_keeps(layout, rows))
        position_keep = row_keep[:, :, None] * col_keep[:, None, :]  # (s, H, W)
        scale = 1.0 / math.sqrt(d)
        masked = None
        if within is not None:  # the model's own mask: its softmax is over the keys a row keeps
            if not isinstance(within, FrameCausal):
                raise ValueError(f"within must be a FrameCausal mask or None, got within={within!r}")
            groups = within.video_groups(layout).to(query.device)
            masked = groups[None, :] > groups[rows][:, None]  # (s, V)
        mass = torch.empty(h, 2)
        # Heads in chunks, so neither the float32 copy of the keys nor the sampled probabilities grow past
        # _CLASSIFY_CHUNK elements: memory is O(num_samples * N), never O(N**2).
        step = max(1, _CLASSIFY_CHUNK // (b * v * max(d, len(rows))))
        for h0 in range(0, h, step):
            heads = slice(h0, h0 + step)
            q = query[:, heads, rows].float() * scale  # (B, h, s, D)
            logits = q @ key[:, heads].float().transpose(-1, -2)  # (B, h, s, V)
            probs = torch.softmax(logits if masked is None else logits.masked_fill(masked, -torch.inf), dim=-1)
            probs = probs.view(*probs.shape[:3], *layout.grid)
            spatial = (probs.sum(dim=(-1, -2)) * frame_keep).sum(-1)  # mass per kept frame, (B, h, s)
            temporal = (probs.sum(dim=-3) * position_keep).sum(dim=(-1, -2))  # mass per kept position
            mass[heads] = torch.stack([spatial, temporal], dim=-1).mean(dim=(0, 2)).cpu()
        return mass

    def fit(
        self, query, key, value, layout, block_size, order=None, generator=None, within=None, shard=None,
        q_tokens=None,
    ) -> SpatialTemporal:
        """A copy with each head's kind chosen by [`~SpatialTemporal.classify`] (values, block size and order
        do not enter: the masks are exact in any; each head is classified on its own, so `shard` does not
        enter either; nor does `q_tokens`: the kinds are read from video query rows, which every call computes)."""
        return self.with_heads(self.classify(query, key, layout, generator=generator, within=within))

    @torch.no_grad()
    def classify(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        layout: VideoLayout,
        generator: torch.Generator | None = None,
        within: FrameCausal | None = None,
    ) -> tuple[str, ...]:
        r"""
        Decide each head's kind from a few query rows: the kind whose mask holds more of the head's attention
        mass. Cost `O(num_samples * N * D)` per head, never `N x N`: the masks are per-axis tables of
        `num_samples x (F + H + W)` entries, and heads are processed in chunks that bound memory to about 64 MB.

        The same `num_samples` video query rows are used for every head and batch entry. For each, its exact
        softmax over all video keys is computed in float32 (scale `1 / sqrt(D)`); the mass a kind captures is
        the sum of the probabilities inside its mask, averaged over the rows and the batch. Text tokens are
        left out of both the rows and the softmax (both kinds keep every text key anyway). Ties go to
        `"spatial"`. Sparse VideoGen instead compares the error of each masked attention output on the sampled
        rows; the mass `m` a mask holds bounds that error by `2 (1 - m) max |v|` and needs no values.

        The two masses are not compared at equal cost, and the rule leans spatial. At the default radii the
        spatial token mask holds more of the keys, about `(2 * frames + 1) / F` against the temporal one's
        `(2 * width + 1)**2 / (H * W)` (testbed, 17 x 12 x 12: 0.170 against 0.0625), so it catches more mass
        where attention has no structure: random queries and keys are classified spatial in 16 of 16 heads
        (testbed, Wan 480p's 21 x 30 x 52, 5 x 16 x 16). A head whose logits fall only with spatial distance, the
        same in every frame (temporal structure), is classified spatial once it spreads moderately (logits
        `-0.02 * (dh**2 + dw**2)` on the testbed: mass 0.173 in the spatial mask, 0.129 in the temporal one).
        Nor are these masks the block masks the kernel runs, whose costs can rank the other way (testbed, block
        64: temporal 0.954 of the blocks, spatial 0.203; class docstring).

        Args:
            query (`torch.Tensor` of shape `(B, H, N, D)`): queries in frame-major order (after RoPE, as the
                kernel sees them), any float dtype and device. `N` is either the layout's video tokens or all its
                tokens (then the text tokens are sliced out).
            key (`torch.Tensor` of shape `(B, H, N, D)`): keys, like `query`.
            layout ([`VideoLayout`]): the sequence layout.
            generator (`torch.Generator`, *optional*, defaults to `None`): draws the rows; `None` uses a
                private generator seeded with `0`, so the rows are the same on every call and torch's global
                random state is untouched.
            within ([`FrameCausal`], *optional*): the model's own attention mask (SkyReels-V2's causal frame
                groups): each row's softmax is over the keys it keeps.

        Returns:
            `tuple[str, ...]`: one kind per head, ready for [`~SpatialTemporal.with_heads`].

        Example:
            >>> from diffsparse.patterns import SpatialTemporal, VideoLayout
            >>> layout = VideoLayout(frames=4, height=4, width=4)
            >>> frame_code = 4 * torch.randn(4, 1, 16, generator=torch.Generator().manual_seed(0))
            >>> qk = frame_code.expand(4, 16, 16).reshape(1, 1, 64, 16)  # same within a frame
            >>> SpatialTemporal(frames=0).classify(qk, qk, layout)
            ('spatial',)
        """
        mass = self._sampled_mass(query, key, layout, generator, within)
        return tuple(KINDS[int(t > s)] for s, t in mass.tolist())
