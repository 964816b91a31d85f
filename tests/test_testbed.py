"""The testbed model's data, training script and sampling (fast: tiny runs, small canvases)."""

import csv
import math

import numpy as np
import pytest
import torch

import diffsparse
from diffsparse import testbed  # module access: pytest would collect `Test*`/`test*` names imported here
from diffsparse.testbed.data import (
    COLOURS,
    DIRECTIONS,
    PROMPT_WORDS,
    TRAIN_BUCKETS,
    make_batch,
    random_clip,
    render,
)
from diffsparse.testbed.train import CHECKPOINT, LOSS_LOG, PIPELINE_DIR, parse_args, train


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
    common = ["--batch", "1", "--save-every", "2", "--threads", "1"]
    first = train(parse_args(["--out", str(base / "run"), "--steps", "3", *common]))
    first_log = _read_log(base / "run")
    resumed = train(parse_args(["--out", str(base / "run"), "--steps", "5", "--resume", *common]))
    straight = train(parse_args(["--out", str(base / "straight"), "--steps", "5", *common]))
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
    assert [int(r["step"]) for r in resumed_log] == [1, 2, 3, 4, 5]
    # Batches, noise and timesteps depend only on (seed, step): the resumed run is the same run.
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]
    state = torch.load(trained["base"] / "run" / CHECKPOINT, map_location="cpu", weights_only=False)
    assert state["step"] == 5 and state["optimizer"]["state"]


def test_training_refuses_to_overwrite_a_run_without_resume(trained):
    with pytest.raises(SystemExit, match="--resume"):
        train(parse_args(["--out", str(trained["base"] / "run"), "--steps", "6"]))


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--batch", "0"])
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


def test_diffsparse_applies_to_the_testbed_pipeline():
    pipe = testbed.build_pipeline()
    call = {"prompt": "a red circle moving left", "num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 3}
    reference = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1)):
        sparse = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").frames
        stats = diffsparse.stats(pipe)
    assert sparse.shape == reference.shape and torch.isfinite(sparse).all()
    assert all(s.dense_calls == 2 and s.sparse_calls == 4 for s in stats.layers)  # 1 dense + 2 sparse steps, CFG
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").frames, reference)
