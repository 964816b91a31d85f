"""What a resumed (or interrupted) testbed training run continues with, what seeds a fresh one, and the model config
checks made before a run folder is written (fast: tiny runs of a few steps at batch 1)."""

import copy
import csv
import json
import re
import signal
from pathlib import Path

import pytest
import torch

from diffsparse.pipelines import testbed  # module access: pytest would collect `test*` names imported here
from diffsparse.testbed import train as train_module

BOOKKEEPING = ["--threads", "1", "--save-every", "9"]


def _run(out, *argv):
    return train_module.train(train_module.parse_args(["--out", str(out), *BOOKKEEPING, *argv]))


def _log(folder, *columns):
    with (folder / train_module.LOSS_LOG).open(newline="") as f:
        return [tuple(row[c] for c in columns) for row in csv.DictReader(f)]


def _config():
    return copy.deepcopy(testbed.testbed_config())  # the module's own dict: a change would reach every test after


def _weights(folder):
    return torch.load(folder / train_module.CHECKPOINT, map_location="cpu", weights_only=False)["model"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(
        a[part].keys() == b[part].keys() and all(torch.equal(a[part][n], b[part][n]) for n in a[part]) for part in a
    )


def _interrupted_after(monkeypatch, steps):
    """Make the next run stop as a SIGTERM stops it, after `steps` steps (it saves and exits cleanly)."""
    make_batch = train_module.make_batch

    def batch_then_signal(seed, step, *args):
        if step == steps - 1:
            signal.raise_signal(signal.SIGTERM)
        return make_batch(seed, step, *args)

    monkeypatch.setattr(train_module, "make_batch", batch_then_signal)


@pytest.mark.parametrize("decay_given", [True, False], ids=["same command", "--decay left out"])
def test_an_interrupted_steps_run_resumed_with_the_same_command_is_the_uninterrupted_run(tmp_path, monkeypatch,
                                                                                         decay_given):
    # Before, the cool-down was measured from where each invocation started: the resumed run cooled down anew over
    # steps 2 to 5, at other rates, and so with other losses, than the run it continued. With --decay left out, the
    # run's own (kept with the cool-down's start), not the default 0.2, which left no cool-down within these steps.
    command = ["--steps", "5", "--decay", "0.6", "--warmup", "0", "--batch", "1", "--image-share", "0.9"]
    _run(tmp_path / "straight", *command)
    _interrupted_after(monkeypatch, 2)
    assert _run(tmp_path / "interrupted", *command)["step"] == 2
    monkeypatch.undo()
    _run(tmp_path / "interrupted", *(command if decay_given else command[:2] + command[4:]), "--resume")
    straight = _log(tmp_path / "straight", "step", "lr", "loss")
    assert [float(lr) for _, lr, _ in straight] == pytest.approx([1e-3, 1e-3, 1e-3, 6.67e-4, 3.33e-4])
    assert _log(tmp_path / "interrupted", "step", "lr", "loss") == straight


def test_a_resume_takes_the_options_the_command_leaves_out_from_the_run(tmp_path):
    # Before, they fell back to their defaults: the resumed run went on with other batches, sizes and noise.
    run = ["--batch", "2", "--image-share", "0", "--shape-counts", "0,0,1", "--timestep-sampling", "uniform",
           "--timestep-shift", "2", "--frame-noise", "0.5", "--clean-first-frame", "0.5", "--warmup", "3",
           "--lr", "5e-3", "--ema", "0.9", "--decay", "0"]
    _run(tmp_path / "straight", "--steps", "4", *run)
    _run(tmp_path / "resumed", "--steps", "2", *run)
    _run(tmp_path / "resumed", "--steps", "4", "--decay", "0", "--resume")
    columns = ("step", "loss", "lr", "frames", "height", "width", "batch")
    assert _log(tmp_path / "resumed", *columns) == _log(tmp_path / "straight", *columns)


def test_a_resume_keeps_the_run_s_weight_decay_ema_and_image_prompts(tmp_path):
    _run(tmp_path, "--steps", "1", "--weight-decay", "0.5", "--ema", "0.9", "--image-prompts", "still", "--decay", "0")
    _run(tmp_path, "--steps", "2", "--resume")
    args = torch.load(tmp_path / train_module.CHECKPOINT, weights_only=False)["args"]
    assert (args["weight_decay"], args["ema"], args["image_prompts"]) == (0.5, 0.9, "still")


def test_a_namespace_not_made_by_parse_args_is_taken_as_it_is(tmp_path):
    # A caller's own Namespace (no record of what was typed): every value is the caller's, none the run's.
    _run(tmp_path, "--steps", "1", "--lr", "5e-4")
    args = train_module.parse_args(["--out", str(tmp_path), *BOOKKEEPING, "--steps", "2", "--resume"])
    del args.given
    args.lr = 1e-3
    train_module.train(args)
    assert torch.load(tmp_path / train_module.CHECKPOINT, weights_only=False)["args"]["lr"] == 1e-3


def _resume_at_step_2(folder, *argv, namespace=lambda args: args):
    """Resume the run in `folder` as if stopped at step 2, with `argv` parsed and then changed by `namespace`; the
    decay the resumed run kept."""
    checkpoint = folder / train_module.CHECKPOINT
    state = torch.load(checkpoint, weights_only=False)
    state["step"] = 2
    torch.save(state, checkpoint)
    args = train_module.parse_args(["--out", str(folder), *BOOKKEEPING, "--resume", *argv])
    train_module.train(namespace(args))
    return torch.load(checkpoint, weights_only=False)["args"]["decay"]


def test_the_run_s_decay_where_the_command_leaves_it_out(tmp_path):
    run = ["--steps", "4", "--warmup", "0", "--batch", "1"]
    _run(tmp_path / "a", *run, "--decay", "0.5")
    assert _resume_at_step_2(tmp_path / "a", *run) == 0.5
    # A caller's own Namespace (no record of what was typed) keeps its own decay.

    def own(args):
        del args.given
        args.decay = 0.0
        return args

    _run(tmp_path / "b", *run, "--decay", "0.5")
    assert _resume_at_step_2(tmp_path / "b", *run, namespace=own) == 0.0


def test_a_checkpoint_from_before_an_option_resumes_with_what_it_trained_with(tmp_path):
    # Runs from before --timestep-sampling, --shape-counts and --image-share trained with uniform noise levels,
    # shape counts (0.5, 0.3, 0.2) and clips only: their checkpoints lack the options, whose defaults now differ.
    _run(tmp_path, "--steps", "1", "--batch", "1", "--timestep-sampling", "uniform", "--shape-counts", "0.5,0.3,0.2",
         "--image-share", "0")
    checkpoint = tmp_path / train_module.CHECKPOINT
    state = torch.load(checkpoint, weights_only=False)
    for name in train_module.LEGACY_VALUES:
        del state["args"][name]
    torch.save(state, checkpoint)
    _run(tmp_path, "--steps", "2", "--resume")
    args = torch.load(checkpoint, weights_only=False)["args"]
    assert {name: args[name] for name in train_module.LEGACY_VALUES} == {
        "timestep_sampling": "uniform", "shape_counts": (0.5, 0.3, 0.2), "image_share": 0.0}


def test_a_resume_refuses_another_value_of_what_makes_the_run_and_takes_a_new_data_mix(tmp_path, capsys):
    run = ["--batch", "2", "--image-share", "0.9", "--shape-counts", "0,1,0", "--timestep-sampling", "uniform"]
    _run(tmp_path, "--steps", "1", *run)
    checkpoint = tmp_path / train_module.CHECKPOINT
    refused = [  # (given, as the run had it, as given)
        (["--batch", "3"], "--batch 2", "--batch 3"),
        (["--shape-counts", "1,0,0"], "--shape-counts 0.0,1.0,0.0", "--shape-counts 1.0,0.0,0.0"),
        (["--timestep-sampling", "logit-normal"], "--timestep-sampling uniform", "--timestep-sampling logit-normal"),
        (["--timestep-shift", "2"], "no --timestep-shift", "--timestep-shift 2.0"),
        (["--precision", "bf16"], "--precision fp32", "--precision bf16"),
        (["--freeze-text-encoder"], "no --freeze-text-encoder", "--freeze-text-encoder"),
        (["--seed", "1"], "--seed 0", "--seed 1"),
    ]
    for given, ran, this in refused:
        message = f"{checkpoint} was trained with {ran}, this invocation has {this}: resume with {ran} or without"
        with pytest.raises(SystemExit, match=re.escape(message)):
            _run(tmp_path, "--steps", "2", "--resume", *given)
    assert torch.load(checkpoint, weights_only=False)["step"] == 1  # left as it was
    # A fine-tune may go on with another data mix (docs/testbed/experiments.md); the next resume keeps it.
    assert _run(tmp_path, "--steps", "2", "--resume", "--image-share", "0.5")["step"] == 2
    assert "resuming with --image-share 0.5 (the run had --image-share 0.9)" in capsys.readouterr().err
    assert torch.load(checkpoint, weights_only=False)["args"]["image_share"] == 0.5


@pytest.fixture
def dropout_config(tmp_path):
    config = _config()
    config["text_encoder"]["dropout_rate"] = 0.1
    path = tmp_path / "dropout.json"
    path.write_text(json.dumps(config))
    return path


def test_a_fresh_run_draws_its_dropout_from_its_seed_and_leaves_the_caller_s_generator(tmp_path, dropout_config):
    # Before, torch's generator was left as the caller had it: two runs with the same --seed differed.
    command = ["--steps", "2", "--batch", "1", "--config", str(dropout_config)]
    torch.manual_seed(1)
    _run(tmp_path / "a", *command)
    torch.manual_seed(2)
    before = torch.get_rng_state()
    _run(tmp_path / "b", *command)
    assert _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_resumed_dropout_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, dropout_config):
    # The resume restores torch's generator from the checkpoint, whatever the caller's holds by then.
    command = ["--batch", "1", "--config", str(dropout_config), "--decay", "0"]
    _run(tmp_path / "straight", "--steps", "4", *command)
    _run(tmp_path / "resumed", "--steps", "2", *command)
    torch.manual_seed(123)
    _run(tmp_path / "resumed", "--steps", "4", "--resume", *command)
    assert _same_weights(_weights(tmp_path / "resumed"), _weights(tmp_path / "straight"))


