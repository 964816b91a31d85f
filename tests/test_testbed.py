"""The testbed model's data, training script and sampling (fast: tiny runs, small canvases)."""

import argparse
import csv
import itertools
import json
import math
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffsparse
from diffsparse.compare import load_pipeline
from diffsparse.pipelines import (
    testbed,  # module access: pytest would collect `Test*`/`test*` names imported here
    text,
)
from diffsparse.testbed import evidence, fidelity
from diffsparse.testbed.data import (
    COLOURS,
    DIRECTIONS,
    IMAGE_BUCKETS,
    PROMPT_WORDS,
    SHAPES,
    SPEEDS,
    TRAIN_BUCKETS,
    Clip,
    Shape,
    _signed_distance,
    batch_size_for,
    make_batch,
    placement_flaws,
    random_clip,
    render,
    train_buckets,
)
from diffsparse.testbed.train import CHECKPOINT, LOSS_LOG, PIPELINE_DIR, SNAPSHOT_DIR, parse_args, train

from helpers import check_pipeline_against_dense


def _frames01(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) in [0, 1]."""
    return ((video.permute(1, 2, 3, 0).numpy() + 1) / 2).astype(np.float64)


def _clips(count: int, frames=9, height=48, width=48, shapes=None):
    """The first `count` clips (seeds 0, 1, ...) with `shapes` shapes (any number when None)."""
    found, seed = [], 0
    while len(found) < count:
        clip = random_clip(np.random.default_rng(seed), frames, height, width)
        if shapes is None or len(clip.shapes) == shapes:
            found.append(clip)
        seed += 1
    return found


# ---------------------------------------------------------------- data


def test_clips_and_batches_are_deterministic_per_seed():
    for seed in range(3):
        a, b = (random_clip(np.random.default_rng(seed), 9, 32, 48) for _ in range(2))
        assert a == b
        assert torch.equal(render(a), render(b))
    videos, prompts = make_batch(seed=3, step=7, batch=4)
    again, prompts_again = make_batch(seed=3, step=7, batch=4)
    assert torch.equal(videos, again) and prompts == prompts_again
    other, _ = make_batch(seed=4, step=7, batch=4)
    assert other.shape != videos.shape or not torch.equal(other, videos)


def test_videos_have_the_documented_layout_and_range():
    for bucket in TRAIN_BUCKETS:
        clip = random_clip(np.random.default_rng(0), bucket.frames, bucket.height, bucket.width)
        video = render(clip)
        assert video.shape == (3, bucket.frames, bucket.height, bucket.width) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
    with pytest.raises(ValueError, match="multiple of 4"):
        random_clip(np.random.default_rng(0), 9, 30, 32)


def test_every_prompt_word_is_in_the_vocabulary_and_fits_the_text_length():
    config = testbed.testbed_config()
    assert PROMPT_WORDS <= set(config["vocabulary"])
    tokenizer = testbed.build_components()["tokenizer"]
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    for clip in _clips(100):
        ids = tokenizer(clip.prompt).input_ids
        assert unk not in ids, clip.prompt
        assert len(ids) <= config["max_sequence_length"], clip.prompt  # words + </s>
    longest = " and ".join(["a purple triangle"] * 3) + " moving right quickly"
    assert len(tokenizer(longest).input_ids) <= config["max_sequence_length"]


def test_shape_pixels_have_the_colours_the_prompt_names():
    for clip in _clips(12):
        frame = _frames01(render(clip))[0]
        named = [w for w in clip.prompt.split() if w in COLOURS]
        assert len(named) == len(clip.shapes)
        for word in named:
            # Pixels within 0.05 of the named colour: at least a good part of a shape's area (radius >= 4 px).
            close = np.linalg.norm(frame - np.asarray(COLOURS[word]), axis=-1) < 0.05
            assert close.sum() >= 20, (clip.prompt, word, close.sum())
        # ... and no other palette colour is drawn.
        for word in set(COLOURS) - set(named):
            assert (np.linalg.norm(frame - np.asarray(COLOURS[word]), axis=-1) < 0.05).sum() == 0, (clip.prompt, word)


def test_every_shape_starts_whole_on_the_canvas_and_unhidden():
    # At the first frame, corners and vertices inside the canvas and shapes apart up to their corners (spacing
    # is by radius: at most a fifth of the smaller shape under another), so the kind the prompt names is what the
    # pixels show. Measured on the shapes' own outlines, on a grid 4x finer than the pixels, reaching past the
    # canvas.
    for height in (32, 48):
        ys, xs = np.mgrid[-16 : height + 16 : 0.25, -16 : height + 16 : 0.25] + 0.125
        on_canvas = (xs >= 0) & (xs <= height) & (ys >= 0) & (ys <= height)
        for clip in _clips(40, height=height, width=height):
            insides = [_signed_distance(s.kind, xs - s.x0, ys - s.y0, s.radius) < 0 for s in clip.shapes]
            for shape, inside in zip(clip.shapes, insides):
                assert (inside & ~on_canvas).sum() == 0, (clip.prompt, shape)
            for i, j in itertools.combinations(range(len(insides)), 2):
                overlap = (insides[i] & insides[j]).sum()
                assert overlap <= 0.2 * min(insides[i].sum(), insides[j].sum()), (clip.prompt, overlap)
    # Small canvases hold fewer shapes rather than overlapping ones.
    counts = [len(c.shapes) for c in _clips(200, height=32, width=32)]
    assert max(counts) >= 2 and np.mean(counts) < np.mean([len(c.shapes) for c in _clips(200)])


def test_placement_flaws_are_counted_as_the_docs_state_them():
    # The shipped weights were trained on these clips, flaws included, so the generator must not change: these
    # counts pin it, and docs/testbed/experiments.md ("Known flaws of the training data") states the 400-step ones.
    flaws = placement_flaws(seed=0, steps=20)
    assert flaws == {
        "clips": 200, "multi_shape": 29, "partly_hidden": 10, "partly_off_canvas": 36, "gone_by_last_frame": 13,
        "by_bucket": {"17x32x32": [48, 23], "13x40x40": [21, 1], "9x32x32": [80, 11], "9x32x48": [22, 1],
                      "9x48x48": [14, 0], "9x48x32": [11, 0], "17x48x48": [4, 0]},
    }
    # Counted on the clips make_batch draws: the same prompts, step by step.
    assert sum(len(make_batch(0, step, 16)[1]) for step in range(20)) == flaws["clips"]
    # Single frames never leave the canvas (no travel), but overlap as clips do.
    images = placement_flaws(seed=0, steps=5, buckets=IMAGE_BUCKETS)
    assert images["partly_off_canvas"] == 0 and images["partly_hidden"] > 0


def test_single_shapes_move_in_the_direction_the_prompt_names():
    for clip in _clips(16, frames=9, height=32, width=32, shapes=1):
        frames = _frames01(render(clip))
        # Weight each pixel by how far it is from the background: the shape's anti-aliased coverage (scaled).
        weight = np.linalg.norm(frames - np.asarray(clip.background), axis=-1)
        ys, xs = np.mgrid[: clip.height, : clip.width]
        centroid = [np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum() for w in (weight[0], weight[-1])]
        shift = centroid[1] - centroid[0]
        direction = next(w for w in clip.prompt.split() if w in DIRECTIONS)
        expected = np.array(DIRECTIONS[direction])
        along = float(shift @ expected)
        across = float(abs(shift @ expected[::-1]))
        assert along > 1.0, (clip.prompt, shift)
        assert across < 0.25 * along, (clip.prompt, shift)


def test_the_prompt_names_the_kind_and_speed_that_are_drawn():
    # Read from the prompt's words and measured on the pixels, as the fidelity scores measure samples: before, a
    # prompt naming a circle for a drawn square, or "slowly" for a quick shape, passed every test.
    for clip in _clips(24, frames=9, height=48, width=48, shapes=1):
        words = clip.prompt.split()
        colour, kind, direction = (next(w for w in words if w in group) for group in (COLOURS, SHAPES, DIRECTIONS))
        request = fidelity.Request(colour, kind, direction, next((w for w in words if w and w in SPEEDS), ""))
        assert request.prompt == clip.prompt  # the words are all read
        video = _frames01(render(clip)).transpose(0, 3, 1, 2)  # (F, 3, H, W), as sampled videos are scored
        scores = fidelity.score_video(video, request)
        assert scores["kind_accuracy"] == 1.0 and scores["direction_accuracy"] == 1.0, (clip.prompt, scores)
        velocity = fidelity._velocity(fidelity._present_masks(video, colour))  # pixels per frame
        # Drawn at 0.85 to 1.15 times the named speed; the speeds are 2x apart.
        assert 0.7 < np.hypot(*velocity) / SPEEDS[request.speed] < 1.3, (clip.prompt, velocity)


def test_each_shape_of_a_several_shape_prompt_is_drawn_as_the_kind_its_colour_is_named_with():
    # The single-shape checks above cannot see a prompt that binds a colour to another shape's kind ("a red circle
    # and a blue square" over a red square and a blue circle): measured per phrase on the first frame, where every
    # shape starts whole and unhidden.
    clips = _clips(30, frames=1, height=48, width=48, shapes=2) + _clips(10, frames=1, height=48, width=48, shapes=3)
    assert len({frozenset(s.kind for s in clip.shapes) for clip in clips}) > 1
    for clip in clips:
        video = _frames01(render(clip)).transpose(0, 3, 1, 2)
        phrases = [phrase.split() for phrase in clip.objects.split(" and ")]
        assert len(phrases) == len(clip.shapes) and all(len(words) == 3 for words in phrases), clip.prompt
        for _article, colour, kind in phrases:
            scores = fidelity.score_video(video, fidelity.Request(colour, kind, "left", ""))
            assert scores["kind_accuracy"] == 1.0, (clip.prompt, colour, kind, scores)


def test_space_to_depth_round_trip_is_exact():
    video = torch.randn(2, 3, 5, 16, 24)
    latents = testbed.space_to_depth(video)
    assert latents.shape == (2, 12, 5, 8, 12)
    torch.testing.assert_close(testbed.depth_to_space(latents), video, atol=0, rtol=0)
    # Channel c * 4 + dy * 2 + dx holds pixel (2y + dy, 2x + dx) of colour c.
    assert torch.equal(latents[:, 1 * 4 + 1 * 2 + 0], video[:, 1, :, 1::2, 0::2])


# ---------------------------------------------------------------- training


def _read_log(folder):
    with (folder / LOSS_LOG).open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run (checkpoint at step 2 and at the end) resumed to 5 steps, and an uninterrupted 5-step run."""
    base = tmp_path_factory.mktemp("testbed")
    # --decay 0: resumed to another --steps (3, then 5), the cool-down starts anew, so only a constant rate matches
    common = ["--batch", "1", "--save-every", "2", "--threads", "1", "--decay", "0"]
    first = train(parse_args(["--out", str(base / "run"), "--steps", "3", *common]))
    first_log = _read_log(base / "run")
    # What a run killed after logging step 4, before its checkpoint, leaves: the resume must drop that row.
    with (base / "run" / LOSS_LOG).open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(first_log[-1])).writerow({**first_log[-1], "step": "4", "loss": "9.9"})
    resumed = train(parse_args(["--out", str(base / "run"), "--steps", "5", "--resume", *common]))
    straight = train(parse_args(["--out", str(base / "straight"), "--steps", "5", "--keep-every", "2", *common]))
    return {"base": base, "first": first, "first_log": first_log, "resumed": resumed, "straight": straight}


