"""PSNR and SSIM against known values, in the layouts diffusers pipelines return."""

import math
import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch

from diffsparse.metrics import as_frames, psnr, ssim


def test_identical_videos():
    video = np.random.default_rng(0).random((4, 16, 20, 3))
    assert psnr(video, video) == float("inf")
    assert ssim(video, video) == pytest.approx(1.0)


def test_constant_offset_has_known_psnr():
    video = np.full((3, 8, 8, 3), 0.5)
    # MSE = 0.05**2 -> PSNR = 10 log10(1 / 0.0025) = 26.0206 dB
    assert psnr(video + 0.05, video) == pytest.approx(20 * np.log10(1 / 0.05))
    assert psnr(video * 255 + 10, video * 255, data_range=255.0) == pytest.approx(20 * np.log10(255 / 10))


def test_psnr_is_averaged_per_frame():
    reference = np.zeros((2, 8, 8, 3))
    video = reference.copy()
    video[0] += 0.1  # 20 dB
    video[1] += 0.01  # 40 dB
    assert psnr(video, reference) == pytest.approx(30.0)
    # A frame identical in both (a conditioning frame, a saturated one) is left out: before, its infinite PSNR made
    # the whole video's inf, and one such video an eval row's.
    assert psnr(np.concatenate([video, reference[:1]]), np.concatenate([reference, reference[:1]])) == \
        pytest.approx(30.0)


def test_ssim_drops_with_noise_and_handles_small_frames():
    rng = np.random.default_rng(1)
    video = rng.random((2, 5, 6, 3))
    noisy = np.clip(video + rng.normal(0, 0.2, video.shape), 0, 1)
    assert ssim(noisy, video) < 0.95
    with pytest.raises(ValueError, match="3x3"):
        ssim(video[:, :2], video[:, :2])
    # The largest odd window that fits: 5 on 5-pixel frames (before: 3), 3 on 3-pixel ones (before: refused).
    from skimage.metrics import structural_similarity

    for side in (3, 5, 6, 7):  # 6: the odd window below it, 5
        a = rng.random((2, side, side, 3))
        b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
        window = side - 1 + side % 2
        expected = np.mean([structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=window)
                            for x, y in zip(b, a)])
        assert ssim(b, a) == pytest.approx(expected), side


def test_layouts_from_pipelines_agree():
    rng = np.random.default_rng(2)
    np_video = rng.random((3, 8, 10, 3)).astype(np.float32)  # output_type="np": (F, H, W, C)
    pt_video = torch.from_numpy(np_video).permute(0, 3, 1, 2)[None]  # output_type="pt": (B, F, C, H, W)
    pil_like = [(frame * 255).round().astype(np.uint8) for frame in np_video]  # like output_type="pil"
    np.testing.assert_allclose(as_frames(pt_video), np_video)
    assert np.abs(as_frames(pil_like) - np_video).max() <= 0.5 / 255 + 1e-6
    assert psnr(pt_video, np_video) == float("inf")
    # Integer frames in [0, 1] whatever their container: before, only PIL lists were scaled (a uint8 array scored
    # -9.5 dB where the same frames as PIL images scored 38.6).
    as_uint8 = np.stack(pil_like)
    for frames in (as_uint8, torch.from_numpy(as_uint8)):
        np.testing.assert_array_equal(as_frames(frames), as_frames(pil_like))
    # 5-D is read as diffusers' (B, F, ...): a VAE's (B, C, F, H, W) has no channel axis where one is looked for
    # when F is not 1, 3 or 4, and is refused, not misread...
    with pytest.raises(ValueError, match="channels"):
        as_frames(np.zeros((1, 3, 5, 16, 16)))
    # ...but with F in (1, 3, 4) it is also a valid (B, F, C, H, W) and cannot be told apart: read as that, C frames
    # of F channels (documented in as_frames; pinned here so that a change of the rule is a decision, not an accident).
    for channels, frames in ((3, 1), (3, 3), (3, 4), (16, 1), (16, 4)):
        assert as_frames(np.zeros((1, channels, frames, 16, 16))).shape == (channels, 16, 16, frames)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(np.zeros((2, 8, 8, 3)), np.zeros((3, 8, 8, 3)))
    # The axes that differ are named: the shapes are as read, (F, H, W, C), which is not a torch video's layout.
    with pytest.raises(ValueError, match=r"differ in frames 2 and 3 \(read as \(frames, height, width, channels"):
        psnr(np.zeros((2, 8, 8, 3)), [np.zeros((8, 8, 3))] * 3)
    with pytest.raises(ValueError, match=r"differ in width 6 and 8; channels 3 and 1 \("):
        ssim(torch.zeros(2, 3, 8, 6), np.zeros((2, 8, 8, 1)))
    # Two videos of 3 frames against three of 2: 6 frames each, but no frame meets its own video's.
    with pytest.raises(ValueError, match="the video holds 2 videos and the reference 3 videos, of 6 frames in all"):
        psnr(np.zeros((2, 3, 8, 8, 3)), torch.zeros(3, 2, 3, 8, 8))
    with pytest.raises(ValueError, match="holds 1 video and the reference 2 videos"):
        psnr(np.zeros((6, 8, 8, 3)), [[np.zeros((8, 8, 3))] * 3] * 2)
    assert psnr(np.zeros((1, 6, 8, 8, 3)), [np.zeros((8, 8, 3))] * 6) == float("inf")  # one video either way
    assert psnr(np.zeros((2, 8, 8, 3)).tolist(), np.zeros((2, 8, 8, 3))) == float("inf")  # lists of rows: one video