@pytest.mark.parametrize("key", ["vocabulary", "max_sequence_length", "scheduler"])
def test_a_config_without_a_key_training_reads_is_refused_before_the_run_folder(tmp_path, key):
    # Before, a bare KeyError.
    config = _config()
    del config[key]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"--config {path} must hold the keys") + f".*lacks \\['{key}'\\]"):
        _run(tmp_path / "run", "--steps", "1", "--config", str(path))
    assert not (tmp_path / "run").exists()


def test_a_config_whose_vocabulary_lacks_a_training_word_is_refused(tmp_path):
    # Before, the run trained on <unk> for the word, with a warning at every step.
    config = _config()
    config["vocabulary"] = [word for word in config["vocabulary"] if word not in ("circle", "left")]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("every word of the training prompts") + r".*\['circle', 'left'\]"):
        _run(tmp_path / "run", "--steps", "1", "--config", str(path))
    assert not (tmp_path / "run").exists()


def test_a_resume_without_config_takes_the_run_s_and_another_is_refused_naming_it(tmp_path, dropout_config):
    # Before, a run trained with --config and resumed without it was refused as "trained with another model config",
    # though a resume takes every other option the command leaves out from the run.
    run, checkpoint = tmp_path / "run", tmp_path / "run" / train_module.CHECKPOINT
    _run(run, "--steps", "1", "--batch", "1", "--config", str(dropout_config))
    assert _run(run, "--steps", "2", "--resume")["step"] == 2
    state = torch.load(checkpoint, weights_only=False)
    assert state["config"] == json.loads(dropout_config.read_text())
    assert state["args"]["config"] == str(dropout_config)  # the next resume still names the run's file
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_config()))
    message = (f"{checkpoint} was trained with --config {dropout_config}, this invocation has --config {other}, "
               f"another model config: resume with --config {dropout_config} or without --config")
    with pytest.raises(SystemExit, match=re.escape(message)):
        _run(run, "--steps", "3", "--resume", "--config", str(other))
    # The run's file changed since: only leaving --config out gives the run's config.
    dropout_config.write_text(other.read_text())
    with pytest.raises(SystemExit, match=re.escape(f"this invocation has --config {dropout_config}, another model "
                                                   "config: resume without --config (the run's config")):
        _run(run, "--steps", "3", "--resume", "--config", str(dropout_config))
    assert torch.load(checkpoint, weights_only=False)["step"] == 2  # left as it was


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "--resume"])
def test_a_run_folder_with_results_but_no_checkpoint_is_not_overwritten(tmp_path, resume):
    # A finished run whose checkpoint.pt was deleted to keep only its exported weights: before, a new run there
    # rewrote its loss log and replaced its weights (with --resume: "no checkpoint.pt yet: starting a new run").
    log = tmp_path / train_module.LOSS_LOG
    log.write_text("step,loss\n1,0.5\n")
    (tmp_path / train_module.PIPELINE_DIR).mkdir()
    (tmp_path / train_module.PIPELINE_DIR / "model_index.json").write_text("{}")
    message = (f"{tmp_path} holds {train_module.LOSS_LOG}, {train_module.PIPELINE_DIR}/ of an earlier run but no "
               f"{train_module.CHECKPOINT} to continue it from: choose another --out, or delete them")
    with pytest.raises(SystemExit, match=re.escape(message)):
        _run(tmp_path, "--steps", "1", "--batch", "1", *(["--resume"] if resume else []))
    assert log.read_text() == "step,loss\n1,0.5\n"
    assert not (tmp_path / train_module.CHECKPOINT).exists()
    snapshots_only = tmp_path / "snapshots_only"
    (snapshots_only / train_module.SNAPSHOT_DIR / "step_000001").mkdir(parents=True)
    with pytest.raises(SystemExit, match=re.escape(f"holds {train_module.SNAPSHOT_DIR}/ of an earlier run")):
        _run(snapshots_only, "--steps", "1", "--batch", "1", *(["--resume"] if resume else []))
    # A loss log of no step (a run that failed in its first step) holds nothing to keep.
    (tmp_path / train_module.PIPELINE_DIR / "model_index.json").unlink()
    (tmp_path / train_module.PIPELINE_DIR).rmdir()
    log.write_text(",".join(train_module.LOG_FIELDS) + "\n")
    assert _run(tmp_path, "--steps", "1", "--batch", "1", *(["--resume"] if resume else []))["step"] == 1