def test_training_writes_checkpoint_log_and_loadable_pipeline(trained):
    run = trained["base"] / "run"
    assert trained["first"]["step"] == 3
    assert (run / CHECKPOINT).is_file()
    assert [int(r["step"]) for r in trained["first_log"]] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in trained["first_log"])
    for part in ("model_index.json", "transformer/config.json", "text_encoder/config.json", "tokenizer"):
        assert (run / PIPELINE_DIR / part).exists(), part
    assert list((run / PIPELINE_DIR / "transformer").glob("*.safetensors"))
    assert list((run / PIPELINE_DIR / "text_encoder").glob("*.safetensors"))


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(trained):
    assert trained["resumed"]["step"] == 5 and trained["resumed"]["steps_this_run"] == 2
    resumed_log = _read_log(trained["base"] / "run")
    straight_log = _read_log(trained["base"] / "straight")
    assert [int(r["step"]) for r in resumed_log] == [1, 2, 3, 4, 5]  # the dead run's step 4 row dropped
    # Batches, noise and timesteps depend only on (seed, step): the resumed run is the same run.
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]
    state = torch.load(trained["base"] / "run" / CHECKPOINT, map_location="cpu", weights_only=False)
    assert state["step"] == 5 and state["optimizer"]["state"]


def test_a_resumed_run_ends_with_the_weights_ema_and_export_of_an_uninterrupted_one(trained):
    # The losses alone match even when the resume drops the EMA (the exported weights then restart from step 3).
    from safetensors.torch import load_file

    resumed, straight = (torch.load(trained["base"] / name / CHECKPOINT, map_location="cpu", weights_only=False)
                         for name in ("run", "straight"))
    for key in ("model", "ema"):
        for part, weights in straight[key].items():
            assert weights.keys() == resumed[key][part].keys()
            assert all(torch.equal(weights[name], resumed[key][part][name]) for name in weights), (key, part)
    for file in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        exported, expected = (load_file(trained["base"] / name / PIPELINE_DIR / file) for name in ("run", "straight"))
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[name], expected[name]) for name in expected), file


def test_snapshots_keep_the_exported_pipeline_every_n_steps(trained):
    snapshots = sorted(p.name for p in (trained["base"] / "straight" / SNAPSHOT_DIR).iterdir())
    assert snapshots == ["step_000002", "step_000004"]
    assert (trained["base"] / "straight" / SNAPSHOT_DIR / "step_000002" / "model_index.json").is_file()
    assert evidence.snapshot_near(trained["base"] / "straight", minutes=0.0).name == "step_000002"


def test_decay_lowers_the_learning_rate_over_the_end_of_the_budget(tmp_path):
    args = ["--steps", "4", "--decay", "0.5", "--warmup", "1", "--batch", "1", "--threads", "1", "--save-every", "9"]
    train(parse_args(["--out", str(tmp_path), *args]))
    rates = [float(r["lr"]) for r in _read_log(tmp_path)]
    # steps 0-1 are before the last half of the budget; step 3 is halfway through the decay
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--decay", "1.5"])


def test_a_resumed_steps_run_cools_down_anew_over_what_is_left(tmp_path):
    # The module docstring's rule: resumed with another --steps than the run's, the cool-down covers this
    # invocation's own budget, here steps 2 to 4, so the first resumed step is still at the full rate (measured from
    # step 0, it was halfway down already). With the run's own --steps it would go on (tests/test_train_resume.py).
    common = ["--out", str(tmp_path), "--warmup", "0", "--batch", "1", "--threads", "1", "--save-every", "9",
              "--image-share", "0"]
    train(parse_args([*common, "--steps", "2", "--decay", "0"]))
    train(parse_args([*common, "--steps", "4", "--decay", "1", "--resume"]))
    assert [float(r["lr"]) for r in _read_log(tmp_path)] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])


def test_the_exported_ema_weights_follow_the_warm_up_of_each_step(tmp_path):
    # The same run without EMA, kept after every step, gives the weights the EMA averages, by hand:
    # decay min(0.999, (1 + step) / (10 + step)) at steps 0, 1, 2 (0.1, 0.18, 0.25), not one decay for all.
    from safetensors.torch import load_file

    common = ["--steps", "3", "--lr", "1e-2", "--warmup", "0", "--decay", "0", "--batch", "1", "--threads", "1",
              "--save-every", "9", "--image-share", "0", "--freeze-text-encoder"]
    train(parse_args(["--out", str(tmp_path / "raw"), "--ema", "0", "--keep-every", "1", *common]))
    train(parse_args(["--out", str(tmp_path / "ema"), "--ema", "0.999", *common]))
    file = "transformer/diffusion_pytorch_model.safetensors"
    raw = [load_file(tmp_path / "raw" / SNAPSHOT_DIR / f"step_{step:06d}" / file) for step in (1, 2, 3)]
    initial = testbed.build_components(seed=0)["transformer"].state_dict()  # the seeded start, as training's
    shadow = {name: weights.detach().clone() for name, weights in initial.items()}
    for step, weights in enumerate(raw):
        decay = min(0.999, (1 + step) / (10 + step))
        shadow = {name: torch.lerp(shadow[name], weights[name], 1 - decay) for name in shadow}
    exported = load_file(tmp_path / "ema" / PIPELINE_DIR / file)
    assert exported.keys() == shadow.keys()
    for name, expected in shadow.items():
        torch.testing.assert_close(exported[name], expected, msg=name)
    assert not all(torch.equal(exported[name], raw[-1][name]) for name in exported)  # the EMA is not the last weights


def test_each_training_step_draws_its_own_batch_and_noise(tmp_path, monkeypatch):
    # Before, a loop drawing every step's noise, or every step's batch, with step 0's passed: a resume draws the
    # same wrong batches as an uninterrupted run, so the resume tests could not tell.
    from diffsparse.testbed import train as train_module

    steps, step_generator = [], train_module._step_generator
    monkeypatch.setattr(train_module, "_step_generator", lambda seed, step: steps.append(step) or step_generator(
        seed, step))
    args = parse_args(["--out", str(tmp_path), "--steps", "3", "--batch", "1", "--threads", "1", "--save-every", "9"])
    train(args)
    assert steps == [0, 1, 2]
    sizes = [[int(r[k]) for k in ("batch", "frames", "height", "width")] for r in _read_log(tmp_path)]
    expected = [make_batch(args.seed, step, 1, train_buckets(args.image_share))[0].shape for step in range(3)]
    assert sizes == [[shape[0], *shape[2:]] for shape in expected]
    assert len({tuple(size) for size in sizes}) > 1  # steps 0 to 2 draw different sizes, so step 0's would show


def test_training_refuses_to_overwrite_a_run_without_resume(trained):
    with pytest.raises(SystemExit, match="--resume"):
        train(parse_args(["--out", str(trained["base"] / "run"), "--steps", "6"]))


def test_a_resume_without_the_run_s_seed_is_refused(tmp_path):
    # Every batch is make_batch(seed, step): before, a seed-5 run resumed without --seed 5 went on with seed 0's
    # batches and noise, no longer the run it continued. Now the run's seed unless another is given.
    common = ["--out", str(tmp_path), "--batch", "1", "--threads", "1", "--save-every", "9", "--image-share", "0"]
    train(parse_args([*common, "--steps", "1", "--seed", "5"]))
    with pytest.raises(SystemExit, match=r"trained with --seed 5, this invocation has --seed 0: resume with --seed 5"):
        train(parse_args([*common, "--steps", "2", "--resume", "--seed", "0"]))
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 1  # left as it was
    assert train(parse_args([*common, "--steps", "2", "--resume", "--seed", "5"]))["step"] == 2
    assert train(parse_args([*common, "--steps", "3", "--resume"]))["step"] == 3
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["args"]["seed"] == 5


