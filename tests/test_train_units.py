"""Units of the testbed's training script that a whole (tiny) run does not pin down: EMA warm-up, per-step noise,
CFG prompt drops, the noise-level shift, the timestep scale the transformer reads, how many shapes its clips keep and
the loss log kept when its rewrite on resume fails."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffsparse.pipelines import testbed  # module access: pytest would collect `test*` names imported here
from diffsparse.testbed import data
from diffsparse.testbed import train as train_module


def test_ema_warms_up_from_a_tenth_and_ends_at_its_decay():
    module = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema = train_module._EMA({"m": module}, decay=0.999)
    with torch.no_grad():
        module.weight.fill_(3.0)
    ema.update({"m": module}, step=0)  # decay min(0.999, (1 + 0) / (10 + 0)) = 0.1
    torch.testing.assert_close(ema.shadow["m"].weight, torch.full((2, 2), 0.1 * 1.0 + 0.9 * 3.0))
    ema.update({"m": module}, step=10**6)  # warmed up: the decay itself
    torch.testing.assert_close(ema.shadow["m"].weight, torch.full((2, 2), 0.999 * 2.8 + 0.001 * 3.0))


def test_each_step_draws_its_own_noise_and_the_same_step_the_same():
    def draw(seed, step):
        return torch.rand(8, generator=train_module._step_generator(seed, step))

    assert torch.equal(draw(0, 1), draw(0, 1))
    assert not torch.equal(draw(0, 0), draw(0, 1))
    assert not torch.equal(draw(0, 1), draw(1, 1))


# With `velocity_errors` replaced, the loss reads only the model's channels (its space-to-depth factor).
NO_MODEL = {"transformer": SimpleNamespace(config=SimpleNamespace(in_channels=12))}


def _seen_by_the_loss(monkeypatch, shift: float, sampling: str, count: int = 2000):
    """The prompts and noise levels `flow_matching_loss` hands to `velocity_errors` for `count` single frames."""
    seen = {}

    def record(components, x0, prompts, noise, t, length):
        seen.update(prompts=prompts, t=t)
        return torch.zeros(len(prompts))

    monkeypatch.setattr(train_module, "velocity_errors", record)
    videos = torch.zeros(count, 3, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    train_module.flow_matching_loss(NO_MODEL, videos, ["a red circle"] * count, generator, shift, 4, sampling)
    return seen


def test_a_tenth_of_the_prompts_are_dropped_for_classifier_free_guidance(monkeypatch):
    prompts = _seen_by_the_loss(monkeypatch, 1.0, "uniform")["prompts"]
    assert set(prompts) == {"", "a red circle"}
    assert prompts.count("") / len(prompts) == pytest.approx(train_module.UNCOND_PROBABILITY, abs=0.02)


def test_the_shift_moves_uniform_noise_levels_towards_noise(monkeypatch):
    # t = shift * u / (1 + (shift - 1) * u): the median u = 0.5 goes to 1.5 / 2 = 0.75 at shift 3.
    t = _seen_by_the_loss(monkeypatch, 3.0, "uniform", count=4000)["t"]
    assert t.median().item() == pytest.approx(0.75, abs=0.02)
    assert _seen_by_the_loss(monkeypatch, 1.0, "uniform", count=4000)["t"].median().item() == pytest.approx(0.5,
                                                                                                          abs=0.02)


def test_the_transformer_reads_noise_levels_as_timesteps_out_of_1000():
    components = testbed.build_components()
    seen = []
    components["transformer"].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    x0, noise = torch.zeros(2, 12, 2, 4, 4), torch.randn(2, 12, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    text_length = testbed.testbed_config()["max_sequence_length"]
    per_clip = torch.tensor([0.25, 0.5])
    train_module.velocity_errors(components, x0, ["a red circle"] * 2, noise, per_clip, text_length)
    torch.testing.assert_close(seen.pop(), per_clip * 1000, rtol=0, atol=0)
    per_frame = torch.tensor([[0.0, 0.5], [0.25, 0.75]])  # 2 x 2 tokens per frame at this size and patch
    train_module.velocity_errors(components, x0, ["a red circle"] * 2, noise, per_frame, text_length)
    torch.testing.assert_close(seen.pop(), (per_frame * 1000).repeat_interleave(4, dim=1), rtol=0, atol=0)


@torch.no_grad()
def test_a_single_frame_has_no_first_frame_to_give_clean():
    # A clean first frame is the whole of a one-frame clip: it would leave nothing to score (loss 0 for the image
    # steps of --image-share). Single frames train exactly as without the option.
    components = testbed.build_components()
    videos = torch.rand(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    text_length = testbed.testbed_config()["max_sequence_length"]

    def loss(clean_first_frame):
        generator = torch.Generator().manual_seed(0)
        return train_module.flow_matching_loss(components, videos, ["a red circle"] * 2, generator, 3.0, text_length,
                                               clean_first_frame=clean_first_frame)

    assert loss(0.0) > 0
    assert torch.equal(loss(1.0), loss(0.0))


def test_shapes_without_room_leave_fewer_multi_shape_clips_than_drawn():
    # SHAPE_COUNT_WEIGHTS draws one, two or three shapes 80/15/5% of the time, but a shape that finds no room is
    # left out: the clips of steps 0-399 (seed 0, batch 16; the README's shares) keep 88.5/10.6/0.9% of the videos
    # and 84.7/13.7/1.6% of the single frames. Counted on the clip descriptions, nothing rendered.
    def shapes_per_clip(buckets):
        clips = (c for step in range(400) for c in data._batch_clips(0, step, 16, buckets, data.SHAPE_COUNT_WEIGHTS))
        return Counter(len(clip.shapes) for clip in clips)

    assert data.SHAPE_COUNT_WEIGHTS == (0.8, 0.15, 0.05)
    assert shapes_per_clip(data.TRAIN_BUCKETS) == {1: 3813, 2: 457, 3: 40}  # of 4,310 clips
    assert shapes_per_clip(data.IMAGE_BUCKETS) == {1: 4164, 2: 673, 3: 78}  # of 4,915 frames


def test_the_cool_down_ends_at_min_lr_ratio_of_the_learning_rate():
    # --decay's help promises a fall to 2% of --lr: nothing checked where it ends (a fall to 0 passed every test).
    assert train_module.MIN_LR_RATIO == 0.02
    by_steps = SimpleNamespace(lr=1e-3, warmup=0, decay=1.0, steps=100, minutes=None)
    rates = [train_module._learning_rate(by_steps, step, 0, 0.0) for step in range(100)]
    assert rates[0] == pytest.approx(1e-3) and rates[50] == pytest.approx(5e-4)
    assert rates[-1] == pytest.approx(2e-5) and min(rates) == pytest.approx(2e-5)  # (1 - 99/100) alone is 1e-5
    by_minutes = SimpleNamespace(lr=1e-3, warmup=0, decay=0.5, steps=None, minutes=10)
    assert [train_module._learning_rate(by_minutes, 7, 0, seconds) for seconds in (300, 450, 599.9, 900)] == (
        pytest.approx([1e-3, 5e-4, 2e-5, 2e-5]))


def test_a_resume_keeps_the_loss_log_when_rewriting_it_fails(tmp_path, monkeypatch):
    # The log is cut back to the checkpoint's step on resume. Before, it was truncated in place: a failure (a full
    # disk, a kill) before the rows were written back lost the whole curve.
    import csv

    log = tmp_path / train_module.LOSS_LOG
    rows = [{field: str(step) for field in train_module.LOG_FIELDS} for step in (1, 2, 3)]
    with log.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=train_module.LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    before = log.read_text()

    def full_disk(self, rows):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(csv.DictWriter, "writerows", full_disk)
        with pytest.raises(OSError, match="No space left"):
            train_module._open_log(log, keep_until_step=2)
    assert log.read_text() == before and sorted(tmp_path.iterdir()) == [log]
    f, writer = train_module._open_log(log, keep_until_step=2)
    writer.writerow({field: "4" for field in train_module.LOG_FIELDS})
    f.close()
    with log.open(newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["1", "2", "4"]


def test_a_checkpoint_save_that_fails_keeps_the_last_one_and_leaves_no_partial_file(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint.pt"
    train_module._atomic_save({"step": 1}, checkpoint)

    def full_disk(obj, file):
        Path(file).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", full_disk)
        with pytest.raises(OSError, match="No space left"):
            train_module._atomic_save({"step": 2}, checkpoint)
    assert sorted(tmp_path.iterdir()) == [checkpoint] and torch.load(checkpoint) == {"step": 1}
