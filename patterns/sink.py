"""An attention sink: every query keeps the keys of the first frames. Composes with any pattern (`p | FrameSink()`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern


@dataclass(frozen=True, repr=False)
class FrameSink(Pattern):
    r"""
    Every query attends to every key of the first `frames` frames (name `"sink"`). Radial Attention keeps
    frame 0 for Wan this way; here the sink is a pattern of its own so it can be added to any other with `|`.

    Args:
        frames (`int`, *optional*, defaults to `1`): how many leading frames are kept as keys.

    Example:
        >>> from diffsparse.patterns import FrameSink, VideoLayout, Window3D
        >>> pattern = Window3D((1, 2, 2)) | FrameSink()
        >>> pattern
        (window3d(window=(1, 2, 2)) | sink(frames=1))
        >>> pattern.block_mask(VideoLayout(frames=4, height=4, width=4), 16)[0, :, 0].all().item()
        True
    """

    frames: int = 1
    name = "sink"

    def __post_init__(self):
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"FrameSink.frames must be an int >= 1, got frames={self.frames!r}")

    def __repr__(self) -> str:
        return f"{self.name}(frames={self.frames})"

    def _video_token_mask(self, layout):
        frame = layout.video_coordinates()[0]
        v = layout.num_video_tokens
        return (frame < self.frames)[None, None, :].expand(1, v, v).clone()

    def _keys_in_sink(self, q, k, last_frame):
        shape = torch.broadcast_shapes(q.t0.shape, k.t0.shape)
        return (last_frame < self.frames).expand(shape).unsqueeze(0)

    def _box_any(self, layout, q, k):
        return self._keys_in_sink(q, k, k.t0)  # the key box reaches into the sink frames

    def _box_all(self, layout, q, k):
        return self._keys_in_sink(q, k, k.t1)  # the key box lies inside the sink frames


@dataclass(frozen=True, repr=False)
class DenseQueryFrames(Pattern):
    r"""
    Every query of the given frames attends to every key (name `"dense_query_frames"`): the transpose of
    [`FrameSink`]. The runtime adds it to the configured pattern for the frames of a diffusion-forcing call that
    are still in their own dense early steps (SkyReels-V2: each frame at its own noise level).

    Args:
        frames (`tuple[int, ...]`): frame indices whose queries are dense; one at or past the layout's frame count
            selects nothing there, so one tuple serves calls of several frame counts.

    Example:
        >>> from diffsparse.patterns import DenseQueryFrames, VideoLayout
        >>> DenseQueryFrames(frames=(1,)).block_mask(VideoLayout(frames=3, height=2, width=4), 8)[0].int()
        tensor([[0, 0, 0],
                [1, 1, 1],
                [0, 0, 0]], dtype=torch.int32)
    """

    frames: tuple[int, ...] = ()
    name = "dense_query_frames"

    def __post_init__(self):
        frames = self.frames
        if not isinstance(frames, tuple) or any(type(f) is not int or f < 0 for f in frames):
            raise ValueError(f"DenseQueryFrames.frames must be a tuple of frame indices >= 0, got frames={frames!r}")

    def __repr__(self) -> str:
        return f"{self.name}(frames={self.frames})"

    def _flags(self, layout) -> torch.Tensor:
        """Per frame 0 .. F: how many of the frames before it are dense (a prefix count, so any box of frames
        is answered by one subtraction)."""
        dense = torch.zeros(layout.frames + 1, dtype=torch.int64)
        dense[1:][[f for f in self.frames if f < layout.frames]] = 1
        return dense.cumsum(0)

    def _video_token_mask(self, layout):
        frame = layout.video_coordinates()[0]
        v = layout.num_video_tokens
        dense = torch.zeros(layout.frames, dtype=torch.bool)
        dense[[f for f in self.frames if f < layout.frames]] = True
        return dense[frame][None, :, None].expand(1, v, v).clone()

    def _dense_frames_in(self, layout, q, k):
        count = self._flags(layout)
        shape = torch.broadcast_shapes(q.t0.shape, k.t0.shape)
        return (count[q.t1 + 1] - count[q.t0]).expand(shape), (q.t1 - q.t0 + 1).expand(shape)

    def _box_any(self, layout, q, k):
        dense, _ = self._dense_frames_in(layout, q, k)
        return (dense > 0).unsqueeze(0)

    def _box_all(self, layout, q, k):
        dense, frames = self._dense_frames_in(layout, q, k)
        return (dense == frames).unsqueeze(0)