def test_init_starts_a_new_run_from_a_pipeline_folder(trained, tmp_path):
    source = trained["base"] / "straight" / PIPELINE_DIR
    # --lr 0 and --ema 0: the exported weights are the initial ones, so they show what --init loaded.
    args = ["--steps", "1", "--batch", "1", "--threads", "1", "--lr", "0", "--ema", "0", "--init", str(source)]
    train(parse_args(["--out", str(tmp_path / "both"), *args]))
    only = ["--init-parts", "transformer", "--freeze-text-encoder"]
    train(parse_args(["--out", str(tmp_path / "transformer"), *args, *only]))
    trained_pipe, fresh = testbed.load(path=source), testbed.build_pipeline(testbed.build_components(seed=0))

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    both = testbed.load(path=tmp_path / "both" / PIPELINE_DIR)
    transformer_only = testbed.load(path=tmp_path / "transformer" / PIPELINE_DIR)
    assert same(both.transformer, trained_pipe.transformer) and same(both.text_encoder, trained_pipe.text_encoder)
    assert same(transformer_only.transformer, trained_pipe.transformer)
    assert same(transformer_only.text_encoder, fresh.text_encoder)
    assert not same(transformer_only.text_encoder, trained_pipe.text_encoder)
    for bad in (["--init-parts", "vae"], ["--init", str(tmp_path / "nowhere")], ["--init-parts", "transformer"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", *bad])
    # Resumed, the frozen text encoder is still --init's (before: the seeded one from the resume on, exported too).
    frozen_init = ["--init", str(source), "--freeze-text-encoder", "--steps", "2", "--batch", "1", "--threads", "1"]
    train(parse_args(["--out", str(tmp_path / "frozen_init"), *frozen_init, "--save-every", "1"]))
    train(parse_args(["--out", str(tmp_path / "frozen_init"), *frozen_init[:-6], "--steps", "3", "--resume",
                      "--batch", "1", "--threads", "1"]))
    assert same(testbed.load(path=tmp_path / "frozen_init" / PIPELINE_DIR).text_encoder, trained_pipe.text_encoder)
    # ... and resumed without --init: the checkpoint's (before: the seeded one, as no test resumed without it).
    train(parse_args(["--out", str(tmp_path / "frozen_init"), "--freeze-text-encoder", "--steps", "4", "--resume",
                      "--batch", "1", "--threads", "1"]))
    assert same(testbed.load(path=tmp_path / "frozen_init" / PIPELINE_DIR).text_encoder, trained_pipe.text_encoder)


def test_ema_switched_on_at_a_resume_starts_from_the_trained_weights(tmp_path):
    # Before, the EMA was made before the checkpoint loaded: from the seeded weights, which it then exported.
    common = ["--batch", "1", "--threads", "1", "--save-every", "9", "--out", str(tmp_path)]
    train(parse_args([*common, "--steps", "2", "--ema", "0"]))
    trained_weights = testbed.load(path=tmp_path / PIPELINE_DIR).transformer.state_dict()
    train(parse_args([*common, "--steps", "3", "--ema", "0.999", "--lr", "0", "--resume"]))
    # --lr 0: the weights stay the trained ones, and so does an EMA that starts from them.
    resumed = testbed.load(path=tmp_path / PIPELINE_DIR).transformer.state_dict()
    assert all(torch.equal(resumed[name], trained_weights[name]) for name in trained_weights)


def test_a_diverged_run_keeps_its_last_good_checkpoint_and_a_resume_takes_new_flags(tmp_path):
    # A loss that was not finite saved the weights that broke it over the last good checkpoint (a lower --lr on
    # resume then failed at once); --weight-decay on resume was silently replaced by the checkpoint's.
    common = ["--batch", "1", "--threads", "1", "--save-every", "9", "--decay", "0", "--warmup", "0",
              "--out", str(tmp_path)]
    train(parse_args([*common, "--steps", "2"]))
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    with pytest.raises(FloatingPointError):
        train(parse_args([*common, "--steps", "40", "--lr", "1e12", "--resume"]))
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert kept["step"] == good["step"] == 2
    seen = {}
    original_step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen["weight_decay"] = self.param_groups[0]["weight_decay"]
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", record)
        train(parse_args([*common, "--steps", str(kept["step"] + 1), "--weight-decay", "0.5", "--resume"]))
    assert seen["weight_decay"] == 0.5


def test_a_run_diverging_before_its_first_checkpoint_says_to_start_again_elsewhere(tmp_path):
    # It said "resume from the checkpoint", which does not exist, and the rerun with a lower --lr in the same --out
    # is refused (its loss log is an earlier run's): the message sends it to another --out.
    common = ["--batch", "1", "--threads", "1", "--save-every", "99", "--decay", "0", "--warmup", "0",
              "--out", str(tmp_path)]
    with pytest.raises(FloatingPointError, match="no checkpoint yet: lower --lr and start again in another --out"):
        train(parse_args([*common, "--steps", "40", "--lr", "1e12"]))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--batch", "0"])
    for bad in (
        ["--image-share", "1"],
        ["--image-share", "-0.1"],
        ["--timestep-shift", "0"],
        ["--timestep-sampling", "cosine"],
        ["--shape-counts", "0.8,0.2"],
        ["--shape-counts", "0.5,0.6,-0.1"],
        ["--frame-noise", "1.5"],
        ["--clean-first-frame", "-0.5"],
        # these ended in tracebacks, some after the run folder was made, or ran silently
        ["--lr", "-1"],
        ["--weight-decay", "-1"],
        ["--seed", "-1"],
        ["--warmup", "-5"],
        ["--minutes", "nan"],
        ["--timestep-shift", "nan"],
        ["--config", "nowhere.json"],
    ):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", *bad])
    assert parse_args(["--out", "x"]).minutes == 60.0  # the documented default budget


# ---------------------------------------------------------------- sampling


def test_sample_from_the_saved_folder_has_the_right_shape_and_finite_values(trained):
    folder = trained["base"] / "run" / PIPELINE_DIR
    prompts = ["a red circle moving left", "a blue square and a green triangle moving up"]
    video = testbed.sample(folder, prompts, frames=5, height=16, width=24, steps=3, seed=0)
    assert video.shape == (2, 5, 3, 16, 24) and video.dtype == torch.float32
    assert torch.isfinite(video).all() and video.min() >= 0 and video.max() <= 1
    assert torch.equal(video, testbed.sample(folder, prompts, frames=5, height=16, width=24, steps=3, seed=0))


def test_pipeline_loads_offline_as_a_diffusers_pipeline(trained):
    pipe = testbed.TestbedPipeline.from_pretrained(trained["base"] / "run" / PIPELINE_DIR)
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert pipe.tokenizer.model_max_length == testbed.testbed_config()["max_sequence_length"]
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a yellow square moving down", num_frames=3, height=16, width=16, num_inference_steps=2)
    assert out.frames.shape == (1, 3, 16, 16, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe("a yellow square", height=18, width=16)


def test_load_reads_training_folders_and_names_a_missing_one(trained, tmp_path):
    pipe = load_pipeline(str(trained["base"] / "run" / PIPELINE_DIR), "cpu", torch.float32)
    assert isinstance(pipe, testbed.TestbedPipeline) and not pipe.transformer.training
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        testbed.load(path=tmp_path)


def test_shipped_weights_load_offline():
    pipe = testbed.load()
    assert isinstance(pipe, testbed.TestbedPipeline)
    config = testbed.testbed_config()
    assert pipe.transformer.config.num_layers == config["transformer"]["num_layers"]
    shipped = sum(f.stat().st_size for f in testbed.WEIGHTS_PATH.rglob("*") if f.is_file())
    assert shipped <= 20 * 2**20  # the package budget for weights


def test_the_readmes_testbed_example_runs_as_written(tmp_path):
    # A reader copies it into a file: it must run alone and give the shapes its comments promise.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    (example,) = [block for block in blocks if "from diffsparse.pipelines.testbed import" in block]
    script = tmp_path / "example.py"
    script.write_text(example)
    names = runpy.run_path(str(script))
    assert names["video"].shape == (9, 32, 32, 3)
    assert tuple(names["videos"].shape) == (1, 17, 3, 48, 48)
    assert tuple(names["still"].shape) == (1, 3, 48, 48)


def test_diffsparse_applies_to_the_testbed_pipeline():
    # Before, only shapes and finite values were checked: sparse outputs scaled by 0.5 passed.
    pipe = testbed.build_pipeline()
    small = {"prompt": "a red circle moving left", "num_frames": 3, "height": 16, "width": 16,
             "num_inference_steps": 2, "output_type": "pt"}
    check_pipeline_against_dense(pipe, small)
    call = {"prompt": "a red circle moving left", "num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 3}
    reference = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1)):
        sparse = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").frames
        stats = diffsparse.stats(pipe)
    assert sparse.shape == reference.shape and torch.isfinite(sparse).all()
    assert all(s.dense_calls == 2 and s.sparse_calls == 4 for s in stats.layers)  # 1 dense + 2 sparse steps, CFG
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").frames, reference)


# ---------------------------------------------------------------- evidence


def test_loss_curve_is_compacted_and_plotted(trained, tmp_path):
    evidence.compact_loss_log(trained["base"] / "run" / LOSS_LOG, tmp_path / "loss.csv", bucket=2)
    rows = list(csv.DictReader((tmp_path / "loss.csv").open()))
    log = _read_log(trained["base"] / "run")
    assert [r["step"] for r in rows] == ["2", "4", "5"]
    assert float(rows[0]["loss"]) == pytest.approx((float(log[0]["loss"]) + float(log[1]["loss"])) / 2, abs=1e-5)
    summary = evidence.plot_loss(tmp_path / "loss.csv", tmp_path / "loss.png")
    assert summary["steps"] == 5 and (tmp_path / "loss.png").stat().st_size > 0


def test_a_fine_tunes_loss_curve_continues_the_run_it_started_from(trained, tmp_path):
    run_log = trained["base"] / "run" / LOSS_LOG
    evidence.compact_loss_log(run_log, tmp_path / "base.csv", bucket=2)
    evidence.compact_loss_log(run_log, tmp_path / "loss.csv", bucket=2, fine_tune_of=tmp_path / "base.csv")
    rows = list(csv.DictReader((tmp_path / "loss.csv").open()))
    base = list(csv.DictReader((tmp_path / "base.csv").open()))
    assert [r["step"] for r in rows] == ["2", "4", "5", "7", "9", "10"]
    assert [r["stage"] for r in rows] == ["0"] * 3 + ["1"] * 3
    assert [r["loss"] for r in rows[3:]] == [r["loss"] for r in base]
    assert float(rows[-1]["train_minutes"]) == pytest.approx(2 * float(base[-1]["train_minutes"]), abs=0.011)
    summary = evidence.plot_loss(tmp_path / "loss.csv", tmp_path / "loss.png")
    assert summary["steps"] == 10 and summary["fine_tunes_start_after_steps"] == [5]
    with pytest.raises(SystemExit):
        evidence.parse_args(["--fine-tune-of", str(tmp_path / "base.csv")])
    # Folders and counts checked before minutes of sampling (before, a wrong --run failed after them, samples.png
    # already overwritten); the run itself is fine.
    run = str(trained["base"] / "run")
    assert evidence.parse_args(["--run", run, "--fine-tune-of", str(tmp_path / "base.csv")]).run == Path(run)
    for bad in (["--run", str(tmp_path / "nowhere")], ["--run", run, "--fine-tune-of", str(tmp_path / "nowhere.csv")],
                ["--model", str(tmp_path)], ["--early", run], ["--attention-prompts", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            evidence.parse_args(bad)


def test_regenerating_without_a_60_minute_model_keeps_its_numbers(tmp_path):
    # samples_60min.png is left alone then, so the numbers measured with it must survive the rewrite.
    previous = tmp_path / "evidence.json"
    early_scores = {"shape_iou": 0.855, "kind": 0.87}
    previous.write_text(
        json.dumps({"model_60min": "runs/t60ln/pipeline", "fidelity": {"60min_training_size": early_scores}})
    )
    fresh = {"fidelity": {"eval_size": {"shape_iou": 0.7}}}
    evidence.carry_over_60min(previous, fresh)
    assert fresh["model_60min"] == "runs/t60ln/pipeline"
    assert fresh["fidelity"] == {"eval_size": {"shape_iou": 0.7}, "60min_training_size": early_scores}
    untouched = {"fidelity": {}}
    evidence.carry_over_60min(tmp_path / "missing.json", untouched)
    assert untouched == {"fidelity": {}}


def _stubbed_evidence(monkeypatch):
    """`evidence.main` with sampling, scoring and plots stubbed: what it prints and records, in a second."""
    scores = fidelity.Scores(1, 0.5, 0.5, 0.5, 0.5)
    decay = evidence.AttentionDecay((1, 1, 1), [[1.0]], [1.0], [[1.0]], [1.0], (1,), {1: [[1.0]]}, {1: 1.0})
    for name, stub in (("load", lambda path=None: path), ("sample", lambda *args, **kwargs: None),
                       ("save_sample_grid", lambda *args, **kwargs: None), ("fidelity", lambda *args, **kwargs: scores),
                       ("reference_scores", lambda *args, **kwargs: scores),
                       ("attention_decay", lambda *args, **kwargs: decay),
                       ("plot_attention_decay", lambda *args, **kwargs: None)):
        monkeypatch.setattr(evidence, name, stub)


def test_kept_60_minute_scores_say_when_they_were_scored(tmp_path, monkeypatch):
    # The kept runs/t60ln scores predate the 2026-12-05 colour check: the README's footnote said so, evidence.json
    # did not, and every rewrite carried them over as if current.
    _stubbed_evidence(monkeypatch)
    early = tmp_path / "early"
    early.mkdir()
    (early / "model_index.json").write_text("{}")
    out = tmp_path / "out"
    fresh = evidence.main(["--early", str(early), "--out", str(out)])
    assert fresh[evidence.SCORED_60MIN] == evidence.scored_60min_now()
    assert fresh[evidence.SCORED_60MIN]["carried_over"] is False
    kept = evidence.main(["--out", str(out)])  # no 60-minute model: its numbers and their date carried over
    assert kept[evidence.SCORED_60MIN] == {**fresh[evidence.SCORED_60MIN], "carried_over": True}
    assert kept["fidelity"]["60min_training_size"] == fresh["fidelity"]["60min_training_size"]
    # An evidence.json from before the key: scored before the colour check, and said to be.
    unmarked = json.loads((out / "evidence.json").read_text())
    del unmarked[evidence.SCORED_60MIN]
    (out / "evidence.json").write_text(json.dumps(unmarked))
    assert evidence.main(["--out", str(out)])[evidence.SCORED_60MIN] == {
        "scored": evidence.UNRECORDED_60MIN_SCORING, "carried_over": True}


def test_the_committed_evidence_marks_its_kept_60_minute_scores_as_the_script_does(tmp_path):
    # Regenerated without the 60-minute model (not on this machine), the file must come out as committed.
    committed = json.loads((Path(__file__).parents[1] / "docs" / "testbed" / "evidence.json").read_text())
    before_the_key = {key: value for key, value in committed.items() if key != evidence.SCORED_60MIN}
    (tmp_path / "evidence.json").write_text(json.dumps(before_the_key))
    rewritten = {"fidelity": {}}
    evidence.carry_over_60min(tmp_path / "evidence.json", rewritten)
    assert committed[evidence.SCORED_60MIN] == rewritten[evidence.SCORED_60MIN] == {
        "scored": evidence.UNRECORDED_60MIN_SCORING, "carried_over": True}
    assert rewritten["fidelity"]["60min_training_size"] == committed["fidelity"]["60min_training_size"]


def test_each_stage_of_the_evidence_prints_how_long_it_took(tmp_path, monkeypatch, capsys):
    # A regeneration takes most of an hour on 2 CPU cores; nothing said which stage ran how long.
    _stubbed_evidence(monkeypatch)
    evidence.main(["--two-stage", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for stage in ("samples.png (6 prompts)", "fidelity at the evaluation size (and of the training data)",
                  "fidelity at the evaluation size, two-stage", "fidelity at the training size",
                  "attention decay (3 prompts)"):
        assert re.search(rf"^{re.escape(stage)}: \d+ s$", printed, re.MULTILINE), stage
    assert re.search(rf"^wrote {re.escape(str(tmp_path))}/ in \d+ s$", printed, re.MULTILINE)
    assert evidence._duration(560.4) == "9 min 20 s" and evidence._duration(59.6) == "1 min 0 s"


def _recorded(query, key, layout, radii=(1,)):
    recorder = evidence._Recorder(layout, layers=1, rows=10**6, radii=radii, seed=0)  # every row
    recorder.add(0, query, key)
    return recorder.result(layout)


def test_attention_decay_of_uniform_attention_is_the_uniform_share():
    layout = (3, 4, 5)
    n = math.prod(layout)
    decay = _recorded(torch.zeros(1, n, 2, 8), torch.randn(1, n, 2, 8), layout)
    for mass, share in ((decay.temporal_mass[0], decay.temporal_share), (decay.spatial_mass[0], decay.spatial_share)):
        assert sum(share) == pytest.approx(1) and mass == pytest.approx(share, abs=1e-6)
    assert decay.concentration(1) == pytest.approx(1, abs=1e-5)
    # brute force: keys with |df| <= 1 and max(|dy|, |dx|) <= 1, averaged over all query positions
    f, h, w = (torch.arange(n) // (layout[1] * layout[2]), torch.arange(n) // layout[2] % layout[1],
               torch.arange(n) % layout[2])
    near = ((f[:, None] - f).abs() <= 1) & ((h[:, None] - h).abs() <= 1) & ((w[:, None] - w).abs() <= 1)
    assert decay.local_share[1] == pytest.approx(near.float().mean().item())


def test_attention_decay_of_self_attention_is_all_local():
    layout = (2, 3, 3)
    n = math.prod(layout)
    one_hot = torch.eye(n).view(1, n, 1, n) * 50  # every token attends to itself
    decay = _recorded(one_hot, one_hot, layout)
    assert decay.temporal_mass[0][0] == pytest.approx(1, abs=1e-6)
    assert decay.spatial_mass[0][0] == pytest.approx(1, abs=1e-6)
    assert decay.local_mass[1][0][0] == pytest.approx(1, abs=1e-6)


def test_attention_decay_of_a_batch_is_the_mean_over_its_videos():
    # Classifier-free guidance runs the transformer on a batch of two: each video's rows count once.
    layout = (2, 3, 3)
    n = math.prod(layout)
    one_hot = torch.eye(n).view(1, n, 1, n) * 50
    query = torch.cat([one_hot, torch.zeros_like(one_hot)])  # all local, then uniform
    decay = _recorded(query, torch.cat([one_hot, torch.randn_like(one_hot)]), layout)
    assert decay.temporal_mass[0][0] == pytest.approx((1 + decay.temporal_share[0]) / 2, abs=1e-6)
    assert sum(decay.spatial_mass[0]) == pytest.approx(1, abs=1e-6)
    assert decay.local_mass[1][0][0] == pytest.approx((1 + decay.local_share[1]) / 2, abs=1e-6)


def test_attention_decay_runs_on_the_pipeline_and_restores_processors():
    pipe = testbed.build_pipeline()
    before = [block.attn1.processor for block in pipe.transformer.blocks]
    decay = evidence.attention_decay(pipe, ["a red circle moving left"], frames=3, height=16, width=16, steps=2,
                                     rows=8)
    assert decay.layout == (3, 4, 4) and len(decay.temporal_mass) == len(before)
    assert all(sum(m) == pytest.approx(1, abs=1e-5) for m in decay.temporal_mass + decay.spatial_mass)
    assert [block.attn1.processor for block in pipe.transformer.blocks] == before


def test_attention_decay_records_the_attention_the_transformer_computes(monkeypatch):
    # The probe recomputes the softmax from q and k. The tests above feed the recorder q and k directly, so a probe
    # that dropped the 1/sqrt(D) scale or RoPE passed them all (and moved the headline concentration from 12.2x to
    # 27.7x or 1.19x). With every query row sampled, probabilities @ v must be what the attention call returned.
    from diffusers.models.transformers import transformer_wan

    events = []
    probabilities, dispatch = evidence._Recorder.probabilities, transformer_wan.dispatch_attention_fn

    def recorded_probabilities(self, query, key):
        probs = probabilities(self, query, key)
        events.append(("probs", probs))
        return probs

    def recorded_dispatch(query, key, value, *args, **kwargs):
        out = dispatch(query, key, value, *args, **kwargs)
        events.append(("dispatch", (value, out)))
        return out

    monkeypatch.setattr(evidence._Recorder, "probabilities", recorded_probabilities)
    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", recorded_dispatch)
    pipe = testbed.build_pipeline()
    decay = evidence.attention_decay(pipe, ["a red circle moving left"], frames=3, height=16, width=16, steps=2,
                                     rows=10**6)
    n = math.prod(decay.layout)
    # The processor's first attention call after the probe's probabilities is that self-attention (then the text's)
    pairs = [(probs, called) for (kind, probs), (next_kind, called) in itertools.pairwise(events)
             if kind == "probs" and next_kind == "dispatch"]
    assert len(pairs) == sum(kind == "probs" for kind, _ in events) >= 2 * len(pipe.transformer.blocks)
    for probs, (value, out) in pairs:
        assert probs.shape[-2:] == (n, n) and value.shape[1] == n
        torch.testing.assert_close(probs @ value.transpose(1, 2).float(), out.transpose(1, 2).float(), atol=1e-5,
                                   rtol=0)


def test_attention_decay_refuses_pipelines_other_than_the_testbed():
    # It samples through testbed.sample (first_frame=...) and counts frames // patch latent frames: a WanPipeline
    # failed with a TypeError about first_frame, and would have binned 9 frames where Wan's VAE makes 3.
    from diffsparse.pipelines.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    before = [block.attn1.processor for block in pipe.transformer.blocks]
    with pytest.raises(ValueError, match="pipe=WanPipeline: attention_decay measures the testbed pipeline only"):
        evidence.attention_decay(pipe, ["a red circle moving left"], frames=9, height=32, width=32, steps=1, rows=8)
    assert [block.attn1.processor for block in pipe.transformer.blocks] == before


# ---------------------------------------------------------------- prompt fidelity


def _rendered(request: fidelity.Request, kind=None, direction=None, frames=9, size=32, speed=1.0) -> np.ndarray:
    """A clean video `(F, 3, H, W)` in [0, 1] of one shape, by default the one `request` asks for."""
    ux, uy = DIRECTIONS[direction or request.direction]
    start = size / 2 - ux * speed * (frames - 1) / 2, size / 2 - uy * speed * (frames - 1) / 2
    shape = Shape(kind or request.kind, request.colour, 5.5, *start, ux * speed, uy * speed)
    clip = Clip(frames, size, size, (0.12, 0.12, 0.12), (shape,), direction or request.direction, "")
    return ((render(clip).permute(1, 0, 2, 3) + 1) / 2).numpy()


def test_fidelity_prompts_cover_every_shape_and_direction_in_training_words():
    todo = fidelity.requests()
    assert {(r.kind, r.direction) for r in todo} == {(k, d) for k in SHAPES for d in DIRECTIONS}
    assert all(set(r.prompt.split()) <= PROMPT_WORDS for r in todo)
    assert fidelity.Request("orange", "square", "up").prompt == "an orange square moving up"


def test_fidelity_of_the_prompted_video_is_near_perfect():
    for request in fidelity.requests():
        scores = fidelity.score_video(_rendered(request), request)
        assert scores["shape_iou"] > 0.95, (request, scores)
        assert scores == {**scores, "kind_accuracy": 1.0, "present": 1.0, "direction_accuracy": 1.0}, request


def test_fidelity_notices_the_wrong_shape_the_wrong_way_and_no_shape():
    request = fidelity.Request("red", "triangle", "left")
    wrong_kind = fidelity.score_video(_rendered(request, kind="circle"), request)
    assert wrong_kind["kind_accuracy"] == 0 and wrong_kind["shape_iou"] < 0.85
    assert fidelity.score_video(_rendered(request, direction="right"), request)["direction_accuracy"] == 0
    assert fidelity.score_video(_rendered(request, speed=0.0), request)["direction_accuracy"] == 0  # standing still
    other_colour = fidelity.score_video(_rendered(fidelity.Request("blue", "triangle", "left")), request)
    assert other_colour == {"shape_iou": 0.0, "kind_accuracy": 0.0, "present": 0.0, "direction_accuracy": 0.0}
    # The two closest prompt colours, within the RGB tolerance of each other: neither passes for the other.
    for drawn, prompted in (("orange", "yellow"), ("yellow", "orange")):
        asked = fidelity.Request(prompted, "circle", "left")
        scores = fidelity.score_video(_rendered(fidelity.Request(drawn, "circle", "left")), asked)
        assert scores["present"] == 0.0 and scores["shape_iou"] == 0.0, (drawn, prompted, scores)


def test_fidelity_of_a_ragged_blob_is_low():
    request = fidelity.Request("green", "square", "down")
    video = _rendered(request)
    noise = np.random.default_rng(0).random(video.shape[-2:]) < 0.35
    video[:, :, noise] = 0.12  # punch background-coloured holes into every frame
    assert fidelity.score_video(video, request)["shape_iou"] < 0.75


def test_direction_accuracy_asks_for_the_prompted_speed():
    # "quickly" is 2 pixels a frame: a shape crawling the right way at 0.6 does not pass, one at 2.0 does (a
    # threshold that forgot the speed word passed both).
    request = fidelity.Request("red", "circle", "right", "quickly")
    assert fidelity.score_video(_rendered(request, speed=0.6), request)["direction_accuracy"] == 0
    assert fidelity.score_video(_rendered(request, speed=2.0), request)["direction_accuracy"] == 1


def test_a_frame_without_the_shape_scores_no_shape_iou():
    # The mean runs over every frame, so blanking 4 of 9 frames leaves 5/9 of the score of the 5 frames kept.
    request = fidelity.Request("red", "circle", "right")
    video = _rendered(request)
    blanked = video.copy()
    blanked[1::2] = 0.12  # the background colour: no shape in the odd frames
    kept = fidelity.score_video(video[0::2], request)
    scores = fidelity.score_video(blanked, request)
    assert kept["shape_iou"] > 0.95 and scores["present"] == pytest.approx(5 / 9)
    assert scores["shape_iou"] == pytest.approx(kept["shape_iou"] * 5 / 9)


def test_the_velocity_counts_the_frames_where_the_shape_is_missing():
    # A shape at 1 px/frame, missing from every other frame, still moves 1 px/frame (not 2 px per frame found).
    request = fidelity.Request("blue", "square", "right")
    video = _rendered(request, speed=1.0)
    video[1::2] = 0.12
    masks = fidelity._present_masks(video, request.colour)
    assert sorted(masks) == [0, 2, 4, 6, 8]
    vx, vy = fidelity._velocity(masks)
    assert vx == pytest.approx(1.0, abs=0.1) and vy == pytest.approx(0.0, abs=0.1)


def test_training_data_reaches_the_fidelity_ceiling():
    scores = fidelity.reference_scores(9, 32, 32, seeds=1)
    assert scores.videos == len(fidelity.requests()) and scores.shape_iou > 0.95
    assert (scores.kind_accuracy, scores.present, scores.direction_accuracy) == (1.0, 1.0, 1.0)


def test_fidelity_runs_on_the_pipeline():
    scores = fidelity.fidelity(testbed.build_pipeline(), frames=2, height=16, width=16, seeds=1, steps=1)
    assert scores.videos == len(fidelity.requests())
    assert all(0 <= v <= 1 for v in (scores.shape_iou, scores.kind_accuracy, scores.present))


def test_still_prompt_is_what_a_single_training_frame_is_prompted_with():
    rng = np.random.default_rng(0)
    for _ in range(50):
        clip = random_clip(rng, 9, 32, 32)
        assert testbed.still_prompt(clip.prompt) == clip.objects
    # The model reads lowercase words (before, "MOVING" kept the motion in the still's prompt, and "circle, moving"
    # kept it too): the helper reads the same words.
    assert testbed.still_prompt("A red circle MOVING right") == "a red circle"
    assert testbed.still_prompt("a red circle, moving right.") == "a red circle"


def test_two_stage_sampling_animates_the_models_own_still_image():
    pipe = testbed.build_pipeline()
    prompts = ["a red circle moving left", "a white square and an orange triangle moving up quickly"]
    images = testbed.sample(pipe, ["a red circle", "a white square and an orange triangle"], frames=1, height=16,
                            width=16, steps=2, seed=3)
    videos = testbed.sample(pipe, prompts, frames=3, height=16, width=16, steps=2, seed=3, two_stage=True)
    # the clip starts from the generated image: a clean condition comes back as given, up to float rounding
    torch.testing.assert_close(videos[:, 0], images[:, 0], atol=1e-5, rtol=0)
    assert not torch.allclose(videos[:, 1], videos[:, 0], atol=1e-3)  # and the later frames are sampled
    with pytest.raises(ValueError, match="two_stage"):
        testbed.sample(pipe, prompts, frames=3, height=16, width=16, steps=1, first_frame=images[:, 0], two_stage=True)


def test_prompt_embeds_make_num_videos_per_prompt_videos_each():
    # Before, given embeddings ignored num_videos_per_prompt (and one prompt's embeddings with 3 raised IndexError).
    pipe = testbed.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {"num_frames": 1, "height": 16, "width": 16, "num_inference_steps": 1, "output_type": "pt",
            "num_videos_per_prompt": 3}
    embeds = pipe.encode_prompt(["a red circle", "a blue square"])
    from_embeds = pipe(prompt_embeds=embeds, generator=torch.Generator().manual_seed(0), **call).frames
    from_text = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), **call).frames
    assert from_embeds.shape[0] == 6
    torch.testing.assert_close(from_embeds, from_text)


def test_fidelity_options_are_checked_before_loading(capsys):
    # Before: raw RuntimeErrors from inside (sizes off the 4-pixel patch grid), an empty-stack error (--seeds 0),
    # and pure noise scored in silence (--steps 0).
    for bad in (["--size", "1x30x30"], ["--size", "0x16x16"], ["--seeds", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            fidelity.main(bad)
        assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err
    assert fidelity.parse_size("9x32x32") == (9, 32, 32)


def test_pipeline_call_inputs_are_checked():
    # Each of these raised an IndexError or TypeError from inside, or ran silently with another meaning (a prompt
    # beside prompt_embeds was dropped, a 0-255 or [-1, 1] first frame was read as [0, 1], max_sequence_length=0
    # meant the default, num_frames=3.0 failed later with a TypeError).
    pipe = testbed.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {"num_frames": 1, "height": 16, "width": 16, "num_inference_steps": 1}
    embeds = pipe.encode_prompt("a blue square")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    red = "a red circle"
    for kwargs, match in (
        ({"prompt": red, "prompt_embeds": embeds}, "give prompt or prompt_embeds, not both"),
        ({"prompt": red, "negative_prompt": "a blue square", "negative_prompt_embeds": embeds},
         "give negative_prompt or negative_prompt_embeds, not both"),
        *(({"prompt": red, "first_frame": bad}, r"first_frame must be a floating tensor with values in \[0, 1\]")
          for bad in ((image * 255).to(torch.uint8), image * 2 - 1, image * 255)),
        ({"prompt": red, "num_frames": 3.0}, "num_frames must be an int >= 1, got num_frames=3.0"),
        ({"prompt": red, "height": 16.0}, "height must be an int >= 1, got height=16.0"),
        ({"prompt": red, "max_sequence_length": 0}, "max_sequence_length must be an int >= 1"),
        ({"prompt": red, "max_sequence_length": True}, "max_sequence_length must be an int >= 1"),
        ({"prompt": None}, "give a prompt"),
        ({"prompt": []}, "give a prompt"),
        ({"prompt": "a red circle", "num_inference_steps": 0}, "num_inference_steps must be an int >= 1"),
        ({"prompt": ["a", "b"], "negative_prompt": ["blurry"]}, "negative_prompt must be a str or one per prompt"),
        ({"prompt": ["a", "b"], "generator": [torch.Generator()]}, "a list needs one per video"),
        ({"prompt": "a red circle", "latents": torch.zeros(1, 3, 1, 2, 2)}, "latents must have shape"),
    ):
        with pytest.raises(ValueError, match=match):
            pipe(**{**call, **kwargs})
    with pytest.raises(ValueError, match="max_sequence_length must be an int >= 1"):
        pipe.encode_prompt(red, max_sequence_length=0)
    # A string dtype was taken by from_pretrained as no dtype at all: float32, without a word.
    for dtype in ("bfloat16", "bf16", torch.int8):
        with pytest.raises(ValueError, match=re.escape(f"dtype must be one of torch.float32, torch.float64, "
                                                       f"torch.float16, torch.bfloat16, got dtype={dtype!r}")):
            testbed.load(dtype=dtype)


def test_guidance_scale_weighs_the_conditional_against_the_unconditional_velocity():
    # Before, no test read guidance_scale: CFG with the scale replaced by 1 passed them all. One step, checked
    # against the transformer's own two outputs.
    pipe = testbed.build_pipeline()
    prompt, negative = "a red circle moving left", "a blue square"
    latents = torch.randn(1, 12, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # 16 x 16 pixels
    call = {"num_frames": 1, "height": 16, "width": 16, "num_inference_steps": 1, "latents": latents,
            "output_type": "latent"}
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: seen.append((kwargs["encoder_hidden_states"], output[0])),
        with_kwargs=True,
    )
    try:
        guided = pipe(prompt, negative_prompt=negative, guidance_scale=3.0, **call).frames
    finally:
        hook.remove()
    (cond_text, cond), (uncond_text, uncond) = seen
    with torch.no_grad():  # as the pipeline encodes (with autograd on, the encoder's kernels round differently)
        torch.testing.assert_close(cond_text, pipe.encode_prompt(prompt))
        torch.testing.assert_close(uncond_text, pipe.encode_prompt(negative))
    sigmas = pipe.scheduler.sigmas
    torch.testing.assert_close(guided, latents + (sigmas[1] - sigmas[0]) * (uncond + 3.0 * (cond - uncond)))
    plain = pipe(prompt, negative_prompt=negative, guidance_scale=1.0, **call).frames  # the cond branch alone
    torch.testing.assert_close(plain, latents + (sigmas[1] - sigmas[0]) * cond)
    assert not torch.allclose(guided, plain, atol=1e-3)


def test_negative_prompt_is_read_as_its_embeddings_are():
    # Before, no test could tell whether negative_prompt was used: encoding "" in its place passed.
    pipe = testbed.build_pipeline()
    call = {"prompt": "a red circle moving left", "num_frames": 1, "height": 16, "width": 16,
            "num_inference_steps": 2, "output_type": "latent"}

    def run(**kwargs):
        return pipe(**call, **kwargs, generator=torch.Generator().manual_seed(0)).frames

    negative = run(negative_prompt="a blue square")
    assert not torch.allclose(negative, run(), atol=1e-3)
    torch.testing.assert_close(run(negative_prompt_embeds=pipe.encode_prompt("a blue square")), negative)


def test_prompt_embeds_of_another_length_get_an_empty_negative_prompt_of_their_length():
    # Embeddings made at 8 tokens with CFG and no negative: the call must run as the prompt itself at
    # max_sequence_length=8 does, its "" negative at 8 tokens too, not at the tokenizer's 16.
    pipe = testbed.build_pipeline()
    prompt = "a red circle moving left"
    call = {"num_frames": 1, "height": 16, "width": 16, "num_inference_steps": 2, "output_type": "latent"}
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():  # as the pipeline encodes (with autograd on, the encoder's kernels round differently)
            embeds = pipe.encode_prompt(prompt, max_sequence_length=8)
        from_embeds = pipe(prompt_embeds=embeds, generator=torch.Generator().manual_seed(0), **call).frames
    finally:
        hook.remove()
    assert seen == [8] * 4  # cond and uncond, both steps
    from_text = pipe(prompt, max_sequence_length=8, generator=torch.Generator().manual_seed(0), **call).frames
    torch.testing.assert_close(from_embeds, from_text)


def test_num_videos_per_prompt_keeps_each_prompts_videos_together():
    # diffusers' order is a, a, b, b. Before, a, b, a, b passed: the one test compared two paths sharing the order.
    pipe = testbed.build_pipeline()
    call = {"num_frames": 1, "height": 16, "width": 16, "num_inference_steps": 2, "output_type": "latent",
            "num_videos_per_prompt": 2}
    prompts = ["a red circle moving left", "a blue square moving up"]

    def seeds():
        return [torch.Generator().manual_seed(seed) for seed in range(4)]

    alone = pipe(prompts[1], **{**call, "num_videos_per_prompt": 1}, generator=torch.Generator().manual_seed(2))
    for given in ({"prompt": prompts}, {"prompt_embeds": pipe.encode_prompt(prompts)}):
        videos = pipe(**given, **call, generator=seeds()).frames
        torch.testing.assert_close(videos[2], alone.frames[0], atol=1e-5, rtol=0)


def test_room_ahead_measures_towards_the_direction_word():
    image = torch.full((3, 32, 32), 0.05)  # a dark background
    image[1, 20:28, 4:12] = 0.9  # a green square: centre x = 8, y = 24
    assert {d: testbed.room_ahead(image, f"a green square moving {d}") for d in DIRECTIONS} == {
        "left": 8.0, "right": 24.0, "up": 24.0, "down": 8.0}
    assert testbed.room_ahead(image, "a green square") == math.inf  # a still prompt: no direction to make room for
    # The model reads "LEFT" as "left" (its tokenizer lowercases); before, no direction was found (inf for all).
    assert testbed.room_ahead(image, "A green square moving LEFT.") == 8.0
    assert testbed.room_ahead(image, "a green square moving left then right") == 24.0  # the last direction named
    assert testbed.room_ahead(torch.full((3, 32, 32), 0.05), "a green square moving up") == -math.inf  # nothing drawn


def test_two_stage_starts_each_clip_from_the_still_with_the_most_room_ahead():
    pipe = testbed.build_pipeline()
    prompts = ["a red circle moving left", "a blue square moving down"]
    call = {"height": 16, "width": 16, "steps": 2}
    stills = torch.stack([testbed.sample(pipe, ["a red circle", "a blue square"], frames=1, seed=5 + c, **call)[:, 0]
                          for c in range(4)], dim=1)
    rooms = [[testbed.room_ahead(still, prompt) for still in candidates] for candidates, prompt in zip(stills, prompts)]
    assert all(len(set(r)) > 1 for r in rooms), rooms  # the candidates differ, so the choice is tested
    videos = testbed.sample(pipe, prompts, frames=3, seed=5, two_stage=True, still_candidates=4, **call)
    for video, candidates, room in zip(videos, stills, rooms):
        torch.testing.assert_close(video[0], candidates[int(np.argmax(room))], atol=1e-5, rtol=0)
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match="still_candidates"):
            testbed.sample(pipe, prompts, frames=3, seed=5, two_stage=True, still_candidates=bad, **call)
    with pytest.raises(ValueError, match="two_stage=True"):
        testbed.sample(pipe, prompts, frames=3, seed=5, still_candidates=2, **call)


def test_best_still_takes_one_prompt_as_a_str_as_sample_does():
    # Before, a str was read letter by letter: 24 stills for "a red circle moving left".
    pipe = testbed.build_pipeline()
    still = testbed.best_still(pipe, "a red circle moving left", 16, 16, steps=1)
    assert still.shape == (1, 3, 16, 16)
    torch.testing.assert_close(still, testbed.best_still(pipe, ["a red circle moving left"], 16, 16, steps=1))


def test_two_stage_fidelity_runs_and_excludes_training_first_frames():
    pipe = testbed.build_pipeline()
    scores = fidelity.fidelity(pipe, frames=3, height=16, width=16, seeds=1, steps=1, two_stage=True)
    assert scores.videos == len(fidelity.requests())
    with pytest.raises(ValueError, match="first_frame and two_stage"):
        fidelity.fidelity(pipe, frames=3, height=16, width=16, seeds=1, steps=1, first_frame=True, two_stage=True)


def test_motion_direction_names_the_way_the_shape_moves_or_none():
    request = fidelity.Request("red", "circle", "left")
    for direction in DIRECTIONS:
        assert fidelity.motion_direction(_rendered(request, direction=direction), "red") == direction
    assert fidelity.motion_direction(_rendered(request, speed=0.0), "red") is None  # standing still
    assert fidelity.motion_direction(_rendered(request), "blue") is None  # no blue shape


def test_steering_batch_asks_every_direction_of_one_centred_first_frame():
    for seed in (0, 1):
        todo, first_frames = fidelity.steering_batch(seed, 32, 32)
        assert first_frames.shape == (len(SHAPES) * len(DIRECTIONS), 3, 32, 32)
        assert all(set(r.prompt.split()) <= PROMPT_WORDS for r in todo)
        for i in range(0, len(todo), len(DIRECTIONS)):
            group = todo[i:i + len(DIRECTIONS)]
            assert [r.direction for r in group] == list(DIRECTIONS)
            assert len({(r.colour, r.kind) for r in group}) == 1
            assert all(torch.equal(first_frames[i], first_frames[j]) for j in range(i, i + len(DIRECTIONS)))
            ys, xs = np.nonzero(fidelity._shape_mask(first_frames[i].numpy(), group[0].colour))
            assert abs(xs.mean() + 0.5 - 16) < 1 and abs(ys.mean() + 0.5 - 16) < 1  # no start position hints a way
    assert fidelity.steering_batch(0, 32, 32)[0] != fidelity.steering_batch(1, 32, 32)[0]  # colours change per seed


def _fake_sampler(follows_prompt: bool):
    """A `sample` stand-in that slides the first frame one pixel per frame: the prompted way, or always right."""
    def fake(model, prompts, frames, height, width, steps, seed, first_frame, **kwargs):
        videos = []
        for prompt, image in zip(prompts, first_frame):
            ux, uy = DIRECTIONS[prompt.split()[-1] if follows_prompt else "right"]
            videos.append(torch.stack([image.roll((f * uy, f * ux), dims=(1, 2)) for f in range(frames)]))
        return torch.stack(videos)
    return fake


def test_steering_scores_a_model_that_follows_the_word_and_one_that_ignores_it(monkeypatch):
    monkeypatch.setattr(testbed, "sample", _fake_sampler(follows_prompt=True))
    follows = fidelity.steering(None, frames=9, height=32, width=32, seeds=1)
    assert follows == {"videos": 12, "steered": 1.0, "moving": 1.0, "direction_accuracy": 1.0, "chance": 0.25}
    monkeypatch.setattr(testbed, "sample", _fake_sampler(follows_prompt=False))
    deaf = fidelity.steering(None, frames=9, height=32, width=32, seeds=1)
    assert deaf["steered"] == deaf["chance"] == 0.25 and deaf["moving"] == 1.0


def test_fidelity_cli_refuses_two_only_checks_at_once(capsys):
    with pytest.raises(SystemExit):
        fidelity.main(["--steering-only", "--sensitivity-only"])
    assert "--steering-only and --sensitivity-only" in capsys.readouterr().err


def test_steering_runs_on_the_pipeline():
    scores = fidelity.steering(testbed.build_pipeline(), frames=2, height=16, width=16, seeds=1, steps=1)
    assert scores["videos"] == len(SHAPES) * len(DIRECTIONS)
    assert all(0 <= scores[k] <= 1 for k in ("steered", "moving", "direction_accuracy"))


def test_prompt_sensitivity_is_zero_exactly_when_the_text_cannot_reach_the_video():
    pipe = testbed.build_pipeline()
    listening = fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1)
    assert set(listening) == {"colour", "kind", "direction"}
    assert all(abs(v) > 1e-4 for v in listening.values()), listening  # random weights: every word changes the error
    with torch.no_grad():
        for block in pipe.transformer.blocks:  # cross-attention is the only way in for the text in Wan
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()
    deaf = fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1)
    assert deaf == {"colour": 0.0, "kind": 0.0, "direction": 0.0}


def test_text_separation_is_zero_exactly_for_words_the_text_path_cannot_tell_apart():
    pipe = testbed.build_pipeline()
    separation = fidelity.text_separation(pipe)
    assert set(separation) == {"colour", "kind", "direction"}
    assert all(v > 0.05 for v in separation.values()), separation  # random weights keep every word apart
    vocabulary = pipe.tokenizer.get_vocab()
    with torch.no_grad():  # give the four direction words one embedding: the encoder can no longer tell them apart
        table = pipe.text_encoder.get_input_embeddings().weight
        table[[vocabulary[w] for w in ("right", "up", "down")]] = table[vocabulary["left"]].clone()
    merged = fidelity.text_separation(pipe)
    assert merged["direction"] == 0.0
    assert merged["colour"] > 0.05 and merged["kind"] > 0.05  # the other words stay apart


def test_prompt_sensitivity_and_text_separation_read_prompts_at_the_pipeline_s_text_length():
    # Before, both took the shipped config's 16 tokens: a model built from a config of 8 was probed with text it
    # never sees, 8 padding tokens more than the pipeline (and its training) feeds it.
    config = {**testbed.testbed_config(), "max_sequence_length": 8}  # the cached config stays as it is
    pipe = testbed.build_pipeline(testbed.build_components(config, seed=0))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.transformer.condition_embedder.text_embedder.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[1]))
    try:
        pipe("a red circle moving left", num_frames=1, height=16, width=16, num_inference_steps=1)
        sampled = set(seen)
        seen.clear()
        fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1, noise_levels=(0.5,))
        probed = set(seen)
        seen.clear()
        fidelity.text_separation(pipe)
        separated = set(seen)
    finally:
        hook.remove()
    assert sampled == probed == separated == {8}