def test_lpips_loads_the_backbone_from_a_checkpoint_file(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from diffsparse.metrics import _lpips_model, lpips

    torch.manual_seed(0)
    backbone = torchvision.models.alexnet()  # random weights stand in for the real checkpoint
    path = tmp_path / "alexnet.pth"
    torch.save(backbone.state_dict(), path)

    model = _lpips_model(str(path))
    loaded = model.net.state_dict()
    assert len(loaded) == 10  # the five convolutions of AlexNet, weight and bias each
    assert torch.equal(loaded["slice1.0.weight"], backbone.features[0].weight)
    assert torch.equal(loaded["slice5.10.bias"], backbone.features[10].bias)

    rng = np.random.default_rng(3)
    video = rng.random((2, 48, 64, 3))
    assert lpips(video, video, weights_path=path) == pytest.approx(0.0, abs=1e-6)
    noisy = np.clip(video + rng.normal(0, 0.3, video.shape), 0, 1)
    # The score is LPIPS's mean over frames of (F, 3, H, W) frames in [-1, 1], its input range.
    def frames(x):
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() * 2 - 1

    with torch.no_grad():
        expected = float(model(frames(noisy), frames(video)).mean())
    assert expected > 0 and lpips(noisy, video, weights_path=path) == pytest.approx(expected, rel=1e-5)
    with pytest.warns(RuntimeWarning, match="LPIPS is nan"):  # a broken (NaN) video never scores as close
        assert np.isnan(lpips(np.full_like(video, np.nan), video, weights_path=path))


def test_lpips_without_weights_says_where_to_put_them(tmp_path):
    from diffsparse.metrics import lpips

    missing = tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth"
    video = np.zeros((1, 48, 48, 3))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        lpips(video, video, weights_path=missing)
    # A path the caller gave is named as theirs, not as the hub cache to fill; an empty one is not the default.
    with pytest.raises(FileNotFoundError, match="weights_path=") as error:
        lpips(video, video, weights_path=missing)
    assert "hub cache" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="weights_path=''"):
        lpips(video, video, weights_path="")


def test_a_broken_video_does_not_hide_what_the_metric_cannot_score(tmp_path):
    # Before, a NaN video gave NaN and a warning before the frame-size and weights checks: the missing weights or
    # too small frames surfaced only on the next run that was not broken.
    from diffsparse.metrics import lpips

    rng = np.random.default_rng(3)
    video = rng.random((2, 40, 40, 3))
    broken = video.copy()
    broken[0, 0, 0, 0] = np.nan
    with pytest.raises(FileNotFoundError, match="weights_path="):
        lpips(broken, video, weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="at least 31x31"):
        lpips(broken[:, :8, :8], video[:, :8, :8], weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="at least 3x3"):
        ssim(broken[:, :2, :2], video[:, :2, :2])


# ---------------------------------------------------------------- inputs that must not score well or be misread


def test_a_video_with_values_that_are_not_finite_scores_nan_not_perfect():
    # Before, the PSNR of an all-NaN video was inf (its NaN frames were dropped like identical ones: a broken run
    # scored as a perfect one), and a half-NaN one the PSNR of its other half.
    rng = np.random.default_rng(4)
    reference = rng.random((4, 16, 16, 3)) * 0.9  # room for the + 0.1 below inside [0, 1]
    half = reference + 0.1
    half[:2] = np.nan
    with_inf = reference.copy()
    with_inf[0, 0, 0, 0] = np.inf
    for video in (np.full_like(reference, np.nan), half, with_inf):
        for metric in (psnr, ssim):
            with pytest.warns(RuntimeWarning, match="not finite"):
                assert np.isnan(metric(video, reference)), metric.__name__
            with pytest.warns(RuntimeWarning, match="not finite"):  # either side
                assert np.isnan(metric(reference, video)), metric.__name__
    # Identical frames are still the only ones left out of the mean, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert psnr(np.concatenate([reference + 0.1, reference]), np.concatenate([reference, reference])) == \
            pytest.approx(20.0)


def test_single_images_are_one_frame_and_ambiguous_3d_input_is_refused():
    from PIL import Image

    rng = np.random.default_rng(5)
    image = rng.random((12, 20, 3))
    # Before, an (H, W, 3) array or one PIL image became H gray frames and a torch (3, H, W) image 3 gray frames.
    np.testing.assert_array_equal(as_frames(image), image[None])
    np.testing.assert_allclose(as_frames(torch.from_numpy(image).permute(2, 0, 1)), image[None])
    pixels = (image * 255).round().astype(np.uint8)
    assert as_frames(Image.fromarray(pixels)).shape == (1, 12, 20, 3)
    np.testing.assert_array_equal(as_frames(Image.fromarray(pixels)), as_frames([Image.fromarray(pixels)]))
    gray = [Image.fromarray(pixels[..., 0]), Image.fromarray(pixels[..., 1])]  # mode "L": 2-D frames
    assert as_frames(gray).shape == (2, 12, 20, 1) and as_frames(gray[0]).shape == (1, 12, 20, 1)
    # 3-D input with no channel axis of 1, 3 or 4 in its container's layout: gray frames or an image? Refused.
    for video in (rng.random((5, 12, 20)), torch.rand(5, 12, 20), rng.random((3, 12, 20))):
        with pytest.raises(ValueError, match="one .* image"):
            as_frames(video)


