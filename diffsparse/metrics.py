"""Video quality of a sparse output against the dense output of the same seed: PSNR, SSIM, LPIPS per frame.

Videos may be given in the layouts diffusers pipelines return: numpy `(F, H, W, C)` (`output_type="np"`),
torch `(F, C, H, W)` or `(B, F, C, H, W)` (`output_type="pt"`), or a list of PIL images (`output_type="pil"`).
Values are expected in [0, 1] unless `data_range` says otherwise (float input); integer frames (uint8 arrays,
tensors or PIL images) are scaled from their type's range to [0, 1].
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

_CHANNEL_SIZES = (1, 3, 4)


def as_frames(video) -> np.ndarray:
    """A video as a float64 array `(F, H, W, C)`."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(frame) for frame in video])
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy() if not video.is_floating_point() else video.detach().float().cpu().numpy()
    video = np.asarray(video)
    # Integer frames (uint8 from PIL, imageio or a tensor) in [0, 1] like float ones: before, only PIL lists were
    # scaled, and a uint8 array scored -9.5 dB where its PIL frames scored 38.6.
    scale = float(np.iinfo(video.dtype).max) if np.issubdtype(video.dtype, np.integer) else 1.0
    video = video.astype(np.float64) / scale
    if video.ndim == 5:  # (B, F, ...) -> frames of all videos in order
        video = video.reshape(-1, *video.shape[2:])
    if video.ndim == 3:  # single-channel frames
        video = video[..., None]
    if video.ndim != 4:
        raise ValueError(f"a video must have 3 to 5 dimensions (frames first), got shape {video.shape}")
    if video.shape[-1] not in _CHANNEL_SIZES and video.shape[1] in _CHANNEL_SIZES:
        video = video.transpose(0, 2, 3, 1)  # (F, C, H, W) -> (F, H, W, C)
    elif video.shape[-1] not in _CHANNEL_SIZES:  # e.g. a VAE's (B, C, F, H, W), read as 16 "channels" before
        raise ValueError(f"a video's frames must have {_CHANNEL_SIZES} channels, last or after the frames, got shape "
                         f"{video.shape}")
    return video


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_frames(a), as_frames(b)
    if a.shape != b.shape:
        raise ValueError(f"videos must have equal shapes to compare, got {a.shape} and {b.shape}")
    return a, b