def test_prompt_sensitivity_noise_levels_are_checked_and_used():
    pipe = testbed.build_pipeline()
    for bad in ((), (0.0,), (1.5,)):
        with pytest.raises(ValueError, match="noise_levels"):
            fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1, noise_levels=bad)
    near_noise = fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1, noise_levels=(0.99,))
    default = fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1)
    assert near_noise != default  # other noise levels, other errors
    clear_start = fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1, first_frame_level=0.1)
    assert clear_start != default
    with pytest.raises(ValueError, match="first_frame_level"):
        fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1, first_frame_level=-0.1)
    assert fidelity.parse_noise_levels("0.9,1") == (0.9, 1.0)
    for bad in ("0.9,x", "0,0.5", "1.01"):
        with pytest.raises(argparse.ArgumentTypeError, match="--noise-levels"):
            fidelity.parse_noise_levels(bad)


# ---------------------------------------------------------------- joint image-video training


def test_image_share_mixes_single_frames_at_the_same_token_budget():
    assert train_buckets(0.0) == tuple(
        type(b)(b.frames, b.height, b.width, b.weight / sum(x.weight for x in TRAIN_BUCKETS)) for b in TRAIN_BUCKETS
    )
    mixed = train_buckets(0.3)
    assert sum(b.weight for b in mixed) == pytest.approx(1)
    assert sum(b.weight for b in mixed if b.frames == 1) == pytest.approx(0.3)
    assert mixed[0] == type(mixed[0])(9, 32, 32, mixed[0].weight)  # the base size batch sizes scale from
    image = next(b for b in mixed if (b.frames, b.height) == (1, 32))
    assert batch_size_for(image, 16, mixed[0]) == 16 * 9  # nine frames' tokens of single frames
    with pytest.raises(ValueError, match="image_share"):
        train_buckets(1.0)