def test_only_uint8_and_uint16_frames_are_scaled_other_integers_are_refused():
    rng = np.random.default_rng(6)
    frames = rng.random((2, 8, 8, 3))
    as_uint16 = (frames * 65535).round().astype(np.uint16)
    assert np.abs(as_frames(as_uint16) - frames).max() <= 0.5 / 65535 + 1e-12
    # Before, int32 frames of 0..255 were divided by 2**31 - 1 (PSNR 172 dB between frames 34 dB apart).
    as_255 = (frames * 255).round()
    for frames_of_255 in (as_255.astype(np.int32), torch.from_numpy(as_255).to(torch.int64), as_255.astype(np.int16)):
        with pytest.raises(ValueError, match=r"dtype int(16|32|64)"):
            psnr(frames_of_255, frames_of_255)
    np.testing.assert_array_equal(as_frames(np.ones((1, 4, 4, 3), bool)), np.ones((1, 4, 4, 3)))


@pytest.mark.parametrize("data_range", [0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_data_range_must_be_a_positive_number(data_range):
    # Before, 0 gave inf and -1 a normal-looking PSNR.
    video = np.zeros((1, 8, 8, 3))
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match="data_range="):
            metric(video + 0.1, video, data_range=data_range)


def test_integer_frames_take_no_data_range_of_their_own():
    # They are read as [0, 1]: data_range=255 on uint8 frames (scikit-image's habit) scored 48 dB too high.
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    noisy = np.clip(frames.astype(int) + rng.integers(-9, 10, frames.shape), 0, 255).astype(np.uint8)
    as_float = psnr(noisy.astype(float), frames.astype(float), data_range=255.0)
    assert psnr(noisy, frames) == pytest.approx(as_float)
    for video in (noisy, torch.from_numpy(noisy), [Image.fromarray(frame) for frame in noisy]):
        for metric in (psnr, ssim):
            with pytest.raises(ValueError, match="data_range=255.0: integer frames"):
                metric(video, frames.astype(float) / 255, data_range=255.0)


def test_a_float_video_against_integer_reference_frames_takes_no_data_range_either():
    # Only the video was looked at: a float video of 0..255 against uint8 frames (read as [0, 1]) went through.
    frames = np.random.default_rng(17).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match="data_range=255.0: integer frames"):
            metric(frames.astype(float), frames, data_range=255.0)


def test_without_the_metrics_extra_lpips_is_left_out_saying_so_or_refused_when_asked_for(tmp_path, monkeypatch):
    from diffsparse import metrics

    # Neither package: before, a ModuleNotFoundError from lpips_weights(None), which compare and eval call first
    # (asking torchvision where the weights go), though LPIPS was then to be left out, saying so.
    with monkeypatch.context() as m:
        for name in ("torchvision", "torchvision.models", "lpips"):  # as if not installed, though imported already
            m.setitem(sys.modules, name, None)
        assert metrics.lpips_weights(None, frame_size=(48, 48)) is None
        assert "diffsparse[metrics]" in metrics.lpips_missing_reason((48, 48))
        assert metrics.alexnet_weights_path().name == "alexnet-owt-7be5be79.pth"
    cache = tmp_path / "alexnet-owt-7be5be79.pth"
    cache.write_bytes(b"weights in the cache")
    monkeypatch.setattr(metrics, "alexnet_weights_path", lambda: cache)
    # With the weights in the cache too, and then torchvision without lpips: before, the weights were found and the
    # ImportError came at the first score, after every video had been generated.
    for hidden in (("torchvision", "torchvision.models", "lpips"), ("lpips",)):
        with monkeypatch.context() as m:
            for name in hidden:
                m.setitem(sys.modules, name, None)
            assert metrics.lpips_weights(None, frame_size=(48, 48)) is None
            reason = metrics.lpips_missing_reason((48, 48))
            assert "lpips" in reason and "diffsparse[metrics]" in reason
            with pytest.raises(ValueError, match=r"lpips_weights=.*diffsparse\[metrics\]"):
                metrics.lpips_weights(cache, frame_size=(48, 48))


def test_the_alexnet_file_name_is_torchvision_s():
    torchvision = pytest.importorskip("torchvision")
    from diffsparse.metrics import ALEXNET_URL

    assert ALEXNET_URL == torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url


