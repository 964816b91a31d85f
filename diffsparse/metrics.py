"""Video quality of a sparse output against the dense output of the same seed: PSNR, SSIM, LPIPS per frame.

Videos may be given in the layouts diffusers pipelines return: numpy `(F, H, W, C)` (`output_type="np"`),
torch `(F, C, H, W)` or `(B, F, C, H, W)` (`output_type="pt"`), or a list of PIL images (`output_type="pil"`);
`as_frames` says exactly which layouts are read and which are refused. Float values must lie in [0, 1], or in
[0, data_range] when `data_range` says otherwise (a `ValueError` names the span found, with a slack of
0.001 x data_range for rounding); uint8 and uint16 frames (arrays, tensors or PIL images, in lists nested as
deep as diffusers' `.frames`) are scaled from their type's range to [0, 1]. A video with a value that is not
finite (NaN or inf: a broken run) scores NaN, with a `RuntimeWarning`, never a score that looks good.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from . import DiffsparseWarning

_CHANNEL_SIZES = (1, 3, 4)
# Integer frames are scaled by their type's full range; only these: an int32 or int64 video is as likely to hold
# 0..255 as 0..2**31-1, and dividing by its type's max turned frames of 0..255 into ~1e-7 (PSNR 172 dB).
_INTEGER_SCALES = {1: 255.0, 2: 65535.0}  # unsigned, by bytes: uint8 and uint16 of either byte order
_LAYOUTS = ("numpy (F, H, W, C) or (H, W, C), torch (F, C, H, W) or (C, H, W), (B, F, ...) of either, or a "
            "list of frames or PIL images, with C in (1, 3, 4)")


def _is_pil_image(video) -> bool:
    try:
        from PIL import Image
    except ImportError:  # without Pillow there are no PIL images to tell apart
        return False
    return isinstance(video, Image.Image)


# PIL modes whose pixels are values of a gray level or of RGB(A) as they are; the other colour modes are converted.
_PIL_AS_THEY_ARE = ("1", "L", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N")
# Modes of raw numbers (32-bit ints, floats) that say nothing of the range their values span.
_PIL_REFUSED = ("I", "F")
# Modes with an alpha band, converted to RGBA (premultiplied `La` by way of `LA`); LAB's "A" is a colour band.
_PIL_WITH_ALPHA = {"LA": "LA", "La": "LA", "PA": "PA", "RGBa": "RGBa"}


def _pil_pixels(image) -> np.ndarray:
    """A PIL image's pixels as `as_frames` reads them: gray or RGB(A) values; a palette (`P`) or another colour space
    (`YCbCr`, `HSV`, `CMYK`, `LAB`, ...) converted to RGB, one with an alpha band (`LA`, `PA`, ...) or a palette
    with a transparent entry (a GIF's) to RGBA. Before, `P` frames were scored on their palette indices and the
    others channel by channel in their own space."""
    if image.mode in _PIL_AS_THEY_ARE:
        return np.asarray(image)
    if image.mode in _PIL_REFUSED:
        raise ValueError(f"video: a PIL image of mode {image.mode!r} holds raw numbers of no known range; give it "
                         f"in mode 'L' or 'RGB', or as a float array (with data_range= when not in [0, 1])")
    if image.mode in _PIL_WITH_ALPHA:
        return np.asarray(image.convert(_PIL_WITH_ALPHA[image.mode]).convert("RGBA"))
    return np.asarray(image.convert("RGBA" if image.mode == "P" and "transparency" in image.info else "RGB"))


def _pil_frames(frames: list) -> list:
    """`frames` with their PIL images read (`_pil_pixels`); where some of them read as RGB and others as RGBA (a GIF
    whose frames differ in having a transparent entry), the RGB ones made opaque RGBA, so the video has one channel
    count."""
    read = [_pil_pixels(item) if _is_pil_image(item) else item for item in frames]
    images = [i for i, item in enumerate(frames) if _is_pil_image(item)]
    if {read[i].shape[-1] for i in images if read[i].ndim == 3} == {3, 4}:
        for i in images:
            if read[i].ndim == 3 and read[i].shape[-1] == 3:
                opaque = np.full((*read[i].shape[:2], 1), np.iinfo(read[i].dtype).max, read[i].dtype)
                read[i] = np.concatenate([read[i], opaque], axis=-1)
    return read


def as_frames(video) -> np.ndarray:
    """A video as a float64 array `(F, H, W, C)`, C in (1, 3, 4). Layouts, by number of dimensions:

    - a list (or tuple) of frames, e.g. PIL images (`output_type="pil"`; palette and other colour modes converted
      to RGB, or RGBA with an alpha band; modes `I` and `F` of raw numbers refused): each `(H, W, C)`, `(C, H, W)`
      or `(H, W)` (gray); a single PIL image is one frame; a list of tensors is read as the tensor stacked from them
      (`list(frames)` as `frames`: channels first, as below); a list of such lists (diffusers' `.frames`, one
      list per video) as the frames of its videos in order, gray ones (2-D arrays, tensors or PIL images; not lists
      of rows, read as the numbers they hold) as in a flat list;
    - 3: one image, numpy `(H, W, C)` or torch `(C, H, W)`, with C in (1, 3, 4); anything else is refused (a
      3-D array could be one image or gray frames: give gray frames as `(F, H, W, 1)` or a list);
    - 4: frames; numpy `(F, H, W, C)` when the last axis has 1, 3 or 4 entries, else `(F, C, H, W)` when the
      second has; torch the other way round, `(F, C, H, W)` first (diffusers' `output_type="pt"`: a video 1, 3
      or 4 pixels wide is not read as channels-last); else refused (e.g. a VAE's latents);
    - 5: the videos of a batch one after the other, `(B, F, ...)` with each video as in 4: diffusers' numpy
      `(B, F, H, W, C)` and torch `(B, F, C, H, W)`. A `(B, C, F, H, W)` tensor (a VAE's layout) is refused when F
      is not 1, 3 or 4, but when it is, it cannot be told apart from `(B, F, C, H, W)` and is read as that (C
      frames of F channels): give decoded frames in diffusers' layouts.

    uint8 and uint16 values are scaled by 255 and 65535 to [0, 1], bool ones read as 0 and 1, float ones kept;
    other integer types are refused (a `ValueError` naming the dtype): their range says nothing about the frames'.
    A video with no frames (an empty list, a `(0, H, W, C)` array) or frames of no pixels is a `ValueError`.
    """
    return _frames_and_videos(video)[0]


def _frames_and_videos(video) -> tuple[np.ndarray, int]:
    """`as_frames(video)`, and how many videos it read one after the other (a batch's B, a nested list's length
    once stacked: a list of rows of numbers is one image)."""
    if _is_pil_image(video):
        video = [video]
    listed = isinstance(video, (list, tuple))
    given = f"an empty {type(video).__name__}" if listed and not video else None
    if listed and video:
        video = _stacked(video)
    # diffusers' pt output is channels-first: a (F, 3, H, 4) video was read as 3 x H pixels of 4 channels. A list
    # of tensors is stacked into one first, so list(frames) reads as frames does.
    channels_first = isinstance(video, torch.Tensor) and video.ndim in (4, 5)
    tensor = isinstance(video, torch.Tensor)
    if tensor:
        video = _tensor_to_numpy(video)
    video = np.asarray(video)
    shape = video.shape  # as given, for the messages: a (B, C, F, H, W) tensor was refused naming (B*C, F, H, W)
    if given is None and video.size == 0:
        given = f"shape {video.shape}"
    if given is not None:  # numpy's "zero-size array to reduction" came from deep inside a score before
        raise ValueError(f"video has no frames or no pixels, got {given}: give at least one frame of at least 1x1 "
                         f"pixels ({_LAYOUTS})")
    scale = _scale(video.dtype)  # first: a dtype refused is never cast (complex would warn, then lose a part)
    video = video.astype(np.float64) / scale
    videos = video.shape[0] if video.ndim == 5 else 1
    if video.ndim == 5:  # (B, F, ...) -> the frames of every video in order
        video = video.reshape(-1, *video.shape[2:])
    elif video.ndim == 3 and listed:  # 2-D frames: gray
        video = video[..., None]
    elif video.ndim == 3:  # one image, in its container's own layout (see the docstring: no guessing)
        channels_axis = 0 if tensor else -1
        if video.shape[channels_axis] not in _CHANNEL_SIZES:
            layout = "(C, H, W)" if tensor else "(H, W, C)"
            raise ValueError(f"video of shape {video.shape}: a 3-D {'tensor' if tensor else 'array'} is read as one "
                             f"{layout} image with C in {_CHANNEL_SIZES}; give gray frames as (F, H, W, 1) or a "
                             f"list of 2-D frames (layouts: {_LAYOUTS})")
        video = (video.transpose(1, 2, 0) if tensor else video)[None]
    if video.ndim != 4:
        raise ValueError(f"video of shape {video.shape}: {video.ndim} dimensions, expected 3 to 5 ({_LAYOUTS})")
    if video.shape[1] in _CHANNEL_SIZES and (channels_first or video.shape[-1] not in _CHANNEL_SIZES):
        video = video.transpose(0, 2, 3, 1)  # (F, C, H, W) -> (F, H, W, C)
    elif video.shape[-1] not in _CHANNEL_SIZES:  # e.g. a VAE's (B, C, F, H, W), read as 16 "channels" before
        got = f"a list stacked to shape {shape}" if listed else f"shape {shape}"
        hint = ""
        if len(shape) == 5 and shape[1] in _CHANNEL_SIZES and shape[2] not in _CHANNEL_SIZES and not listed:
            swap = "permute" if tensor else "transpose"
            hint = f"; (B, C, F, H, W)? give frames as (B, F, C, H, W): `video.{swap}(0, 2, 1, 3, 4)`"
        raise ValueError(f"a video's frames must have {_CHANNEL_SIZES} channels, last or after the frames, got {got}"
                         f"{hint} ({_LAYOUTS})")
    return video, videos


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # float() first: numpy has no bfloat16, and frames of a run with autograd on still hold their graph
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).cpu().numpy()


def _stacked(frames: list | tuple) -> np.ndarray | torch.Tensor:
    """A list of frames (or of videos, nested as deep as diffusers' `.frames`) as one array, or as one tensor when
    every item is a tensor: then the tensor layouts apply, channels first, as to the tensor the list was made of."""
    items = _pil_frames([_stacked(item) if isinstance(item, (list, tuple)) and item else item for item in frames])
    # A 2-D frame given whole (array, tensor, PIL image) is gray: its channel axis goes in here, where it is still
    # known to be a frame. Stacked without one, a nested list ([[frame, ...]], as `.frames`) became (1, F, H, W),
    # its F frames read as channels. Frames built here from lists of rows keep as_frames' rule for 3-D lists.
    gray = [not isinstance(frame, (list, tuple)) and getattr(item, "ndim", None) == 2
            for frame, item in zip(frames, items)]
    if all(isinstance(item, torch.Tensor) for item in items):
        tensors = [item.detach()[None] if is_gray else item.detach() for item, is_gray in zip(items, gray)]
        try:  # a gray frame's channel axis first, as the tensor layouts read it
            return torch.stack(tensors)
        except RuntimeError as error:  # frames of different shapes or dtypes
            raise ValueError(f"video: a list's frames must have one shape, got {[tuple(i.shape) for i in items]} "
                             f"({error})") from error
    arrays = [_tensor_to_numpy(item) if isinstance(item, torch.Tensor) else np.asarray(item) for item in items]
    shapes = [array.shape for array in arrays]  # as given, for the message: (H, W) for a gray frame
    arrays = [array[..., None] if is_gray else array for array, is_gray in zip(arrays, gray)]
    if len({array.shape for array in arrays}) > 1:  # numpy's "all input arrays must have the same shape" named none
        modes = [item.mode for item in frames if _is_pil_image(item)]
        of_modes = f" (PIL images of modes {modes})" if modes else ""
        raise ValueError(f"video: a list's frames must have one shape, got {shapes}{of_modes}: give frames of one "
                         "size and one channel count (PIL images of one size and one mode, 'L' or 'RGB', say)")
    return np.stack(arrays)


def _scale(dtype: np.dtype) -> float:
    if dtype.kind == "u" and dtype.itemsize in _INTEGER_SCALES:
        return _INTEGER_SCALES[dtype.itemsize]
    if np.issubdtype(dtype, np.integer):
        raise ValueError(f"video of dtype {dtype}: integer frames must be uint8 (0..255) or uint16 (0..65535); give "
                         "other values as floats (in [0, 1], or with data_range=)")
    if not (np.issubdtype(dtype, np.floating) or dtype == np.bool_):
        raise ValueError(f"video of dtype {dtype}: frames must be real numbers (float, uint8, uint16 or bool)")
    return 1.0


def _scaled_on_reading(video) -> bool:
    """Whether `as_frames` scales `video` to [0, 1] itself: integer or bool frames, PIL images among them."""
    first = video
    # To the first frame however deep: pipe(output_type="pil").frames is a list of videos, each a list of PIL
    # images, and looking one level down let data_range=255 through on it (48 dB too high).
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if _is_pil_image(first):
        return True
    dtype = first.dtype if isinstance(first, (torch.Tensor, np.ndarray)) else None
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex)
    return dtype is not None and (np.issubdtype(dtype, np.integer) or dtype == np.bool_)


def _check_data_range(data_range, video, reference) -> None:
    real = isinstance(data_range, (int, float, np.number)) and not isinstance(data_range, (bool, np.bool_))
    if not (real and math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range={data_range!r}: must be a finite number above 0, the span of the values "
                         "(1.0 for frames in [0, 1], 255.0 for float frames holding 0..255)")
    # uint8/uint16 frames are read as [0, 1] already: data_range=255 on them, scikit-image's habit, added 48 dB.
    if data_range != 1 and (_scaled_on_reading(video) or _scaled_on_reading(reference)):
        raise ValueError(f"data_range={data_range!r}: integer frames (uint8, uint16, PIL images) are scaled to "
                         "[0, 1] when read, so their span is 1.0: leave data_range at its default")


# Slack for values a rounding step past the range (clamped float16 output converted, say), as a share of it.
_RANGE_SLACK = 1e-3


def _check_values_in_range(a: np.ndarray, b: np.ndarray, data_range: float, integer: tuple[bool, bool]) -> None:
    """A `ValueError` when a video's values leave [0, data_range]: the scores assume that span, and frames of
    0..255 scored at the default range gave a PSNR of -27.6 dB, an LPIPS of 0.0042 where [0, 1] gave 0.0097.
    `integer`: whether the video and the reference were integer frames (read as [0, 1], taking no data_range)."""
    slack = _RANGE_SLACK * data_range
    for name, x, other, other_is_integer in (("video", a, "reference", integer[1]),
                                             ("reference", b, "video", integer[0])):
        lo, hi = float(x.min()), float(x.max())
        if lo < -slack or hi > data_range + slack:
            # data_range=255.0 is refused when the other video is integer frames: the float one must come to [0, 1].
            advice = (f"the {other} is integer frames, read as [0, 1] and taking no data_range: divide the float "
                      f"{name} by 255 (by 65535 for 0..65535) first" if other_is_integer else
                      "frames in [0, 1] at the default 1.0; data_range=255.0 for float frames of 0..255; map frames "
                      "in [-1, 1] to [0, 1] first")
            raise ValueError(
                f"data_range={data_range!r}: the {name}'s values span [{lo:.6g}, {hi:.6g}], expected [0, data_range] "
                f"({advice})"
            )


class NonFiniteScoreWarning(DiffsparseWarning, RuntimeWarning):
    """A score is NaN: a video holds values that are not finite. A `RuntimeWarning` as well, as numpy's own."""


def _not_finite(a: np.ndarray, b: np.ndarray, metric: str) -> bool:
    """Does either video hold a value that is not finite? Then `metric` is NaN, said in a warning: a NaN frame
    left out (or an all-NaN video read as identical, PSNR inf) made a broken run look as good as a perfect one."""
    bad = {name: int((~np.isfinite(x)).sum()) for name, x in (("video", a), ("reference", b))}
    if not any(bad.values()):
        return False
    counts = ", ".join(f"{name} {count} of {a.size}" for name, count in bad.items() if count)
    # 4: past this function, _scored_pair and psnr/ssim/lpips, at the line that asked for the score.
    warnings.warn(f"{metric} is nan: values that are not finite (NaN or inf) in {counts}", NonFiniteScoreWarning,
                  stacklevel=4)
    return True


_AXES = ("frames", "height", "width", "channels")  # of as_frames' (F, H, W, C)


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    (a, videos_a), (b, videos_b) = _frames_and_videos(a), _frames_and_videos(b)
    if videos_a != videos_b and a.shape == b.shape:
        # A batch of 2 videos of 3 frames and one of 3 of 2 read as 6 frames each: scored frame by frame, each
        # video's frames would meet another video's.
        held_a, held_b = (f"{n} video{'s' * (n != 1)}" for n in (videos_a, videos_b))
        raise ValueError(f"videos must have equal shapes to compare: the video holds {held_a} and the reference "
                         f"{held_b}, of {a.shape[0]} frames in all (give both as the same batch)")
    if a.shape != b.shape:
        # Named by axis: the shapes are as read, (F, H, W, C), not as given (a torch video is (F, C, H, W)), and a
        # bare pair of tuples left the reader to find which axis differed, and in which layout.
        differ = "; ".join(f"{axis} {x} and {y}" for axis, x, y in zip(_AXES, a.shape, b.shape) if x != y)
        raise ValueError(f"videos must have equal shapes to compare: the video and the reference differ in {differ} "
                         f"(read as (frames, height, width, channels): {a.shape} and {b.shape})")
    return a, b


def _scored_pair(video, reference, data_range, metric: str, check_frames=None) -> tuple[np.ndarray, np.ndarray] | None:
    """Both videos as frames, checked; `None` when either holds a value that is not finite (the score is NaN).
    `check_frames(frames)` raises for what the metric cannot score at all (frames too small, no weights) before
    that: a broken run's NaN must not hide an error the next run would meet."""
    _check_data_range(data_range, video, reference)
    a, b = _paired(video, reference)
    if check_frames is not None:
        check_frames(a)
    if _not_finite(a, b, metric):
        return None
    _check_values_in_range(a, b, data_range, (_scaled_on_reading(video), _scaled_on_reading(reference)))
    return a, b


def psnr(video, reference, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, per frame then averaged over the frames that differ (a frame identical in
    both has an infinite PSNR, which would make the mean infinite whatever the others: `inf` only when every frame
    is identical). NaN when either video holds a value that is not finite (a broken run), with a `RuntimeWarning`:
    `eval.md`, `eval.csv` and `compare`'s printout show `nan`, `compare.json` `"nan"` (its `null` is `inf`).
    `data_range`: the span of float values, a finite number above 0 (integer frames are read as [0, 1]: 1.0);
    float values below 0 or above `data_range` (past a slack of 0.001 x data_range) are a `ValueError`.

    Example:
        >>> import numpy as np
        >>> a = np.zeros((2, 8, 8, 3))
        >>> round(psnr(a + 0.1, a), 6)
        20.0
    """
    pair = _scored_pair(video, reference, data_range, "PSNR")
    if pair is None:
        return float("nan")
    a, b = pair
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    differing = mse[mse > 0]  # only identical frames: a NaN one never reaches here (see _not_finite)
    return float(np.mean(10.0 * np.log10(data_range**2 / differing))) if len(differing) else float("inf")


def _ssim_window(frames: np.ndarray) -> int:
    """The largest odd window up to scikit-image's 7 pixels that fits the frames."""
    side = min(frames.shape[1:3])
    win_size = min(7, side if side % 2 else side - 1)
    if win_size < 3:
        raise ValueError(f"SSIM needs frames of at least 3x3 pixels, got {frames.shape[1:3]}")
    return win_size


def ssim(video, reference, data_range: float = 1.0) -> float:
    """Structural similarity (scikit-image, colour channels), per frame then averaged.

    Frames smaller than scikit-image's 7-pixel window use the largest odd window that fits. NaN (with a
    `RuntimeWarning`) when either video holds a value that is not finite; `data_range` as in `psnr`.

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).random((2, 16, 16, 3))
        >>> ssim(a, a)
        1.0
    """
    pair = _scored_pair(video, reference, data_range, "SSIM", check_frames=_ssim_window)
    if pair is None:
        return float("nan")
    a, b = pair
    win_size = _ssim_window(a)
    scores = [
        structural_similarity(x, y, data_range=data_range, channel_axis=-1, win_size=win_size) for x, y in zip(a, b)
    ]
    return float(np.mean(scores))


# torchvision's AlexNet_Weights.IMAGENET1K_V1.url, spelt out so that the path (and the message saying LPIPS was
# left out) needs no torchvision: without the metrics extra, asking where the weights go ended every command.
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
_METRICS_PACKAGES = ("lpips", "torchvision")


def alexnet_weights_path() -> Path:
    """Where torchvision keeps the AlexNet backbone that LPIPS uses: the standard torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(ALEXNET_URL)


def _missing_packages() -> list[str]:
    """The packages of the `metrics` extra that cannot be imported (imported, not looked up: a torchvision built
    for another torch is there but fails to import)."""
    missing = []
    for name in _METRICS_PACKAGES:
        try:
            with warnings.catch_warnings():  # lpips still calls torchvision's deprecated `pretrained=` argument
                warnings.simplefilter("ignore", UserWarning)
                __import__(name)
        except Exception:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError on import
            missing.append(name)
    return missing


# AlexNet's convolutions and pooling leave a 30 x 30 frame nothing to pool at the last max-pool (31 x 31 scores).
LPIPS_MIN_SIZE = 31


def _too_small_for_lpips(frame_size) -> bool:
    return frame_size is not None and None not in frame_size and min(frame_size) < LPIPS_MIN_SIZE


def lpips_weights(path: str | os.PathLike | None = None, frame_size: tuple[int, int] | None = None) -> Path | None:
    """The AlexNet checkpoint LPIPS scores with: `path` when given (a `ValueError`, before any run, when the file
    is missing or holds no AlexNet `features.*` weights of AlexNet's shapes, or the `metrics` extra's packages,
    lpips and torchvision, are not installed: LPIPS was asked for), else the torch hub cache's
    (`alexnet_weights_path()`) when it holds one and the packages are installed (a `ValueError` too when that file
    holds no AlexNet weights of AlexNet's shapes), else `None` (scores go without LPIPS, saying so:
    `lpips_missing_reason`).
    `frame_size`, (height, width) in pixels when known: frames smaller than LPIPS takes get `None` too, or a
    `ValueError` when `path` asked for LPIPS."""
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(
                f"lpips_weights={str(path)!r}: no such file (torchvision's AlexNet checkpoint, "
                f"{alexnet_weights_path().name})"
            )
        if _too_small_for_lpips(frame_size):
            raise ValueError(f"lpips_weights={str(path)!r}: LPIPS (AlexNet) needs frames of at least "
                             f"{LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels, got {frame_size[0]}x{frame_size[1]}")
        missing = _missing_packages()
        if missing:
            raise ValueError(f"lpips_weights={str(path)!r}: LPIPS needs the packages {' and '.join(missing)}, not "
                             "installed (or failing to import): pip install 'diffsparse[metrics]'")
        _alexnet_features(Path(path))  # a wrong file (lpips' own alex.pth, say): said now, not after the runs
        return Path(path)
    if _too_small_for_lpips(frame_size) or _missing_packages():
        return None
    default = alexnet_weights_path()
    if not default.is_file():
        return None
    # Checked as a given file is: a wrong file there (lpips' own alex.pth copied in, a truncated download) failed in
    # lpips() only after the runs.
    stat = default.stat()
    # The change time and inode too: a copy that keeps the size and the modification time (`rsync -a`, `cp -p`) is
    # another file.
    _cached_file_checked(str(default), stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_size)
    return default


@lru_cache(maxsize=4)
def _cached_file_checked(path: str, *version: int) -> None:
    """`_alexnet_features` of the torch hub cache's file, once per `version` of it (its times, inode and size): the
    commands ask before and after their runs, and reading 233 MB each time is not free."""
    try:
        _alexnet_features(Path(path), "file")
    except ValueError as error:
        raise ValueError(f"the torch hub cache's AlexNet checkpoint, which LPIPS scores with when no weights are "
                         f"given, cannot be used (replace or delete it, or give another file: lpips_weights, on the "
                         f"command line --lpips-weights): {error}") from error


def lpips_missing_reason(frame_size: tuple[int, int] | None = None) -> str:
    """Why a run has no LPIPS score (`lpips_weights` gave `None`): its frames are too small, the `metrics` extra
    is not installed, or there are no weights in the torch hub cache."""
    if _too_small_for_lpips(frame_size):
        return (f"frames of {frame_size[0]}x{frame_size[1]} pixels, LPIPS (AlexNet) needs at least "
                f"{LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}")
    missing = _missing_packages()
    if missing:
        return f"{' and '.join(missing)} not installed or failing to import (pip install 'diffsparse[metrics]')"
    return f"no AlexNet weights at {alexnet_weights_path()} (or give --lpips-weights; see diffsparse.metrics.lpips)"


# The shapes of torchvision AlexNet's five convolutions (`features.*` less the prefix), which LPIPS loads: a test
# pins them to torchvision's. Checked with the file: a wrong shape surfaced after every run, as a bare RuntimeError.
_ALEXNET_FEATURES = {
    "0.weight": (64, 3, 11, 11), "0.bias": (64,),
    "3.weight": (192, 64, 5, 5), "3.bias": (192,),
    "6.weight": (384, 192, 3, 3), "6.bias": (384,),
    "8.weight": (256, 384, 3, 3), "8.bias": (256,),
    "10.weight": (256, 256, 3, 3), "10.bias": (256,),
}


def _alexnet_features(path: Path, field: str = "lpips_weights") -> dict[str, torch.Tensor]:
    """`features.*` of a torchvision AlexNet checkpoint, without the prefix; a `ValueError` naming `field` and the
    file when it is not a state dict, lacks one of the five convolutions' weights or biases (before, the first
    missing layer surfaced as a bare `KeyError('0.weight')`), or holds one that is not a tensor of its shape."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors alike for a file it cannot read
        raise ValueError(f"{field}={str(path)!r}: not a torch checkpoint torch.load can read ({error})") from error
    advice = (f"give torchvision's AlexNet checkpoint, {os.path.basename(ALEXNET_URL)} from {ALEXNET_URL}, not "
              "lpips' own weights/v0.1/alex.pth")
    if not isinstance(state, dict):  # a bare tensor, a list: read as holding nothing before
        raise ValueError(f"{field}={str(path)!r}: the file holds a {type(state).__name__}, not a state dict of "
                         f"AlexNet's features.* weights: {advice}")
    features = {key.removeprefix("features."): value for key, value in state.items()
                if isinstance(key, str) and key.startswith("features.")}
    absent = [key for key in _ALEXNET_FEATURES if key not in features]
    if absent:
        found = ", ".join(map(str, list(state)[:3])) or "nothing"
        which = "no AlexNet" if len(absent) == len(_ALEXNET_FEATURES) else "not all the AlexNet"
        missing = ", ".join(f"features.{key}" for key in absent)
        raise ValueError(
            f"{field}={str(path)!r}: {which} features.* weights in the file (missing {missing}; it holds "
            f"{found}{', ...' if len(state) > 3 else ''}): {advice}"
        )
    for key, shape in _ALEXNET_FEATURES.items():
        value = features[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = f"has shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else \
                f"is a {type(value).__name__}"
            raise ValueError(f"{field}={str(path)!r}: features.{key} {got}, expected a tensor of shape {shape} "
                             f"(torchvision's AlexNet): {advice}")
    return features


@lru_cache(maxsize=2)
def _lpips_model(weights_path: str, given: bool = True):
    try:
        import lpips as lpips_package
    except ImportError as error:
        raise ImportError("LPIPS needs the metrics extra: pip install 'diffsparse[metrics]'") from error

    path = Path(weights_path)
    if not path.is_file() and given:
        raise FileNotFoundError(
            f"weights_path={weights_path!r}: no such file. LPIPS needs torchvision's AlexNet checkpoint there "
            f"({ALEXNET_URL}). No score is given without it."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the AlexNet backbone weights, and there is no file at {path}. Download "
            f"{ALEXNET_URL} on a machine with network and put it there (the standard torch "
            "hub cache), or pass weights_path=... to lpips(). No score is given without them."
        )
    features = _alexnet_features(path, "weights_path")
    # pnet_rand=True builds the backbone without downloading; the real weights are loaded from `path` below.
    # The linear calibration layers of LPIPS v0.1 ship inside the lpips package.
    with warnings.catch_warnings():  # lpips still calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips_package.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    # LPIPS splits torchvision's `features` into slices that keep the original layer indices as names.
    backbone = {key: features[key.split(".", 1)[1]] for key in model.net.state_dict()}
    model.net.load_state_dict(backbone)
    return model.eval()


# Frames per AlexNet pass: its activations take ~125 MiB per 480x832 frame, ~10 GiB for Wan's 81 frames at once.
LPIPS_CHUNK = 8


def lpips(video, reference, weights_path: str | os.PathLike | None = None, data_range: float = 1.0) -> float:
    """LPIPS (AlexNet, v0.1) per frame, then averaged; lower is closer. Videos in [0, data_range], [0, 1] by
    default; scored `LPIPS_CHUNK` frames at a time, so memory does not grow with the frame count. AlexNet sees RGB:
    RGBA frames are scored on their RGB channels only (their alpha is left out, where `psnr` and `ssim` score all
    4 channels), gray frames as their RGB copies.

    Args:
        video, reference: videos in any layout `as_frames` accepts, values in [0, data_range].
        weights_path (`str` or `os.PathLike`, *optional*): the torchvision AlexNet checkpoint; defaults to
            the standard torch hub cache (`alexnet_weights_path()`). A missing file raises `FileNotFoundError`
            saying where to put it, a file without AlexNet's `features.*` weights (or with ones of other shapes) a
            `ValueError`: there is never a silent zero or a random backbone. NaN (with a `RuntimeWarning`) when
            either video holds a value that is not finite.
        data_range (`float`, *optional*, defaults to `1.0`): the span of float values, as in `psnr` and `ssim`
            (a `ValueError` for values outside it: LPIPS has no range of its own, and frames of 0..255 read as
            [0, 1] scored 0.0042 where the same frames in [0, 1] scored 0.0097). Frames are divided by it.

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).random((2, 64, 64, 3))
        >>> lpips(a, a) if alexnet_weights_path().is_file() else 0.0
        0.0
    """
    def model_for(frames):  # too small frames or no weights are errors, before a NaN video's early return
        if min(frames.shape[1:3]) < LPIPS_MIN_SIZE:
            raise ValueError(f"LPIPS (AlexNet) needs frames of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels, "
                             f"got {frames.shape[1:3]}")
        given = weights_path is not None
        return _lpips_model(str(weights_path if given else alexnet_weights_path()), given)

    pair = _scored_pair(video, reference, data_range, "LPIPS", check_frames=model_for)
    if pair is None:
        return float("nan")
    a, b = pair
    model = model_for(a)

    def to_input(frames):  # (F, H, W, C) in [0, data_range] -> (F, 3, H, W) in [-1, 1], float32 per chunk only
        x = torch.from_numpy(frames[..., :3]).float().permute(0, 3, 1, 2) / data_range
        return x.expand(-1, 3, -1, -1) * 2 - 1 if x.shape[1] == 1 else x * 2 - 1

    scores = []
    with torch.no_grad():
        for start in range(0, len(a), LPIPS_CHUNK):
            chunk = slice(start, start + LPIPS_CHUNK)
            scores.append(model(to_input(a[chunk]), to_input(b[chunk])).flatten().double())
    return float(torch.cat(scores).mean())