def test_shape_counts_set_how_many_shapes_a_clip_draws():
    rng = np.random.default_rng(0)
    assert {len(random_clip(rng, 9, 48, 48, (1.0, 0.0, 0.0)).shapes) for _ in range(20)} == {1}
    _, prompts = make_batch(0, 0, 8, shape_counts=(1.0, 0.0, 0.0))
    assert not any(" and " in p for p in prompts)
    with pytest.raises(ValueError, match="shape_counts"):
        random_clip(rng, 9, 48, 48, (0.5, 0.5))


def test_still_image_prompts_drop_the_motion_only_from_single_frames():
    motion_videos, motion = make_batch(0, 5, 4, IMAGE_BUCKETS)
    still_videos, still = make_batch(0, 5, 4, IMAGE_BUCKETS, image_prompts="still")
    assert torch.equal(motion_videos, still_videos)  # the same frames, only the words differ
    assert all(m.startswith(s + " moving ") and "moving" not in s for m, s in zip(motion, still)), (motion, still)
    # Clips keep their motion words: there the motion is visible.
    assert make_batch(0, 5, 4, TRAIN_BUCKETS, image_prompts="still")[1] == make_batch(0, 5, 4, TRAIN_BUCKETS)[1]
    with pytest.raises(ValueError, match="image_prompts"):
        make_batch(0, 5, 4, image_prompts="none")
    assert parse_args(["--out", "x", "--image-prompts", "still"]).image_prompts == "still"
    assert parse_args(["--out", "x"]).image_prompts == "motion"


