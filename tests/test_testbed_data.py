"""The testbed's training data and evidence measurements against fixed expectations, not against the tables they
are drawn from (fast: tiny canvases and layouts, no pipeline)."""

import math

import numpy as np
import pytest
import torch

from diffsparse.testbed import evidence
from diffsparse.testbed.data import COLOURS, Bucket, _coverage, make_batch, random_clip, render


def _single_shape_clips(direction: str, count: int, frames=5, size=32):
    found, seed = [], 0
    while len(found) < count:
        clip = random_clip(np.random.default_rng(seed), frames, size, size)
        if clip.direction == direction and len(clip.shapes) == 1:
            found.append(clip)
        seed += 1
    return found


# The pixel motion each direction word must mean, written out here: the tests in test_testbed.py and the fidelity
# scores read the expected motion from `data.DIRECTIONS` itself, so a table with left and right swapped (or "up"
# moving down the rows) passed them all while every prompt described the opposite motion.
PIXEL_MOTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (column, row) signs


@pytest.mark.parametrize("direction", sorted(PIXEL_MOTION))
def test_a_direction_word_moves_the_drawn_shape_that_way_on_the_pixel_grid(direction):
    for clip in _single_shape_clips(direction, 2):
        video = render(clip)  # (3, F, H, W): H is the row (down the image), W the column
        assert f"moving {direction}" in clip.prompt
        weight = (video - torch.tensor(clip.background)[:, None, None, None] * 2 + 1).norm(dim=0)  # (F, H, W)
        rows, columns = torch.meshgrid(torch.arange(clip.height), torch.arange(clip.width), indexing="ij")
        first, last = (((w * columns).sum() / w.sum(), (w * rows).sum() / w.sum()) for w in (weight[0], weight[-1]))
        shift = [float(b - a) for a, b in zip(first, last)]
        expected = PIXEL_MOTION[direction]
        for moved, sign in zip(shift, expected):
            assert (moved > 1.0 if sign > 0 else moved < -1.0 if sign < 0 else abs(moved) < 0.25), (clip, shift)


def test_the_uniform_share_is_taken_over_the_sampled_query_rows_the_mass_is():
    # The evidence samples 256 of 2,448 query rows. Uniform attention must read as concentration 1 whatever rows
    # were drawn: a share over every query position (or over a window that ignores the canvas and clip edges) is
    # another denominator than the mass's and moves the README's concentration numbers with the sample.
    layout = (3, 4, 5)
    n = math.prod(layout)
    recorder = evidence._Recorder(layout, layers=1, rows=7, radii=(1, 2), seed=3)
    for _step in range(2):  # calls add up (steps, CFG branches), each counted once
        recorder.add(0, torch.zeros(1, n, 2, 8), torch.randn(1, n, 2, 8))
    decay = recorder.result(layout)
    every_row = evidence._Recorder(layout, layers=1, rows=n, radii=(1, 2), seed=0)
    for r in (1, 2):
        # These rows' windows hold another share of the keys than the average query's: the test can tell them apart.
        assert abs(decay.local_share[r] - every_row.local[r].float().mean().item()) > 0.01
        assert decay.concentration(r) == pytest.approx(1, abs=1e-5)
        assert decay.layer_concentration(r) == pytest.approx([1], abs=1e-5)
    assert decay.temporal_mass[0] == pytest.approx(decay.temporal_share, abs=1e-6)
    assert decay.spatial_mass[0] == pytest.approx(decay.spatial_share, abs=1e-6)


def test_a_sample_grid_of_one_frame_column_has_a_row_per_prompt(tmp_path):
    # One column of several prompts (single-frame videos, or frames=(0,)) failed with an IndexError: matplotlib
    # returned the axes 1-D and np.atleast_2d laid them out as one row.
    path = tmp_path / "grid.png"
    evidence.save_sample_grid(torch.rand(2, 1, 3, 8, 8), ["a red circle", "a blue square"], path)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match=r"frames=\(4, 8\): none is a frame of the videos' 1"):
        evidence.save_sample_grid(torch.rand(2, 1, 3, 8, 8), ["a", "b"], path, frames=(4, 8))
    with pytest.raises(ValueError, match="prompts: 1 for 2 videos"):
        evidence.save_sample_grid(torch.rand(2, 1, 3, 8, 8), ["a"], path)


def test_render_draws_each_shape_where_placement_and_placement_flaws_put_it():
    # `placement_flaws` and the documented flaw rates measure `_coverage` (pixel centres at +0.5): the video
    # trained on must be that coverage over the background, not the same shapes half a pixel off or unblended.
    for clip in (random_clip(np.random.default_rng(seed), 3, 16, 20, shape_counts=(0, 0, 1)) for seed in range(2)):
        expected = np.broadcast_to(np.asarray(clip.background)[:, None, None, None], (3, 3, 16, 20))
        for shape in clip.shapes:
            coverage = _coverage(clip, shape)[None]
            expected = expected * (1 - coverage) + np.asarray(COLOURS[shape.colour])[:, None, None, None] * coverage
        torch.testing.assert_close(render(clip), torch.from_numpy(expected * 2 - 1).float())


@pytest.mark.parametrize(
    "size, match",
    [((0, 16, 16), "frames must be at least 1, got frames=0"),
     ((1, 12, 16), "height must be a multiple of 4 pixels and at least 16, got height=12"),
     ((1, 16, 18), "width must be a multiple of 4 pixels and at least 16, got width=18")],
)
def test_a_clip_size_the_model_cannot_take_is_named(size, match):
    with pytest.raises(ValueError, match=match):
        random_clip(np.random.default_rng(0), *size)


def test_still_prompts_name_only_the_shapes_of_single_frames():
    # "still" drops the motion words where one frame cannot show them, and only there: clips keep their motion.
    video_buckets, image_buckets = (Bucket(3, 16, 16, 1.0),), (Bucket(1, 16, 16, 1.0),)
    _, clips = make_batch(0, 0, 2, video_buckets, image_prompts="still")
    _, stills = make_batch(0, 0, 2, image_buckets, image_prompts="still")
    _, moving = make_batch(0, 0, 2, image_buckets, image_prompts="motion")
    assert all(" moving " in f"{p} " for p in clips + moving) and not any("moving" in p for p in stills)
    assert [p.split(" moving")[0] for p in moving] == stills


def test_data_options_out_of_range_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"shape_counts must be 3 non-negative probabilities .* got shape_counts="):
        random_clip(rng, 1, 16, 16, shape_counts=(0.5, 0.3, 0.1))  # sums to 0.9
    with pytest.raises(ValueError, match="batch must be at least 1, got batch=0"):
        make_batch(0, 0, 0)
    with pytest.raises(ValueError, match="image_prompts must be one of"):
        make_batch(0, 0, 1, image_prompts="none")


def test_the_compact_loss_log_averages_each_bucket_and_times_it_at_its_last_step(tmp_path):
    run_log, compact = tmp_path / "run.csv", tmp_path / "loss.csv"
    run_log.write_text("step,loss,train_seconds\n1,4.0,60\n2,2.0,120\n3,1.0,300\n")
    evidence.compact_loss_log(run_log, compact, bucket=2)
    assert compact.read_text().splitlines() == ["step,loss,train_minutes,stage", "2,3.00000,2.00,0", "3,1.00000,5.00,0"]