def test_a_weights_file_without_alexnet_features_is_a_value_error_naming_it(tmp_path):
    pytest.importorskip("lpips")
    pytest.importorskip("torchvision")
    from diffsparse.metrics import lpips, lpips_weights

    # lpips' own weights/v0.1/alex.pth holds only its linear layers: before, a bare KeyError('0.weight') at the
    # first score, after every video had been generated.
    linear_only = tmp_path / "alex.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, linear_only)
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    video = np.zeros((1, 32, 32, 3))
    for path, message in ((linear_only, "no AlexNet features"), (not_a_checkpoint, "torch.load can read")):
        with pytest.raises(ValueError, match=f"lpips_weights=.*{path.name}.*{message}"):
            lpips_weights(path, frame_size=(32, 32))
        with pytest.raises(ValueError, match=f"weights_path=.*{path.name}.*{message}"):
            lpips(video, video, weights_path=path)


def test_nested_pil_frames_take_no_data_range_either():
    # pipe(output_type="pil").frames is a list of videos, each a list of PIL images: only one level was looked into,
    # so data_range=255 went through on it and scored 82.6 dB where the default gave 34.4.
    from PIL import Image

    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    noisy = np.clip(frames.astype(int) + rng.integers(-8, 9, frames.shape), 0, 255).astype(np.uint8)
    nested, nested_noisy = ([[Image.fromarray(f) for f in video] for video in x] for x in (frames, noisy))
    assert psnr(nested_noisy, nested) == pytest.approx(psnr(noisy, frames))
    for video in (nested_noisy, [list(v) for v in noisy], (tuple(noisy[0]),)):
        for metric in (psnr, ssim):
            with pytest.raises(ValueError, match="data_range=255.0: integer frames"):
                metric(video, video, data_range=255.0)


def test_float_values_outside_the_data_range_are_refused(tmp_path):
    # Before, they were scored as they were: frames of 0..255 at the default range gave a PSNR of -27.6 dB and an
    # SSIM near 0.95, and LPIPS (no range at all) 0.0042 where the same frames in [0, 1] gave 0.0097.
    torchvision = pytest.importorskip("torchvision")
    from diffsparse.metrics import lpips

    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    rng = np.random.default_rng(8)
    video = rng.random((2, 32, 32, 3))
    noisy = np.clip(video + rng.normal(0, 0.1, video.shape), 0, 1)
    below = video.copy()
    below[0, 0, 0, 0] = -0.01

    def lpips_with(video, reference, **kwargs):
        return lpips(video, reference, weights_path=weights, **kwargs)

    for metric in (psnr, ssim, lpips_with):
        for a, b, data_range, message in ((noisy * 255, video, 1.0, "video's values span [0, 255]"),
                                          (noisy * 2 - 1, video, 1.0, "video's values span [-1, 1]"),
                                          (noisy, below, 1.0, "reference's values span [-0.01, "),
                                          (noisy * 255 + 2, video * 255, 255.0, "video's values span [2, 257]")):
            with pytest.raises(ValueError, match=re.escape(f"data_range={data_range}: the {message}")):
                metric(a, b, data_range=data_range)
        # Rounding past the range is not a new range: within 0.001 x data_range it is scored.
        assert np.isfinite(metric(np.clip(noisy, 0, 1) * 1.0005, video))
        # The same frames score the same with their own data_range, LPIPS included.
        assert metric(noisy * 255, video * 255, data_range=255) == pytest.approx(metric(noisy, video), rel=1e-5)


def test_lpips_scores_at_most_8_frames_at_a_time(tmp_path, monkeypatch):
    # Every frame went through AlexNet in one batch: ~125 MiB per 480x832 frame, ~10 GiB for Wan's 81.
    torchvision = pytest.importorskip("torchvision")
    from diffsparse import metrics

    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    model = metrics._lpips_model(str(weights))
    batches = []

    def recording(a, b):
        batches.append(len(a))
        assert a.dtype == torch.float32
        return model(a, b)

    monkeypatch.setattr(metrics, "_lpips_model", lambda path, given=True: recording)
    rng = np.random.default_rng(9)
    video = rng.random((20, 32, 40, 3))
    noisy = np.clip(video + rng.normal(0, 0.2, video.shape), 0, 1)
    score = metrics.lpips(noisy, video, weights_path=weights)
    assert batches == [8, 8, 4]

    def frames(x):
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() * 2 - 1

    with torch.no_grad():
        unchunked = float(model(frames(noisy), frames(video)).mean())
    assert score > 0 and score == pytest.approx(unchunked, rel=1e-5)


def test_torch_frames_are_read_channels_first_however_narrow():
    # diffusers' pt output is (F, C, H, W): a video 1, 3 or 4 pixels wide was read as (F, H, W, C) before, a
    # (2, 3, 16, 4) tensor as 2 frames of 3 x 16 pixels with 4 channels.
    rng = np.random.default_rng(10)
    for width in (1, 3, 4):
        frames = rng.random((2, 16, width, 3), dtype=np.float32)
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2)
        np.testing.assert_array_equal(as_frames(tensor), frames)
        np.testing.assert_array_equal(as_frames(tensor[None]), frames)  # (B, F, C, H, W)
        np.testing.assert_array_equal(as_frames(frames), frames)  # numpy stays channels-last first
    # A torch (C, H, W) image 3 pixels high is one image, not read twice.
    image = rng.random((3, 3, 8), dtype=np.float32)
    np.testing.assert_array_equal(as_frames(torch.from_numpy(image)), image.transpose(1, 2, 0)[None])