# For tests that replace `velocity_errors`: of the model, the loss then reads only the channels (space-to-depth factor).
NO_MODEL = {"transformer": SimpleNamespace(config=SimpleNamespace(in_channels=12))}


def test_logit_normal_timesteps_favour_the_middle_noise_levels(monkeypatch):
    from diffsparse.testbed import train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "velocity_errors", lambda c, x0, p, n, t, length: seen.setdefault("t", t))
    videos = torch.zeros(4000, 3, 1, 4, 4)
    for sampling in train_module.TIMESTEP_SAMPLINGS:
        generator = torch.Generator().manual_seed(0)
        train_module.flow_matching_loss(NO_MODEL, videos, [""] * 4000, generator, 1.0, 4, sampling)
        t = seen.pop("t")
        middle = ((t > 0.25) & (t < 0.75)).float().mean().item()
        # uniform: half of the noise levels in the middle half; logit-normal: P(|z| < logit(0.75)) = 0.73
        assert middle == pytest.approx({"uniform": 0.5, "logit-normal": 0.727}[sampling], abs=0.03)
    with pytest.raises(ValueError, match="timestep_sampling"):
        train_module.flow_matching_loss(NO_MODEL, videos, [""] * 4000, torch.Generator(), 1.0, 4, "cosine")


