"""Quality on the shipped testbed model at its evaluation size: what sparse attention costs, measured.

Thresholds come from measurements on the shipped weights (README, "Quality on the testbed"), with a margin
for run-to-run numerical differences across CPUs; each test says what it measured.
"""

import numpy as np
import pytest

import diffsparse
from diffsparse.metrics import psnr, ssim
from diffsparse.pipelines import testbed  # module access: pytest would collect `Test*` names imported here
from diffsparse.testbed import evidence

PROMPTS = ["a red circle moving left", "a blue square moving up"]
EVAL = testbed.testbed_config()["eval"]  # 17 frames x 48 x 48 pixels = 17 x 12 x 12 = 2448 tokens
RADIAL_25 = {"pattern": "radial", "density": 0.25, "block_size": 64}
# Measured on the shipped weights (mean of the 2 prompts, seed 0): PSNR 23.01 dB, SSIM 0.832 with 20% dense steps;
# 17.48 dB, 0.736 with none. Thresholds leave ~1.8 dB and 0.06 of margin.
PSNR_RADIAL_25_DENSE_20 = 21.2
SSIM_RADIAL_25_DENSE_20 = 0.77
# Searched blocks (greedy, row budget, searched again every 4 steps) at 25% density, block 64, 20% dense steps:
# measured 30.92 dB, SSIM 0.922, the 30 dB aim (block 32: 28.94 dB / 0.919; before each video of a batch was
# searched on its own tensors, the two prompts shared one search and scored 28.23 dB at block 64, 27.02 at 32).
# Thresholds leave ~0.9 dB and 0.03.
SEARCHED_25 = {"pattern": "searched(refresh=4, budget='row')", "density": 0.25, "block_size": 64, "dense_steps": 0.2}
PSNR_SEARCHED_25 = 30.0
SSIM_SEARCHED_25 = 0.89


@pytest.fixture(scope="module")
def pipe():
    return testbed.load()


def _generate(pipe, config=None, steps=20):
    call = {"frames": EVAL["frames"], "height": EVAL["height"], "width": EVAL["width"], "steps": steps, "seed": 0}
    if config is None:
        return testbed.sample(pipe, PROMPTS, **call).numpy()
    with diffsparse.sparse(pipe, config):
        return testbed.sample(pipe, PROMPTS, **call).numpy()


def _scores(video, reference):
    return (
        float(np.mean([psnr(v, r) for v, r in zip(video, reference)])),
        float(np.mean([ssim(v, r) for v, r in zip(video, reference)])),
    )


@pytest.fixture(scope="module")
def dense(pipe):
    return _generate(pipe)


@pytest.fixture(scope="module")
def radial_with_dense_steps(pipe):
    return _generate(pipe, diffsparse.SparseConfig(**RADIAL_25, dense_steps=0.2))


def test_dense_twice_is_identical(pipe):
    # Determinism does not need the 20 steps the scores use: 3 steps at the evaluation size, twice (saves ~15 s).
    assert np.array_equal(_generate(pipe, steps=3), _generate(pipe, steps=3))


def test_radial_at_a_quarter_density_with_dense_first_steps_stays_close(radial_with_dense_steps, dense):
    value_psnr, value_ssim = _scores(radial_with_dense_steps, dense)
    assert value_psnr >= PSNR_RADIAL_25_DENSE_20, value_psnr
    assert value_ssim >= SSIM_RADIAL_25_DENSE_20, value_ssim


def test_searched_blocks_at_a_quarter_density_stay_closer_than_a_static_pattern(pipe, dense, radial_with_dense_steps):
    value_psnr, value_ssim = _scores(_generate(pipe, diffsparse.SparseConfig(**SEARCHED_25)), dense)
    assert value_psnr >= PSNR_SEARCHED_25, value_psnr
    assert value_ssim >= SSIM_SEARCHED_25, value_ssim
    # Searching on the model's own attention is what the search costs buy: measured 7.9 dB above radial here.
    assert value_psnr >= _scores(radial_with_dense_steps, dense)[0] + 5.0, value_psnr