def psnr(video, reference, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, per frame then averaged over the frames that differ (a frame identical in
    both has an infinite PSNR, which would make the mean infinite whatever the others: `inf` only when every frame
    is identical).

    Example:
        >>> import numpy as np
        >>> a = np.zeros((2, 8, 8, 3))
        >>> round(psnr(a + 0.1, a), 6)
        20.0
    """
    a, b = _paired(video, reference)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        per_frame = 10.0 * np.log10(data_range**2 / mse)
    differing = per_frame[np.isfinite(per_frame)]
    return float(differing.mean()) if len(differing) else float("inf")


def ssim(video, reference, data_range: float = 1.0) -> float:
    """Structural similarity (scikit-image, colour channels), per frame then averaged.

    Frames smaller than scikit-image's 7-pixel window use the largest odd window that fits.

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).random((2, 16, 16, 3))
        >>> ssim(a, a)
        1.0
    """
    a, b = _paired(video, reference)
    side = min(a.shape[1:3])
    win_size = min(7, side if side % 2 else side - 1)  # the largest odd window that fits
    if win_size < 3:
        raise ValueError(f"SSIM needs frames of at least 3x3 pixels, got {a.shape[1:3]}")
    scores = [
        structural_similarity(x, y, data_range=data_range, channel_axis=-1, win_size=win_size) for x, y in zip(a, b)
    ]
    return float(np.mean(scores))


def alexnet_weights_path() -> Path:
    """Where torchvision keeps the AlexNet backbone that LPIPS uses: the standard torch hub cache."""
    from torchvision.models import AlexNet_Weights

    filename = os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


LPIPS_MIN_SIZE = 32  # AlexNet's pooling needs frames of at least 32 x 32 pixels


def _too_small_for_lpips(frame_size) -> bool:
    return frame_size is not None and None not in frame_size and min(frame_size) < LPIPS_MIN_SIZE


def lpips_weights(path: str | os.PathLike | None = None, frame_size: tuple[int, int] | None = None) -> Path | None:
    """The AlexNet checkpoint LPIPS scores with: `path` when given (a missing file is a `ValueError`: LPIPS was
    asked for), else the torch hub cache's (`alexnet_weights_path()`) when it holds one, else `None` (scores go
    without LPIPS, saying so: `lpips_missing_reason`). `frame_size`, (height, width) in pixels when known: frames
    smaller than LPIPS takes get `None` too, or a `ValueError` when `path` asked for LPIPS."""
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(
                f"lpips_weights={str(path)!r}: no such file (torchvision's AlexNet checkpoint, "
                f"{alexnet_weights_path().name})"
            )
        if _too_small_for_lpips(frame_size):
            raise ValueError(f"lpips_weights={str(path)!r}: LPIPS (AlexNet) needs frames of at least "
                             f"{LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels, got {frame_size[0]}x{frame_size[1]}")
        return Path(path)
    default = alexnet_weights_path()
    return default if default.is_file() and not _too_small_for_lpips(frame_size) else None


def lpips_missing_reason(frame_size: tuple[int, int] | None = None) -> str:
    """Why a run has no LPIPS score (`lpips_weights` gave `None`): its frames are too small, or there are no
    weights in the torch hub cache."""
    if _too_small_for_lpips(frame_size):
        return (f"frames of {frame_size[0]}x{frame_size[1]} pixels, LPIPS (AlexNet) needs at least "
                f"{LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}")
    return f"no AlexNet weights at {alexnet_weights_path()} (or give --lpips-weights; see diffsparse.metrics.lpips)"


@lru_cache(maxsize=2)
def _lpips_model(weights_path: str):
    try:
        import lpips as lpips_package
    except ImportError as error:
        raise ImportError("LPIPS needs the metrics extra: pip install 'diffsparse[metrics]'") from error
    from torchvision.models import AlexNet_Weights

    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the AlexNet backbone weights, and there is no file at {path}. Download "
            f"{AlexNet_Weights.IMAGENET1K_V1.url} on a machine with network and put it there (the standard torch "
            "hub cache), or pass weights_path=... to lpips(). No score is given without them."
        )
    # pnet_rand=True builds the backbone without downloading; the real weights are loaded from `path` below.
    # The linear calibration layers of LPIPS v0.1 ship inside the lpips package.
    with warnings.catch_warnings():  # lpips still calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips_package.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    features = {
        key.removeprefix("features."): value
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items()
        if key.startswith("features.")
    }
    # LPIPS splits torchvision's `features` into slices that keep the original layer indices as names.
    backbone = {key: features[key.split(".", 1)[1]] for key in model.net.state_dict()}
    model.net.load_state_dict(backbone)
    return model.eval()


def lpips(video, reference, weights_path: str | os.PathLike | None = None) -> float:
    """LPIPS (AlexNet, v0.1) per frame, then averaged; lower is closer. Videos in [0, 1].

    Args:
        video, reference: videos in any layout `as_frames` accepts, values in [0, 1].
        weights_path (`str` or `os.PathLike`, *optional*): the torchvision AlexNet checkpoint; defaults to
            the standard torch hub cache (`alexnet_weights_path()`). A missing file raises `FileNotFoundError`
            saying where to put it: there is never a silent zero or a random backbone.

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).random((2, 64, 64, 3))
        >>> lpips(a, a) if alexnet_weights_path().is_file() else 0.0
        0.0
    """
    a, b = _paired(video, reference)
    if min(a.shape[1:3]) < LPIPS_MIN_SIZE:
        raise ValueError(f"LPIPS (AlexNet) needs frames of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels, got "
                         f"{a.shape[1:3]}")
    model = _lpips_model(str(weights_path or alexnet_weights_path()))

    def to_input(frames):  # (F, H, W, C) in [0, 1] -> (F, 3, H, W) in [-1, 1]
        x = torch.from_numpy(frames[..., :3]).float().permute(0, 3, 1, 2)
        return x.expand(-1, 3, -1, -1) * 2 - 1 if x.shape[1] == 1 else x * 2 - 1

    with torch.no_grad():
        return float(model(to_input(a), to_input(b)).mean())