def test_a_list_of_torch_frames_reads_as_the_tensor_it_was_made_of():
    # A list of tensors went through numpy's layout rules: list(v) of a (2, 3, 8, 3) (F, C, H, W) video came back
    # transposed, and bfloat16 or requires_grad frames raised TypeError and RuntimeError.
    video = torch.rand(2, 3, 8, 3, generator=torch.Generator().manual_seed(11))
    np.testing.assert_array_equal(as_frames(list(video)), as_frames(video))
    np.testing.assert_array_equal(as_frames([list(video)]), as_frames(video[None]))  # nested, as `.frames`
    as_bf16 = video.bfloat16()
    np.testing.assert_array_equal(as_frames(list(as_bf16)), as_frames(as_bf16))
    np.testing.assert_array_equal(as_frames(list(video.clone().requires_grad_())), as_frames(video))
    np.testing.assert_array_equal(as_frames(video.clone().requires_grad_()), as_frames(video))  # and not in a list
    assert as_frames([torch.rand(8, 8), torch.rand(8, 8)]).shape == (2, 8, 8, 1)  # 2-D tensors: gray, as arrays


@pytest.mark.parametrize("frame_count", [1, 3, 5])
def test_a_nested_list_of_gray_frames_reads_as_the_flat_list(frame_count):
    # A list of 2-D frames in a list (as `.frames`) stacked to (1, F, H, W): 3 gray frames were scored as one RGB
    # frame, and 5 were refused as a frame of 5 channels.
    from PIL import Image

    rng = np.random.default_rng(18)
    frames = rng.integers(0, 256, (frame_count, 8, 8), dtype=np.uint8)
    noisy = np.clip(frames.astype(int) + rng.integers(-8, 9, frames.shape), 0, 255).astype(np.uint8)
    gray = as_frames(frames[..., None])
    assert gray.shape == (frame_count, 8, 8, 1)
    for as_list in (lambda x: [Image.fromarray(f, "L") for f in x], list, lambda x: list(torch.from_numpy(x))):
        video, reference = as_list(noisy), as_list(frames)
        np.testing.assert_array_equal(as_frames(reference), gray)
        np.testing.assert_array_equal(as_frames([reference]), gray)
        assert psnr([video], [reference]) == psnr(video, reference)
        assert ssim([video], [reference]) == ssim(video, reference)
    # Frames written out as Python lists of rows are not 2-D frames given whole: RGB ones keep their channels.
    rgb = rng.random((frame_count, 8, 8, 3))
    np.testing.assert_array_equal(as_frames([[frame.tolist() for frame in rgb]]), rgb)


def test_a_vae_layout_video_is_refused_naming_the_shape_given_and_the_permute():
    # The message named the shape after the batch was flattened, (3, 5, 16, 16) for this (B, C, F, H, W) tensor.
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(19))
    hint = ("got shape (1, 3, 5, 16, 16); (B, C, F, H, W)? give frames as (B, F, C, H, W): "
            "`video.permute(0, 2, 1, 3, 4)`")
    with pytest.raises(ValueError, match=re.escape(hint)):
        psnr(video, video)
    np.testing.assert_array_equal(as_frames(video.permute(0, 2, 1, 3, 4)), video[0].permute(1, 2, 3, 0).numpy())
    with pytest.raises(ValueError, match=re.escape("`video.transpose(0, 2, 1, 3, 4)`")):  # numpy has no permute
        as_frames(video.numpy())
    with pytest.raises(ValueError, match=re.escape("got shape (1, 16, 5, 16, 16) (")):  # a latent: no such hint
        as_frames(torch.rand(1, 16, 5, 16, 16))


@pytest.mark.parametrize("video", [np.zeros((0, 8, 8, 3)), [], torch.zeros(0, 3, 8, 8), np.zeros((2, 0, 8, 3))],
                         ids=["no frames", "empty list", "empty tensor", "no pixels"])
def test_a_video_without_frames_is_a_value_error_naming_it(video):
    # Before, numpy's "zero-size array to reduction" or "need at least one array to stack" from inside a score.
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=r"video has no frames or no pixels, got (shape \(|an empty list)"):
            metric(video, video)


@pytest.fixture(scope="module")
def random_alexnet(tmp_path_factory):
    """A torchvision AlexNet checkpoint with random weights, standing in for the real one (written once here)."""
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("lpips")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def test_lpips_scores_gray_frames_as_their_rgb_copies(random_alexnet):
    from diffsparse.metrics import lpips

    rng = np.random.default_rng(12)
    gray = rng.random((2, 48, 48, 1))
    noisy = np.clip(gray + rng.normal(0, 0.2, gray.shape), 0, 1)
    expected = lpips(np.repeat(noisy, 3, -1), np.repeat(gray, 3, -1), weights_path=random_alexnet)
    assert expected > 0 and lpips(noisy, gray, weights_path=random_alexnet) == pytest.approx(expected, rel=1e-5)


