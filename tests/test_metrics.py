"""PSNR and SSIM against known values, in the layouts diffusers pipelines return."""

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

    for side in (3, 5, 7):
        a = rng.random((2, side, side, 3))
        b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
        expected = np.mean([structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=side)
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
    # A layout with no channel axis where one is looked for (a VAE's (B, C, F, H, W)) is refused, not misread.
    with pytest.raises(ValueError, match="channels"):
        as_frames(np.zeros((1, 3, 5, 16, 16)))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(np.zeros((2, 8, 8, 3)), np.zeros((3, 8, 8, 3)))


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


def test_lpips_without_weights_says_where_to_put_them(tmp_path):
    from diffsparse.metrics import lpips

    missing = tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth"
    video = np.zeros((1, 48, 48, 3))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        lpips(video, video, weights_path=missing)
