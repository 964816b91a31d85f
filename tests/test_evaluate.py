"""`diffsparse eval` (`diffsparse.evaluate`): its warm-ups, the configurations it refuses as one run spelled twice,
its prompts, what each row's columns are computed over, and its tables."""

import argparse
import codecs
import contextlib
import csv
import json
import re
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffsparse
from diffsparse import evaluate, metrics, runtime
from diffsparse.cli import build_parser, main
from diffsparse.config import SparseConfig
from diffsparse.patterns import get_pattern

# Tiny videos of the testbed: 3 frames of 4 x 4 tokens, one step; a frame per block, each keeping its own frame only.
TINY = ["--steps", "1", "--frames", "3", "--height", "16", "--width", "16", "--block-size", "16"]
WINDOW = "window3d(window=(1, 3, 3))"


def _sparse_applied(pipe) -> bool:
    from diffsparse.pipelines.wan import WanSparseAttnProcessor

    return isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)


def _rows(folder):
    with open(folder / "eval.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_the_warm_ups_reach_the_kernel_when_the_first_configuration_runs_nothing_sparse(tmp_path, monkeypatch):
    # Before, the sparse warm-up was the first configuration as given: with its dense steps covering every step no
    # kernel ran in it, and the first timed sparse video paid the process's one-off kernel load (180 ms against
    # 10-20 ms of warmed attention on a GPU). Counted here, not timed: which video first calls the kernel.
    events = []
    kernel, generate = runtime.block_sparse_attention, evaluate.timed_generation
    monkeypatch.setattr(runtime, "block_sparse_attention", lambda *a, **kw: events.append("kernel") or kernel(*a, **kw))
    monkeypatch.setattr(evaluate, "timed_generation", lambda *a, **kw: events.append("video") or generate(*a, **kw))
    args = ["eval", *TINY, "--pattern", WINDOW, "--density", "none", "--dense-steps", "1,0", "--prompts", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    videos_before_kernel = events[: events.index("kernel")].count("video")
    assert videos_before_kernel == 2  # the dense warm-up, then the sparse one, which called it
    assert events.count("video") == 2 + 1 * (1 + 2)  # two warm-ups, one dense video, one per configuration
    all_dense, sparse_run = _rows(tmp_path)
    # pattern_ran is "-" (empty in the csv) where no call ran sparse, the pattern that ran otherwise.
    assert (all_dense["pattern_ran"], sparse_run["pattern_ran"]) == ("", WINDOW)


def test_the_dense_control_row_shows_no_target_density(tmp_path):
    # Beside a density sweep, the dense pattern's row read `| dense() | - | 0.3 |`: a density it never used.
    args = ["eval", *TINY, "--pattern", f"dense,{WINDOW}", "--density", "0.3", "--dense-steps", "0", "--prompts", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    dense, window = _rows(tmp_path)
    assert (dense["pattern"], dense["target_density"], window["target_density"]) == ("dense()", "", "0.3")
    assert "\n| 1 | dense() | - | - | " in (tmp_path / "eval.md").read_text()
    # Nor a row whose dense steps cover the run (here its one step).
    args = ["eval", *TINY, "--steps", "1", "--pattern", WINDOW, "--density", "0.3", "--dense-steps", "1,0",
            "--prompts", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning of a row whose every step is dense: not the point
        assert main([*args, "--out", str(tmp_path / "steps")]) == 0
    covered, sparse_row = _rows(tmp_path / "steps")
    assert (covered["dense_steps"], covered["target_density"], sparse_row["target_density"]) == ("1", "", "0.3")


def test_pattern_ran_says_a_data_dependent_pattern_was_fitted_for_the_density(tmp_path):
    # Their fits (per layer and video) are not kept, so the row says how they were made; nothing checked the text,
    # nor that it names each pattern (the configured repr, or one pattern's name for every row, passed).
    args = ["eval", *TINY, "--pattern", "searched,spatial_temporal", "--density", "0.25", "--dense-steps", "0",
            "--prompts", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.25 is out of reach on 3 blocks (each keeps its diagonal): not the point
        assert main([*args, "--out", str(tmp_path)]) == 0
    assert [r["pattern_ran"] for r in _rows(tmp_path)] == [
        f"{name} fitted per layer and video, each fit solved for the target density"
        for name in ("searched", "spatial_temporal")]


def test_warm_ups_are_dense_then_each_correction_path_with_every_step_and_layer_sparse():
    configs = [
        SparseConfig(pattern="dense", dense_steps=0),
        SparseConfig(pattern="radial", dense_steps=0.5, dense_last_steps=1, dense_layers=[0, 1]),
        SparseConfig(pattern="window3d", dense_steps=3),
        # Measuring at every sparse step, it would run nothing sparse; a second refresh is the same path.
        SparseConfig(pattern="window3d", dense_steps=1, correction="residual", correction_refresh=1),
        SparseConfig(pattern="window3d", dense_steps=1, correction="residual", correction_refresh=2),
    ]
    dense, plain, corrected = evaluate._warm_ups(configs)
    assert dense is None
    assert plain == SparseConfig(pattern="radial", dense_steps=0, dense_last_steps=0, dense_layers=0)
    assert corrected == SparseConfig(pattern="window3d", dense_steps=0, correction="residual")
    assert evaluate._warm_ups(configs[:1]) == [None]  # a dense pattern alone never reaches the kernel: no sparse one


def test_measured_density_covers_every_case(tmp_path, monkeypatch):
    # The second prompt's videos have 2 frames, the first's 3: the window's density differs between them (1/2, 1/3),
    # and the row must be the mean over the calls of both, not the last video's alone.
    from diffsparse.evaluate import PROMPTS

    generate, per_video = evaluate.timed_generation, []

    def two_sizes(pipe, prompt, seed, args, first_frame=None):
        if prompt == PROMPTS[1]:
            args = argparse.Namespace(**{**vars(args), "frames": 2})
        out = generate(pipe, prompt, seed, args, first_frame)
        if _sparse_applied(pipe):
            per_video.append(diffsparse.stats(pipe).layers)
        return out

    monkeypatch.setattr(evaluate, "timed_generation", two_sizes)
    args = ["eval", *TINY, "--pattern", WINDOW, "--density", "none", "--dense-steps", "0",
            "--prompts", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path)
    timed = per_video[-2:]  # after the sparse warm-up: the row's two videos
    calls = sum(s.dense_calls + s.sparse_calls for layers in timed for s in layers)
    work = sum(s.dense_calls + s.sparse_calls * (s.mean_density or 0.0) for layers in timed for s in layers)
    last = [sum(s.sparse_calls * s.mean_density for s in timed[1]) / sum(s.sparse_calls for s in timed[1])]
    assert float(row["measured_density"]) == pytest.approx(work / calls)
    assert float(row["measured_density"]) != pytest.approx(last[0])


def test_measured_density_leaves_out_the_dense_steps(tmp_path):
    # Step 0 of 2 dense, step 1 keeping each frame's own block of 3: the sparse steps' density is 1/3, where the
    # mean over every call (the dense step's counting 1.0) would be 2/3.
    args = ["eval", "--steps", "2", *TINY[2:], "--pattern", WINDOW, "--density", "none", "--dense-steps", "1",
            "--prompts", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path)
    assert float(row["measured_density"]) == pytest.approx(1 / 3)


def test_measured_density_counts_the_dense_layers_of_the_sparse_steps_at_one(tmp_path):
    # Step 0 of 2 dense; in step 1, block 0 of 4 dense (1.0) and the others keeping each frame's own block of 3
    # (1/3): the sparse steps' attention work is 0.5. Over the sparse calls alone it would read 1/3, over every
    # call (the dense step's counting 1.0) 0.75.
    args = ["eval", "--steps", "2", *TINY[2:], "--pattern", WINDOW, "--density", "none", "--dense-steps", "1",
            "--dense-layers", "1", "--prompts", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path)
    assert float(row["measured_density"]) == pytest.approx(0.5)


def test_two_stage_scores_leave_out_the_shared_still(tmp_path, monkeypatch):
    # Frame 0 is the still every run starts from: here it differs (0 dB) and every other frame is 0.01 off dense
    # (40 dB). Only frames 1 on may be scored.
    def videos(pipe, prompt, seed, args, first_frame=None):
        sparse = _sparse_applied(pipe)
        frames = np.full((3, 4, 4, 3), 0.5 + 0.01 * sparse)
        frames[0] = float(sparse)
        return frames, 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    monkeypatch.setattr(evaluate, "shared_still", lambda *args: None)
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1",
            "--two-stage"]
    # No video was generated, so the sparse warm-up ran no call sparse: said, since its timings would be off.
    with pytest.warns(UserWarning, match="sparse warm-up .* ran no call through the sparse kernel"):
        assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path)
    assert float(row["psnr_db"]) == pytest.approx(40.0, abs=1e-9)
    # SSIM too: the still, 0 against 1, would pull it far down; an identical still would pull it up towards 1.
    dense, sparse = np.full((2, 4, 4, 3), 0.5), np.full((2, 4, 4, 3), 0.51)
    assert float(row["ssim"]) == pytest.approx(metrics.ssim(sparse, dense), rel=1e-9)


def test_the_attention_timer_adds_every_call():
    from diffusers.hooks import HookRegistry

    clock = iter([1.0, 1.5, 10.0, 10.25, 20.0, 21.0])
    total = [0.0]
    module = torch.nn.Identity()
    HookRegistry.check_if_exists_or_initialize(module).register_hook(evaluate._AttentionTimer(total), "timer")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.time, "perf_counter", lambda: next(clock))
        patch.setattr(evaluate, "synchronize_accelerators", lambda: None)
        for _ in range(3):
            module(torch.zeros(1))
    assert total == [1.75]


@pytest.mark.parametrize(
    ("patterns", "densities", "dense_layers", "kept", "message"),
    [
        (["radial(decay=0.5)", "radial"], [0.3], [0], 1, "density=0.3 solves decay whatever it is given as"),
        (["dense"], [None, 0.1, 0.2], [0], 1, "a dense pattern runs every call dense"),
        # A dense control row beside a density sweep (refused outright for a while: "give dense once" could not be
        # done without collapsing the other lists).
        (["dense", "radial"], [0.1, 0.2], [0], 3, "a dense pattern runs every call dense"),
        (["radial"], [0.3], [0, []], 1, "dense_layers=0 and dense_layers=[] name the same blocks"),
        (["radial"], [None], [2, [1, 0]], 1, "dense_layers=2 and dense_layers=[1, 0] name the same blocks"),
        # A searched pattern's density is its `keep`, set at construction: before, `searched(keep=0.5)` then read as
        # `searched` given twice and the grid was refused.
        (["searched", "searched(keep=0.5)"], [None, 0.25], [0], 3, "density=0.25 solves keep whatever it is given"),
        (["searched_windows", "searched_windows(keep=0.5)"], [None, 0.25], [0], 3,
         "density=0.25 solves keep whatever it is given"),
    ],
)
def test_configurations_that_run_the_same_are_measured_once(patterns, densities, dense_layers, kept, message):
    # Before, each was run again: every video generated twice (or three times) for identical rows.
    configs = [SparseConfig(pattern=p, density=d, dense_steps=0, dense_layers=layers)
               for p in patterns for d in densities for layers in dense_layers]
    with pytest.warns(UserWarning, match="diffsparse: eval: pattern=") as caught:
        distinct = evaluate._distinct_runs(configs)
    assert len(distinct) == kept and distinct == [c for c in configs if c in distinct]  # the first of each run
    assert all(message in str(w.message) for w in caught) and len(caught) == len(configs) - kept


def test_one_pattern_spelled_twice_is_refused():
    with pytest.raises(ValueError, match=r"pattern='radial\(decay=1.0\)' and pattern='radial' are the same pattern"):
        evaluate._distinct_runs([SparseConfig(pattern="radial"), SparseConfig(pattern="radial(decay=1.0)")])
    with pytest.raises(ValueError, match=r"pattern='searched\(keep=0.25\)' and pattern='searched' are the same"):
        evaluate._distinct_runs([SparseConfig(pattern=p, density=0.25) for p in ("searched", "searched(keep=0.25)")])


@pytest.mark.parametrize(
    ("dense_steps", "steps", "kept", "message"),
    [
        # (dense_steps, dense_last_steps) pairs. 0.2 of 2 steps rounds to none (the runtime's `resolve_step_count`).
        ([(0, 0), (0.2, 0)], 2, 1, "dense_steps=0 and dense_steps=0.2 keep no step of a 2-step run dense"),
        ([(4, 0), (0.2, 0)], 20, 1, "dense_steps=4 and dense_steps=0.2 keep the first 4 and the last 0 steps"),
        ([(1, 0), (0.25, 0)], 2, 1, "keep the first 1 and the last 0 steps of a 2-step run dense"),  # half up
        ([(2, 0), (3, 0), (1, 1), (0.9, 0)], 2, 1, "keep every step of a 2-step run dense"),
        ([(0, 1), (0.5, 0)], 2, 2, None),  # the last step dense, and the first
        ([(0, 0), (0.25, 0)], 2, 2, None),
        ([(0, 0), (0.2, 0)], 3, 2, None),
    ],
)
def test_dense_steps_that_keep_the_same_steps_dense_are_measured_once(dense_steps, steps, kept, message):
    # Before, `--steps 2 --dense-steps 0,0.2` generated every video twice, the second row saying 0.2 where no step
    # had run dense.
    configs = [SparseConfig(pattern="radial", dense_steps=first, dense_last_steps=last) for first, last in dense_steps]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert evaluate._distinct_runs(configs) == configs  # the step count not yet known: each kept
        distinct = evaluate._distinct_runs(configs, steps=steps)
    assert len(distinct) == kept and distinct == configs[:kept]
    assert len(caught) == len(configs) - kept and all(message in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("settings", "steps", "blocks", "message", "fewer"),
    [
        # `fewer`: the steps or blocks where not every one is dense, each configuration then a run of its own.
        ({"dense_steps": 2}, 2, None, "dense_steps=2 keeps every step of a 2-step run dense", {"steps": 3}),
        ({"dense_steps": 0.8}, 2, None, "dense_steps=0.8 keeps every step of a 2-step run dense", {"steps": 3}),
        ({"dense_steps": 1, "dense_last_steps": 1}, 2, None, "dense_steps=1, dense_last_steps=1 keeps every step",
         {"steps": 3}),
        ({"dense_layers": 4}, None, range(4), "dense_layers=4 keeps every self-attention block of the model dense",
         {"blocks": frozenset(range(5))}),
        ({"dense_layers": [3, 1, 2, 0]}, None, range(4), "dense_layers=[3, 1, 2, 0] keeps every self-attention block",
         {"blocks": frozenset(range(5))}),
    ],
)
def test_configurations_that_run_every_call_dense_are_measured_once_with_the_dense_pattern(settings, steps, blocks,
                                                                                            message, fewer):
    # Every step or every block dense: every call runs the original processor, as under the dense pattern, whatever
    # the pattern, density and correction. Before, each was a row of its own, every video generated again.
    configs = [
        SparseConfig(pattern="radial", density=0.1, **settings),
        SparseConfig(pattern="radial", density=0.2, **settings),
        SparseConfig(pattern="window3d", density=0.2, correction="residual", **settings),
        SparseConfig(pattern="dense", dense_steps=0),
    ]
    blocks = None if blocks is None else frozenset(blocks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert evaluate._distinct_runs(configs) == configs  # neither the step count nor the blocks known yet
        assert evaluate._distinct_runs(configs, **fewer) == configs
        assert caught == []
        distinct = evaluate._distinct_runs(configs, steps=steps, blocks=blocks)
    assert distinct == configs[:1]
    texts = [str(w.message) for w in caught]
    assert len(texts) == 3
    for merged, text in zip(configs[1:], texts):
        assert f"diffsparse: eval: {evaluate._settings(merged)} runs as {evaluate._settings(configs[0])} (" in text
        assert message in text and "measured once, in that row" in text
        assert "every call runs the original processor, as the dense pattern's do" in text
    assert "a dense pattern runs every call dense" in texts[-1]


def test_eval_measures_every_step_or_every_block_dense_once_with_the_dense_pattern(tmp_path, monkeypatch):
    # The testbed has 4 blocks, so dense layers 4 cover them all, and 0.8 of 2 steps rounds to both steps.
    generate, videos = evaluate.timed_generation, []
    monkeypatch.setattr(evaluate, "timed_generation", lambda *a, **kw: videos.append(1) or generate(*a, **kw))
    args = ["eval", "--steps", "2", *TINY[2:], "--pattern", f"{WINDOW},dense", "--density", "0.3,0.5",
            "--dense-steps", "0,0.8", "--dense-layers", "0,4", "--prompts", "1"]
    with pytest.warns(UserWarning) as caught:
        assert main([*args, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    # The row whose dense layers cover every block ran no density: none shown.
    assert [(r["target_density"], r["dense_steps"], r["dense_layers"]) for r in rows] == [
        ("0.3", "0", "0"), ("", "0", "4"), ("0.5", "0", "0")]
    assert len(videos) == 2 + 1 + 3  # two warm-ups, dense, the three configurations
    every_call_dense = rows[1]
    assert every_call_dense["pattern_ran"] == "" and float(every_call_dense["psnr_db"]) == float("inf")
    merged = [str(w.message) for w in caught if str(w.message).startswith("diffsparse: eval: ")]
    # Before loading, dense under its 7 other settings; with the blocks known, the 3 other configurations with dense
    # layers 4 and the dense pattern's row; with the step count known, the 2 others with dense steps 0.8.
    assert len(merged) == 7 + 4 + 2
    assert sum("runs as pattern='window3d(window=(1, 3, 3))', density=0.3, dense_steps=0, dense_layers=4" in text
               for text in merged) == 4 + 2
    assert sum("dense_layers=4 keeps every self-attention block of the model dense (4 blocks)" in text
               for text in merged) == 4 + 2
    assert sum("dense_steps=0.8 keeps every step of a 2-step run dense" in text for text in merged) == 2
    # Each is kept by the row standing in, where the table's readers look: before, they reached stderr only, and the
    # row read as measured for its own settings alone. Every one ends in the second row, through the rows merged
    # into it on the way (dense's into its first, that into the second with the blocks known).
    kept = [[text for text in json.loads(row["warnings"]) if text.startswith("diffsparse: eval: ")] for row in rows]
    assert kept[0] == kept[2] == [] and sorted(kept[1]) == sorted(merged)
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert all(f"- {text}" in table.split("Warnings of row 2:")[1] for text in merged)


def test_the_time_ratios_are_the_means_over_the_videos(tmp_path, monkeypatch):
    # Each (prompt, seed) its own seconds: the row's ratios must be the mean of each video's sparse / dense, not one
    # video's (the first 3.0 and 0.5, the last 0.5 and 2.0) nor the ratio of the sums (0.8 and 0.625).
    from diffsparse.evaluate import PROMPTS

    seconds = {  # (prompt, seed): ((dense wall, dense attention), (sparse wall, sparse attention))
        (PROMPTS[0], 0): ((1.0, 1.0), (3.0, 0.5)),
        (PROMPTS[0], 1): ((2.0, 4.0), (1.0, 1.0)),
        (PROMPTS[1], 0): ((4.0, 2.0), (1.0, 1.5)),
        (PROMPTS[1], 1): ((1.0, 1.0), (0.5, 2.0)),
    }

    def videos(pipe, prompt, seed, args, first_frame=None):
        sparse = _sparse_applied(pipe)
        wall, attention = seconds[prompt, seed][sparse]
        return np.full((2, 4, 4, 3), 0.5 + 0.01 * sparse), wall, attention

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "2",
            "--seeds", "2"]
    with pytest.warns(UserWarning, match="sparse warm-up .* ran no call through the sparse kernel"):
        assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path)
    assert float(row["end_to_end_ratio"]) == pytest.approx((3.0 + 0.5 + 0.25 + 0.5) / 4)
    assert float(row["attention_time_ratio"]) == pytest.approx((0.5 + 0.25 + 0.75 + 2.0) / 4)


def _two_seeds_with_lpips(tmp_path, monkeypatch, offsets: dict[int, float], lpips) -> list[str]:
    """The arguments of an eval of two seeds whose sparse videos are plain grey, `offsets[seed]` off the dense 0.5,
    scored with `lpips` (frames, reference -> score) standing in for LPIPS."""

    def videos(pipe, prompt, seed, args, first_frame=None):
        return np.full((2, 16, 16, 3), 0.5 + offsets[seed] * _sparse_applied(pipe)), 1.0, 1.0

    weights = tmp_path / "alexnet.pth"
    weights.touch()
    monkeypatch.setattr(evaluate, "timed_generation", videos)
    monkeypatch.setattr(evaluate, "lpips_weights", lambda path, frame_size=None: weights)
    monkeypatch.setattr(evaluate, "lpips", lambda frames, reference, weights_path=None: lpips(frames, reference))
    return ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1",
            "--seeds", "2"]


def test_a_row_s_ssim_and_lpips_are_the_means_over_its_videos(tmp_path, monkeypatch):
    # Seed 0's sparse video 0.01 off dense, seed 1's 0.2 off: the row must average both, not give one video's.
    offsets = {0: 0.01, 1: 0.2}
    args = _two_seeds_with_lpips(tmp_path, monkeypatch, offsets,
                                 lambda frames, reference: 0.1 if frames.max() - reference.max() < 0.1 else 0.3)
    with pytest.warns(UserWarning, match="sparse warm-up .* ran no call through the sparse kernel"):
        assert main([*args, "--out", str(tmp_path / "e")]) == 0
    (row,) = _rows(tmp_path / "e")
    dense = np.full((2, 16, 16, 3), 0.5)
    per_video = [metrics.ssim(dense + offset, dense) for offset in offsets.values()]
    assert per_video[0] - per_video[1] > 0.01  # the two videos score apart
    assert float(row["ssim"]) == pytest.approx(sum(per_video) / 2, rel=1e-9)
    assert float(row["lpips"]) == pytest.approx(0.2)


def test_eval_csv_keeps_each_row_s_warnings_as_a_json_list(tmp_path, monkeypatch):
    # Warning texts hold commas, semicolons and quotes of their own: joined as text, no reader could split them.
    texts = ["diffsparse: one, with a comma; and a semicolon", 'diffsparse: two, "quoted"']

    def videos(pipe, prompt, seed, args, first_frame=None):
        if _sparse_applied(pipe):
            for text in texts:
                warnings.warn(text, diffsparse.DiffsparseWarning)
        return np.full((2, 4, 4, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1"]
    with pytest.warns(UserWarning):
        assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path)
    # First the warm-up's (no kernel ran in these fake videos): it says this row's time ratios are high.
    cold, *own = json.loads(row["warnings"])
    assert own == texts
    assert cold.startswith("diffsparse: eval's sparse warm-up (pattern='window3d', density=0.5, every step and layer "
                           "sparse) ran no call through the sparse kernel")


def test_eval_measures_dense_steps_that_round_to_the_same_steps_once(tmp_path, monkeypatch):
    generate, videos = evaluate.timed_generation, []
    monkeypatch.setattr(evaluate, "timed_generation", lambda *a, **kw: videos.append(1) or generate(*a, **kw))
    args = ["eval", "--steps", "2", *TINY[2:], "--pattern", WINDOW, "--density", "none", "--dense-steps", "0,0.2",
            "--prompts", "1"]
    with pytest.warns(UserWarning, match=r"dense_steps=0.2, .* runs as .*dense_steps=0, .*keep no step of a 2-step"):
        assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path)
    assert row["dense_steps"] == "0" and len(videos) == 2 + 1 + 1  # two warm-ups, dense, the one configuration
    # Resolved for the steps the runs had, not for `--steps`: a pipeline running 10 (img2img's `strength` runs
    # fewer than asked, stages their own) keeps 2 of them dense under 0.2, so both configurations are measured.
    from diffsparse.api import SparseHandle

    new_run = SparseHandle._new_run
    monkeypatch.setattr(SparseHandle, "_new_run", lambda self, num_steps=None: new_run(self, 10))
    videos.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main([*args, "--out", str(tmp_path / "ten")]) == 0
    assert [row["dense_steps"] for row in _rows(tmp_path / "ten")] == ["0", "0.2"] and len(videos) == 2 + 1 + 2


def test_eval_merges_nothing_on_the_step_count_when_the_runs_differ(tmp_path, monkeypatch):
    # A pipeline whose denoising runs have counts of their own (stages): 0.2 keeps no step of the 2-step run dense
    # but 2 of the 10-step one, so dense steps 0 and 0.2 are two runs. Before, nothing pinned it: taking either
    # count (the first seen) merged them into one row.
    from diffsparse.api import SparseHandle

    new_run = SparseHandle._new_run

    def two_runs(self, num_steps=None):
        new_run(self, num_steps)
        self.run_step_counts.append(10)  # a second stage of 10 steps, as the warm-up sees it

    monkeypatch.setattr(SparseHandle, "_new_run", two_runs)
    args = ["eval", "--steps", "2", *TINY[2:], "--pattern", WINDOW, "--density", "none", "--dense-steps", "0,0.2",
            "--prompts", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main([*args, "--out", str(tmp_path)]) == 0
    assert [row["dense_steps"] for row in _rows(tmp_path)] == ["0", "0.2"]


def test_a_correction_is_a_run_of_its_own():
    configs = [SparseConfig(pattern="radial", density=0.3, dense_steps=1, correction=c) for c in (None, "residual")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate._distinct_runs(configs) == configs
        # Each correction refresh too: before, two refreshes read as one pattern given twice, and were refused.
        refreshed = [replace(configs[1], correction_refresh=refresh) for refresh in (0, 1, 4)]
        assert evaluate._distinct_runs(refreshed) == refreshed
        assert evaluate._distinct_runs(refreshed, steps=20, blocks=frozenset(range(4))) == refreshed
        # With every step dense, a refresh is measured nowhere: one row, the first's, as for any correction.
        every_step = [replace(config, dense_steps=20) for config in refreshed]
        warnings.simplefilter("always")
        with pytest.warns(UserWarning, match="dense_steps=20 keeps every step of a 20-step run dense") as caught:
            assert evaluate._distinct_runs(every_step, steps=20) == every_step[:1]
    assert [str(w.message).split(" runs as ")[0].endswith(f"correction_refresh={refresh}") for w, refresh in
            zip(caught, (1, 4))] == [True, True]


def _grid_args(**lists):
    settings = {"pattern": ["radial"], "density": [0.3], "dense_steps": [0], "dense_last_steps": [0],
                "dense_layers": [0], "correction": [None], "correction_refresh": [0]}
    return SimpleNamespace(**{**settings, **lists}, block_size=64, order=None)


@pytest.mark.parametrize("refreshes", [[0, 2, 3], [2, 0, 3], [2, 3]])
def test_a_correction_refresh_without_a_correction_is_measured_once_with_refresh_0(refreshes):
    # SparseConfig refuses a refresh without a correction: before, `--correction none,residual --correction-refresh
    # 0,2` could only fail, or (the refresh dropped) generate the uncorrected configuration's videos twice.
    args = _grid_args(dense_last_steps=[0, 1], correction=[None, "residual"], correction_refresh=refreshes)
    with pytest.warns(UserWarning, match="has no effect without a correction") as caught:
        configs = evaluate._grid(args)
    assert [(c.dense_last_steps, c.correction, c.correction_refresh) for c in configs] == [
        (last, correction, refresh) for last in (0, 1) for correction, refresh in
        [(None, 0), *(("residual", r) for r in refreshes)]]
    # Every refresh other than 0 is left out and said, 0 in the list or not: the row is labelled 0, what it runs.
    # Before, with `2,3`, the row read 0 while only 3 was said, 2 taken silently as the row's own.
    left_out = [r for r in refreshes if r]
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2 * len(left_out)
    for text, (last, refresh) in zip(texts, [(last, r) for last in (0, 1) for r in left_out]):
        kept = evaluate._settings(SparseConfig(pattern="radial", density=0.3, dense_steps=0, dense_last_steps=last))
        assert text == (f"diffsparse: eval: {kept}, correction_refresh={refresh} runs as {kept}, correction_refresh=0 "
                        f"(correction_refresh={refresh} has no effect without a correction): measured once, in that "
                        "row")
    assert evaluate._distinct_runs(configs) == configs  # and every configuration left is a run of its own
    # Kept for the row that stands for them, the uncorrected configuration's: eval.md and eval.csv said none.
    notes = {}
    with pytest.warns(UserWarning, match="has no effect without a correction"):
        evaluate._grid(args, notes)
    uncorrected = [c for c in configs if c.correction is None]
    assert notes == {uncorrected[0]: texts[:len(left_out)], uncorrected[1]: texts[len(left_out):]}


@pytest.mark.parametrize(
    ("dense_steps", "refreshes", "kept", "message"),
    [
        # 3 steps, the first dense: measured at step 0, sparse at 1 and 2. Refresh 2 comes at step 2; 3 and 5 never.
        (1, [0, 2, 3, 5], [0, 2], ("correction_refresh=3 never comes in a 3-step run: the correction measures at "
                                   "step 0 and the last sparse step, 2, is 2 steps after it, so it measures once, as "
                                   "correction_refresh=0 does")),
        # No dense step: measured at step 0, the first sparse one, sparse at 1 and 2 (the refresh of the number of
        # sparse steps, 2, comes: at step 2).
        (0, [0, 2, 3], [0, 2], "correction_refresh=3 never comes in a 3-step run: the correction measures at step 0"),
        # None is 0: the first row stands for the other, both refreshes named.
        (1, [5, 3], [5], "correction_refresh=5 and correction_refresh=3 never come in a 3-step run"),
    ],
)
def test_a_correction_refresh_that_never_comes_runs_as_refresh_0(dense_steps, refreshes, kept, message):
    # Before, each was a run of its own, every video generated again for a row identical to refresh 0's.
    base = SparseConfig(pattern="radial", density=0.3, dense_steps=dense_steps, correction="residual")
    configs = [replace(base, correction_refresh=refresh) for refresh in refreshes]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate._distinct_runs(configs) == configs  # the step count unknown: each its own
    with pytest.warns(UserWarning) as caught:
        assert [c.correction_refresh for c in evaluate._distinct_runs(configs, steps=3)] == kept
    assert len(caught) == len(refreshes) - len(kept) and message in str(caught[0].message)
    assert " runs as " in str(caught[0].message) and str(caught[0].message).endswith("measured once, in that row")


def test_a_correction_refresh_that_never_comes_makes_the_videos_of_refresh_0(tiny_pipe):
    # What the merge stands on, checked on the runtime: two CFG branches, 3 steps, the first dense.
    from helpers import tiny_call

    def video(refresh):
        config = SparseConfig(pattern="window3d", density=0.3, dense_steps=1, block_size=16, correction="residual",
                              correction_refresh=refresh)
        with diffsparse.sparse(tiny_pipe, config):
            return tiny_pipe(**tiny_call(num_inference_steps=3)).frames[0]

    once = video(0)
    for refresh in (3, 4):
        assert evaluate._refresh_never_comes(replace(SparseConfig(correction="residual", dense_steps=1),
                                                     correction_refresh=refresh), 3)
        torch.testing.assert_close(video(refresh), once, rtol=0, atol=0)
    assert not evaluate._refresh_never_comes(SparseConfig(correction="residual", dense_steps=1, correction_refresh=2),
                                             3)
    assert not torch.equal(video(2), once)


def test_eval_measures_a_correction_refresh_that_never_comes_once_and_its_row_says_so(tmp_path, monkeypatch):
    generate, videos = evaluate.timed_generation, []
    monkeypatch.setattr(evaluate, "timed_generation", lambda *a, **kw: videos.append(1) or generate(*a, **kw))
    args = ["eval", "--steps", "3", *TINY[2:], "--pattern", WINDOW, "--density", "none", "--dense-steps", "1",
            "--correction", "residual", "--correction-refresh", "5,0,2", "--prompts", "1", "--out", str(tmp_path)]
    with pytest.warns(UserWarning, match=r"correction='residual' runs as .*correction_refresh=5 \(correction_refresh=5 "
                                         "never comes in a 3-step run") as caught:
        assert main(args) == 0
    (merge,) = [str(w.message) for w in caught if " runs as " in str(w.message)]
    rows = _rows(tmp_path)
    assert [row["correction_refresh"] for row in rows] == ["5", "2"]
    assert len(videos) == 2 + 1 + 2  # two warm-ups, one dense video, one per row left
    # The row labelled 5 says it measured once, where its readers look.
    said = ("diffsparse: eval: correction_refresh=5 never comes in a 3-step run: the correction measures at step 0 "
            "and the last sparse step, 2, is 2 steps after it, so it measures once, as correction_refresh=0 does")
    assert json.loads(rows[0]["warnings"]) == [merge, said]  # refresh 0's row, which it stands for, first
    assert json.loads(rows[1]["warnings"]) == []


@pytest.mark.parametrize("every_call_dense", [["--dense-steps", "2"], ["--dense-steps", "0", "--dense-layers", "100"]])
def test_a_row_that_runs_every_call_dense_says_nothing_of_a_refresh(tmp_path, every_call_dense):
    # Nothing measures there, so no refresh comes or fails to: before, every dense step crashed the run ("'measure'
    # is not in list") and every dense layer's row said the correction measured at step 0.
    args = ["eval", "--steps", "2", *TINY[2:], "--pattern", WINDOW, "--density", "none", *every_call_dense,
            "--correction", "residual", "--correction-refresh", "3", "--prompts", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    (row,) = _rows(tmp_path)
    assert float(row["measured_density"]) == 1.0
    assert not any("never comes" in warning for warning in json.loads(row["warnings"]))


def test_a_correction_refresh_with_no_correction_at_all_is_refused(tmp_path, monkeypatch, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(evaluate._grid(_grid_args(correction_refresh=[0]))) == 1
    with pytest.raises(ValueError, match="correction_refresh=2 has no effect without a correction"):
        evaluate._grid(_grid_args(correction_refresh=[0, 2]))
    # Said before the model loads.
    monkeypatch.setattr(evaluate, "load_pipeline_for", lambda args: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *TINY, "--correction-refresh", "0,2", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "diffsparse eval: error: correction_refresh=2 has no effect without a correction" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--dense-last-steps", "0,1.5", "or a fraction of the steps in [0, 1), got '1.5'"),
        ("--dense-last-steps", "0,x", "got 'x'"),
        ("--dense-last-steps", "1,0,1", "1 is given twice in '1,0,1': give each value once"),
        ("--dense-last-steps", "0,0.0", "0.0 is given twice in '0,0.0'"),
        ("--correction-refresh", "0,-1", "must be at least 0, got -1"),
        ("--correction-refresh", "1.5", "expected a whole number, got '1.5'"),
        ("--correction-refresh", "2,2", "2 is given twice in '2,2': give each value once"),
    ],
)
def test_bad_dense_last_steps_and_correction_refreshes_are_refused(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["eval", option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"diffsparse eval: error: argument {option}: " in err and message in err


def test_eval_takes_dense_last_steps_and_correction_refreshes(tmp_path, monkeypatch):
    # Before, eval had neither option: every configuration ran with the last steps sparse and measured once.
    applied, apply = [], evaluate.sparse
    monkeypatch.setattr(evaluate, "sparse", lambda pipe, config: applied.append(config) or apply(pipe, config))
    assert build_parser().parse_args(["eval"]).dense_last_steps == [0]
    assert build_parser().parse_args(["eval"]).correction_refresh == [0]
    # 4 steps: with the last one dense too, refresh 2 still comes (measured at step 0, again at 2). Of 3 it would
    # not (sparse at step 1 only): a run of refresh 0's, measured once in its row.
    args = ["eval", "--steps", "4", *TINY[2:], "--pattern", WINDOW, "--density", "none", "--dense-steps", "1",
            "--dense-last-steps", "0,1", "--correction", "none,residual", "--correction-refresh", "0,2",
            "--prompts", "1"]
    with pytest.warns(UserWarning, match="correction_refresh=2 has no effect without a correction"):
        assert main([*args, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    settings = [(last, correction, refresh) for last in ("0", "1")
                for correction, refresh in (("", "0"), ("residual", "0"), ("residual", "2"))]
    assert [(r["dense_steps"], r["dense_last_steps"], r["correction"], r["correction_refresh"]) for r in rows] == [
        ("1", *setting) for setting in settings]
    # What ran: the timed runs under each row's settings, after the warm-ups (dense's None is no `sparse` call).
    timed = applied[-len(rows):]
    assert [(c.dense_steps, c.dense_last_steps, c.correction, c.correction_refresh) for c in timed] == [
        (1, int(last), correction or None, int(refresh)) for last, correction, refresh in settings]
    # The last step dense changes the video.
    assert rows[0]["psnr_db"] != rows[3]["psnr_db"]
    # Every row of eval.md tells its settings apart: the rows differing only in these would read the same without
    # their columns.
    table = [line for line in (tmp_path / "eval.md").read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].split("|")]
    columns = [header.index(name) for name in ("dense_steps", "dense_last_steps", "correction", "correction_refresh")]
    cells = [[line.split("|")[i].strip() for i in columns] for line in table[1:]]
    assert cells == [["1", last, correction or "-", refresh] for last, correction, refresh in settings]
    assert "dense_last_steps: the first and the last steps kept dense" in (tmp_path / "eval.md").read_text()


def test_eval_measures_dense_first_and_last_steps_keeping_the_same_steps_dense_once(tmp_path, monkeypatch):
    # Of 2 steps: 0.2 keeps none, 0.5 one. So last steps 0.2 run as 0, and first 1 with last 0.5 keep both steps
    # dense: the dense control row, standing for the dense pattern's.
    generate, videos = evaluate.timed_generation, []
    monkeypatch.setattr(evaluate, "timed_generation", lambda *a, **kw: videos.append(1) or generate(*a, **kw))
    args = ["eval", "--steps", "2", *TINY[2:], "--pattern", f"{WINDOW},dense", "--density", "none", "--dense-steps",
            "0,1", "--dense-last-steps", "0,0.2,0.5", "--prompts", "1"]
    with pytest.warns(UserWarning) as caught:
        assert main([*args, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert [(r["dense_steps"], r["dense_last_steps"]) for r in rows] == [("0", "0"), ("0", "0.5"), ("1", "0"),
                                                                       ("1", "0.5")]
    assert len(videos) == 2 + 1 + 4  # two warm-ups, dense, the four configurations
    every_step_dense = rows[3]
    assert every_step_dense["pattern_ran"] == "" and float(every_step_dense["psnr_db"]) == float("inf")
    assert rows[1]["pattern_ran"] == WINDOW and float(rows[1]["psnr_db"]) < float("inf")
    merged = [str(w.message) for w in caught if str(w.message).startswith("diffsparse: eval: ")]
    # Before loading, dense under its 5 other settings; with the step count known, the two last steps 0.2, and the
    # dense pattern's row.
    assert len(merged) == 5 + 3
    window = f"pattern={WINDOW!r}, density=None"
    assert sum(f"{window}, dense_steps=0, dense_last_steps=0.2, dense_layers=0, correction=None runs as {window}, "
               "dense_steps=0, dense_layers=0, correction=None (dense_steps=0 and dense_steps=0, dense_last_steps=0.2 "
               "keep no step of a 2-step run dense" in text for text in merged) == 1
    assert sum(f"{window}, dense_steps=1, dense_last_steps=0.2, dense_layers=0, correction=None runs as {window}, "
               "dense_steps=1, dense_layers=0, correction=None (dense_steps=1 and dense_steps=1, dense_last_steps=0.2 "
               "keep the first 1 and the last 0 steps of a 2-step run dense" in text for text in merged) == 1
    assert sum(f"runs as {window}, dense_steps=1, dense_last_steps=0.5, dense_layers=0, correction=None (" in text
               and "dense_steps=1, dense_last_steps=0.5 keeps every step of a 2-step run dense" in text
               for text in merged) == 1


@pytest.mark.parametrize(
    ("patterns", "densities", "dense_layers"),
    [
        (["radial(decay=0.5)", "radial"], [None], [0]),  # as written, the decays differ
        (["radial(min_window=16)", "radial"], [0.3], [0]),  # the density solves decay, not min_window
        # Window3D's density scales the window given: two shapes solve to different windows.
        (["window3d(window=(1, 8, 8))", "window3d(window=(3, 3, 3))"], [0.3], [0]),
        (["spatial_temporal(frames=2)", "spatial_temporal"], [0.3], [0]),
        (["radial", "dense"], [0.3], [0]),
        (["radial"], [0.3], [2, [0, 2]]),
    ],
)
def test_configurations_that_run_differently_are_kept(patterns, densities, dense_layers):
    configs = [SparseConfig(pattern=p, density=d, dense_layers=layers)
               for p in patterns for d in densities for layers in dense_layers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate._distinct_runs(configs) == configs


def test_prompts_default_to_two_fixed_ones_and_a_file_s_byte_order_mark_is_not_a_prompt(tmp_path):
    assert evaluate.eval_prompts(SimpleNamespace(prompt_file=None, prompts=None)) == list(evaluate.PROMPTS[:2])
    # Saved as "UTF-8 with BOM": before, the BOM glued to the first line hid its "#" and the comment ran as a prompt.
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xef\xbb\xbf# my prompts\na cat\n")
    assert evaluate.eval_prompts(SimpleNamespace(prompt_file=str(prompts), prompts=None)) == ["a cat"]


def test_each_configuration_keeps_a_warning_text_once():
    from diffsparse.bench import _warn_if_off_target

    with evaluate.diffsparse_warnings() as kept:
        warnings.simplefilter("always")  # shown each time, as under `-W always`
        for _ in range(2):
            _warn_if_off_target("bench density", 0.1, 0.9, "radial", "the mask", "this row runs")
    assert kept == [("diffsparse: bench density: --density 0.1 is out of reach of radial: the mask has density "
                     "0.900, so this row runs denser than asked")]


def _fake_videos(monkeypatch, side: int) -> None:
    """Videos of 2 frames of side x side pixels instead of generating: dense ones at 0.5, sparse ones 0.01 off."""
    def videos(pipe, prompt, seed, args, first_frame=None):
        return np.full((2, side, side, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)


def test_lpips_is_left_out_when_the_pipeline_made_frames_smaller_than_asked(tmp_path, monkeypatch):
    # Asked 48 x 48 (LPIPS fits), made 16 x 16 (it does not): the check must be made again on the size made, else
    # scoring the first configuration failed after every video was generated.
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("lpips")
    from diffsparse import metrics

    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)  # random weights stand in for the checkpoint
    monkeypatch.setattr(metrics, "alexnet_weights_path", lambda: weights)
    assert metrics.lpips_weights(None, frame_size=(48, 48)) == weights  # at the size asked, LPIPS would be scored
    _fake_videos(monkeypatch, 16)
    args = ["eval", "--steps", "1", "--frames", "2", "--height", "48", "--width", "48", "--block-size", "16",
            "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1"]
    with pytest.warns(UserWarning, match="sparse warm-up .* ran no call through the sparse kernel"):
        assert main([*args, "--out", str(tmp_path / "e")]) == 0
    (row,) = _rows(tmp_path / "e")
    assert row["lpips"] == ""
    assert "LPIPS not computed: frames of 16x16 pixels" in (tmp_path / "e" / "eval.md").read_text()


def test_a_pipe_in_a_pattern_is_escaped_in_the_markdown_table(tmp_path, capsys):
    # A composed pattern's repr holds " | ": before, it split its cell in two and shifted the columns after it.
    composed = repr(get_pattern("radial") | get_pattern("window3d"))
    assert "|" in composed
    row = evaluate.EvalRow(pattern=composed, pattern_ran=composed, target_density=None, measured_density=0.5,
                           dense_steps=0, dense_layers=0, correction=None, order="frame_major()", psnr_db=30.0,
                           ssim=0.9, lpips=None, attention_time_ratio=1.0, end_to_end_ratio=1.0, dense_last_steps=0,
                           correction_refresh=0)
    args = SimpleNamespace(model=None, steps=1, seeds=1, seed=0, block_size=64, device="cpu", two_stage=False,
                           still_candidates=1, image=None, call_kwargs=None)
    evaluate._write([row], tmp_path, args, ["a prompt"], False, "cpu", (1, 48, 48))
    capsys.readouterr()
    header, _, cells = [line for line in (tmp_path / "eval.md").read_text().splitlines() if line.startswith("|")]
    unescaped = r"(?<!\\)\|"
    assert len(re.split(unescaped, cells)) == len(re.split(unescaped, header))
    assert composed.replace("|", "\\|") in cells
    assert _rows(tmp_path)[0]["pattern"] == composed  # the CSV keeps it as it is


def test_a_video_identical_to_dense_leaves_the_row_s_psnr_the_mean_of_the_others(tmp_path, monkeypatch):
    # A video identical to dense has an infinite PSNR (all its frames skipped): before, it made the whole row inf,
    # though the metric's rule is inf only when every one is. A NaN (a broken run) still makes the row NaN.
    def videos_with(sparse_offsets):
        def videos(pipe, prompt, seed, args, first_frame=None):
            offset = sparse_offsets[seed] if _sparse_applied(pipe) else 0.0
            return np.full((2, 16, 16, 3), 0.5 + offset), 1.0, 1.0
        return videos

    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1",
            "--seeds", "2"]
    for name, offsets, expected in (("one", (0.0, 0.01), 40.0), ("all", (0.0, 0.0), float("inf")),
                                    ("nan", (float("nan"), 0.0), None)):
        monkeypatch.setattr(evaluate, "timed_generation", videos_with(offsets))
        broken = pytest.warns(RuntimeWarning, match="is nan") if expected is None else contextlib.nullcontext()
        with pytest.warns(UserWarning, match="sparse warm-up .* ran no call through the sparse kernel"), broken:
            assert main([*args, "--out", str(tmp_path / name)]) == 0
        (row,) = _rows(tmp_path / name)
        if expected is None:
            assert np.isnan(float(row["psnr_db"]))
        else:
            assert float(row["psnr_db"]) == pytest.approx(expected)
        # SSIM counts the identical video at 1.0 where PSNR leaves it out: said in the row, which before read as
        # both taken over the same two videos. Not where every video is identical (the dense control row).
        said = [text for text in json.loads(row["warnings"]) if "identical to dense" in text]
        partly = ("diffsparse: eval: 1 of 2 videos identical to dense (infinite PSNR): psnr_db is the mean of the "
                  "other 1, ssim of all 2, an identical video counting 1.0 there")
        assert said == ([] if name == "all" else [partly])
    assert "psnr_db leaves out a video identical to dense" in (tmp_path / "one" / "eval.md").read_text()


def test_the_self_attention_blocks_are_every_transformer_s():
    # Wan 2.2's two experts: dense layers must cover both for a configuration to run as `dense` does (a union of
    # one expert's blocks only would merge a configuration whose deeper expert still runs sparse).
    from diffusers import WanPipeline, WanTransformer3DModel

    from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline

    base = tiny_wan_pipeline()
    shallow = {**tiny_wan_config()["transformer"], "num_layers": 1}
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                       transformer=base.transformer, boundary_ratio=0.5,
                       transformer_2=WanTransformer3DModel(**shallow).eval())
    blocks = evaluate._self_attention_blocks(pipe)
    assert blocks == frozenset(range(base.transformer.config.num_layers))
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                       transformer=WanTransformer3DModel(**shallow).eval(), boundary_ratio=0.5,
                       transformer_2=base.transformer)
    assert evaluate._self_attention_blocks(pipe) == blocks


def test_a_merged_configuration_s_warnings_follow_it_to_the_row_that_stands_in():
    # dense at 0.5 runs as dense at 0.3; with the model's 4 blocks known, that runs as radial with every block
    # dense: the last row must keep both texts, not only the last merge's.
    configs = [SparseConfig(pattern="radial", density=0.3, dense_steps=0, dense_layers=4),
               SparseConfig(pattern="dense", density=0.3, dense_steps=0),
               SparseConfig(pattern="dense", density=0.5, dense_steps=0)]
    notes = {}
    with pytest.warns(UserWarning, match=" runs as ") as caught:
        configs = evaluate._distinct_runs(configs, notes=notes)
    (first,) = (str(w.message) for w in caught)
    assert notes == {configs[1]: [first]}
    with pytest.warns(UserWarning, match=" runs as ") as caught:
        kept = evaluate._distinct_runs(configs, blocks=frozenset(range(4)), notes=notes)
    (second,) = (str(w.message) for w in caught)
    assert kept == configs[:1] and notes == {kept[0]: [second, first]}


def _fake_videos_failing(monkeypatch, at: int) -> list[int]:
    """`_fake_videos` of 16 x 16 pixels whose video number `at` (from 1, warm-ups counted) fails as a GPU out of
    memory does; returns the count of videos asked for."""
    count = [0]

    def videos(pipe, prompt, seed, args, first_frame=None):
        count[0] += 1
        if count[0] == at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return np.full((2, 16, 16, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    return count


@pytest.mark.parametrize(("at", "finished"), [(3, []), (5, ["window3d"])])
def test_a_run_that_stops_keeps_the_rows_it_finished_and_says_it_stopped(tmp_path, monkeypatch, at, finished):
    # Two warm-ups, the dense video, then one video per configuration: video 3 fails before any row, 5 in the second
    # configuration. Before, the rows were written only at the end: the first configuration's was lost, and an older
    # run's eval.md and eval.csv in the folder stayed, reading as this run's result.
    (tmp_path / "eval.md").write_text("| row | pattern |\n| 1 | an older run's row |\n")
    (tmp_path / "eval.csv").write_text("pattern\nan older run's row\n")
    _fake_videos_failing(monkeypatch, at)
    args = ["eval", *TINY, "--pattern", "window3d,radial", "--density", "0.5", "--dense-steps", "0", "--prompts", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake videos' cold warm-up: not the point
        with pytest.raises(RuntimeError, match="out of memory"):
            main([*args, "--out", str(tmp_path)])
    assert [row["pattern"].split("(")[0] for row in _rows(tmp_path)] == finished
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert "older" not in table
    assert table.startswith(f"Stopped early: {len(finished)} of 2 configurations measured, then RuntimeError: CUDA "
                            "out of memory (simulated).")


def test_a_run_stopped_while_writing_its_whole_table_says_so_with_every_row(tmp_path, monkeypatch):
    # The last write came after the run's error handling: stopped there (Ctrl-C, a full disk), the last row was lost
    # and eval.md said the run was still going.
    _fake_videos_failing(monkeypatch, at=0)
    replace, calls = evaluate._replace, []

    def interrupted(path, text):
        calls.append(text)
        if text.startswith("model: "):  # the whole table, no status line
            raise KeyboardInterrupt
        replace(path, text)

    monkeypatch.setattr(evaluate, "_replace", interrupted)
    args = ["eval", *TINY, "--pattern", "window3d,radial", "--density", "0.5", "--dense-steps", "0", "--prompts", "1"]
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        main([*args, "--out", str(tmp_path)])
    assert (tmp_path / "eval.md").read_text(encoding="utf-8").startswith(
        "Stopped early: 2 of 2 configurations measured, then KeyboardInterrupt.")
    assert len(_rows(tmp_path)) == 2


def test_a_run_that_stops_keeps_the_warnings_of_its_dense_videos(tmp_path, monkeypatch):
    said, count = "diffsparse: a warning while the first dense video was made", [0]

    def videos(pipe, prompt, seed, args, first_frame=None):
        count[0] += 1
        if count[0] == 3:  # after two warm-ups: the first dense video
            warnings.warn(said, diffsparse.DiffsparseWarning)
        if count[0] == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return np.full((2, 16, 16, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1",
            "--seeds", "2"]
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="out of memory"):
        main([*args, "--out", str(tmp_path)])
    assert said in (tmp_path / "eval.md").read_text(encoding="utf-8")


def test_eval_md_says_while_the_run_is_under_way_that_it_is_incomplete(tmp_path, monkeypatch):
    # A run killed outright (SIGKILL, the machine lost) cannot say it stopped: what it left must not read as whole.
    seen = []

    def videos(pipe, prompt, seed, args, first_frame=None):
        seen.append(((tmp_path / "eval.md").read_text(encoding="utf-8"), len(_rows(tmp_path))))
        return np.full((2, 16, 16, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    args = ["eval", *TINY, "--pattern", "window3d,radial", "--density", "0.5", "--dense-steps", "0", "--prompts", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--out", str(tmp_path)]) == 0
    # The warm-ups, the dense video and the first configuration's see no row; the second's sees the first.
    assert [rows for _, rows in seen] == [0, 0, 0, 0, 1]
    assert all(text.startswith(f"Incomplete: {rows} of 2 configurations measured so far.") for text, rows in seen)
    assert (tmp_path / "eval.md").read_text(encoding="utf-8").startswith("model: ")  # whole at the end


@pytest.mark.parametrize("first_every_call_dense", [["--pattern", f"dense,{WINDOW}"],
                                                    ["--pattern", WINDOW, "--dense-layers", "4,0"]])
def test_the_cold_warm_up_s_warning_goes_to_the_first_row_that_runs_sparse(tmp_path, monkeypatch,
                                                                            first_every_call_dense):
    # The testbed's 4 blocks: dense layers 4 run every call dense, as the dense pattern does. Such a row's videos
    # never reach the kernel, so the one-off costs the warning speaks of land in the next row's time ratios. And
    # eval.md's section of the warm-ups' and dense videos' warnings holds each text once, none a row keeps.
    said, count = "diffsparse: a warning of the dense path", [0]

    def videos(pipe, prompt, seed, args, first_frame=None):
        count[0] += 1
        if count[0] in (1, 3):  # the dense warm-up, then the dense video: the same text twice
            warnings.warn(said, diffsparse.DiffsparseWarning)
        return np.full((2, 16, 16, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    args = ["eval", *TINY, *first_every_call_dense, "--density", "none", "--dense-steps", "0", "--prompts", "1"]
    with pytest.warns(UserWarning, match="sparse warm-up .* ran no call through the sparse kernel") as caught:
        assert main([*args, "--out", str(tmp_path)]) == 0
    (cold,) = {str(w.message) for w in caught if "sparse warm-up" in str(w.message)}
    every_call_dense, sparse_row = _rows(tmp_path)
    assert (sparse_row["pattern"], sparse_row["dense_layers"]) == (WINDOW, "0")
    assert cold not in json.loads(every_call_dense["warnings"]) and cold in json.loads(sparse_row["warnings"])
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert table.count(said) == 1 and table.count(cold) == 1
    assert f"Warnings of the warm-ups and the dense videos:\n- {said}\n" in table


def test_eval_md_keeps_the_warnings_of_the_dense_videos(tmp_path, monkeypatch):
    # No row's: before, they reached stderr only.
    said = "diffsparse: a warning while a dense video was made"

    def videos(pipe, prompt, seed, args, first_frame=None):
        if not _sparse_applied(pipe):
            warnings.warn(said, diffsparse.DiffsparseWarning)
        return np.full((2, 16, 16, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1"]
    with pytest.warns(UserWarning):
        assert main([*args, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert f"Warnings of the warm-ups and the dense videos:\n- {said}\n" in table
    assert said not in _rows(tmp_path)[0]["warnings"]


def test_eval_md_and_csv_are_utf8_whatever_the_locale(tmp_path):
    # Under a C locale (ASCII) or Windows' cp1252, the tables were written in the locale's encoding: a prompt the
    # file read as UTF-8 failed the run after every video, eval.md left empty. Printing the table failed too.
    import os
    import subprocess
    import sys

    prompt = "un café rouge, 赤い丸"
    (tmp_path / "prompts.txt").write_text(prompt + "\n", encoding="utf-8")
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompt-file",
            str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "e")]
    # The fake videos of `_fake_videos`; in a process of its own, as the locale's encoding is read at start.
    script = f"""
import locale, sys, warnings
import numpy as np
import diffusers.hooks
sys.path.insert(0, {os.path.dirname(os.path.dirname(evaluate.__file__))!r})
from diffsparse import evaluate
from diffsparse.cli import main
if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
    sys.exit(3)
evaluate.timed_generation = lambda pipe, prompt, seed, args, first_frame=None: (np.full((2, 16, 16, 3), 0.5), 1, 1)
warnings.simplefilter("ignore")
sys.exit(main({args!r}))
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LC_", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            check=False)
    if result.returncode == 3:
        pytest.skip("no locale of another encoding than UTF-8 here")
    assert result.returncode == 0, result.stderr.decode()[-1000:]
    assert f'Prompts: "{prompt}"' in (tmp_path / "e" / "eval.md").read_text(encoding="utf-8")
    assert _rows(tmp_path / "e")  # read as UTF-8 too
    assert b'Prompts: "un caf\\xe9 rouge, \\u8d64' in result.stdout  # what ASCII cannot print, escaped


def test_a_prompt_file_that_is_not_utf8_is_refused_naming_it(tmp_path, capsys):
    # Before: "'utf-8' codec can't decode byte 0xff in position 0", naming neither the option nor the file.
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\n".encode("utf-16"))
    with pytest.raises(SystemExit):
        main(["eval", "--prompt-file", str(prompts), "--out", str(tmp_path / "o")])
    assert (f"prompt_file={str(prompts)!r} (--prompt-file): not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"
            in capsys.readouterr().err)
    # Offsets in the file, a byte-order mark counted (utf-8-sig counts them after it).
    prompts.write_bytes(codecs.BOM_UTF8 + b"a cat\ncaf\xe9\n")
    with pytest.raises(ValueError, match=re.escape("not UTF-8 text (byte 0xe9 at offset 12)")):
        evaluate.eval_prompts(argparse.Namespace(prompt_file=str(prompts), prompts=None))


def test_a_prompt_given_twice_in_the_file_is_refused_naming_its_lines(tmp_path):
    # Before, it was run twice and counted double in every mean; the comma lists refuse a repeat the same way.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# a dog\na dog\n\n  a cat \na dog\na bird\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"prompt_file={str(prompts)!r}: each prompt must be given once, "
                                                   "got 'a cat' on lines 1, 5; 'a dog' on lines 3, 6")):
        evaluate.eval_prompts(SimpleNamespace(prompt_file=str(prompts), prompts=1))


def test_asking_for_one_prompt_more_than_there_are_is_refused(tmp_path):
    with pytest.raises(ValueError, match="prompts=4: there are 3 in the fixed prompts"):
        evaluate.eval_prompts(SimpleNamespace(prompt_file=None, prompts=4))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    assert evaluate.eval_prompts(SimpleNamespace(prompt_file=str(prompts), prompts=2)) == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="prompts=3: there are 2 in prompt_file="):
        evaluate.eval_prompts(SimpleNamespace(prompt_file=str(prompts), prompts=3))


def test_the_seeds_start_at_seed(tmp_path, monkeypatch):
    seen = []

    def videos(pipe, prompt, seed, args, first_frame=None):
        seen.append(seed)
        return np.full((2, 16, 16, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1",
            "--seed", "5", "--seeds", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--out", str(tmp_path)]) == 0
    assert sorted(set(seen)) == [5, 6]
    assert "1 prompts x 2 seeds from 5" in (tmp_path / "eval.md").read_text(encoding="utf-8")


def test_timed_generation_seeds_torch_s_global_generator(monkeypatch):
    # Some pipelines draw from it besides the call's generator (JoyImage Edit's reference latents): unseeded, the
    # dense and sparse runs of one case started from different draws, and scored the difference as sparsity's.
    monkeypatch.setattr(evaluate, "generation_kwargs", lambda pipe, args, prompt, seed, first_frame: {})
    monkeypatch.setattr(evaluate, "_attention_modules", lambda pipe: iter(()))
    monkeypatch.setattr(evaluate, "first_output", lambda output: output)

    def draw(seed):
        torch.rand(7)  # the global generator moved on, as earlier videos move it
        return evaluate.timed_generation(lambda: torch.rand(3), "a prompt", seed, None)[0]

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_the_attention_timer_covers_every_self_attention_block(tiny_pipe):
    from diffsparse.pipelines import adapter_for

    transformer = tiny_pipe.transformer
    expected = [module for _, module in adapter_for(transformer).self_attention_modules(transformer)]
    assert len(expected) == tiny_pipe.transformer.config.num_layers > 1
    assert list(evaluate._attention_modules(tiny_pipe)) == expected


def test_a_row_with_lpips_says_an_identical_video_counts_0_there(tmp_path, monkeypatch):
    # With LPIPS, an identical video counts in two of the row's means, not in ssim's alone: the row must say so.
    args = _two_seeds_with_lpips(tmp_path, monkeypatch, {0: 0.0, 1: 0.2},
                                 lambda frames, reference: 0.0 if np.array_equal(frames, reference) else 0.3)
    with pytest.warns(UserWarning):  # the fake videos' cold warm-up, and the row's own
        assert main([*args, "--out", str(tmp_path / "e")]) == 0
    (row,) = _rows(tmp_path / "e")
    assert float(row["lpips"]) == pytest.approx(0.15)
    said = [text for text in json.loads(row["warnings"]) if "identical to dense" in text]
    partly = ("diffsparse: eval: 1 of 2 videos identical to dense (infinite PSNR): psnr_db is the mean of the other "
              "1, ssim and lpips of all 2, an identical video counting 1.0 and 0 there")
    assert said == [partly]


def test_a_run_killed_in_its_first_configuration_leaves_the_video_size_and_the_dense_videos_warnings(tmp_path,
                                                                                                   monkeypatch):
    # Killed outright (SIGKILL) no handler writes: eval.md holds what the last write before the first row said.
    said, seen = "diffsparse: a warning while the dense video was made", []

    def videos(pipe, prompt, seed, args, first_frame=None):
        if _sparse_applied(pipe):
            seen.append((tmp_path / "eval.md").read_text(encoding="utf-8"))
        else:
            warnings.warn(said, diffsparse.DiffsparseWarning)
        return np.full((2, 16, 16, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1"]
    with pytest.warns(UserWarning):  # the fake videos' cold warm-up too
        assert main([*args, "--out", str(tmp_path)]) == 0
    first_row_s = seen[-1]  # the sparse warm-up's comes first
    assert first_row_s.startswith("Incomplete: 0 of 1 configurations measured so far.")
    assert "2 frames 16x16" in first_row_s and "video size not known yet" not in first_row_s
    assert f"Warnings of the warm-ups and the dense videos:\n- {said}\n" in first_row_s


def test_with_two_stage_every_run_of_a_case_starts_from_its_still(tmp_path, monkeypatch):
    # The dense video is the reference of the case's sparse ones: started from another still, or none, it scored the
    # difference of the stills as sparsity's.
    started = []

    def videos(pipe, prompt, seed, args, first_frame=None):
        started.append((_sparse_applied(pipe), seed, first_frame))
        return np.full((3, 4, 4, 3), 0.5 + 0.01 * _sparse_applied(pipe)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", videos)
    monkeypatch.setattr(evaluate, "shared_still", lambda pipe, args, prompt, seed: f"the still of seed {seed}")
    args = ["eval", *TINY, "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--prompts", "1",
            "--seeds", "2", "--two-stage"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake videos' cold warm-up: not the point
        assert main([*args, "--out", str(tmp_path)]) == 0
    assert len(started) == 2 + 2 * 2  # two warm-ups, then each seed's dense and sparse video
    assert all(still == f"the still of seed {seed}" for _, seed, still in started)


def test_a_pattern_text_giving_what_the_density_sets_is_said_and_kept_in_its_row():
    # Before, `--pattern 'radial(decay=0.5)' --density 0.25` ran decay solved for 0.25 without a word, the row
    # labelled radial(decay=0.5); `compare` and the benches said it.
    args = _grid_args(pattern=["radial(decay=0.5)", "window3d"], density=[0.25, None])
    notes = {}
    with pytest.warns(diffsparse.DiffsparseWarning) as caught:
        configs = evaluate._grid(args, notes)
    said = ("diffsparse: --pattern 'radial(decay=0.5)' gives decay=0.5, and --density 0.25 sets decay too: the density "
            "wins")
    assert [str(w.message)[:len(said)] for w in caught] == [said]
    assert caught[0].filename == __file__
    (replaced,) = [c for c in configs if c.pattern == "radial(decay=0.5)" and c.density == 0.25]
    assert list(notes) == [replaced] and notes[replaced][0].startswith(said)


def test_a_pattern_object_giving_what_the_density_sets_is_kept_in_its_row_as_said_when_made():
    # Python callers may pass pattern objects. SparseConfig warns of those itself, in the API's words; before, that
    # text stayed on stderr and out of eval.md, which compare.json keeps.
    from diffsparse.patterns import Radial

    args = _grid_args(pattern=[Radial(decay=0.5)], density=[0.25], dense_steps=[0, 0.2])
    notes = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configs = evaluate._grid(args, notes)
    said = "diffsparse: SparseConfig.pattern=radial(decay=0.5, min_window=64, sink=False) gives decay=0.5"
    # Said by SparseConfig once per configuration made, not again by eval.
    assert len(configs) == 2 and [str(w.message).startswith(said) for w in caught] == [True, True]
    assert all([note[:len(said)] for note in notes[config]] == [said] for config in configs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the caller ignores is not kept (as compare's runs' warnings)
        notes = {}
        evaluate._grid(args, notes)
    assert notes == {}


def test_a_replaced_parameter_is_warned_once_and_kept_in_every_row_it_names():
    # Each dense-step and layer value beside it made the same warning again (catch_warnings forgets what was shown).
    args = _grid_args(pattern=["radial(decay=0.5)"], density=[0.25], dense_steps=[0, 0.2], dense_layers=[0, 2])
    notes = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        configs = evaluate._grid(args, notes)
    assert len(configs) == 4 and sum("gives decay=0.5" in str(w.message) for w in caught) == 1
    assert all(any("gives decay=0.5" in note for note in notes[config]) for config in configs)