def test_lpips_takes_frames_down_to_the_31_pixels_alexnet_takes(random_alexnet):
    # AlexNet scores 31 x 31 frames (30 x 30 leave its last max-pool nothing to pool): 31 was refused as under 32.
    from diffsparse.metrics import LPIPS_MIN_SIZE, _lpips_model, lpips, lpips_missing_reason, lpips_weights

    assert LPIPS_MIN_SIZE == 31
    rng = np.random.default_rng(13)
    for height, width in ((31, 31), (31, 40), (40, 31)):
        video = rng.random((1, height, width, 3))
        assert lpips(video, np.clip(video + 0.1, 0, 1), weights_path=random_alexnet) > 0
        assert lpips_weights(random_alexnet, frame_size=(height, width)) == random_alexnet
    video = rng.random((1, 30, 40, 3))
    with pytest.raises(ValueError, match=r"at least 31x31 pixels, got \(30, 40\)"):
        lpips(video, video, weights_path=random_alexnet)
    with pytest.raises(ValueError, match="at least 31x31 pixels, got 30x40"):
        lpips_weights(random_alexnet, frame_size=(30, 40))
    assert lpips_missing_reason((40, 30)) == "frames of 40x30 pixels, LPIPS (AlexNet) needs at least 31x31"
    with torch.no_grad(), pytest.raises(RuntimeError, match="too small"):  # the limit is AlexNet's, not ours
        _lpips_model(str(random_alexnet))(torch.zeros(1, 3, 30, 40), torch.zeros(1, 3, 30, 40))


def test_pil_frames_of_a_palette_or_another_colour_space_are_scored_in_rgb():
    # Before, a `P` frame was scored on its palette indices (the same picture under two palettes: 30 dB, not inf),
    # and YCbCr, HSV or CMYK frames channel by channel in their own space (CMYK's 4 channels read as RGBA).
    from PIL import Image

    rng = np.random.default_rng(0)
    indices = rng.integers(0, 8, (16, 16), dtype=np.uint8)
    palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    first, second = Image.fromarray(indices, "P"), Image.fromarray((indices + 3) % 8, "P")
    first.putpalette(palette.tobytes())
    second.putpalette(np.roll(palette, 3, axis=0).tobytes())  # index i + 3 holds colour i: the same picture
    assert psnr([first], [second]) == float("inf")
    np.testing.assert_array_equal(as_frames(first), palette[indices][None] / 255)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    noisy = Image.fromarray(np.clip(np.asarray(rgb) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8))
    for mode in ("CMYK", "HSV", "YCbCr"):  # lossless or near it from RGB: the RGB score within their rounding
        assert as_frames(rgb.convert(mode)).shape == (1, 16, 16, 3)
        assert psnr([rgb.convert(mode)], [noisy.convert(mode)]) == pytest.approx(psnr([rgb], [noisy]), abs=0.25)
    gray_alpha = Image.fromarray(np.asarray(rgb)[..., 0], "L").convert("LA")
    assert as_frames(gray_alpha).shape == (1, 16, 16, 4)  # refused before: 2 channels
    # LAB's "A" is a colour band, not alpha. A palette with a transparent entry (a GIF's) reads as RGBA, as an RGBA
    # frame does; in a video whose other frames read as RGB, those are made opaque RGBA (one channel count).
    assert as_frames(rgb.convert("LAB")).shape == (1, 16, 16, 3) and math.isfinite(psnr([rgb.convert("LAB")], [rgb]))
    transparent = first.copy()
    transparent.info["transparency"] = 0
    mixed = as_frames([first, transparent])
    assert mixed.shape == (2, 16, 16, 4) and (mixed[0, ..., 3] == 1).all() and (mixed[1, ..., 3] < 1).any()
    np.testing.assert_array_equal(mixed[..., :3], as_frames([first, first]))
    assert psnr([transparent.convert("RGBA")], [transparent]) == float("inf")
    rgba = np.concatenate([np.asarray(rgb), np.full((16, 16, 1), 128, np.uint8)], axis=-1)
    for mode, source in (("PA", "RGBA"), ("RGBa", "RGBA"), ("La", "LA")):  # alpha bands, kept
        frames = as_frames(Image.fromarray(rgba if source == "RGBA" else rgba[..., [0, 3]], source).convert(mode))
        assert frames.shape == (1, 16, 16, 4) and np.allclose(frames[..., 3], 128 / 255, atol=1 / 255)
    sixteen_bits = Image.new("I;16N", (4, 4), 1000)  # native-order 16 bits, read as they are
    assert as_frames(sixteen_bits)[0, 0, 0, 0] == pytest.approx(1000 / 65535)
    for mode in ("F", "I"):
        with pytest.raises(ValueError, match=f"PIL image of mode '{mode}' holds raw numbers"):
            as_frames(rgb.convert(mode))


# ---------------------------------------------------------------- the rules pinned: window, mean, batches, ranges


def test_ssim_is_scikit_image_s_default_on_frames_the_7_pixel_window_fits():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(14)
    a = rng.random((2, 16, 20, 3))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    expected = np.mean([structural_similarity(x, y, data_range=1, channel_axis=-1) for x, y in zip(b, a)])
    assert ssim(b, a) == pytest.approx(expected)


