"""The label on the sparse half of compare.mp4: what ran, and all of it inside the frame."""

import warnings

import numpy as np
import pytest

from diffsparse import DiffsparseWarning, SparseConfig, compare
from diffsparse.demo import compare_once
from diffsparse.patterns import Radial, Searched, SearchedWindows, Window3D

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


@pytest.mark.parametrize(
    ("pattern", "density", "said"),
    [
        ("radial(decay=0.5)", 0.25, ("--pattern 'radial(decay=0.5)' gives decay=0.5, and --density 0.25 sets decay "
                                     "too: the density wins (decay is solved for it on each layout where decay "
                                     "changes the density), so decay=0.5 is replaced; give --density none to run the "
                                     "pattern as written, or leave decay out of --pattern")),
        ("searched(keep=0.5, refresh=4)", 0.25, ("--pattern 'searched(keep=0.5, refresh=4)' gives keep=0.5, and "
                                                 "--density 0.25 sets keep too: the density wins (keep=0.25 runs), so "
                                                 "keep=0.5 is replaced")),
        ("searched_windows(keep=0.4)", 0.2, "gives keep=0.4, and --density 0.2 sets keep too"),
        # Nothing replaced: no density; the density's own value; a parameter the density does not set; window3d's
        # window, scaled by the density, not replaced.
        ("radial(decay=0.5)", None, None), ("searched(keep=0.25)", 0.25, None), ("radial(min_window=32)", 0.3, None),
        ("window3d(window=(1, 4, 4))", 0.3, None), ("radial", 0.3, None),
    ],
)
def test_a_pattern_parameter_the_density_replaces_is_said(pattern, density, said):
    # Before, the density replaced it without a word: `compare --pattern 'searched(keep=0.5)' --density 0.25` ran
    # keep=0.25 under a label naming keep=0.5.
    config = SparseConfig(pattern=pattern, density=density)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare.warn_if_density_replaces(config)
    assert [str(w.message) for w in caught if not said or said in str(w.message)] == [
        str(w.message) for w in caught]
    assert len(caught) == (1 if said else 0) and all(w.category is DiffsparseWarning for w in caught)
    assert all(str(w.message).startswith("diffsparse: ") for w in caught)


def test_the_page_says_a_parameter_its_density_replaces_and_the_label_leaves_it_out(tiny_pipe, tmp_path, monkeypatch):
    labels = []
    write = compare.write_side_by_side
    monkeypatch.setattr(compare, "write_side_by_side",
                        lambda path, dense, frames, label, fps: labels.append(label) or write(path, dense, frames,
                                                                                              label, fps))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result, summary = compare_once(tiny_pipe, "a red circle", "searched(keep=0.5, sample_rows=8)", density=0.25,
                                       block_size=16, **SMALL, out=tmp_path)
    # The parameters that ran, the density's own in its place.
    assert labels == ["sparse searched(sample_rows=8) @ density 0.25"]
    said = ("diffsparse: the 'pattern' field's 'searched(keep=0.5, sample_rows=8)' gives keep=0.5, and the 'target "
            "block density' slider at 0.25 sets keep too: the density wins (keep=0.25 runs), so keep=0.5 is replaced; "
            "set the 'target block density' slider to 0 to run the pattern as written, or leave keep out of the "
            "'pattern' field")
    assert said in result.warnings and said in summary