def test_frame_noise_gives_clips_one_noise_level_per_frame_and_leaves_single_frames_alone(monkeypatch):
    from diffsparse.testbed import train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "velocity_errors", lambda c, x0, p, n, t, length: seen.setdefault("t", t))
    clips, frames = torch.zeros(2000, 3, 5, 4, 4), torch.zeros(8, 3, 1, 4, 4)

    def levels(videos, frame_noise):
        generator = torch.Generator().manual_seed(0)
        train_module.flow_matching_loss(NO_MODEL, videos, [""] * len(videos), generator, 3.0, 4,
                                        frame_noise=frame_noise)
        return seen.pop("t")

    per_clip = levels(clips, 0.0)
    assert per_clip.shape == (2000,)
    mixed = levels(clips, 0.5)
    assert mixed.shape == (2000, 5)
    varies = (mixed.max(1).values > mixed.min(1).values).float().mean().item()
    assert varies == pytest.approx(0.5, abs=0.05)
    # the clips that keep one level keep the level drawn without the option: same runs, same draws
    same = mixed.max(1).values == mixed.min(1).values
    assert torch.equal(mixed[same, 0], per_clip[same])
    assert levels(frames, 1.0).shape == (8,)  # one frame has one level anyway
    with pytest.raises(ValueError, match="frame_noise"):
        levels(clips, 1.5)


def test_clean_first_frame_conditions_a_share_of_the_clips_and_is_not_scored(monkeypatch):
    from diffsparse.testbed import train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "velocity_errors", lambda c, x0, p, n, t, length: seen.setdefault("t", t))
    clips = torch.zeros(2000, 3, 5, 4, 4)
    generator = torch.Generator().manual_seed(0)
    train_module.flow_matching_loss(NO_MODEL, clips, [""] * 2000, generator, 3.0, 4, clean_first_frame=0.5)
    t = seen.pop("t")
    clean = t[:, 0] == 0
    assert clean.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert (t[:, 1:] > 0).all() and torch.equal(t[~clean, 0], t[~clean, 1])  # the rest keep the clip's level
    with pytest.raises(ValueError, match="clean_first_frame"):
        train_module.flow_matching_loss(NO_MODEL, clips, [""] * 2000, generator, 3.0, 4, clean_first_frame=-1)


def test_one_noise_level_per_frame_equals_one_per_clip_when_the_levels_agree():
    from diffsparse.testbed.train import velocity_errors

    components = testbed.build_components()
    x0 = testbed.space_to_depth(torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        per_clip = velocity_errors(components, x0, ["a red circle", ""], noise, t, 16)
        per_frame = velocity_errors(components, x0, ["a red circle", ""], noise, t[:, None].expand(2, 3), 16)
        torch.testing.assert_close(per_frame, per_clip)
        # and the per-token timesteps do reach the model: another level for one frame changes the error
        other = velocity_errors(components, x0, ["a red circle", ""], noise, torch.tensor([[0.3, 0.3, 0.9],
                                                                                            [0.8, 0.8, 0.8]]), 16)
    assert abs(other[0] - per_clip[0]) > 1e-3
    torch.testing.assert_close(other[1], per_clip[1])
    # a frame at level 0 is a clean condition: whatever the model predicts there is not scored
    with torch.no_grad():
        conditioned = velocity_errors(components, x0, ["a red circle", ""], noise, torch.tensor([[0.0, 0.5, 0.5]] * 2),
                                      16)
        clean_target = noise.clone()
        clean_target[:, :, 0] = 0  # another "noise" for the clean frame changes nothing: x_t = x0 there
        elsewhere = velocity_errors(components, x0, ["a red circle", ""], clean_target,
                                    torch.tensor([[0.0, 0.5, 0.5]] * 2), 16)
    torch.testing.assert_close(conditioned, elsewhere)


def test_bf16_training_with_images_and_a_timestep_shift_runs(tmp_path, monkeypatch):
    # Before, the run only had to finish: with autocast switched off, bf16 trained in float32 and passed.
    from diffsparse.testbed import train as train_module

    build, activations = train_module.build_components, []

    def recording(*args, **kwargs):
        components = build(*args, **kwargs)
        components["transformer"].register_forward_hook(lambda module, inputs, output: activations.append(
            output[0].dtype))
        return components

    monkeypatch.setattr(train_module, "build_components", recording)
    args = ["--steps", "3", "--batch", "1", "--threads", "1", "--image-share", "0.9", "--precision", "bf16",
            "--timestep-shift", "1.5", "--save-every", "9"]
    train(parse_args(["--out", str(tmp_path), *args]))
    rows = _read_log(tmp_path)
    assert len(rows) == 3 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert any(r["frames"] == "1" for r in rows)  # single frames were drawn
    assert activations == [torch.bfloat16] * 3
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)  # the weights themselves stay float32
    assert {w.dtype for part in state["model"].values() for w in part.values()} == {torch.float32}
    activations.clear()
    train(parse_args(["--out", str(tmp_path / "fp32"), "--steps", "1", "--batch", "1", "--threads", "1"]))
    assert activations == [torch.float32]


def test_frozen_text_encoder_keeps_its_initial_weights_and_must_resume_frozen(tmp_path):
    from safetensors.torch import load_file

    from diffsparse.testbed import train as train_module

    def text_weights(folder):
        (path,) = (folder / PIPELINE_DIR / "text_encoder").glob("*.safetensors")
        return load_file(path)

    common = ["--batch", "1", "--threads", "1", "--save-every", "9", "--ema", "0"]
    train(parse_args(["--out", str(tmp_path / "frozen"), "--steps", "2", "--freeze-text-encoder", *common]))
    train(parse_args(["--out", str(tmp_path / "unfrozen"), "--steps", "2", *common]))
    initial = train_module.build_components(testbed.testbed_config(), seed=0)["text_encoder"].state_dict()
    frozen, unfrozen = text_weights(tmp_path / "frozen"), text_weights(tmp_path / "unfrozen")
    assert all(torch.equal(frozen[name], initial[name]) for name in frozen)
    assert any(not torch.equal(unfrozen[name], initial[name]) for name in unfrozen)  # the default trains it
    # Resumed without the flag, a frozen run stays frozen (before: refused); a run that trained it cannot freeze it.
    train(parse_args(["--out", str(tmp_path / "frozen"), "--steps", "3", "--resume", *common]))
    assert all(torch.equal(text_weights(tmp_path / "frozen")[name], initial[name]) for name in frozen)
    with pytest.raises(SystemExit, match="trained with no --freeze-text-encoder, this invocation has --freeze-text-"):
        train(parse_args(["--out", str(tmp_path / "unfrozen"), "--steps", "3", "--resume", "--freeze-text-encoder",
                          *common]))


def test_first_frame_is_kept_clean_and_the_rest_is_generated():
    pipe = testbed.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    try:
        video = pipe(["a red circle moving left", "a blue square moving up"], num_frames=3, height=16, width=16,
                     num_inference_steps=2, output_type="pt", first_frame=image).frames
    finally:
        hook.remove()
    torch.testing.assert_close(video[:, 0], image, atol=1e-5, rtol=0)
    assert not torch.allclose(video[:, 1], image, atol=0.05)
    # One timestep per token: 0 on the first frame's 4 x 4 tokens, the step's timestep on the others.
    assert seen[0].shape == (2, 3 * 16) and torch.all(seen[0][:, :16] == 0) and torch.all(seen[0][:, 16:] > 0)
    with pytest.raises(ValueError, match="first_frame must be a tensor of shape"):
        pipe("a red circle", num_frames=3, height=16, width=16, num_inference_steps=1, first_frame=image[:, :, :8])


