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
        (window3d(t=1, h=2, w=2) | sink(frames=1))
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
