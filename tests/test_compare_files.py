"""What `run_compare` writes and reports about its runs: the drawn labels of compare.mp4, the direction of the
speedups, the still a two-stage run starts from."""

import argparse
import json

import numpy as np

from diffsparse import SparseConfig, compare
from diffsparse.demo import compare_once

SMALL = {"steps": 1, "frames": 5, "height": 32, "width": 32, "seed": 0}


def test_each_half_of_the_side_by_side_carries_its_own_label(tiny_pipe, tmp_path, monkeypatch):
    # Only the label passed to `write_side_by_side` was checked: the text drawn on the sparse half could be any
    # label (or the dense half's) unnoticed. The pixels handed to the encoder are compared exactly (the mp4 is lossy).
    from helpers import grey_timed_runs

    grey_timed_runs(monkeypatch)
    encoded = {}
    write_mp4 = compare._write_mp4

    def recording(path, pixels, fps):
        encoded[path.name] = pixels
        write_mp4(path, pixels, fps)

    monkeypatch.setattr(compare, "_write_mp4", recording)
    compare_once(tiny_pipe, "a red circle", "window3d", density=0.5, block_size=16, **SMALL, out=tmp_path)
    label = "sparse window3d @ density 0.5"
    frames = np.ones((5, 32, 32, 3), np.float32)
    expected = np.concatenate([compare._labelled(0.2 * frames, "dense"), compare._labelled(0.8 * frames, label)],
                              axis=2)
    # The labels are told apart by their pixels: a wrong text on either half cannot pass.
    assert not np.array_equal(compare._labelled(0.8 * frames, label), compare._labelled(0.8 * frames, "sparse"))
    assert not np.array_equal(compare._labelled(0.2 * frames, "dense"), compare._labelled(0.2 * frames, label))
    assert np.array_equal(encoded["compare.mp4"], expected)


def test_the_speedups_are_the_dense_runs_time_over_the_sparse_runs(tiny_pipe, tmp_path, monkeypatch):
    # Nothing checked their direction: sparse / dense would have reported a 3x speedup as 0.33x. The timed runs'
    # seconds are set (after the two warm-ups), not measured.
    generate, runs = compare._generate, []
    seconds = {2: (6.0, 3.0), 3: (2.0, 1.5)}  # dense, sparse: (end-to-end, text encoding + denoising)

    def timed(pipe, args, progress, first_frame=None):
        frames, *measured = generate(pipe, args, progress, first_frame)
        runs.append(args.steps)
        return (frames, *seconds.get(len(runs) - 1, measured))

    monkeypatch.setattr(compare, "_generate", timed)
    result, summary = compare_once(tiny_pipe, "a red circle", "window3d", density=0.5, block_size=16, **SMALL,
                                   out=tmp_path)
    assert len(runs) == 4
    assert (result.dense_seconds, result.sparse_seconds, result.speedup) == (6.0, 2.0, 3.0)
    assert (result.dense_denoise_seconds, result.sparse_denoise_seconds, result.denoise_speedup) == (3.0, 1.5, 2.0)
    written = json.loads((tmp_path / "compare.json").read_text())
    assert (written["speedup"], written["denoise_speedup"]) == (3.0, 2.0)
    assert "Speedup 3.00x end-to-end, 2.00x text encoding + denoising" in summary


def test_a_two_stage_run_starts_from_the_still_of_its_own_seed(tmp_path, monkeypatch):
    # Only seed 0 was run: a still sampled at any fixed seed passed, so every --seed would start from the same one.
    from diffsparse.pipelines import testbed

    seeds = []
    best_still = testbed.best_still

    def recording(*args, seed=0, **kwargs):
        seeds.append(seed)
        return best_still(*args, seed=seed, **kwargs)

    monkeypatch.setattr(testbed, "best_still", recording)
    args = argparse.Namespace(model=None, prompt="a red circle moving left", **{**SMALL, "seed": 3}, device="cpu",
                              out=str(tmp_path), lpips_weights=None, two_stage=True, still_candidates=1, image=None,
                              call_kwargs=None)
    config = SparseConfig(pattern="window3d", density=0.5, block_size=16, dense_steps=0)
    result = compare.run_compare(args, config, pipe=testbed.load())
    assert seeds == [3] and result.seed == 3