def test_a_search_sharing_its_budget_over_the_layer_beats_the_same_search_per_row(pipe, dense):
    # One search per layer at the first sparse step, 25% density, block 64, 20% dense steps: measured 28.42 dB /
    # SSIM 0.893 with the row budget, 31.65 / 0.923 with the layer's blocks handed out by gain (30.76 / 0.920 when
    # the layer's total was its rows' rounded shares, 2.6% more blocks; six videos, README "Shared budgets": +2.2).
    # Thresholds leave ~1 dB.
    config = {"density": 0.25, "block_size": 64, "dense_steps": 0.2}
    row = _scores(_generate(pipe, diffsparse.SparseConfig(pattern="searched(budget='row')", **config)), dense)
    layer = _scores(_generate(pipe, diffsparse.SparseConfig(pattern="searched", **config)), dense)  # the default
    assert layer[0] >= 29.8 and layer[1] >= 0.90, layer
    assert layer[0] >= row[0] + 1.0 and layer[1] > row[1], (layer, row)


def test_dense_first_steps_matter(pipe, dense, radial_with_dense_steps):
    with_dense = _scores(radial_with_dense_steps, dense)
    without = _scores(_generate(pipe, diffsparse.SparseConfig(**RADIAL_25, dense_steps=0)), dense)
    # The same pattern on every step scores measurably worse than with the first 20% of steps dense.
    assert with_dense[0] - without[0] >= 0.5, (with_dense, without)
    assert with_dense[1] > without[1], (with_dense, without)


def test_the_model_attends_locally(pipe):
    # The target: mass within |df| <= 1 and 1-2 tokens at least 3x its uniform share (layers and heads).
    decay = evidence.attention_decay(pipe, PROMPTS[:1], EVAL["frames"], EVAL["height"], EVAL["width"], steps=10)
    assert decay.concentration(1) >= 3.0, decay.layer_concentration(1)
    # and it decays with temporal distance: more mass per key at |df| <= 1 than at the far end of the clip
    per_key = np.mean(decay.temporal_mass, axis=0) / np.asarray(decay.temporal_share)
    assert per_key[:2].mean() > 2 * per_key[-4:].mean(), per_key


def test_the_model_draws_the_prompted_colour_on_a_dark_background(dense):
    # What `make run` shows (it samples in two stages, these videos in one pass): objects in the prompt's colour
    # (red, then blue) over a plain dark background.
    for video, channel in zip(dense, (0, 2)):  # (F, 3, H, W) in [0, 1]
        pixels = video.transpose(0, 2, 3, 1).reshape(-1, 3)
        bright = pixels.max(-1) > 0.5
        assert 0.01 < bright.mean() < 0.5, bright.mean()  # an object, not an empty or a flooded canvas
        assert pixels[bright].mean(0).argmax() == channel, pixels[bright].mean(0)
        assert np.median(pixels.max(-1)) < 0.25  # the background stays dark


def test_make_runs_two_stage_videos_move_the_prompted_way(pipe):
    # `make run` samples in two stages from the best of 4 stills. Measured (seed 0): the red circle's centre moves
    # 23 px left (1 px vertically), the blue square's 20 px up (2.5 px sideways), keeping colour and size.
    call = {"frames": EVAL["frames"], "height": EVAL["height"], "width": EVAL["width"], "steps": 20, "seed": 0}
    videos = testbed.sample(pipe, PROMPTS, **call, two_stage=True, still_candidates=4).numpy()
    for video, channel, (ax, ay) in zip(videos, (0, 2), ((-1, 0), (0, -1))):  # the prompted way, in (x, y)
        centres = []
        for frame in video:  # (3, H, W)
            bright = frame.max(0) > 0.5
            rows, cols = np.nonzero(bright)
            centres.append((cols.mean(), rows.mean()))
            assert frame[:, bright].mean(1).argmax() == channel
        dx, dy = np.subtract(centres[-1], centres[0])
        moved, sideways = dx * ax + dy * ay, abs(dx * ay - dy * ax)
        assert moved >= 10 and moved >= 3 * sideways, (dx, dy)
