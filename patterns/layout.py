"""Token layouts: where video and text tokens sit in an attention sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_POSITIONS = ("start", "end")

# An extent along (frames, height, width): one int for all three axes, or one int per axis.
Triple = int | tuple[int, int, int]


def as_triple(value: Triple, name: str) -> tuple[int, int, int]:
    r"""
    Normalise an int-or-triple argument to `(t, h, w)`.

    Args:
        value (`int` or `tuple[int, int, int]`): one positive size for all axes, or one per axis.
        name (`str`): the argument's name, for the error message.

    Example:
        >>> as_triple(8, "tile"), as_triple((2, 8, 8), "tile")
        ((8, 8, 8), (2, 8, 8))
    """
    triple = (value,) * 3 if not isinstance(value, (tuple, list)) else tuple(value)
    # The bound keeps sizes inside torch's int64 (a larger one covers any axis anyway).
    if len(triple) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31 for v in triple):
        raise ValueError(
            f"{name} must be a positive int below 2**31 or a triple of them (t, h, w), got {name}={value!r}"
        )
    return triple


@dataclass(frozen=True)
class VideoLayout:
    r"""
    The token layout of one attention sequence: a video grid in frame-major order, plus optional text.

    Args:
        frames (`int`): latent frames after patchification (tokens along time).
        height (`int`): tokens along height.
        width (`int`): tokens along width.
        text_len (`int`, *optional*, defaults to `0`): number of text tokens in the same sequence
            (joint-attention models); `0` for models whose self-attention sees only video tokens (Wan).
        text_position (`str`, *optional*, defaults to `"end"`): `"start"` or `"end"`, where the text
            tokens sit relative to the video tokens.

    Video token `n` (counted from the first video token) sits at frame `n // (height * width)`,
    row `(n // width) % height`, column `n % width`.

    Example:
        >>> layout = VideoLayout(frames=21, height=30, width=52)
        >>> layout.num_tokens
        32760
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: str = "end"

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VideoLayout.{name} must be a positive int, got {name}={value!r}")
        if not isinstance(self.text_len, int) or isinstance(self.text_len, bool) or self.text_len < 0:
            raise ValueError(f"VideoLayout.text_len must be an int >= 0, got text_len={self.text_len!r}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(
                f"VideoLayout.text_position must be one of {TEXT_POSITIONS}, got text_position={self.text_position!r}"
            )

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.num_video_tokens + self.text_len

    @property
    def video_start(self) -> int:
        """Index of the first video token in the sequence."""
        return self.text_len if self.text_position == "start" else 0

    @property
    def text_start(self) -> int:
        """Index of the first text token in the sequence (the text span is empty when `text_len == 0`)."""
        return 0 if self.text_position == "start" else self.num_video_tokens

    @property
    def grid(self) -> tuple[int, int, int]:
        """`(frames, height, width)`."""
        return self.frames, self.height, self.width

    def video_coordinates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""
        `(frame, row, col)` of every video token in frame-major order: three `torch.LongTensor` of shape
        `(V,)`.

        Example:
            >>> [c.tolist() for c in VideoLayout(frames=2, height=1, width=2).video_coordinates()]
            [[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]]
        """
        n = torch.arange(self.num_video_tokens)
        return n // self.tokens_per_frame, (n // self.width) % self.height, n % self.width
