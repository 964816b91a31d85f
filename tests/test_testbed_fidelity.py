"""The prompt-fidelity scores of `diffsparse.testbed.fidelity` on frames whose right answer is known by construction:
which pixels are the shape's, when a shape is present, and how the prompt sensitivity averages its errors."""

import math

import numpy as np
import pytest
import torch

from diffsparse.pipelines import testbed  # module access: pytest would collect `Test*` names imported here
from diffsparse.testbed import fidelity, train
from diffsparse.testbed.data import COLOURS, RADIUS_RANGE, _signed_distance


def _disc_frame(colour, background, size=16, radius=5.5, centre=(7.3, 8.1)):
    """A frame `(3, H, W)` of a circle of `colour` over `background`, blended by coverage as `render` blends, and
    the coverage `(H, W)`."""
    y, x = np.mgrid[:size, :size] + 0.5
    coverage = np.clip(0.5 - _signed_distance("circle", x - centre[0], y - centre[1], radius), 0, 1)
    background, colour = np.asarray(background)[:, None, None], np.asarray(colour)[:, None, None]
    return background + coverage * (colour - background), coverage


def _block_frame(colour, pixels, size=32, background=(0.02, 0.02, 0.02)):
    """A frame `(3, H, W)` with the first `pixels` pixels (row by row, from (8, 8) in rows of 8) of hard-edged
    `colour`, and nothing else."""
    frame = np.broadcast_to(np.asarray(background)[:, None, None], (3, size, size)).copy()
    for i in range(pixels):
        frame[:, 8 + i // 8, 8 + i % 8] = colour
    return frame


def test_the_shape_s_pixels_are_those_nearer_its_colour_than_the_background():
    # Blended linearly, a pixel is nearer the shape's colour than the background's exactly when the shape covers
    # more than half of it. The background here is within the tolerance of red and red by chromaticity, so only
    # the comparison with the frame's median tells it apart (an estimate fixed at black took the whole frame; the
    # mean, pulled towards the shape's 37% of the frame, dropped edge pixels).
    red = np.asarray(COLOURS["red"])
    frame, coverage = _disc_frame(red, 0.6 * red)
    assert np.linalg.norm(0.4 * red) < fidelity.COLOUR_TOLERANCE  # the background could pass for red
    np.testing.assert_array_equal(fidelity._shape_mask(frame, "red"), coverage > 0.5)


@pytest.mark.parametrize("radius", [6.5, 7.0])
def test_a_shape_covering_most_of_the_frame_is_found(radius):
    # A training-sized circle fills 52% (radius 6.5) and 60% (7) of a 16 x 16 frame. Before, the frame's median was
    # then (a blend of) the shape's colour and its outline or, at radius 8, the whole circle went missing.
    frame, coverage = _disc_frame(COLOURS["red"], (0.02, 0.02, 0.02), radius=radius, centre=(8.0, 8.0))
    near_red = np.linalg.norm(frame - np.asarray(COLOURS["red"])[:, None, None], axis=0) < fidelity.COLOUR_TOLERANCE
    np.testing.assert_array_equal(fidelity._shape_mask(frame, "red"), (coverage > 0.5) & near_red)
    scores = fidelity.score_video(np.stack([frame, frame]), fidelity.Request("red", "circle", "left"))
    assert scores["present"] == 1.0 and scores["kind_accuracy"] == 1.0 and scores["shape_iou"] > 0.95, scores


def test_a_frame_all_of_the_prompted_colour_shows_no_shape():
    frame = np.broadcast_to(np.asarray(COLOURS["red"])[:, None, None], (3, 16, 16))
    assert not fidelity._shape_mask(frame, "red").any()


def test_a_colour_counts_within_the_tolerance_of_the_prompted_one():
    # White is (0.95, 0.95, 0.95): a light grey 0.35 away is white, a mid grey 0.78 away is not, though it is
    # nearer white than the dark background and white by chromaticity.
    for grey, present in ((0.75, 1.0), (0.5, 0.0)):
        video = np.stack([_block_frame((grey, grey, grey), 64)] * 2)
        assert fidelity.score_video(video, fidelity.Request("white", "square", "left"))["present"] == present, grey


def test_present_asks_for_a_third_of_the_smallest_training_shape():
    # pi * 5.5^2 / 3 = 31.7 pixels: 32 count, 31 do not.
    assert RADIUS_RANGE[0] == 5.5
    request = fidelity.Request("green", "square", "left")
    for pixels, present in ((32, 1.0), (31, 0.0)):
        video = np.stack([_block_frame(COLOURS["green"], pixels)] * 3)
        assert fidelity.score_video(video, request)["present"] == present, pixels


def test_kind_accuracy_counts_only_the_frames_with_the_shape():
    square = _block_frame(COLOURS["blue"], 64)  # an 8 x 8 square
    blank = _block_frame(COLOURS["blue"], 0)
    scores = fidelity.score_video(np.stack([square, blank, square, blank]), fidelity.Request("blue", "square", "up"))
    assert scores["present"] == 0.5 and scores["kind_accuracy"] == 1.0, scores


def test_prompt_sensitivity_is_the_mean_error_over_levels_and_clips_relative_to_the_true_prompt(monkeypatch):
    # Errors made up per prompt word and noise level: true prompt `level`, wrong colour `level + 0.1`, wrong kind
    # `2 * level`, wrong direction `level` (ignored). The ratio of the means over levels 0.3, 0.5, 0.7, 0.9
    # (mean 0.6) is then 0.1 / 0.6, 1 and 0; a mean of per-level ratios, or the first level alone, differs.
    seeds = 2
    batch = {word: [(r if word == "true" else fidelity._altered(r, word)).prompt for r in fidelity.requests()] * seeds
             for word in ("true", "colour", "kind", "direction")}  # one batch per word: prompts of seed 0, seed 1

    def errors(components, x0, prompts, noise, t, text_length):
        level = float(t[0])
        made_up = {"true": level, "colour": level + 0.1, "kind": 2 * level, "direction": level}
        return torch.full((len(prompts),), next(made_up[w] for w, asked in batch.items() if asked == prompts))

    monkeypatch.setattr(train, "velocity_errors", errors)
    sensitivity = fidelity.prompt_sensitivity(testbed.build_pipeline(), frames=2, height=16, width=16, seeds=seeds)
    assert sensitivity == pytest.approx({"colour": 0.1 / 0.6, "kind": 1.0, "direction": 0.0})
    assert math.isfinite(sensitivity["colour"])