def test_psnr_and_ssim_are_the_mean_over_frames_not_another_average():
    from skimage.metrics import structural_similarity

    reference = np.full((3, 16, 16, 3), 0.5)
    video = reference + np.array([0.1, 0.01, 10**-2.5])[:, None, None, None]  # 20, 40 and 50 dB: median 40
    assert psnr(video, reference) == pytest.approx((20 + 40 + 50) / 3)
    rng = np.random.default_rng(15)
    a = rng.random((3, 16, 16, 3))
    b = np.clip(a + rng.normal(0, 1, (3, 1, 1, 1)) * np.array([0.02, 0.05, 0.3])[:, None, None, None]
                * rng.normal(size=a.shape), 0, 1)
    per_frame = [structural_similarity(x, y, data_range=1.0, channel_axis=-1) for x, y in zip(b, a)]
    assert abs(np.mean(per_frame) - np.median(per_frame)) > 0.01  # uneven: a median would not pass for the mean
    assert ssim(b, a) == pytest.approx(np.mean(per_frame))


def test_a_batch_scores_every_video_not_only_the_first():
    reference = np.full((2, 3, 8, 8, 3), 0.5)  # (B, F, H, W, C): two videos of 3 frames
    video = reference.copy()
    video[1] += 0.1  # only the second video differs
    assert psnr(video, reference) == pytest.approx(20.0)
    assert as_frames(video).shape == (6, 8, 8, 3)


def test_integer_frames_refuse_a_data_range_below_1_too():
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match="data_range=0.5: integer frames"):
            metric(frames, frames, data_range=0.5)


def test_values_past_the_range_s_slack_are_refused():
    reference = np.full((1, 8, 8, 3), 0.5)
    video = reference.copy()
    video[0, 0, 0, 0] = 1.0 + 1.5e-3  # past 1.0 + 0.001, within twice that
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=re.escape("data_range=1.0: the video's values span [0.5, 1.0015]")):
            metric(video, reference)


def test_a_uint8_video_against_a_float_reference_of_0_to_255_is_told_to_divide_it():
    # data_range=255.0, the advice before, is refused when the other video is integer frames.
    rng = np.random.default_rng(16)
    floats = rng.random((2, 8, 8, 3)) * 255
    frames = floats.round().astype(np.uint8)
    for video, reference, name in ((frames, floats, "reference"), (floats, frames, "video")):
        with pytest.raises(ValueError) as caught:
            psnr(video, reference)
        message = str(caught.value)
        assert f"divide the float {name} by 255" in message and "data_range=255" not in message
    assert np.isfinite(psnr(frames, floats / 255))  # what the message says works


def test_a_list_of_frames_of_different_shapes_names_them():
    from PIL import Image

    with pytest.raises(ValueError, match=re.escape("frames must have one shape, got [(8, 8, 3), (8, 9, 3)]")):
        as_frames([np.zeros((8, 8, 3)), np.zeros((8, 9, 3))])
    with pytest.raises(ValueError, match=re.escape("got [(8, 8), (8, 8, 3)] (PIL images of modes ['L', 'RGB'])")):
        as_frames([Image.new("L", (8, 8)), Image.new("RGB", (8, 8))])


def test_the_not_finite_warning_points_at_the_line_that_asked_for_the_score(random_alexnet):
    from diffsparse.metrics import NonFiniteScoreWarning, lpips

    reference = np.zeros((1, 32, 32, 3))
    broken = np.full_like(reference, np.nan)
    for metric in (psnr, ssim, lambda a, b: lpips(a, b, weights_path=random_alexnet)):
        with pytest.warns(NonFiniteScoreWarning) as record:
            metric(broken, reference)
        assert record[0].filename == __file__


def test_lpips_scores_rgba_frames_on_their_rgb(random_alexnet):
    # AlexNet takes RGB: the alpha is left out (documented), where PSNR and SSIM score all 4 channels.
    from diffsparse.metrics import lpips

    rng = np.random.default_rng(17)
    rgb = rng.random((2, 48, 48, 3))
    noisy = np.clip(rgb + rng.normal(0, 0.2, rgb.shape), 0, 1)
    alpha = rng.random((2, 48, 48, 1))
    expected = lpips(noisy, rgb, weights_path=random_alexnet)
    rgba = lpips(np.concatenate([noisy, 1 - alpha], -1), np.concatenate([rgb, alpha], -1), weights_path=random_alexnet)
    assert expected > 0 and rgba == pytest.approx(expected, rel=1e-6)


def test_alexnet_shapes_are_torchvision_s():
    torchvision = pytest.importorskip("torchvision")
    from diffsparse.metrics import _ALEXNET_FEATURES

    state = torchvision.models.alexnet(weights=None).state_dict()
    assert {f"features.{key}": shape for key, shape in _ALEXNET_FEATURES.items()} == \
        {key: tuple(value.shape) for key, value in state.items() if key.startswith("features.")}