@pytest.mark.parametrize(
    ("pattern", "label", "replaced"),
    [
        # The parameters given, less the one the density sets in its place, as the same given as text reads.
        (Radial(decay=0.5, sink=True), "sparse radial(sink=True) @ density 0.25", True),
        ("radial(decay=0.5, sink=True)", "sparse radial(sink=True) @ density 0.25", True),
        (Searched(keep=0.5, sample_rows=8), "sparse searched(sample_rows=8) @ density 0.25", True),
        (SearchedWindows(keep=0.4), "sparse searched_windows @ density 0.25", True),
        # The defaults: decay solved per layout, keep the density, whatever the default instance holds.
        (Radial(), "sparse radial @ density 0.25", False), (Searched(), "sparse searched @ density 0.25", False),
        (Window3D(window=(1, 4, 4)), "sparse window3d(window=(1, 4, 4)) @ density 0.25", False),
    ],
)
def test_the_label_of_a_pattern_object_leaves_out_what_the_density_replaces(pattern, label, replaced):
    # Before, an object's repr: `sparse radial(decay=0.5, min_window=64, sink=True) @ density 0.25` (decay is solved
    # per layout) and `sparse searched(keep=0.5, ...) @ density 0.25` (keep=0.25 ran).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = SparseConfig(pattern=pattern, density=0.25)
        made = len(caught)
        compare.warn_if_density_replaces(config)  # an object was said when the config was made: not twice
    assert compare.sparse_label(config) == label
    assert len(caught) == replaced and all(w.category is DiffsparseWarning for w in caught)
    assert made == (0 if isinstance(pattern, str) else len(caught))


def test_compare_json_keeps_what_a_pattern_object_s_config_said_when_made(tiny_pipe, tmp_path):
    # Before, only stderr had it: SparseConfig warns of an object's replaced parameter when made, outside the run,
    # and compare.json (and the page's summary) read as if the pattern had run as written.
    import argparse
    import json

    from diffsparse.compare import run_compare

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = SparseConfig(pattern=Radial(decay=0.5, sink=True), density=0.25, block_size=16)
        said = [str(w.message) for w in caught]
        args = argparse.Namespace(model=None, prompt="a red circle", **SMALL, device="cpu", out=str(tmp_path),
                                  lpips_weights=None, two_stage=False, still_candidates=1, image=None,
                                  call_kwargs=None)
        result = run_compare(args, config, pipe=tiny_pipe)
    assert len(said) == 1 and "gives decay=0.5, and density=0.25 sets decay too" in said[0]
    kept = json.loads((tmp_path / "compare.json").read_text())["warnings"]
    assert kept[0] == said[0] and result.warnings == kept
    # Kept, not said a second time by the run.
    assert sum(str(w.message) == said[0] for w in caught) == 1


def test_each_file_holds_its_own_run_and_the_scores_compare_those(tiny_pipe, tmp_path, monkeypatch):
    # The dense run's frames made grey 0.2, the sparse run's 0.8: dense.mp4, the left half of compare.mp4 and the
    # reference of the scores must be the first, sparse.mp4 and the right half the second.
    import imageio.v3 as iio

    from helpers import grey_timed_runs

    runs = grey_timed_runs(monkeypatch)
    result, _ = compare_once(tiny_pipe, "a red circle", "window3d", density=0.5, block_size=16, **SMALL, out=tmp_path)
    assert runs == [1, 1, 2, 2]
    for name, grey in (("dense", 0.2), ("sparse", 0.8)):
        assert abs(iio.imread(tmp_path / f"{name}.mp4") / 255 - grey).max() < 0.02, name
    side_by_side = iio.imread(tmp_path / "compare.mp4") / 255
    below_labels = side_by_side[:, 64:]  # each half scaled 8x, its label drawn at the top
    assert abs(below_labels[:, :, :256] - 0.2).max() < 0.02 and abs(below_labels[:, :, 256:] - 0.8).max() < 0.02
    assert result.psnr_db == pytest.approx(10 * np.log10(1 / 0.6**2))


def test_compare_json_leaves_out_a_when_made_warning_the_caller_ignores(tiny_pipe, tmp_path):
    # Kept as the run's own warnings are: under the caller's filters. Before, it was replayed under "always" and kept
    # while the run's warnings under the same "ignore" were not.
    import argparse
    import json

    from diffsparse.compare import run_compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiffsparseWarning)
        config = SparseConfig(pattern=Radial(decay=0.5, sink=True), density=0.25, block_size=16)
        args = argparse.Namespace(model=None, prompt="a red circle", **SMALL, device="cpu", out=str(tmp_path),
                                  lpips_weights=None, two_stage=False, still_candidates=1, image=None,
                                  call_kwargs=None)
        run_compare(args, config, pipe=tiny_pipe)
    assert json.loads((tmp_path / "compare.json").read_text())["warnings"] == []
