"""The label on the sparse half of compare.mp4: what ran, and all of it inside the frame."""

import numpy as np

from diffsparse import compare
from diffsparse.demo import compare_once

SMALL = {"steps": 2, "frames": 5, "height": 32, "width": 32, "seed": 0}


def test_the_label_says_the_density_that_ran(tiny_pipe, tmp_path, monkeypatch):
    # Before, it was the pattern's default instance: window3d at 0.1 and at 0.6 both "window3d(window=(3, 8, 8))".
    labels = []
    write = compare.write_side_by_side
    monkeypatch.setattr(compare, "write_side_by_side",
                        lambda path, dense, frames, label, fps: labels.append(label) or write(path, dense, frames,
                                                                                              label, fps))
    for density in (0.1, 0.6):
        compare_once(tiny_pipe, "a red circle", "window3d", density=density, block_size=16, **SMALL, out=tmp_path)
    compare_once(tiny_pipe, "a red circle", "radial(decay=0.5)", block_size=16, **SMALL, out=tmp_path)
    assert labels[:2] == ["sparse window3d @ density 0.1", "sparse window3d @ density 0.6"]
    # Without a density, the parameters that ran, the ones left out spelled out at their defaults.
    assert labels[2] == "sparse radial(decay=0.5, min_window=64, sink=False)"


def test_a_long_label_is_wrapped_inside_the_frame(tmp_path):
    # Before, a label longer than the frame ran off its right edge (a 48-pixel frame is drawn 288 wide).
    label = "sparse searched(sample_rows=8, keep=0.25, budget='layer', min_blocks=1) @ density 0.25"
    black = np.zeros((1, 48, 48, 3))
    wide = np.zeros((1, 48, 480, 3))  # the same scale (6), room for the label on one line
    narrow_frame, wide_frame = compare._labelled(black, label)[0], compare._labelled(wide, label)[0]
    assert narrow_frame.shape[1] == 288
    ink = [int(frame.sum()) for frame in (narrow_frame, wide_frame)]
    assert ink[0] > 0.98 * ink[1]  # every glyph drawn: nothing cut off at the edge
    rows_with_ink = np.flatnonzero(narrow_frame.any(axis=(1, 2)))
    assert rows_with_ink.max() > 2 * np.flatnonzero(wide_frame.any(axis=(1, 2))).max()  # on more lines
    assert not narrow_frame[:, -3:].any()  # with a margin at the right edge
