"""Inputs of `eval`, the testbed's fidelity scores and the evidence script that must be refused up front or said
as they are, not fail late or be mislabelled."""

import csv

import pytest

from diffsparse.cli import main
from diffsparse.testbed import evidence, fidelity


def test_eval_refuses_seeds_past_torch_s_range_before_loading_the_model(monkeypatch, capsys):
    from diffsparse import compare

    # --seed takes up to 2**64 - 1, but --seeds 2 from there needs 2**64: before, that failed only at the second
    # seed, after the model had loaded and generated the first.
    monkeypatch.setattr(compare, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(SystemExit):
        main(["eval", "--seed", str(2**64 - 1), "--seeds", "2", "--pattern", "window3d"])
    assert "seed=18446744073709551615, seeds=2, still_candidates=1" in capsys.readouterr().err


def test_eval_counts_its_warm_ups_and_refuses_a_configuration_given_twice(tmp_path, monkeypatch, capsys):
    # Two untimed warm-ups (dense, then the first configuration) ran outside the progress bar's total; a value given
    # twice generated every video again for an identical row.
    import numpy as np

    from diffsparse import compare, evaluate

    calls, bar = [], {}
    monkeypatch.setattr(evaluate, "timed_generation", lambda *args: calls.append(args[1:3]) or (
        np.full((1, 4, 4, 3), 0.5), 1.0, 1.0))

    class Bar:
        def __init__(self, total, **kwargs):
            bar.update(total=total, done=0)

        def update(self, n):
            bar["done"] += n

        def close(self):
            pass

    monkeypatch.setattr(evaluate, "tqdm", Bar)
    args = ["eval", "--pattern", "window3d", "--dense-steps", "0", "--steps", "1", "--frames", "1", "--height", "16",
            "--width", "16", "--block-size", "16", "--prompts", "1", "--seeds", "2", "--out", str(tmp_path)]
    assert main([*args, "--density", "0.5,0.3"]) == 0
    cases, configs = 2, 2
    assert len(calls) == 2 + cases * (1 + configs) == bar["total"] == bar["done"]
    monkeypatch.setattr(compare, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded"))
    for option, value, message in (
        ("--density", "0.5,0.5", "argument --density: 0.5 is given twice in '0.5,0.5'"),
        ("--density", "none,0.5,none", "argument --density: none is given twice"),
        ("--dense-steps", "0,1,1", "argument --dense-steps: 1 is given twice"),
        ("--pattern", "radial,window3d,radial", "argument --pattern: 'radial' is given twice"),
        # One setting spelled two ways (no dense step, no density, no correction), and eval's other lists.
        ("--dense-steps", "0,0.0", "argument --dense-steps: 0.0 is given twice in '0,0.0'"),
        ("--density", "none,None", "argument --density: none is given twice"),
        ("--dense-last-steps", "1,1", "argument --dense-last-steps: 1 is given twice"),
        ("--dense-layers", "[0,3],[0, 3]", "argument --dense-layers: [0, 3] is given twice"),
        ("--correction", "none,None", "argument --correction: none is given twice"),
        ("--correction-refresh", "0,0", "argument --correction-refresh: 0 is given twice"),
        # One pattern spelled twice: found once the names are resolved, before the model loads.
        ("--pattern", "radial,radial(decay=1.0)", "pattern='radial(decay=1.0)' and pattern='radial' are the same"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--density", "0.5", option, value] if option != "--density" else [*args, option, value])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, (option, value)


@pytest.mark.parametrize("call", [
    lambda: fidelity.reference_scores(9, 32, 32, seeds=0),
    lambda: fidelity.fidelity(None, frames=2, height=16, width=16, seeds=0),
    lambda: fidelity.steering(None, frames=2, height=16, width=16, seeds=0),
    lambda: fidelity.prompt_sensitivity(None, frames=2, height=16, width=16, seeds=0),
])
def test_fidelity_scores_of_no_seed_are_a_value_error(call):
    # Before, an IndexError from the mean of no scores (or a NaN with numpy's warning, for steering).
    with pytest.raises(ValueError, match="seeds=0"):
        call()


def _run(tmp_path, snapshot_seconds: dict[int, float]):
    """A training run folder: loss.csv timing each step, and a snapshot folder of each of `snapshot_seconds`."""
    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    with (run / "loss.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "train_seconds"])
        for step, seconds in snapshot_seconds.items():
            writer.writerow([step, 0.1, seconds])
            (run / "snapshots" / f"step_{step:06d}").mkdir()
    return run


def test_the_60_minute_snapshot_must_be_near_60_minutes_and_is_titled_with_its_own(tmp_path, monkeypatch):
    # Before, the snapshot nearest 60 min was taken however far from it (a 5-minute one of a 10-minute run) and
    # titled "after ~60 min", its scores written as the 60-minute model's.
    near, far = _run(tmp_path / "a", {100: 300.0, 1000: 3480.0}), _run(tmp_path / "b", {100: 300.0})
    assert evidence.snapshot_near(far, 60.0) is None
    assert evidence.snapshot_near(near, 60.0).name == "step_001000"
    assert evidence.snapshot_times(near)[near / "snapshots" / "step_001000"] == pytest.approx(58.0)
    assert evidence.snapshot_near(far, 60.0, tolerance=60.0).name == "step_000100"

    # The evidence script itself, its sampling and scoring stubbed: what it titles and records.
    titles = {}
    scores = fidelity.Scores(1, 0.5, 0.5, 0.5, 0.5)
    decay = evidence.AttentionDecay((1, 1, 1), [[1.0]], [1.0], [[1.0]], [1.0], (1,), {1: [[1.0]]}, {1: 1.0})
    monkeypatch.setattr(evidence, "load", lambda path=None: path)
    monkeypatch.setattr(evidence, "sample", lambda *args, **kwargs: None)
    monkeypatch.setattr(evidence, "save_sample_grid", lambda videos, prompts, path, frames=None, title="":
                        titles.__setitem__(path.name, title))
    monkeypatch.setattr(evidence, "fidelity", lambda *args, **kwargs: scores)
    monkeypatch.setattr(evidence, "reference_scores", lambda *args, **kwargs: scores)
    monkeypatch.setattr(evidence, "compact_loss_log", lambda *args, **kwargs: None)
    monkeypatch.setattr(evidence, "attention_decay", lambda *args, **kwargs: decay)
    monkeypatch.setattr(evidence, "plot_attention_decay", lambda *args, **kwargs: None)
    result = evidence.main(["--run", str(near), "--out", str(tmp_path / "a" / "out")])
    assert titles["samples_60min.png"].startswith("after 58.0 min (")
    assert result["model_60min"].endswith("step_001000") and result["model_60min_minutes"] == pytest.approx(58.0)
    titles.clear()
    result = evidence.main(["--run", str(far), "--out", str(tmp_path / "b" / "out")])
    assert "samples_60min.png" not in titles and "model_60min" not in result
