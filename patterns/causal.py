"""Frame-block causality: a query attends to its own group of frames and the groups before it (SkyReels-V2's
asynchronous diffusion forcing), and whether a kernel's blocks can carry that mask exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BlockSize, Pattern
from .layout import VideoLayout
from .ordering import IdentityOrder, TokenOrder, as_order


@dataclass(frozen=True, repr=False)
class FrameCausal(Pattern):
    r"""
    Frames in consecutive groups of `frames`; a query keeps every key whose group is not later than its own
    (name `"frame_causal"`). It is the mask diffusers' `SkyReelsV2Transformer3DModel` builds when its config has
    `num_frame_per_block > 1`.

    A block-sparse kernel computes whole blocks, so it applies this mask exactly only where no kept block holds
    both an allowed and a masked pair: [`FrameCausal.whole_blocks`] says whether that holds for every block.

    Args:
        frames (`int`, *optional*, defaults to `1`): frames per causal group.

    Example:
        >>> from diffsparse.patterns import FrameCausal, VideoLayout
        >>> layout = VideoLayout(frames=4, height=2, width=4)  # 8 tokens per frame
        >>> FrameCausal(frames=2).block_mask(layout, 16)[0].int()
        tensor([[1, 0],
                [1, 1]], dtype=torch.int32)
        >>> FrameCausal(frames=2).whole_blocks(layout, 16) is not None, FrameCausal(frames=2).whole_blocks(layout, 32)
        (True, None)
    """

    frames: int = 1
    name = "frame_causal"

    def __post_init__(self):
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"FrameCausal.frames must be an int >= 1, got frames={self.frames!r}")

    def __repr__(self) -> str:
        return f"{self.name}(frames={self.frames})"

    def video_groups(self, layout: VideoLayout, order: TokenOrder | None = None) -> torch.Tensor:
        """The group of every video token, as a `(V,)` `torch.LongTensor` in frame-major order or, for a layout
        without text, in `order`: query `r` keeps key `s` where `groups[s] <= groups[r]`."""
        group = layout.video_coordinates()[0] // self.frames
        order = as_order(order)
        if isinstance(order, IdentityOrder):
            return group
        if layout.text_len:
            raise ValueError(
                f"FrameCausal.video_groups in {order!r} order needs a layout without text (the order moves text "
                f"tokens too), got text_len={layout.text_len}"
            )
        return group[order.permutation(layout)]

    def group_bounds(self, layout: VideoLayout, order: TokenOrder | None = None) -> tuple[int, ...] | None:
        """Where each group starts in `order`, then the sequence's length, `(0, b1, ..., N)`, when the order keeps
        each group's tokens together (a group's queries then attend a prefix of the keys); `None` when it
        interleaves groups or the layout has text tokens."""
        if layout.text_len:
            return None
        group = self.video_groups(layout, order)
        if not bool((group[1:] >= group[:-1]).all()):
            return None
        return (0, *(torch.nonzero(group[1:] != group[:-1]).flatten() + 1).tolist(), layout.num_tokens)

    def _video_token_mask(self, layout):
        group = self.video_groups(layout)
        return (group[None, :] <= group[:, None])[None]

    def _box_any(self, layout, q, k):
        return (k.t0 // self.frames <= q.t1 // self.frames).unsqueeze(0)

    def _box_all(self, layout, q, k):
        return (k.t1 // self.frames <= q.t0 // self.frames).unsqueeze(0)

    def whole_blocks(
        self, layout: VideoLayout, block_size: BlockSize, order: TokenOrder | None = None
    ) -> torch.Tensor | None:
        """The `(1, nq, nk)` block mask when every block pair is wholly allowed or wholly masked, so that the kernel
        applies this mask exactly by skipping the masked blocks; `None` when some block pair is mixed (a block
        that straddles a group boundary). Layouts with text tokens are `None` (the mask is over video alone)."""
        if layout.text_len:
            return None
        allowed = self.block_mask(layout, block_size, order=order)
        masked = _LaterFrameGroup(self.frames).block_mask(layout, block_size, order=order)
        return None if (allowed & masked).any() else allowed


@dataclass(frozen=True, repr=False)
class _LaterFrameGroup(FrameCausal):
    """The complement of [`FrameCausal`]: keys in a later group than the query's."""

    name = "later_frame_group"

    def _video_token_mask(self, layout):
        return ~super()._video_token_mask(layout)

    def _box_any(self, layout, q, k):
        return (k.t1 // self.frames > q.t0 // self.frames).unsqueeze(0)

    def _box_all(self, layout, q, k):
        return (k.t0 // self.frames > q.t1 // self.frames).unsqueeze(0)