def test_a_weights_file_of_other_shapes_or_not_a_state_dict_is_a_value_error_before_any_run(tmp_path, random_alexnet):
    # Before, each passed lpips_weights' check and failed at the first score, after every video had been generated,
    # with a bare RuntimeError from load_state_dict (or, a bare tensor, as "holds nothing").
    from diffsparse.metrics import lpips, lpips_weights

    state = torch.load(random_alexnet, weights_only=True)
    one_channel = {**state, "features.0.weight": torch.zeros(64, 1, 11, 11)}
    a_list = {**state, "features.8.bias": [1, 2]}
    without_6 = {key: value for key, value in state.items() if key != "features.6.weight"}
    cases = {
        "shape.pth": (one_channel, re.escape("features.0.weight has shape (64, 1, 11, 11), expected a tensor of shape "
                                             "(64, 3, 11, 11)")),
        "list.pth": (a_list, re.escape("features.8.bias is a list, expected a tensor of shape (256,)")),
        "no6.pth": (without_6, re.escape("not all the AlexNet features.* weights in the file (missing "
                                             "features.6.weight;")),
        "tensor.pth": (torch.zeros(3), "holds a Tensor, not a state dict"),
    }
    video = np.zeros((1, 32, 32, 3))
    for name, (content, message) in cases.items():
        path = tmp_path / name
        torch.save(content, path)
        with pytest.raises(ValueError, match=f"lpips_weights=.*{name}'?: .*{message}"):
            lpips_weights(path, frame_size=(32, 32))
        with pytest.raises(ValueError, match=f"weights_path=.*{name}'?: .*{message}"):
            lpips(video, video, weights_path=path)


def test_a_wrong_file_in_the_torch_hub_cache_is_said_before_any_run(random_alexnet, tmp_path, monkeypatch):
    # Before, lpips_weights() took any file there: lpips' own alex.pth copied in failed at the first score, after
    # compare or eval had generated every video.
    from diffsparse import metrics

    cache = tmp_path / "alexnet-owt-7be5be79.pth"
    monkeypatch.setattr(metrics, "alexnet_weights_path", lambda: cache)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, cache)
    with pytest.raises(ValueError, match=rf"torch hub cache's AlexNet checkpoint.*--lpips-weights\): "
                                         rf"file='{re.escape(str(cache))}': no AlexNet features\.\* weights"):
        metrics.lpips_weights(None, frame_size=(48, 48))
    cache.write_bytes(random_alexnet.read_bytes())  # replaced by the right file: taken
    assert metrics.lpips_weights(None, frame_size=(48, 48)) == cache
    # Damaged in place keeping its size and modification time (as `rsync -a` or `cp -p` of a bad copy would): the
    # check, remembered per version of the file, must not take it for the one it read.
    times = cache.stat()
    damaged = bytearray(cache.read_bytes())
    damaged[100:4000] = bytes(3900)
    cache.write_bytes(bytes(damaged))
    os.utime(cache, ns=(times.st_atime_ns, times.st_mtime_ns))
    with pytest.raises(ValueError, match="not a torch checkpoint torch.load can read"):
        metrics.lpips_weights(None, frame_size=(48, 48))
    # Frames smaller than AlexNet takes: no LPIPS, said why (lpips_weights=... for them is refused, tested above).
    assert metrics.lpips_weights(None, frame_size=(30, 48)) is None
    assert metrics.lpips_missing_reason((30, 48)).startswith("frames of 30x48 pixels, LPIPS (AlexNet) needs at least")


def test_values_below_zero_take_the_same_slack_as_values_past_the_range():
    # Rounding below 0 (a float16 output clamped, then converted) is scored; past 0.001 x data_range it is refused.
    reference = np.full((1, 8, 8, 3), 0.5)
    for data_range in (1.0, 255.0):
        video = reference * data_range
        video[0, 0, 0, 0] = -5e-4 * data_range
        for metric in (psnr, ssim):
            assert math.isfinite(metric(video, reference * data_range, data_range=data_range))
        video[0, 0, 0, 0] = -1.5e-3 * data_range
        for metric in (psnr, ssim):
            with pytest.raises(ValueError, match=re.escape(f"data_range={data_range}: the video's values span [-")):
                metric(video, reference * data_range, data_range=data_range)


def test_lpips_without_the_hub_cache_s_file_says_where_to_put_it(tmp_path, monkeypatch):
    # No weights_path given and nothing in the torch hub cache: the message says where the checkpoint goes and where
    # to get it, not that a file (there is none) is no torch checkpoint.
    pytest.importorskip("lpips")
    from diffsparse import metrics

    cache = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    monkeypatch.setattr(metrics, "alexnet_weights_path", lambda: cache)
    video = np.zeros((1, 48, 48, 3))
    with pytest.raises(FileNotFoundError, match=re.escape(f"there is no file at {cache}. Download "
                                                          f"{metrics.ALEXNET_URL}")):
        metrics.lpips(video, video)


def test_a_gray_frame_among_rgb_and_rgba_pil_frames_is_named_not_padded():
    # Only RGB frames are made opaque RGBA beside RGBA ones; a gray frame 3 pixels wide is not an RGB pixel row.
    from PIL import Image

    frames = [Image.new("RGB", (3, 8)), Image.new("RGBA", (3, 8)), Image.new("L", (3, 8))]
    with pytest.raises(ValueError, match=re.escape("got [(8, 3, 4), (8, 3, 4), (8, 3)] (PIL images of modes ['RGB', "
                                                   "'RGBA', 'L'])")):
        as_frames(frames)