def test_image_to_video_fidelity_runs_on_the_pipeline():
    pipe = testbed.build_pipeline()
    given = fidelity.fidelity(pipe, frames=2, height=16, width=16, seeds=1, steps=1, first_frame=True)
    plain = fidelity.fidelity(pipe, frames=2, height=16, width=16, seeds=1, steps=1)
    assert given.videos == len(fidelity.requests())
    assert given.present > plain.present  # random weights draw no shape; the given first frame shows it


# ---------------------------------------------------------------- text, loop conventions, loading


def _embeds(pipe, prompts):
    return testbed.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, pipe.tokenizer.model_max_length)


def test_punctuation_does_not_turn_words_into_unknowns():
    # Before, the tokenizer split on whitespace only: "left." and "circle," were <unk>, and "moving left." encoded
    # like "moving xyz", while the two-stage helpers read "left" and "circle".
    pipe = testbed.load()
    clean = _embeds(pipe, ["a red circle moving left"])
    for variant in ("a red circle moving left.", "a red circle, moving left", "A red circle -- moving LEFT!",
                    "  a red\tcircle (moving left)  "):
        assert torch.equal(_embeds(pipe, [variant]), clean), variant
    assert not torch.equal(_embeds(pipe, ["a red circle moving xyz"]), clean)
    image = torch.zeros(3, 32, 32)
    image[0, 10:14, 4:8] = 1.0
    assert testbed.room_ahead(image, "a red square, moving left.") == 6.0  # as "a red square moving left"
    assert testbed.still_prompt("a red circle, moving left.") == "a red circle"
    assert text.clean_prompt("a red circle, moving left.") == "a red circle moving left"
    # Underscores separate words too, as the docstring says: nothing failed when `_WORD` matched `\w+` (then
    # "red_circle" was one unknown word).
    assert text.prompt_words("red_circle, moving") == ["red", "circle", "moving"]
    assert text.clean_prompt("A red_circle") == "a red circle"
    # A letter with a combining accent is one (unknown) word, precomposed by NFKC or not (q + U+0301 has no single
    # code point; before, the mark split it: "aq", "b").
    assert text.prompt_words("cafe\u0301 aq\u0301b left") == ["caf\u00e9", "aq\u0301b", "left"]


def test_prompts_without_punctuation_encode_exactly_as_before():
    # The tokenizer's own path (lowercase, whitespace split), as every training prompt and the shipped weights' used.
    pipe = testbed.load()
    prompts = [c.prompt for c in _clips(12)] + ["A Blue SQUARE moving up", "a  green\ttriangle ", "", "moving xyz"]
    length = pipe.tokenizer.model_max_length
    raw = pipe.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    hidden = pipe.text_encoder(raw.input_ids, attention_mask=raw.attention_mask).last_hidden_state
    before = hidden * raw.attention_mask.unsqueeze(-1).to(hidden.dtype)
    assert torch.equal(_embeds(pipe, prompts), before)


def test_unknown_words_and_cut_prompts_are_warned_about(caplog):
    pipe = testbed.build_pipeline()
    with caplog.at_level("WARNING", logger=testbed.__name__):
        _embeds(pipe, ["a red circle moving left", "a blue square and a green triangle moving up quickly"])
    assert caplog.text == ""  # training prompts: nothing to say
    with caplog.at_level("WARNING", logger=testbed.__name__):
        _embeds(pipe, ["a magenta circle moving sideways."])
    assert "lacks ['magenta', 'sideways']" in caplog.text
    caplog.clear()
    long = " and ".join(["a purple triangle"] * 4) + " moving right quickly"  # 18 words: 15 fit before </s>
    with caplog.at_level("WARNING", logger=testbed.__name__):
        pipe(long, num_frames=1, height=16, width=16, num_inference_steps=1)
    assert "was cut to 16 tokens (15 words and </s>); this part was dropped: 'moving right quickly'" in caplog.text


def test_vocabulary_words_no_training_prompt_uses_are_warned_about(caplog):
    # Before, "a cyan circle" drew nothing cyan without a word, and the unknown-word warning offered 'cyan', 'cat',
    # ... as words the model knows. The trained words are the data's own.
    pipe = testbed.build_pipeline()
    with caplog.at_level("WARNING", logger=testbed.__name__):
        _embeds(pipe, ["a cyan circle moving left", "a pink cat"])
    assert "never trained on ['cyan']" in caplog.text and "never trained on ['cat', 'pink']" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=testbed.__name__):
        _embeds(pipe, ["a magenta circle"])
    assert f"; it knows {sorted(PROMPT_WORDS)}" in caplog.text and "'cat'" not in caplog.text


def test_the_loop_follows_wan_pipelines_interrupt_and_timestep_conventions():
    # Before, `pipe._interrupt = True` in a callback was ignored, and there was no `_current_timestep` (which
    # diffsparse's step clock reads) and no `num_timesteps`.
    pipe = testbed.build_pipeline()
    call = {"prompt": "a red circle moving left", "num_frames": 1, "height": 16, "width": 16,
            "num_inference_steps": 4}
    steps = []

    def stop(pipeline, i, t, tensors):
        steps.append(i)
        pipeline._interrupt = True
        return {}

    pipe(**call, callback_on_step_end=stop)
    assert steps == [0] and pipe.interrupt and pipe.num_timesteps == 4
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["timestep"].clone(), pipe.current_timestep)), with_kwargs=True
    )
    try:
        pipe(**call)  # a new call runs every step again
    finally:
        hook.remove()
    assert len(seen) == 8 and not pipe.interrupt  # 4 steps, CFG
    assert all(current is not None and torch.all(timestep == current) for timestep, current in seen)
    assert pipe.current_timestep is None  # after the loop, as WanPipeline leaves it


@pytest.mark.parametrize(
    "part, file, drop",
    [("text_encoder", "model.safetensors", "encoder.final_layer_norm.weight"),
     ("transformer", "diffusion_pytorch_model.safetensors", "scale_shift_table")],
)
def test_load_refuses_a_folder_with_missing_or_extra_weights(tmp_path, part, file, drop):
    # Before: a text encoder missing a weight loaded with a fresh random one in its place (a logged "newly
    # initialized" note), a transformer missing one failed with a NotImplementedError about meta tensors.
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "copy"
    shutil.copytree(testbed.WEIGHTS_PATH, folder)
    weights = load_file(folder / part / file)
    del weights[drop]
    save_file(weights, folder / part / file, metadata={"format": "pt"})
    named = re.escape(f"{folder / part} (path=") + ".*" + re.escape(f"missing ['{drop}']")
    with pytest.raises(ValueError, match=named):
        testbed.load(path=folder)
    weights = load_file(testbed.WEIGHTS_PATH / part / file)
    weights["stray.weight"] = torch.zeros(2)
    save_file(weights, folder / part / file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("missing [], unexpected ['stray.weight']")):
        testbed.load(path=folder)


def test_the_training_log_counts_tokens_with_the_configs_patch(tmp_path):
    # Before, tokens were pixels // 16 whatever the --config's patch size.
    config = json.loads(testbed.CONFIG_PATH.read_text())
    config["transformer"]["patch_size"] = [1, 4, 4]
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    train(parse_args(["--out", str(tmp_path / "run"), "--config", str(config_path), "--steps", "2", "--batch", "1",
                      "--threads", "1", "--save-every", "9", "--image-share", "0"]))
    rows = _read_log(tmp_path / "run")
    assert rows and all(
        int(r["tokens"]) == int(r["batch"]) * int(r["frames"]) * (int(r["height"]) // 8) * (int(r["width"]) // 8)
        for r in rows
    )


def test_a_run_resumes_after_the_configs_comment_is_reworded(tmp_path):
    args = ["--out", str(tmp_path), "--batch", "1", "--threads", "1", "--save-every", "9", "--image-share", "0"]
    train(parse_args([*args, "--steps", "1"]))
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    state["config"]["_comment"] = "an older wording"
    torch.save(state, tmp_path / CHECKPOINT)
    # Given again explicitly: a resume without --config takes the run's own, comparing nothing.
    resumed = parse_args([*args, "--steps", "2", "--resume", "--config", str(testbed.CONFIG_PATH)])
    assert train(resumed)["step"] == 2


def _config_with(tmp_path, **transformer) -> Path:
    config = json.loads(testbed.CONFIG_PATH.read_text())
    space_to_depth = transformer.pop("space_to_depth", None)
    config["transformer"].update(transformer)
    if space_to_depth is not None:
        config["space_to_depth"] = space_to_depth
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_a_config_with_another_space_to_depth_factor_trains_samples_and_is_scored(tmp_path):
    # 48 channels: a 4x4 space-to-depth, which the pipeline sampled, but training and prompt_sensitivity fed the
    # transformer a 2x2 one (12 channels) and failed in its first convolution.
    config = _config_with(tmp_path, in_channels=48, out_channels=48, patch_size=[1, 1, 1], space_to_depth=4)
    train(parse_args(["--out", str(tmp_path / "run"), "--config", str(config), "--steps", "2", "--batch", "1",
                      "--threads", "1", "--save-every", "9", "--image-share", "0"]))
    rows = _read_log(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert all(
        int(r["tokens"]) == int(r["batch"]) * int(r["frames"]) * (int(r["height"]) // 4) * (int(r["width"]) // 4)
        for r in rows
    )
    pipe = testbed.load(path=tmp_path / "run" / PIPELINE_DIR)
    assert pipe.space_to_depth_factor == 4
    video = testbed.sample(pipe, "a red circle moving left", frames=2, height=16, width=16, steps=1)
    assert video.shape == (1, 2, 3, 16, 16) and torch.isfinite(video).all()
    sensitivity = fidelity.prompt_sensitivity(pipe, frames=2, height=16, width=16, seeds=1, noise_levels=(0.5,))
    assert all(math.isfinite(v) for v in sensitivity.values())


@pytest.mark.parametrize(
    "transformer, match",
    [
        ({"in_channels": 13, "out_channels": 13}, "in_channels must be 3 * factor**2"),
        ({"in_channels": 48, "out_channels": 48}, "space_to_depth must be the factor in_channels=48 implies (4)"),
        ({"in_channels": 48, "out_channels": 12, "space_to_depth": 4}, "out_channels must equal in_channels (48)"),
        ({"patch_size": [1, 3, 3]}, "patch_size=[1, 3, 3] with the space-to-depth factor 2"),
    ],
)
def test_configs_training_cannot_use_are_refused_before_the_run_folder_is_made(tmp_path, transformer, match):
    config = _config_with(tmp_path, **transformer)
    with pytest.raises(ValueError, match=re.escape(match)):
        train(parse_args(["--out", str(tmp_path / "run"), "--config", str(config), "--steps", "1", "--batch", "1",
                          "--threads", "1", "--image-share", "0"]))
    assert not (tmp_path / "run").exists()