@pytest.mark.parametrize("writer", ["checkpoint", "pipeline"])
def test_a_save_that_dies_half_written_keeps_the_last_good_checkpoint_and_pipeline(tmp_path, monkeypatch, writer):
    # An interrupt or a full disk in the middle of a save must not cost the run its last good checkpoint or its
    # exported weights: both are written beside and moved into place whole. The export comes first: before, a
    # checkpoint of step 2 was written ahead of an export that failed, and a resume to --steps 2 ran nothing and
    # left pipeline/ at step 1.
    command = ["--batch", "1", "--image-share", "0", "--decay", "0"]
    _run(tmp_path, "--steps", "1", *command)
    checkpoint = tmp_path / train_module.CHECKPOINT
    exported = tmp_path / train_module.PIPELINE_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    kept = checkpoint.read_bytes(), exported.read_bytes()

    def half_written(target):
        target = Path(target)
        if writer == "pipeline":
            (target / "transformer").mkdir(parents=True, exist_ok=True)
            target = target / "transformer" / "diffusion_pytorch_model.safetensors"
        target.write_bytes(b"half a file")
        raise OSError("No space left on device")

    if writer == "checkpoint":
        monkeypatch.setattr(train_module.torch, "save", lambda obj, path, *args, **kwargs: half_written(path))
    else:
        monkeypatch.setattr(train_module.TestbedPipeline, "save_pretrained",
                            lambda self, folder, *args, **kwargs: half_written(folder))
    with pytest.raises(OSError, match="No space left on device"):
        _run(tmp_path, "--steps", "2", "--resume", *command)
    monkeypatch.undo()
    assert checkpoint.read_bytes() == kept[0]
    if writer == "pipeline":
        assert exported.read_bytes() == kept[1]
    assert testbed.load(path=tmp_path / train_module.PIPELINE_DIR).transformer.config.num_layers == 4
    resumed = _run(tmp_path, "--steps", "2", "--resume", *command)
    assert (resumed["step"], resumed["steps_this_run"]) == (2, 1)  # step 2 done again, and exported this time
    assert exported.read_bytes() != kept[1]
