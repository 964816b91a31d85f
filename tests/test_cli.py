"""The `diffsparse` command on tiny inputs: every subcommand runs and writes what it says."""

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffsparse.cli import build_parser, main, pattern_line

from helpers import tiny_call


def test_compare_writes_video_and_json(tmp_path, capsys):
    import imageio.v3 as iio

    args = ["compare", "--steps", "2", "--frames", "5", "--height", "32", "--width", "48", "--block-size", "16"]
    assert main([*args, "--dense-steps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert (tmp_path / "compare.mp4").stat().st_size > 0
    assert iio.immeta(tmp_path / "compare.mp4")["fps"] == 8
    # Each video alone too, unlabelled at its own size (the side-by-side scales small frames up and labels them).
    for name in ("dense", "sparse"):
        assert result[f"{name}_path"] == str(tmp_path / f"{name}.mp4")
        assert iio.imread(tmp_path / f"{name}.mp4").shape == (5, 32, 48, 3)
    assert result["steps"] == 2 and 0 < result["mean_attention_density"] < 1
    assert result["model"].startswith("embedded testbed")  # the trained default of `make run`
    assert result["psnr_db"] > 0 and -1 <= result["ssim"] <= 1
    out = capsys.readouterr().out
    assert "PSNR" in out and "pattern: radial(decay=1.0, min_window=64, sink=False)\n" in out  # defaults spelled out
    assert main([*args, "--dense-steps", "1", "--fps", "16", "--out", str(tmp_path / "wan_rate")]) == 0
    # Each video alone plays at the rate asked too, not compare.mp4 alone.
    for name in ("compare", "dense", "sparse"):
        assert iio.immeta(tmp_path / "wan_rate" / f"{name}.mp4")["fps"] == 16, name
    # What the run was called with, to repeat it.
    assert (result["prompt"], result["image"], result["call_kwargs"], result["vae_tiling"]) == (
        "a red circle moving left", None, None, False)


def test_the_pattern_line_says_what_the_density_does_to_the_pattern():
    import diffsparse

    assert pattern_line(diffsparse.SparseConfig(pattern="radial")) == (
        "pattern: radial(decay=1.0, min_window=64, sink=False)")
    # Searched patterns spend the density as their budget, set once: not a parameter solved per layout.
    assert pattern_line(diffsparse.SparseConfig(pattern="searched", density=0.25)) == (
        "pattern: searched(keep=0.25, criterion='greedy', budget='layer'), its keep set to the density 0.25 (the "
        "search's block budget)")
    assert pattern_line(diffsparse.SparseConfig(pattern="searched_windows", density=0.3)).endswith(
        ", its keep set to the density 0.3 (the search's block budget)")
    assert pattern_line(diffsparse.SparseConfig(pattern="window3d", density=0.3)).endswith(
        ", its main parameter solved for density 0.3 per layout")
    # A data-dependent pattern that is not searched: its frames and width are solved, not a keep set.
    assert pattern_line(diffsparse.SparseConfig(pattern="spatial_temporal", density=0.3)).endswith(
        ", its main parameter solved for density 0.3 per layout")
    assert pattern_line(diffsparse.SparseConfig(pattern="dense", density=0.3)) == (
        "pattern: dense() (every block kept: the density 0.3 changes nothing)")


def test_an_image_to_video_compare_records_the_image_it_was_given(tmp_path, monkeypatch):
    # compare.json's `image` was checked only as None: a run from an image did not have to say which.
    from diffsparse import compare

    from helpers import tiny_image_to_video_pipeline

    folder = tmp_path / "i2v"  # the class read before loading: an image-to-video pipeline, which takes --image
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline"}')
    pipe = tiny_image_to_video_pipeline("wan22")
    monkeypatch.setattr(compare, "load_pipeline", lambda *args, **kwargs: pipe)
    image = tmp_path / "first.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(image)
    assert main(["compare", "--model", str(folder), "--image", str(image), "--steps", "2", "--frames", "5",
                 "--height", "32", "--width", "48", "--block-size", "16", "--dense-steps", "1",
                 "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert (result["model"], result["image"]) == (str(folder), str(image))


def test_two_stage_compare_starts_both_videos_from_one_still_and_scores_the_generated_frames(tmp_path, capsys,
                                                                                             monkeypatch):
    from diffsparse import compare

    scored = []  # the frame counts each metric was given, sparse and dense

    def recording(metric):
        def record(sparse_frames, dense, **kwargs):
            scored.append((metric.__name__, len(sparse_frames), len(dense)))
            return metric(sparse_frames, dense, **kwargs)
        return record

    for name in ("psnr", "ssim", "lpips"):
        monkeypatch.setattr(compare, name, recording(getattr(compare, name)))
    # LPIPS too where the metrics extra is installed, from random AlexNet weights the test writes: scored only with
    # weights in the torch hub cache before, so a frame 0 reaching LPIPS went unnoticed.
    lpips_weights = []
    if all(importlib.util.find_spec(name) for name in ("lpips", "torchvision")):
        import torchvision

        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet.pth")
        lpips_weights = ["--lpips-weights", str(tmp_path / "alexnet.pth")]
    args = ["compare", "--steps", "2", "--frames", "5", "--height", "32", "--width", "32", "--block-size", "16",
            "--dense-steps", "0", "--two-stage", "--still-candidates", "2", *lpips_weights, "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["sampler"] == "two-stage, best of 2 stills"
    # Frame 0 is the shared still in both videos, so an unscored frame 0 cannot inflate PSNR to infinity.
    assert 0 < result["psnr_db"] < float("inf")
    # ... and every metric is given the 4 generated frames alone (the PSNR bound above held with frame 0 scored too).
    assert {name for name, _, _ in scored} >= {"psnr", "ssim", *(["lpips"] if lpips_weights else [])}
    assert (result["lpips"] is not None) == bool(lpips_weights)
    assert {(sparse_frames, dense) for _, sparse_frames, dense in scored} == {(4, 4)}
    assert "frame 0 is the shared still" in capsys.readouterr().out


def test_compare_s_sparse_warm_up_runs_sparse_whatever_the_dense_steps(tmp_path, monkeypatch):
    # The untimed sparse warm-up is one step: run under the config as given, dense steps covering that step left it
    # dense, and the sparse path's one-time costs (kernel, plans) fell into the timed run.
    from diffsparse import compare

    sparse_calls = []  # per `sparse` block of the run, in order: the sparse calls it ran

    @contextlib.contextmanager
    def counting(pipe, config):
        with real_sparse(pipe, config) as handle:
            yield handle
            sparse_calls.append(sum(layer.sparse_calls for layer in handle.stats(since_apply=True).layers))

    real_sparse = compare.sparse
    monkeypatch.setattr(compare, "sparse", counting)
    assert main(["compare", "--steps", "2", "--frames", "5", "--height", "32", "--width", "32", "--block-size", "16",
                 "--pattern", "window3d", "--density", "0.3", "--dense-steps", "1", "--out", str(tmp_path)]) == 0
    # `check_config_fits` (applied and removed, nothing run), the warm-up, the timed sparse run.
    assert len(sparse_calls) == 3 and sparse_calls[0] == 0, sparse_calls
    assert sparse_calls[1] > 0, f"the warm-up ran no sparse call: {sparse_calls}"
    assert sparse_calls[2] > 0


def test_mp4s_of_odd_sides_are_cropped_to_even_ones_that_read_back(tmp_path):
    # yuv420p needs even sides: with the width left odd the mp4 could not be written or read back.
    import imageio.v3 as iio

    from diffsparse.compare import write_frames

    frames = np.random.default_rng(0).random((3, 33, 35, 3))
    path = write_frames(tmp_path / "odd", frames)
    assert path == tmp_path / "odd.mp4"
    assert iio.imread(path).shape == (3, 32, 34, 3)


def test_compare_video_starts_from_the_still_it_was_given(tiny_pipe, tmp_path):
    import imageio.v3 as iio

    from diffsparse.compare import run_compare
    from diffsparse.config import SparseConfig
    from diffsparse.pipelines import testbed

    args = argparse.Namespace(model=None, prompt="a red circle moving left", steps=2, frames=5, height=32, width=32,
                              seed=0, device="cpu", out=str(tmp_path), two_stage=True, still_candidates=1)
    config = SparseConfig(pattern="radial", block_size=16, dense_steps=0)
    with pytest.raises(ValueError, match="two_stage needs the testbed pipeline .* loads WanPipeline"):
        run_compare(args, config, pipe=tiny_pipe)
    pipe = testbed.load()
    still = testbed.best_still(pipe, [args.prompt], 32, 32, steps=2, seed=0)
    run_compare(args, config, pipe=pipe)
    first = iio.imread(tmp_path / "compare.mp4", index=0).astype(float) / 255
    # Both halves of the side-by-side frame 0 show the still (nearest-upscaled 8x, through lossy H.264): measured
    # 0.004 mean error each, against 0.054 for a sparse clip sampled without the still.
    expected = still[0].permute(1, 2, 0).repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
    assert abs(first[20:256, :256] - expected[20:]).mean() < 0.01  # rows below the text label
    assert abs(first[20:256, 256:512] - expected[20:]).mean() < 0.01


def test_compare_on_a_pipeline_with_diffsparse_applied_compares_against_its_own_attention(tiny_pipe, tmp_path,
                                                                                         monkeypatch):
    # Before, the warm-up and "dense" runs went through the caller's sparse processors: sparse against sparse.
    import diffsparse
    from diffsparse import compare
    from diffsparse.config import SparseConfig

    generated = []
    real_generate = compare._generate

    def spy(*args, **kwargs):
        frames, *seconds = real_generate(*args, **kwargs)
        generated.append(frames)  # warm-up dense, warm-up sparse, dense, sparse
        return (frames, *seconds)

    monkeypatch.setattr(compare, "_generate", spy)
    args = argparse.Namespace(model=None, prompt="a red circle moving left", steps=2, frames=17, height=64, width=96,
                              seed=0, device="cpu", out=str(tmp_path), two_stage=False, still_candidates=1)
    config = SparseConfig(pattern="window3d", density=0.5, block_size=16, dense_steps=0)
    plain = compare.run_compare(args, config, pipe=tiny_pipe)
    plain_dense, generated[:] = generated[2], []
    handle = diffsparse.apply(tiny_pipe, SparseConfig(pattern="window3d", density=0.3, block_size=16, dense_steps=0))
    result = compare.run_compare(args, config, pipe=tiny_pipe)
    assert np.array_equal(generated[2], plain_dense) and result.psnr_db == plain.psnr_db
    # The caller's sparse attention is back afterwards, and it runs.
    assert tiny_pipe.transformer._diffsparse_handle is handle and handle.installed
    tiny_pipe(**tiny_call(num_inference_steps=2))
    assert handle.stats().sparse_density < 1
    diffsparse.remove(tiny_pipe)
    # A pipeline given without `model=` is named by what it is, not as the embedded testbed.
    assert plain.model == "WanPipeline"


def test_compare_into_an_earlier_runs_folder_leaves_no_file_of_the_other_format(tmp_path, capsys):
    # Before, one frame then three left compare.png, dense.png and sparse.png beside the new mp4s (and back).
    args = ["compare", "--steps", "1", "--height", "16", "--width", "16", "--block-size", "16", "--out", str(tmp_path)]
    written, said = {}, {}
    for frames in ("1", "3", "1"):
        assert main([*args, "--frames", frames]) == 0
        written[frames] = sorted(p.name for p in tmp_path.iterdir())
        said[frames] = capsys.readouterr().out
    assert written["1"] == ["compare.json", "compare.mp4", "compare.png", "dense.png", "sparse.png"]
    assert written["3"] == ["compare.json", "compare.mp4", "dense.mp4", "sparse.mp4"]
    # The printout names what was written: before, one frame's compare.png was left out of it.
    names = {frames: [name for name in written[frames] if name != "compare.json"] for frames in written}
    for frames, (first, *others) in (("1", ("compare.mp4", "compare.png", "dense.png", "sparse.png")),
                                      ("3", ("compare.mp4", "dense.mp4", "sparse.mp4"))):
        assert sorted([first, *others]) == names[frames]
        paths = ", ".join(str(tmp_path / name) for name in (first, *others))
        assert f"wrote {paths} and {tmp_path / 'compare.json'}\n" in said[frames]


def test_the_sampler_says_that_call_kwargs_do_not_reach_the_two_stage_stills():
    from diffsparse.compare import sampler_label

    args = argparse.Namespace(two_stage=True, still_candidates=4, call_kwargs={"guidance_scale": 5.0})
    assert sampler_label(args) == "two-stage, best of 4 stills; --call-kwargs reach the clips, not the stills"
    assert sampler_label(argparse.Namespace(two_stage=True, still_candidates=4)) == "two-stage, best of 4 stills"
    assert sampler_label(argparse.Namespace(two_stage=False, call_kwargs={"guidance_scale": 5.0})) == "one pass"


def test_two_stage_needs_the_testbed_and_still_candidates_needs_two_stage(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--still-candidates", "3", "--steps", "1"])
    assert "still_candidates=3 chooses among two-stage stills" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--two-stage", "--steps", "1", "--frames", "1"])
    assert "frames must be >= 2, got frames=1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["compare", "--steps", "0"], ["eval", "--seeds", "0"], ["compare", "--block-size", "-64"],
    ["bench", "attention", "--seq", "0"], ["masks", "--frames", "0"], ["bench", "permute", "--tile", "1,0,16"],
])
def test_counts_and_sizes_below_their_bound_are_usage_errors(argv, capsys):
    # Before, `--steps 0` crashed with an IndexError after loading the model, and other counts ran empty.
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least 1, got " in err and "Traceback" not in err


def test_an_image_over_pil_s_decompression_bomb_limit_is_a_value_error(tmp_path, monkeypatch):
    # PIL's DecompressionBombError is no OSError: it escaped the check as a traceback.
    from diffsparse.compare import check_image

    large = tmp_path / "large.png"
    PIL.Image.new("RGB", (64, 64)).save(large)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # lowered from 179 megapixels: 4,096 is over twice it
    with pytest.raises(ValueError, match=f"image='{re.escape(str(large))}': too large for PIL"):
        check_image(str(large))


def test_a_device_type_torch_names_no_backend_for_is_checked_by_placing_a_tensor(monkeypatch):
    # torch_xla registers "xla" without a `torch.xla` to ask (habana "hpu" likewise): such a type is taken where torch
    # can place a tensor on it (the torch-ops path runs on any device), refused by name where it cannot ("hip" ended
    # in torch's traceback after the tensors were made); "meta" places tensors but computes nothing.
    from diffsparse import devices

    for device in ("hip", "xla:0", "privateuseone"):  # the last: torch's ModuleNotFoundError, a traceback before
        with pytest.raises(ValueError, match=f"device='{device}': torch cannot place tensors on it here"):
            devices.device_here(device)
    with pytest.raises(ValueError, match="a meta tensor holds no values"):
        devices.device_here("meta")
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *size, device=None, **kw: empty(*size, **kw))  # as if registered
    assert devices.device_here("xla:0") == torch.device("xla:0")


def test_settings_found_wrong_only_late_are_usage_errors_before_the_work(tmp_path, capsys, monkeypatch):
    # Each ended in a traceback, some after the model loaded or both videos were generated, or ran on silently.
    from diffsparse import compare

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model before refusing the setting")

    monkeypatch.setattr(compare, "load_pipeline", no_loading)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    wan = tmp_path / "wan"  # a checkpoint folder as far as its model_index.json: the class is read, nothing loaded
    wan.mkdir()
    (wan / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    image_to_video = tmp_path / "i2v"
    image_to_video.mkdir()
    (image_to_video / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline"}')
    an_image = tmp_path / "an_image.png"
    PIL.Image.new("RGB", (16, 16)).save(an_image)
    not_image = tmp_path / "not_image.png"
    not_image.write_text("hello")
    nowhere = tmp_path / "nowhere.png"
    truncated = tmp_path / "truncated.jpg"  # a header PIL opens, pixels it cannot decode (a half-written download)
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for argv, message in (
        (["compare", "--device", "gpu"], "device='gpu': not a torch device"),
        # --image was opened only at the first generation, after loading: FileNotFoundError and PIL's
        # UnidentifiedImageError or IsADirectoryError as tracebacks.
        (["compare", "--image", str(nowhere)], f"image='{nowhere}': no such file"),
        (["compare", "--image", str(not_image)], f"image='{not_image}': not an image file PIL can read"),
        (["compare", "--image", str(tmp_path)], f"image='{tmp_path}': a directory, not an image file"),
        (["eval", "--image", str(nowhere)], f"image='{nowhere}': no such file"),
        (["eval", "--image", str(not_image)], f"image='{not_image}': not an image file PIL can read"),
        (["eval", "--image", str(tmp_path)], f"image='{tmp_path}': a directory, not an image file"),
        (["compare", "--image", str(truncated)], f"image='{truncated}': not an image file PIL can read"),
        (["trace", "--image", str(not_image)], f"image='{not_image}': not an image file PIL can read"),
        (["bench", "pipeline", "--image", str(nowhere)], f"image='{nowhere}': no such file"),
        # --image given to a pipeline that takes none, or missing for one that needs it, was said by the first
        # generation's call: after loading the checkpoint, and with --two-stage after sampling the stills.
        (["compare", "--model", str(wan), "--image", str(an_image)],
         f"image='{an_image}': WanPipeline takes no `image` (it is not an image-to-video or editing pipeline)"),
        (["compare", "--model", str(image_to_video)],
         "WanImageToVideoPipeline generates from an image: give one with --image PATH"),
        (["compare", "--two-stage", "--image", str(an_image)], "TestbedPipeline takes no `image`"),
        (["eval", "--model", str(image_to_video)], "WanImageToVideoPipeline generates from an image"),
        (["trace", "--model", str(wan), "--image", str(an_image)], "WanPipeline takes no `image`"),
        (["bench", "pipeline", "--model", str(image_to_video)], "WanImageToVideoPipeline generates from an image"),
        # A key the pipeline does not take was said only once the pipeline had loaded (a 14B checkpoint: minutes).
        (["compare", "--call-kwargs", '{"guidance_scal": 2}'],
         "'guidance_scal', which TestbedPipeline does not take; it takes "),
        (["compare", "--model", str(wan), "--call-kwargs", '{"guidance_scal": 2}'],
         "which WanPipeline does not take; it takes "),
        (["eval", "--model", str(wan), "--call-kwargs", '{"guidance_scal": 2}'], "(did you mean 'guidance_scale'?)"),
        (["trace", "--call-kwargs", '{"negative_promt": ""}'], "(did you mean 'negative_prompt'?)"),
        (["bench", "pipeline", "--call-kwargs", '{"guidance_scal": 2}'], "which TestbedPipeline does not take"),
        (["bench", "attention", "--device", "gpu"], "device='gpu': not a torch device"),
        # Meta tensors hold no data: it got past the check (torch has no `torch.meta` to ask) and ended in a
        # traceback after the tensors were made, or after the model had loaded.
        (["bench", "attention", "--device", "meta"], "device='meta': a meta tensor holds no values to compute with"),
        (["compare", "--device", "meta"], "device='meta': a meta tensor holds no values"),
        (["compare", "--out", str(a_file)], f"out='{a_file}': cannot be used as the output folder"),
        (["eval", "--out", str(a_file / "sub")], "cannot be used as the output folder"),
        (["compare", "--tile", "2,8"], "a tile is t,h,w (three positive integers) or one for a cube, got '2,8'"),
        (["masks", "--tile", "2,8,8,4"], "a tile is t,h,w"),
        (["bench", "attention", "--density", "nan,2"], "expected comma-separated block densities in (0, 1]"),
        (["eval", "--pattern", "nosuch"], "pattern must be one of"),  # checked before the model loads
        (["compare", "--seed", str(2**64)], "argument --seed: must fit in 64 bits"),  # was torch's "Overflow"
        # The stills take seeds seed .. seed + still_candidates - 1 (eval: from each of its seeds): was torch's
        # "Overflow" after loading.
        (["compare", "--two-stage", "--still-candidates", "2", "--seed", str(2**64 - 1)],
         f"seed={2**64 - 1}, seeds=1, still_candidates=2: the run samples with seeds {2**64 - 1} .. {2**64}"),
        (["eval", "--two-stage", "--still-candidates", "2", "--seeds", "2", "--seed", str(2**64 - 2)],
         f"seeds=2, still_candidates=2: the run samples with seeds {2**64 - 2} .. {2**64} (seed + seeds - 1 + "),
        (["compare", "--model", "someone/a-video-model", "--two-stage"], "two_stage needs the testbed pipeline"),
        # A batch was cut to its first video, unsaid; the rest ended in tracebacks after loading.
        (["compare", "--call-kwargs", '{"num_videos_per_prompt": 2}'],
         "sets num_videos_per_prompt=2: the commands generate and score one video per call"),
        (["compare", "--call-kwargs", '{"num_images_per_prompt": 3}'], "sets num_images_per_prompt=3"),
        (["compare", "--call-kwargs", '{"return_dict": false}'], "'return_dict', which the command sets itself"),
        (["compare", "--call-kwargs", '{"callback_on_step_end": null}'], "'callback_on_step_end', which the command"),
        (["compare", "--call-kwargs", '{"callback_on_step_end_tensor_inputs": ["latents"]}'],
         "'callback_on_step_end_tensor_inputs', which the command sets itself"),
        (["trace", "--call-kwargs", '{"output_type": "pt"}'], "'output_type', which the command sets itself"),
        (["eval", "--call-kwargs", '{"num_videos_per_prompt": 2}'], "sets num_videos_per_prompt=2"),
        (["bench", "pipeline", "--call-kwargs", '{"return_dict": false}'], "'return_dict', which the command"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["compare", "--device", "cuda"])
        assert "device='cuda': this machine has no cuda device" in capsys.readouterr().err
    # Spaces after the commas, as the other lists take them.
    assert build_parser().parse_args(["eval", "--correction", "none, residual"]).correction == [None, "residual"]
    # CPU devices by index load in float32 as "cpu" does.
    monkeypatch.undo()
    assert compare.weights_dtype(compare.load_pipeline(None, "cpu:0")) == "fp32"
    # bfloat16 on other devices (meta: no accelerator needed, nothing computed).
    assert compare.weights_dtype(compare.load_pipeline(None, "meta")) == "bf16"


def test_bench_and_masks_settings_are_refused_before_the_work(capsys, monkeypatch):
    # Each was refused (or not at all) only after the tensors were made or the pattern solved, or after the demo's
    # model had loaded.
    from diffsparse.patterns import Pattern

    def no_work(*args, **kwargs):
        raise AssertionError("did the work before refusing the setting")

    monkeypatch.setattr(torch, "randn", no_work)
    monkeypatch.setattr(Pattern, "at_density", no_work)
    step_count = "expected a step count (a whole number >= 0) or a fraction of the steps in [0, 1), got "
    per_head = "window3d(window=[(1, 2, 2), (2, 4, 4)])"
    for argv, message in (
        (["bench", "attention", "--seq", "75600", "--mask", "radial"],
         "--seq must be a multiple of 1024 (e.g. 74752 or 75776), got seq=75600"),
        (["bench", "attention", "--mask", "nosuch"], "--mask 'nosuch': random, or a pattern; pattern must be one of"),
        # Unfitted, spatial_temporal is the union of its masks: its rows ran at density 1.0 whatever the target.
        (["bench", "attention", "--mask", "spatial_temporal"], "--mask 'spatial_temporal': must be random or a static"),
        (["bench", "attention", "--mask", "dense"], "--mask 'dense': must be random or a static"),
        # Refused by the warm-up call, after the tensors, the plans and a dense call, as bench causal's were.
        (["bench", "attention", "--backend", "nosuch"], "--backend 'nosuch': backend must be 'auto' or one of"),
        (["bench", "permute", "--backend", "nosuch"], "--backend 'nosuch': backend must be 'auto' or one of"),
        (["bench", "attention", "--backend", "triton", "--device", "cpu"],
         "--backend 'triton': backend='triton' was requested but cannot run"),
        (["bench", "permute", "--backend", "triton", "--device", "cpu"], "--backend 'triton': backend='triton'"),
        # One group of every frame is no causal mask: its "masked" SDPA was unmasked.
        (["bench", "causal", "--causal-frames", "8"],
         "--causal-frames 8 with --frames 8: a causal mask needs at least two groups of frames"),
        (["masks", "--pattern", per_head, "--head", "2", "--density", "0.3"],
         "--head 2: window3d(window=((1, 2, 2), (2, 4, 4))) gives 2 per-head masks, so --head must be in 0 .. 1"),
        # A shared mask drew head 0 for any head asked, unsaid.
        (["masks", "--frames", "2", "--height", "8", "--width", "8", "--block-size", "16", "--head", "5"],
         "--head 5: radial(decay=1.0, min_window=64, sink=False) gives one mask, shared by every head"),
        (["masks", "--head", "1"], "--head 1: radial(decay=1.0, min_window=64, sink=False) gives one mask, shared"),
        # Unclassified, spatial_temporal is the union of its kinds' masks, which no call runs: it was drawn and
        # "solved" (far off the target) without a word. The searched ones have no mask before their search.
        (["masks", "--pattern", "spatial_temporal", "--density", "0.3"],
         "diffsparse masks: error: --pattern 'spatial_temporal': must be a static pattern (e.g. radial, window3d)"),
        (["masks", "--pattern", "searched", "--density", "0.3"],
         "diffsparse masks: error: --pattern 'searched': must be a static pattern"),
        (["masks", "--pattern", "searched_windows(keep=0.3)"],
         "diffsparse masks: error: --pattern 'searched_windows(keep=0.3)': must be a static pattern"),
        (["demo", "--port", "65536"], "argument --port: must be a port number in 1 .. 65535, got 65536"),
        (["compare", "--dense-steps", "abc"], f"argument --dense-steps: {step_count}'abc'"),
        (["trace", "--dense-last-steps", "nan"], f"argument --dense-last-steps: {step_count}'nan'"),
        (["bench", "pipeline", "--dense-steps", "inf"], f"argument --dense-steps: {step_count}'inf'"),
        (["eval", "--dense-steps", "0,1.5"], f"argument --dense-steps: {step_count}'1.5'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
    # The plot's own check: a head past the last was drawn as the last, unsaid; a shared mask is every head's.
    monkeypatch.undo()
    from diffsparse.patterns import VideoLayout, get_pattern

    layout = VideoLayout(2, 4, 4)
    with pytest.raises(ValueError, match=r"gives 2 per-head masks, so head must be < 2\), got head=2"):
        get_pattern(per_head).render(layout, 16, "unused.png", head=2)
    with pytest.raises(ValueError, match=r"head must be an int >= 0 .*got head=-1"):
        get_pattern("radial").render(layout, 16, "unused.png", head=-1)


def test_a_bench_subcommands_parse_errors_and_later_errors_share_one_prefix(capsys):
    # argparse said `diffsparse bench attention: error:`, diffsparse's own checks `diffsparse bench: error:`.
    for argv in (["bench", "attention", "--seq", "0"], ["bench", "attention", "--mask", "nosuch"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        last = capsys.readouterr().err.splitlines()[-1]
        assert exit_info.value.code == 2 and last.startswith("diffsparse bench attention: error: "), (argv, last)


def test_a_model_that_cannot_load_is_a_usage_error_that_says_why(tmp_path, capsys):
    # Offline (conftest sets HF_HUB_OFFLINE) a hub id outside the cache, and a folder without model_index.json.
    for model in ("diffsparse-tests/not-cached", str(tmp_path)):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", "--model", model, "--steps", "1"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"--model {model}: cannot load it as a diffusers pipeline" in err and "Traceback" not in err
    assert "HF_HUB_OFFLINE is set" in err
    # A folder that does not exist, and cannot be a hub id (before: only how hub ids are spelled).
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit):
        main(["compare", "--model", missing, "--steps", "1"])
    assert f"--model {missing}: no such folder, and not a hub id either" in capsys.readouterr().err


def test_compare_loads_a_modular_pipeline(tiny_pipe, tmp_path):
    # A folder with a modular_model_index.json and no model_index.json (how FLUX.3 and Cosmos 3 ship): loaded as a
    # ModularPipeline with its components and called through its blocks; here diffusers' modular Wan on the tiny
    # pipeline's components (the guider is the blocks' default, CFG in two calls).
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanBlocks

    from diffsparse.compare import ModularCall, generation_kwargs, load_pipeline

    modular = WanBlocks().init_pipeline()
    modular.update_components(**{name: getattr(tiny_pipe, name)
                                 for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")})
    folder = tmp_path / "modular"
    modular.save_pretrained(str(folder), overwrite_modular_index=True)
    assert not (folder / "model_index.json").exists()
    pipe = load_pipeline(str(folder), "cpu")
    assert isinstance(pipe, ModularCall)
    # Its blocks' inputs are the call's parameters, and messages name the modular pipeline.
    call = argparse.Namespace(image=None, frames=9, height=64, width=96, steps=3, call_kwargs={"guidance_scale": 5.0})
    with pytest.raises(ValueError, match="'guidance_scale', which WanModularPipeline does not take"):
        generation_kwargs(pipe, call, "a red circle", 0)
    args = ["compare", "--model", str(folder), "--frames", "9", "--height", "64", "--width", "96", "--steps", "3",
            "--pattern", "window3d", "--density", "0.5", "--block-size", "16", "--dense-steps", "1"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["model"] == str(folder) and result["frames"] == 9
    assert 0 < result["mean_attention_density"] < 1 and result["psnr_db"] > 0
    with pytest.raises(ValueError, match="offload='model': modular pipelines have no enable_model_cpu_offload"):
        load_pipeline(str(folder), "cpu", offload="model")


def test_compare_with_model_offload_or_another_dtype_says_so(tmp_path, capsys):
    # `--offload model` (diffusers' enable_model_cpu_offload; the CPU as the "accelerator" here: the hooks' wiring
    # runs, not a move between devices) gives the videos of a pipeline on the device; each result names the dtype
    # and the offloading it ran with.
    from diffsparse.bench import DTYPES
    from diffsparse.cli import DTYPE_NAMES
    from diffsparse.cli import OFFLOADS as OFFLOAD_NAMES
    from diffsparse.compare import OFFLOADS, load_pipeline, offload_mode

    assert OFFLOAD_NAMES == OFFLOADS and DTYPE_NAMES == tuple(DTYPES)
    args = ["compare", "--steps", "2", "--frames", "5", "--height", "32", "--width", "32", "--block-size", "16",
            "--dense-steps", "1", "--pattern", "window3d", "--density", "0.3"]
    results = {}
    for name, extra in {"plain": [], "offload": ["--offload", "model"], "bf16": ["--dtype", "bf16"]}.items():
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        results[name] = json.loads((tmp_path / name / "compare.json").read_text())
        printed = capsys.readouterr().out.splitlines()
        results[name]["printed"] = next(line for line in printed if line.startswith("video:"))
    assert (results["plain"]["dtype"], results["plain"]["offload"]) == ("fp32", "none")
    assert (results["offload"]["dtype"], results["offload"]["offload"]) == ("fp32", "model")
    assert (results["bf16"]["dtype"], results["bf16"]["offload"]) == ("bf16", "none")
    assert ", cpu, fp32, one pass" in results["plain"]["printed"]
    assert ", cpu, fp32, model offload, one pass" in results["offload"]["printed"]
    # The same videos up to float rounding (accelerate's hooks change where tensors are allocated).
    assert results["offload"]["psnr_db"] == pytest.approx(results["plain"]["psnr_db"], abs=1e-3)
    assert results["offload"]["ssim"] == pytest.approx(results["plain"]["ssim"], abs=1e-5)
    assert results["bf16"]["psnr_db"] != results["plain"]["psnr_db"]  # the weights did change dtype
    with pytest.raises(ValueError, match="'sequential' offloads to the CPU from an accelerator; got device='cpu'"):
        load_pipeline(None, "cpu", offload="sequential")
    with pytest.raises(ValueError, match=r"offload must be one of \('none', 'model', 'sequential'\), got offload="):
        load_pipeline(None, "cpu", offload="disk")
    with pytest.raises(SystemExit):
        main([*args, "--offload", "disk"])
    assert "invalid choice: 'disk'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="vae_tiling=True: TestbedPipeline has no VAE that tiles"):
        load_pipeline(None, "cpu", vae_tiling=True)  # it samples in pixel space
    # What enable_sequential_cpu_offload puts on the transformer (accelerate's cpu_offload) reads as "sequential".
    from accelerate import cpu_offload

    from diffsparse.pipelines import testbed

    pipe = testbed.load()
    assert offload_mode(pipe) == "none"
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"), offload_buffers=True)
    assert offload_mode(pipe) == "sequential"


def test_timed_runs_wait_for_the_gpu_before_reading_the_clock(tmp_path, monkeypatch):
    # CUDA kernels run asynchronously: a clock read at a step's end, or after a timed attention call, must come
    # after a synchronisation, else it times the launches. The function waits for every device; compare's step ends
    # and run ends and eval's attention timer call it.
    from diffsparse import compare, evaluate

    synced = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    compare.synchronize_accelerators()
    assert synced == [0, 1]
    monkeypatch.undo()

    calls = []
    monkeypatch.setattr(compare, "synchronize_accelerators", lambda: calls.append("compare"))
    monkeypatch.setattr(evaluate, "synchronize_accelerators", lambda: calls.append("eval"))
    args = ["--steps", "3", "--frames", "5", "--height", "32", "--width", "32", "--block-size", "16",
            "--dense-steps", "1"]
    assert main(["compare", *args, "--out", str(tmp_path)]) == 0
    # Before and after each run and at each of its steps' ends: two one-step warm-ups, then dense and sparse runs of
    # three steps.
    assert calls == ["compare"] * (2 * (2 + 1) + 2 * (2 + 3))
    calls.clear()
    assert main(["eval", *args, "--pattern", "window3d", "--density", "0.5", "--prompts", "1",
                 "--out", str(tmp_path)]) == 0
    # Every timed attention call is closed by a synchronisation (two per call), and every run (two each).
    assert calls.count("eval") > 2 * 3 * 2 * 2 and calls.count("compare") == 0


def test_compare_reports_dense_over_sparse_times_and_both_densities(tmp_path, capsys, monkeypatch):
    # Scripted clocks, so that a number computed the wrong way round shows (an inverted speedup, the end-to-end
    # time read as the denoising time, the sparse steps' density as the mean): each clock reading of the dense run
    # advances 2 s, of the sparse run 0.5 s, and the sparse run's decode 1.5 s more. Dense: 4 s to its second and
    # last step's end, 6 s end to end; sparse: 1 s and 3 s.
    import warnings
    from types import SimpleNamespace

    from diffsparse import compare
    from diffsparse.pipelines.wan import WanSparseAttnProcessor

    inside = _diffsparse_module()
    loaded, now = [], [0.0]
    load = compare.load_pipeline_for
    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: loaded.append(load(args)) or loaded[0])

    def sparse_applied() -> bool:
        return isinstance(loaded[0].transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)

    def clock() -> float:
        now[0] += 0.5 if sparse_applied() else 2.0
        return now[0]

    def first_output(output):  # between the last step and the end of the run: the decode's share
        now[0] += 1.5 if sparse_applied() else 0.0
        inside.warn("a warning of diffsparse's code, its text not prefixed")
        warnings.warn("diffsparse: a text that is not diffsparse's warning")
        return first(output)

    first = compare.first_output
    monkeypatch.setattr(compare, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(compare, "first_output", first_output)
    args = ["compare", "--steps", "2", "--frames", "5", "--height", "32", "--width", "48", "--block-size", "16",
            "--dense-steps", "1", "--density", "0.5", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert (result["dense_seconds"], result["sparse_seconds"]) == (6.0, 3.0)
    assert (result["dense_denoise_seconds"], result["sparse_denoise_seconds"]) == (4.0, 1.0)
    assert (result["speedup"], result["denoise_speedup"]) == (2.0, 4.0)  # dense over sparse
    out = capsys.readouterr().out
    assert "\nspeedup 2.00x end-to-end, 4.00x text encoding + denoising\n" in out
    assert "dense      6.00 s end-to-end,     4.00 s text encoding + denoising\n" in out
    # Step 0 dense (its calls count 1.0), step 1 sparse: the mean is over both, the sparse steps' density over one.
    assert result["sparse_calls"] > 0 and result["sparse_steps_density"] < 1
    assert result["mean_attention_density"] == pytest.approx((1 + result["sparse_steps_density"]) / 2)
    assert result["mean_attention_density"] != pytest.approx(result["sparse_steps_density"])
    # The warnings kept are diffsparse's (DiffsparseWarning), whatever their text (before: those starting with
    # "diffsparse", which the causal-mask and Cosmos 3 ones did not).
    assert "a warning of diffsparse's code, its text not prefixed" in result["warnings"]
    assert "diffsparse: a text that is not diffsparse's warning" not in result["warnings"]


def _diffsparse_module():
    """A stand-in for a module of the `diffsparse` package: `warn` raises diffsparse's warning there, `passes_on` a
    plain `UserWarning` from the same frame, as one raised in torch's or numpy's C code that diffsparse calls looks
    (its frame is the caller's, diffsparse's: a check by module kept it)."""
    import types

    from diffsparse import DiffsparseWarning

    def warn(text, category):
        import warnings

        warnings.warn(text, category, stacklevel=2)

    globals_ = {"__name__": "diffsparse.warning_source", "__builtins__": __builtins__}
    raise_there = types.FunctionType(warn.__code__, globals_)
    return types.SimpleNamespace(warn=lambda text: raise_there(text, DiffsparseWarning),
                                 passes_on=lambda text: raise_there(text, UserWarning))


def test_kept_warnings_are_diffsparses_own_also_when_nested():
    import warnings

    from diffsparse.compare import kept_warnings

    inside = _diffsparse_module()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with kept_warnings() as outer:
            with kept_warnings() as inner:  # its `keep` passes each warning on to the outer one's
                inside.warn("transformer: runs the original processor (dense)")
                warnings.warn("diffsparse: raised outside diffsparse")
                inside.passes_on("torch: a warning of a call diffsparse makes")
            inside.warn("after the inner block")
    assert inner == ["transformer: runs the original processor (dense)"]
    assert outer == ["transformer: runs the original processor (dense)", "after the inner block"]
    assert len(shown) == 4  # every warning is still shown, kept or not


def test_kept_warnings_keep_every_kind_of_diffsparse_warning():
    import warnings

    import numpy as np

    from diffsparse import DiffsparseWarning
    from diffsparse.compare import kept_warnings
    from diffsparse.metrics import psnr
    from diffsparse.runtime import StepScheduleWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with kept_warnings() as caught:
            warnings.warn("diffsparse: a schedule not followed", StepScheduleWarning)
            warnings.warn("diffsparse: a config that runs dense", DiffsparseWarning)
            assert np.isnan(psnr(np.full((2, 8, 8, 3), np.nan), np.zeros((2, 8, 8, 3))))
    assert caught[:2] == ["diffsparse: a schedule not followed", "diffsparse: a config that runs dense"]
    assert len(caught) == 3 and "PSNR is nan" in caught[2]


def test_compare_keeps_the_warning_of_a_nan_score(tmp_path, monkeypatch):
    # Scored after the runs' warnings were collected, a broken sparse video's "PSNR is nan" reached stderr but not
    # compare.json, where eval's rows kept it.
    import numpy as np

    from diffsparse import compare

    generate, runs = compare._generate, []

    def broken_sparse_run(*args, **kwargs):
        frames, *rest = generate(*args, **kwargs)
        runs.append(frames)
        if len(runs) == 4:  # the one-step warm-ups, the dense run, then the sparse one
            frames = frames.copy()
            frames[0, 0, 0, 0] = np.nan
        return (frames, *rest)

    monkeypatch.setattr(compare, "_generate", broken_sparse_run)
    args = ["compare", "--steps", "1", "--frames", "5", "--height", "32", "--width", "32", "--pattern", "dense"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["psnr_db"] == "nan" and len(runs) == 4
    assert any("PSNR is nan" in text for text in result["warnings"])
    assert any("SSIM is nan" in text for text in result["warnings"])


def test_every_warning_diffsparse_raises_is_a_diffsparse_warning():
    """`kept_warnings` (compare's and eval's warnings columns) and a user's one filter go by the category: a
    `warnings.warn` that names none (UserWarning) would be shown but never reach them."""
    import ast
    import inspect
    from pathlib import Path

    import diffsparse
    from diffsparse import DiffsparseWarning
    from diffsparse.metrics import NonFiniteScoreWarning
    from diffsparse.runtime import StepScheduleWarning

    ours = {cls.__name__ for cls in (DiffsparseWarning, NonFiniteScoreWarning, StepScheduleWarning)}
    assert all(issubclass(cls, DiffsparseWarning) for cls in (NonFiniteScoreWarning, StepScheduleWarning))
    root = Path(inspect.getfile(diffsparse)).resolve().parent.parent
    calls = []
    for folder in ("diffsparse", "patterns", "kernels", "pipelines"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
                    given = [*node.args[1:2], *(kw.value for kw in node.keywords if kw.arg == "category")]
                    calls.append((f"{path.relative_to(root)}:{node.lineno}", [ast.unparse(c) for c in given]))
    assert len(calls) >= 20  # the scan found the package's warnings
    assert [(where, given) for where, given in calls if len(given) != 1 or given[0] not in ours] == []


def test_identical_videos_write_standard_json(tmp_path, capsys):
    # The PSNR of identical videos is infinite: Python wrote `Infinity`, which strict JSON readers refuse.
    args = ["compare", "--steps", "1", "--frames", "5", "--height", "32", "--width", "32", "--pattern", "dense"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert result["psnr_db"] is None and result["ssim"] == 1.0
    # Nothing ran sparse: the speedup times two dense runs, and says so (before, a bare 1.89x or 0.58x under load).
    assert result["sparse_calls"] == 0
    assert re.search(r"^speedup \S+x end-to-end, \S+x text encoding \+ denoising \(nothing ran sparse: run-to-run "
                     r"noise\)$", capsys.readouterr().out, re.MULTILINE)
    # A broken run's NaN scores must not read as that null of a perfect one.
    from diffsparse.bench import strict_json

    assert json.loads(strict_json({"psnr_db": float("nan"), "ssim": float("inf")})) == {"psnr_db": "nan", "ssim": None}


def test_frames_too_small_for_lpips_are_scored_without_it_or_refused_when_it_was_asked_for(tmp_path, capsys,
                                                                                           monkeypatch):
    # AlexNet needs 31 x 31 pixels. With the weights in the torch cache, a 16-pixel run failed after generating
    # both videos; now it goes without LPIPS and says why. Asked for with --lpips-weights: refused before loading.
    from diffsparse import compare, metrics

    cache = tmp_path / "alexnet.pth"
    cache.write_bytes(b"never read")
    monkeypatch.setattr(metrics, "alexnet_weights_path", lambda: cache)
    small = ["--steps", "2", "--frames", "5", "--height", "16", "--width", "16", "--block-size", "16"]
    assert main(["compare", *small, "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["lpips"] is None
    assert "LPIPS not computed: frames of 16x16 pixels, LPIPS (AlexNet) needs at least 31x31" in capsys.readouterr().out
    assert main(["eval", *small, "--prompts", "1", "--pattern", "window3d", "--out", str(tmp_path / "e")]) == 0
    assert "LPIPS not computed: frames of 16x16 pixels" in (tmp_path / "e" / "eval.md").read_text()
    monkeypatch.setattr(compare, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded"))
    for command in ("compare", "eval"):
        with pytest.raises(SystemExit):
            main([command, *small, "--lpips-weights", str(cache)])
        assert "needs frames of at least 31x31 pixels, got 16x16" in capsys.readouterr().err


def test_compare_and_eval_score_lpips_with_the_weights_given(tmp_path, capsys):
    # A checkpoint outside the torch cache, given on the command line (random AlexNet weights stand in for it).
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    args = ["--steps", "2", "--frames", "5", "--height", "32", "--width", "32", "--block-size", "16",
            "--dense-steps", "1", "--pattern", "window3d", "--density", "0.3"]
    assert main(["compare", *args, "--lpips-weights", str(weights), "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["lpips"] > 0
    assert main(["eval", *args, "--prompts", "1", "--lpips-weights", str(weights), "--out", str(tmp_path / "e")]) == 0
    (row,) = csv.DictReader((tmp_path / "e" / "eval.csv").open())
    assert float(row["lpips"]) > 0 and "LPIPS not computed" not in (tmp_path / "e" / "eval.md").read_text()
    capsys.readouterr()
    for command in ("compare", "eval"):  # a path that is not there is an error, not a run without LPIPS
        with pytest.raises(SystemExit):
            main([command, *args, "--lpips-weights", str(tmp_path / "nowhere.pth")])
        assert "lpips_weights=" in capsys.readouterr().err


def test_vae_tiling_tiles_the_pipelines_vae(tiny_pipe, tmp_path):
    from diffsparse.compare import load_pipeline

    folder = tmp_path / "wan"
    tiny_pipe.save_pretrained(str(folder))
    assert not load_pipeline(str(folder), "cpu").vae.use_tiling
    assert load_pipeline(str(folder), "cpu", vae_tiling=True).vae.use_tiling
    args = ["compare", "--model", str(folder), "--frames", "5", "--height", "32", "--width", "32", "--steps", "2",
            "--block-size", "16", "--dense-steps", "1", "--vae-tiling"]
    assert main([*args, "--call-kwargs", '{"guidance_scale": 3.0}', "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["vae_tiling"] is True and result["call_kwargs"] == {"guidance_scale": 3.0}
    # eval's table says which call arguments its videos had (a guidance scale changes every number in it).
    assert main(["eval", *args[1:-1], "--prompts", "1", "--pattern", "window3d", "--call-kwargs",
                 '{"guidance_scale": 3.0}', "--out", str(tmp_path / "eval")]) == 0
    assert 'Call arguments: {"guidance_scale": 3.0}' in (tmp_path / "eval" / "eval.md").read_text()


def test_masks_and_density_bench(tmp_path, capsys):
    assert main(["masks", "--pattern", "window3d", "--frames", "5", "--height", "8", "--width", "12",
                 "--block-size", "64", "--tile", "1,4,4", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("mask_window3d_*.png"))
    assert "block density" in capsys.readouterr().out
    assert main(["bench", "density", "--pattern", "radial", "--frames", "4,8", "--height", "8", "--width", "8",
                 "--block-size", "64", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench_density.png").exists()
    printed = capsys.readouterr().out
    from diffsparse.patterns import Radial, TileOrder, VideoLayout, get_pattern

    for frames in (4, 8):  # each row's density is the pattern's own at that layout
        density = Radial().density(VideoLayout(frames, 8, 8), 64)
        assert f"| {Radial()!r} | {frames} | {frames * 64} | {density:.4f} | " in printed
    # Each row's density in the --tile order (before, the tile was ignored).
    pattern = get_pattern("window3d(window=(1, 2, 2))")
    tiled = pattern.density(VideoLayout(4, 8, 8), 16, TileOrder((1, 4, 4)))
    assert tiled != pattern.density(VideoLayout(4, 8, 8), 16)
    assert main(["bench", "density", "--pattern", repr(pattern), "--frames", "4", "--height", "8", "--width", "8",
                 "--block-size", "16", "--tile", "1,4,4", "--out", str(tmp_path)]) == 0
    assert f"| {pattern!r} | 4 | 256 | {tiled:.4f} | " in capsys.readouterr().out
    # A joint sequence: 8 text tokens first, whose block row and column stay whole.
    assert main(["masks", "--pattern", "radial", "--frames", "4", "--height", "8", "--width", "8", "--block-size", "16",
                 "--text-tokens", "8", "--text-position", "start", "--density", "0.3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "on 264 tokens (4x8x8 + 8 text at the start)" in printed
    assert "planning cost: solving for the density" in printed and "block mask and kernel plan" in printed


def test_masks_of_other_settings_into_one_folder_keep_their_own_pngs(tmp_path, capsys):
    # The PNG was named by the pattern's name and the grid alone: each run overwrote the last one's, saying "wrote".
    grid = ["masks", "--pattern", "window3d", "--frames", "4", "--height", "8", "--width", "8", "--block-size", "16",
            "--out", str(tmp_path)]
    written = []
    for setting in (["--density", "0.2"], ["--density", "0.5"], ["--density", "0.2", "--tile", "1,4,4"]):
        assert main([*grid, *setting]) == 0
        written.append(capsys.readouterr().out.rsplit("wrote ", 1)[1].strip())
    assert sorted(written) == sorted(str(path) for path in tmp_path.glob("*.png")) and len(set(written)) == 3
    # Named by what was drawn, the solved pattern's parameters first, and pasted into a shell unquoted.
    assert Path(written[0]).name == "mask_window3d_window=1,3,3_4x8x8_block16.png"
    assert Path(written[2]).name == "mask_window3d_window=1,3,3_4x8x8_block16_tiles_1,4,4.png"


def test_mask_names_of_composed_patterns_keep_their_grouping_apart():
    # The name drops brackets: (a | b) & c and a | (b & c), other masks, were one file.
    from diffsparse.cli import _mask_png_name
    from diffsparse.patterns import FrameSink, Radial, VideoLayout, Window3D

    a, b, c = Radial(), Window3D(window=(3, 8, 8)), FrameSink(frames=1)
    layout = VideoLayout(4, 8, 8)
    left, right = ((a | b) & c, a | (b & c))
    assert not torch.equal(left.block_mask(layout, 16), right.block_mask(layout, 16))
    names = {_mask_png_name(pattern, layout, 16, None, 0) for pattern in (left, right)}
    assert len(names) == 2 and all("-or-" in name and "-and-" in name for name in names), names


def test_masks_counts_the_block_density_in_the_tile_order_it_draws(tmp_path, capsys):
    # The frame-major count (0.1094) was printed beside a tiled mask's PNG.
    assert main(["masks", "--pattern", "window3d(window=(1,2,2))", "--frames", "4", "--height", "8", "--width", "8",
                 "--block-size", "16", "--tile", "1,4,4", "--out", str(tmp_path)]) == 0
    assert "order tiles(1,4,4): block density 0.1406\n" in capsys.readouterr().out


def test_masks_draws_the_head_asked_for(tmp_path, monkeypatch, capsys):
    from diffsparse.patterns import Pattern

    drawn, render = [], Pattern.render

    def recording(self, *args, head=0, **kwargs):
        drawn.append(head)
        return render(self, *args, head=head, **kwargs)

    monkeypatch.setattr(Pattern, "render", recording)
    assert main(["masks", "--pattern", "window3d(window=[(1, 2, 2), (2, 4, 4)])", "--head", "1", "--frames", "4",
                 "--height", "8", "--width", "8", "--block-size", "16", "--out", str(tmp_path)]) == 0
    assert drawn == [1]
    (png,) = tmp_path.glob("*.png")
    assert png.name == "mask_window3d_window=1,2,2_2,4,4_4x8x8_block16_head1.png"
    # spatial_temporal with its heads' kinds given draws the temporal head's mask (unclassified, it is refused).
    assert main(["masks", "--pattern", "spatial_temporal(heads='ST')", "--head", "1", "--density", "0.3", "--frames",
                 "4", "--height", "8", "--width", "8", "--block-size", "16", "--out", str(tmp_path / "st")]) == 0
    assert drawn == [1, 1] and len(list((tmp_path / "st").glob("*_head1.png"))) == 1
    capsys.readouterr()
    # The density printed is the mean over the heads; the drawn head's is said too (here every block).
    assert main(["masks", "--pattern", "spatial_temporal(heads='ST')", "--head", "1", "--frames", "8", "--height",
                 "4", "--width", "4", "--block-size", "16", "--out", str(tmp_path / "st")]) == 0
    assert "block density 0.6719 (the mean over 2 heads; head 1, drawn: 1.0000)\n" in capsys.readouterr().out


def test_attention_bench_table(tmp_path, capsys):
    assert main(["bench", "attention", "--seq", "2048", "--heads", "2", "--dim", "32", "--density", "0.25,0.5",
                 "--repeats", "1", "--mask", "window3d", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "bench_attention.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["mask", "backend", "target_density", "density", "dense_ms", "sparse_ms", "speedup",
                             "bound", "efficiency", "plan_ms", "plan_mb", "peak_mb"]
    assert [r["mask"] for r in rows] == ["window3d", "window3d"]
    printed = capsys.readouterr().out
    from diffsparse.kernels import make_plan
    from diffsparse.patterns import VideoLayout, get_pattern

    layout = VideoLayout(2, 32, 32)  # --seq 2048: 2 frames of 32 x 32 tokens
    for r, target in zip(rows, (0.25, 0.5)):
        assert r["backend"] in ("cpu (compiled kernel)", "cpu (torch ops)")
        # CPU keeps no allocator statistics: no peak, rather than the plan's bytes under that name.
        assert r["peak_mb"] == "" and float(r["plan_mb"]) > 0
        x = {key: float(value) for key, value in r.items() if key not in ("mask", "backend", "peak_mb")}
        assert x.pop("target_density") == target
        # The density the timed plan has, not the target it was solved for.
        mask = get_pattern("window3d").at_density(layout, target, 128).block_mask(layout, 128)[None]
        assert x["density"] == make_plan(mask, 2048, 2048, 128).density != target
        # Below 1, or efficiency = speedup x density could not tell multiplying from dividing (radial stays at
        # density 1 on these 2 frames).
        assert x["density"] < 1
        # The CSV holds the floats unrounded (csv writes their repr), so the derived columns match exactly.
        assert x["speedup"] == x["dense_ms"] / x["sparse_ms"]
        assert x["bound"] == 1 / x["density"] and x["efficiency"] == x["speedup"] * x["density"]
        # The printed table is the same row, rounded: 3 decimals for the ratios and the plan's memory, 1 for times
        # and bound.
        cells = [f"{x[c]:.3f}" if c in ("density", "speedup", "efficiency", "plan_mb") else f"{x[c]:.1f}" for c in x]
        assert f"| window3d | {r['backend']} | {target:g} | " + " | ".join(cells) + " | - |" in printed
    assert f"backend={rows[0]['backend']} mask=window3d" in printed


def test_attention_bench_names_the_backend_the_call_runs(monkeypatch):
    # On CUDA, "auto" runs blocks other than 64/128 and head dims above 256 on the torch-ops path: the label said
    # triton for them, as it was chosen without the call's plan and head dim.
    from diffsparse import bench
    from diffsparse.kernels import attention, make_plan

    monkeypatch.setattr(attention, "triton_available", lambda device: (True, ""))
    cuda = torch.device("cuda")
    for block, dim, runs in ((128, 64, "triton"), (256, 64, "cpu (torch ops)"), (32, 64, "cpu (torch ops)"),
                             (128, 512, "cpu (torch ops)")):
        plan = make_plan(torch.ones(1, 1, 2, 2, dtype=torch.bool), 2 * block, 2 * block, block)
        assert bench._backend_label(cuda, torch.bfloat16, "auto", plan, dim) == runs, (block, dim)
    # On CPU the compiled kernel takes float32 and bfloat16 only: float16 was labelled as the compiled kernel.
    from diffsparse.kernels import cpu_native

    if cpu_native.forward_op() is not None:
        cpu = torch.device("cpu")
        assert bench._backend_label(cpu, torch.float32, "cpu", plan, 64) == "cpu (compiled kernel)"
        assert bench._backend_label(cpu, torch.float16, "cpu", plan, 64) == "cpu (torch ops)"


def test_permute_bench_reads_the_tile_as_the_other_commands_do(capsys):
    from diffsparse.patterns import TileOrder, VideoLayout, get_pattern

    args = ["bench", "permute", "--frames", "2", "--height", "4", "--width", "8", "--block-size", "16", "--heads", "2",
            "--dim", "8", "--dtype", "fp32", "--repeats", "1"]
    # One number is a cube, as for masks and bench density (before: a TileOrder of one element, refused).
    for tile, order in (("2", TileOrder(2)), ("1,2,4", TileOrder((1, 2, 4)))):
        assert main([*args, "--tile", tile]) == 0
        row = dict(item.split("=", 1) for item in capsys.readouterr().out.strip().splitlines()[-1].split(" | "))
        density = get_pattern("window3d").density(VideoLayout(2, 4, 8), 16, order)
        assert (row["layout"], row["tokens"], row["order"]) == ("2x4x8", "64", repr(order))
        assert row["density"] == f"{density:.4g}" and float(row["share"]) > 0


def test_pipeline_bench_interleaves_dense_and_sparse_runs(tmp_path, capsys, monkeypatch):
    # Also: the size of the frames' other dimensions as the video's, and the stats of the last denoising run only
    # (not every segment's) passed.
    import statistics

    from diffsparse import evaluate
    from diffsparse.api import SparseHandle
    from diffsparse.pipelines.wan import WanSparseAttnProcessor

    sparse_applied, timed = [], evaluate.timed_generation

    def recording(pipe, *args, **kwargs):
        sparse = isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)
        sparse_applied.append(sparse)
        # Real frames, clock readings fixed: the speedups must come out dense over sparse, 2 and 4.
        frames, _, _ = timed(pipe, *args, **kwargs)
        return (frames, 1.0, 0.25) if sparse else (frames, 2.0, 1.0)

    since, stats = [], SparseHandle.stats

    def recording_stats(self, since_apply=False):
        since.append(since_apply)
        return stats(self, since_apply=since_apply)

    monkeypatch.setattr(evaluate, "timed_generation", recording)
    monkeypatch.setattr(SparseHandle, "stats", recording_stats)
    args = ["bench", "pipeline", "--steps", "2", "--frames", "5", "--height", "32", "--width", "48",
            "--block-size", "16", "--dense-steps", "1", "--density", "0.5", "--repeats", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert sparse_applied == [False, True] * 3  # an untimed pair, then the timed pairs, each dense first
    assert since and all(since)
    result = json.loads((tmp_path / "bench_pipeline.json").read_text())
    pairs = result["pairs"]
    assert len(pairs) == 2 and result["repeats"] == 2 and result["video"] == "5 frames 32x48, 2 steps"
    assert (result["prompt"], result["seed"], result["call_kwargs"], result["image"], result["vae_tiling"]) == (
        "a red circle moving left", 0, None, None, False)
    assert result["speedup"] == statistics.median(p["dense_seconds"] / p["sparse_seconds"] for p in pairs)
    assert [(p["speedup"], p["attention_speedup"]) for p in pairs] == [(2.0, 4.0)] * 2
    assert (result["speedup"], result["attention_speedup"]) == (2.0, 4.0)
    # Step 0 dense, step 1 sparse: the work is the mean of 1.0 and the sparse step's density.
    assert result["sparse_step_density"] < 1
    assert result["attention_work"] == pytest.approx((1 + result["sparse_step_density"]) / 2)
    assert result["efficiency"] == pytest.approx(result["attention_speedup"] * result["attention_work"])
    assert "median end-to-end speedup" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args[:-2], "--repeats", "0", "--out", str(tmp_path)])
    assert "argument --repeats: must be at least 1, got 0" in capsys.readouterr().err


def test_search_bench_times_one_search_against_one_dense_call(tmp_path, capsys):
    args = ["bench", "search", "--frames", "3", "--height", "4", "--width", "8", "--block-size", "16",
            "--heads", "2", "--dim", "8", "--density", "0.5", "--repeats", "2"]
    assert main([*args, "--pattern", "searched(refresh=4)", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_search.json").read_text())
    assert result["tokens"] == 96 and result["repeats"] == 2
    assert result["pattern"].startswith("searched(keep=0.5,") and result["density"] == 0.5  # searched at --density
    assert result["dense_calls_per_search"] == result["search_ms"] / result["dense_ms"]
    assert "a search costs" in capsys.readouterr().out
    assert main(["bench", "search", *args[2:], "--pattern", "spatial_temporal", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "bench_search.json").read_text())["pattern"].startswith("spatial_temporal(")
    with pytest.raises(SystemExit):
        main([*args, "--pattern", "radial", "--out", str(tmp_path)])
    assert "--pattern 'radial' is static: it has no search to time" in capsys.readouterr().err


def test_causal_bench_times_the_masked_dense_call_against_the_sparse_path(tmp_path, capsys):
    # Groups of 2 frames of 4 x 6 tokens: 48 tokens, whole blocks of 16, split by blocks of 32.
    args = ["bench", "causal", "--frames", "4", "--height", "4", "--width", "6", "--causal-frames", "2", "--heads",
            "2", "--dim", "8", "--pattern", "window3d", "--density", "0.3,1", "--repeats", "2", "--out", str(tmp_path)]
    # Every block the mask allows: 3 x 3 + 3 x 6 of 6 x 6 blocks of 16; per group, 2 x 2 + 2 x 3 of 3 x 3 blocks of
    # 32 (the partial blocks at the groups' edge count whole in the block density, at their size in the density: the
    # pairs the mask allows, 3/4, either way).
    for block_size, path, every_block in (("16", "whole blocks", 27 / 36), ("32", "per group", 10 / 9)):
        assert main([*args, "--block-size", block_size]) == 0
        result = json.loads((tmp_path / "bench_causal.json").read_text())
        assert result["tokens"] == 96 and result["group_tokens"] == 48 and result["repeats"] == 2
        assert [r["path"] for r in result["rows"]] == [path, path]
        assert result["rows"][0]["block_density"] < result["rows"][1]["block_density"] == pytest.approx(every_block)
        assert result["rows"][0]["density"] < result["rows"][1]["density"] == 0.75
        for r in result["rows"]:
            faster = min(r["dense_ms"], r["unmasked_ms"])
            assert r["speedup"] == r["dense_ms"] / r["sparse_ms"] and r["efficiency"] == faster / r["sparse_ms"] * (
                r["density"])
            assert r["efficiency_baseline"] == ("masked" if faster == r["dense_ms"] else "unmasked")
    assert "dense: SDPA with the boolean mask" in capsys.readouterr().out
    # Searched blocks across the groups: searched on the masked attention, per group, every allowed block at 1.
    assert main([*args, "--block-size", "32", "--pattern", "searched"]) == 0
    rows = json.loads((tmp_path / "bench_causal.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["per group"] * 2 and rows[1]["block_density"] == pytest.approx(10 / 9)
    assert rows[1]["density"] == 0.75


def test_eval_writes_a_table(tmp_path, capsys, monkeypatch):
    from diffsparse import evaluate
    from diffsparse.pipelines.wan import WanSparseAttnProcessor

    real = evaluate.timed_generation

    def fixed_seconds(pipe, *args, **kwargs):
        # Real frames, clock readings fixed: the ratios must come out sparse over dense, 1/2 and 1/4.
        frames, _, _ = real(pipe, *args, **kwargs)
        sparse = isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)
        return (frames, 1.0, 0.25) if sparse else (frames, 2.0, 1.0)

    monkeypatch.setattr(evaluate, "timed_generation", fixed_seconds)
    args = ["eval", "--pattern", "radial", "--density", "0.5", "--dense-steps", "0,1", "--steps", "2",
            "--frames", "5", "--height", "32", "--width", "48", "--block-size", "16", "--prompts", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "eval.csv").read_text().splitlines()
    assert rows[0].startswith(
        "pattern,pattern_ran,target_density,measured_density,dense_steps,dense_layers,correction,order,psnr_db")
    assert len(rows) == 3
    with open(tmp_path / "eval.csv") as f:
        ratios = [(float(r["end_to_end_ratio"]), float(r["attention_time_ratio"])) for r in csv.DictReader(f)]
    assert ratios == [(0.5, 0.25)] * 2
    table = (tmp_path / "eval.md").read_text()
    assert "| radial(" in table and "attention_time_ratio" in table and "bench pipeline" in table
    assert "PSNR" not in capsys.readouterr().err


def test_eval_runs_the_prompts_of_a_prompt_file(tmp_path, capsys, monkeypatch):
    # A real model's users evaluate on their own prompts; every video is generated from them, and eval.md says which.
    from diffsparse import evaluate

    generated = []
    real = evaluate.timed_generation
    monkeypatch.setattr(evaluate, "timed_generation", lambda pipe, prompt, *rest: generated.append(prompt) or
                        real(pipe, prompt, *rest))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# the shapes the testbed knows\na yellow square moving down\n\n  a blue circle moving right \n")
    args = ["eval", "--pattern", "window3d", "--density", "0.5", "--dense-steps", "1", "--steps", "2", "--frames", "5",
            "--height", "32", "--width", "32", "--block-size", "16", "--prompt-file", str(prompts)]
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    assert set(generated) == {"a yellow square moving down", "a blue circle moving right"}
    table = (tmp_path / "all" / "eval.md").read_text()
    assert "2 prompts x 1 seeds from 0" in table and 'Prompts: "a yellow square moving down"; "a blue circle' in table
    generated.clear()
    assert main([*args, "--prompts", "1", "--out", str(tmp_path / "one")]) == 0
    assert set(generated) == {"a yellow square moving down"}
    for bad, message in [(["--prompts", "3"], "prompts=3: there are 2 in prompt_file="),
                         (["--prompt-file", str(tmp_path / "none.txt")], "none.txt': no such file")]:
        with pytest.raises(SystemExit):
            main([*args, *bad])
        assert re.search(message, capsys.readouterr().err)
    # A folder is there: "no such file" sent the user looking for a path that exists.
    with pytest.raises(SystemExit):
        main([*args, "--prompt-file", str(tmp_path)])
    assert f"prompt_file={str(tmp_path)!r}: is a folder; give a text file of prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args[:-2], "--prompts", "4"])  # three fixed prompts
    assert "prompts=4: there are 3 in the fixed prompts" in capsys.readouterr().err


def test_two_stage_eval_starts_dense_and_sparse_from_one_still(tmp_path):
    args = ["eval", "--pattern", "radial", "--density", "0.3", "--dense-steps", "0,2", "--steps", "2", "--frames", "5",
            "--height", "32", "--width", "32", "--block-size", "16", "--prompts", "1", "--two-stage",
            "--still-candidates", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "eval.csv") as f:
        sparse_run, all_dense = [float(r["psnr_db"]) for r in csv.DictReader(f)]
    # Every step dense: the same still and the same noise give the dense video again, frame for frame.
    assert all_dense == float("inf") and sparse_run < float("inf")
    assert "two-stage, best of 2 stills, scored on frames 1 on (frame 0 is the shared still)" in (
        tmp_path / "eval.md"
    ).read_text()


def test_eval_crosses_dense_layers_and_corrections(tmp_path):
    args = ["eval", "--pattern", "radial", "--density", "0.3", "--dense-steps", "1", "--dense-layers", "0,[1]",
            "--correction", "none,residual", "--tile", "1,2,2", "--steps", "3", "--frames", "5", "--height", "32", "--width", "48",
            "--block-size", "16", "--prompts", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dense_layers"], r["correction"]) for r in rows] == [("0", ""), ("0", "residual"), ("[1]", ""), ("[1]", "residual")]
    assert {r["order"] for r in rows} == {"tiles(1,2,2)"}
    # Measured density covers the sparse steps' calls: a dense layer counts 1.0 there.
    assert float(rows[2]["measured_density"]) > float(rows[0]["measured_density"])


def test_eval_takes_patterns_with_parameters(tmp_path):
    args = ["eval", "--pattern", "radial(decay=0.5),searched(keep=0.5, refresh=1)", "--density", "0.5",
            "--dense-steps", "1", "--steps", "3", "--frames", "5", "--height", "32", "--width", "48",
            "--block-size", "16", "--prompts", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["pattern"].startswith("radial(") and "min_window=64" in rows[0]["pattern"]
    assert rows[1]["pattern"] == "searched(keep=0.5, criterion='greedy', budget='layer', refresh=1)"
    assert abs(float(rows[1]["measured_density"]) - 0.5) < 0.05


def test_eval_runs_a_pattern_as_written_with_density_none_and_names_the_solved_one(tmp_path):
    # With a density the main parameter is solved: the row named window3d(window=(1, 2, 2)) ran (2, 3, 3). Before,
    # `none` was refused and nothing in the table said which window ran.
    from diffsparse.patterns import VideoLayout, get_pattern

    written = "window3d(window=(1,2,2))"
    args = ["eval", "--pattern", written, "--density", "none,0.5", "--dense-steps", "0", "--steps", "1", "--frames",
            "5", "--height", "32", "--width", "32", "--block-size", "64", "--prompts", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "eval.csv") as f:
        as_written, solved = csv.DictReader(f)
    layout, pattern = VideoLayout(5, 8, 8), get_pattern(written)  # 5 frames of 32 x 32 pixels: 5 x 8 x 8 tokens
    ran = pattern.at_density(layout, 0.5, 64)
    assert (as_written["target_density"], as_written["pattern_ran"]) == ("", repr(pattern))
    assert float(as_written["measured_density"]) == pytest.approx(pattern.density(layout, 64))
    assert (solved["target_density"], solved["pattern_ran"]) == ("0.5", "window3d(window=(2, 3, 3))") == (
        "0.5", repr(ran))
    assert float(solved["measured_density"]) == pytest.approx(ran.density(layout, 64))
    assert solved["pattern"] == as_written["pattern"] == repr(pattern)  # as configured, in both rows
    assert "measured_density: the mean block density over every self-attention call of the sparse steps" in (
        tmp_path / "eval.md").read_text()


def test_eval_keeps_each_configurations_warnings_in_its_row(tmp_path):
    # Before, diffsparse's warnings reached stderr only; compare.json kept them, eval.md and eval.csv none.
    args = ["eval", "--pattern", "radial", "--density", "0.1", "--dense-steps", "0,2", "--steps", "2", "--frames", "1",
            "--height", "16", "--width", "16", "--block-size", "16", "--prompts", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "eval.csv") as f:
        sparse_run, all_dense = (json.loads(r["warnings"]) for r in csv.DictReader(f))
    nothing = "so nothing runs sparse"
    assert not any(nothing in w for w in sparse_run) and any("out of reach" in w for w in sparse_run)
    assert [w for w in all_dense if nothing in w] == all_dense != []  # its plans never built: no density warning
    table = (tmp_path / "eval.md").read_text()
    first, second = table.split("Warnings of row 1:")[1].split("Warnings of row 2:")
    assert nothing not in first and "out of reach" in first and nothing in second
    assert "| 1 | radial(" in table and table.count(" | 1 |\n") == 2  # one warning each in the table's last column


def _constant_videos(monkeypatch, value):
    """`timed_generation` without the pipeline: every frame the constant `value(prompt, seed, sparse)`; the (prompt,
    seed, sparse) of each call in the list returned."""
    from diffsparse import evaluate
    from diffsparse.pipelines.wan import WanSparseAttnProcessor

    generated = []

    def constant(pipe, prompt, seed, *rest):
        sparse = isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)
        generated.append((prompt, seed, sparse))
        return np.full((2, 4, 4, 3), value(prompt, seed, sparse)), 1.0, 1.0

    monkeypatch.setattr(evaluate, "timed_generation", constant)
    return generated


def test_eval_scores_each_video_against_its_own_dense_video_over_every_seed(tmp_path, monkeypatch):
    # Each (prompt, seed) its own dense level, the sparse video 0.01 above it: 40 dB exactly, only when each video
    # is scored against its own dense one. Before, no test told that from pairing with the first case's dense video,
    # or --seeds from repeating the first seed.
    from diffsparse.evaluate import PROMPTS

    dense = {(PROMPTS[0], 0): 0.2, (PROMPTS[0], 1): 0.4, (PROMPTS[1], 0): 0.6, (PROMPTS[1], 1): 0.8}
    generated = _constant_videos(monkeypatch, lambda prompt, seed, sparse: dense[prompt, seed] + 0.01 * sparse)
    args = ["eval", "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--steps", "1",
            "--frames", "5", "--height", "32", "--width", "32", "--prompts", "2", "--seeds", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "eval.csv") as f:
        (row,) = csv.DictReader(f)
    assert float(row["psnr_db"]) == pytest.approx(40.0, abs=1e-9)
    timed = generated[2:]  # after the two warm-ups
    assert {(prompt, seed) for prompt, seed, _ in timed} == set(dense)
    assert sorted((prompt, seed) for prompt, seed, sparse in timed if sparse) == sorted(dense)


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for deeper, subsub in _subparsers(sub):
                    yield f"{name} {deeper}", subsub


def test_every_option_is_documented_in_help():
    documented = {}
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                documented[f"{name} {action.option_strings[0]}"] = bool(action.help)
    assert "eval --dense-steps" in documented and "bench attention --backend" in documented
    assert [option for option, has_help in documented.items() if not has_help] == []


def test_list_options_name_what_they_expected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--density", "0.1,x"])
    assert "expected comma-separated densities in (0, 1] or none, got '0.1,x'" in capsys.readouterr().err


def test_none_and_out_of_range_values_are_read_at_parsing(capsys):
    parse = build_parser().parse_args
    # `None` as Python writes it was passed on as the correction's name 'None' and refused by the config.
    assert parse(["compare", "--correction", "None"]).correction is None
    assert parse(["eval", "--correction", "None, residual"]).correction == [None, "residual"]
    # eval's --density took none (the pattern as written) while the one-configuration commands refused it.
    for command in (["compare"], ["trace"], ["bench", "pipeline"], ["masks"]):
        assert parse([*command, "--density", "none"]).density is None
        assert parse([*command, "--density", "0.25"]).density == 0.25
    assert parse(["eval", "--density", "None,0.2"]).density == [None, 0.2]
    # A fraction in exponent form is a fraction, as SparseConfig takes it; "3" a step count.
    assert parse(["compare", "--dense-steps", "2e-1", "--dense-last-steps", "3"]).dense_steps == 0.2
    assert parse(["eval", "--dense-steps", "5E-2,3"]).dense_steps == [0.05, 3]
    step_count = "expected a step count (a whole number >= 0) or a fraction of the steps in [0, 1), got "
    for argv, message in (
        (["bench", "attention", "--density", "0"], "expected comma-separated block densities in (0, 1], got '0'"),
        (["compare", "--density", "0"], "argument --density: expected a block density in (0, 1] or none, got '0'"),
        (["masks", "--density", "nan"], "argument --density: expected a block density in (0, 1] or none, got 'nan'"),
        # A fraction of 1.0 is every step: an int says that (before, only the config's later message refused it).
        (["compare", "--dense-steps", "1.0"], f"argument --dense-steps: {step_count}'1.0'"),
        (["eval", "--dense-steps", "0,1.0"], f"argument --dense-steps: {step_count}'1.0'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, (argv, err)


def test_seeds_take_the_whole_64_bit_range():
    # torch's manual_seed takes -2**63 .. 2**64 - 1: nothing checked that negative seeds stay allowed.
    parse = build_parser().parse_args
    assert parse(["compare", "--seed", str(-(2**63))]).seed == -(2**63)
    assert parse(["bench", "attention", "--seed", "-1"]).seed == -1


def test_every_sparse_config_option_reaches_the_config():
    # --dense-last-steps, --correction-refresh or --tile dropped on the way to the config went unnoticed.
    from diffsparse.cli import _sparse_config
    from diffsparse.patterns import TileOrder

    for command in (["compare"], ["trace"], ["bench", "pipeline"]):
        args = build_parser().parse_args([*command, "--pattern", "window3d", "--density", "0.3", "--block-size", "32",
                                          "--dense-steps", "2", "--dense-last-steps", "1", "--dense-layers", "[1]",
                                          "--correction", "residual", "--correction-refresh", "3",
                                          "--tile", "1,1,1/1,8,8"])
        config = _sparse_config(args)
        assert (config.pattern, config.density, config.block_size, config.dense_steps, config.dense_last_steps,
                config.dense_layers, config.correction, config.correction_refresh, config.order) == (
            "window3d", 0.3, 32, 2, 1, [1], "residual", 3, [None, TileOrder((1, 8, 8))]), command


def test_the_last_port_is_taken():
    # Only 65536's refusal was tested: a bound moved down by one would have refused the last port, untested.
    assert build_parser().parse_args(["demo", "--port", "65535"]).port == 65535


def test_pattern_lists_keep_parameters_together(capsys):
    args = build_parser().parse_args(["eval", "--pattern", "radial, searched(keep=0.3, refresh=4)"])
    assert args.pattern == ["radial", "searched(keep=0.3, refresh=4)"]
    # An empty item, or a stray closing parenthesis that a later opening one balances, was taken as a pattern.
    for bad in ("radial,searched(keep=0.3", "radial,,window3d", "radial),window3d("):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", "--pattern", bad])
        assert "expected comma-separated patterns" in capsys.readouterr().err, bad


def test_dense_layers_take_a_count_or_a_list_of_block_indices(capsys):
    parse = build_parser().parse_args
    assert parse(["eval", "--dense-layers", "0,1,[0, 3],[]"]).dense_layers == [0, 1, [0, 3], []]
    assert parse(["compare", "--dense-layers", "2"]).dense_layers == 2
    assert parse(["trace", "--dense-layers", "[3]"]).dense_layers == [3]
    for bad in ("[0,x]", "[0,3", "1.5", "[True]"):
        with pytest.raises(SystemExit):
            parse(["eval", "--dense-layers", bad])
        err = capsys.readouterr().err
        assert "expected comma-separated dense-layer settings" in err or "SparseConfig.dense_layers as text" in err
    with pytest.raises(SystemExit):
        main(["compare", "--dense-layers", "[-1]", "--steps", "1"])
    assert "SparseConfig.dense_layers must be an int >= 0" in capsys.readouterr().err


def test_bad_settings_end_with_the_message_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["masks", "--pattern", "searched", "--frames", "2", "--height", "4", "--width", "4"])
    assert exit_info.value.code == 2
    assert "diffsparse masks: error: --pattern 'searched': must be a static pattern" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--density", "2", "--steps", "1"])
    assert "argument --density: expected a block density in (0, 1] or none, got '2'" in capsys.readouterr().err


def test_module_commands_run_from_the_checkout_root():
    # `python -m` puts the checkout root first on sys.path, where the folder `kernels/` would shadow Hugging Face's
    # `kernels` package that transformers imports when a model class loads (CI broke on this with transformers 5.25).
    root = Path(__file__).resolve().parents[1]
    probe = ("import diffsparse, importlib.util; from diffusers import WanTransformer3DModel; "
             "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else '')")

    def run_at_root(*args):
        done = subprocess.run([sys.executable, *args], check=False, cwd=root, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert not run_at_root("-c", probe).strip().startswith(str(root / "kernels"))
    assert "usage: diffsparse" in run_at_root("-m", "diffsparse.cli", "--help")
    assert run_at_root("-m", "diffsparse", "--version").strip() == "diffsparse 0.1.0"
    # The command's parser, `--help` and `--version` import neither torch nor diffusers (seconds on small machines):
    # `diffsparse`'s public names load on first use.
    light = ("import sys, diffsparse.cli; diffsparse.cli.build_parser(); "
             "print(sorted({'torch', 'diffusers'} & set(sys.modules)))")
    assert run_at_root("-c", light).strip() == "[]"
    assert "apply" in run_at_root("-c", "import diffsparse; print(diffsparse.apply.__name__, dir(diffsparse))")


def test_unset_video_options_take_the_models_own(tiny_pipe):
    # `--steps/--frames/--height/--width` default to the model's call defaults (the tiny Wan is a WanPipeline:
    # 50 steps, 81 frames at 480 x 832); what the user gave stays. The testbed's own is its evaluation size.
    import argparse

    from diffsparse.compare import fill_call_defaults
    from diffsparse.pipelines import testbed

    args = argparse.Namespace(steps=None, frames=None, height=32, width=None)
    fill_call_defaults(args, tiny_pipe)
    assert vars(args) == {"steps": 50, "frames": 81, "height": 32, "width": 832}
    args = argparse.Namespace(steps=None, frames=None, height=None, width=None)
    fill_call_defaults(args, testbed.load())
    assert vars(args) == {"steps": 20, "frames": 17, "height": 48, "width": 48}


def test_tile_option_cycles_orders_over_the_layers():
    from diffsparse import SparseConfig
    from diffsparse.cli import _order, _tiles
    from diffsparse.patterns import TileOrder

    assert _order(_tiles("1,8,8")) == TileOrder((1, 8, 8))
    assert _order(_tiles("1,1,1/1,8,8/4,4,4")) == [None, TileOrder((1, 8, 8)), TileOrder((4, 4, 4))]
    # One number is a cube: 1 is the frame-major order, as 1,1,1 is (it gave tiles(1,1,1)).
    assert _order(_tiles("1")) is None and _order(_tiles("1/1,8,8")) == [None, TileOrder((1, 8, 8))]
    config = SparseConfig(order=_order(_tiles("1,1,1/1,8,8")))
    assert [repr(config.layer_order(layer)) for layer in range(3)] == [
        "frame_major()", "tiles(1,8,8)", "frame_major()"
    ]


class GlobalNoisePipeline:
    """Draws its image from torch's global generator and ignores `generator`, as JoyImage Edit draws its reference
    image's latents."""

    def __call__(self, prompt, height=8, width=8, num_inference_steps=2, generator=None, output_type="np",
                 callback_on_step_end=None):
        import torch

        for step in range(num_inference_steps):
            callback_on_step_end(self, step, 0, {})
        return argparse.Namespace(images=torch.rand(1, height, width, 3).numpy())


def test_each_generation_of_the_commands_draws_the_same_global_noise_for_its_seed():
    # Dense and sparse runs of `compare` and `eval` start from the same draws, and the caller's generator state is
    # left as it was.
    import numpy as np
    import torch
    from tqdm import tqdm

    from diffsparse.compare import _generate

    def generate(seed):
        args = argparse.Namespace(prompt="a red circle", seed=seed, frames=1, height=8, width=8, steps=2,
                                  image=None, call_kwargs=None)
        return _generate(GlobalNoisePipeline(), args, tqdm(disable=True))[0]

    state = torch.get_rng_state()
    first, again, other = generate(0), generate(0), generate(1)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_loaded_pipeline_s_call_kwargs_are_checked_before_its_still_is_sampled(tmp_path, monkeypatch):
    # The demo passes its loaded pipeline: a key it does not take was refused only at the clips' call, after the
    # stills had been sampled.
    from diffsparse import SparseConfig, compare
    from diffsparse.pipelines import testbed

    def no_still(*args, **kwargs):
        raise AssertionError("sampled the still before refusing the call arguments")

    monkeypatch.setattr(testbed, "best_still", no_still)
    pipe = compare.load_pipeline(None, "cpu")
    for call_kwargs, message in (({"guidnce_scale": 1.0}, "(did you mean 'guidance_scale'?)"),
                                 ({"num_videos_per_prompt": 2}, "sets num_videos_per_prompt=2")):
        args = argparse.Namespace(model=None, prompt="a red circle moving left", steps=2, frames=5, height=32,
                                  width=32, seed=0, device="cpu", out=str(tmp_path), lpips_weights=None,
                                  two_stage=True, still_candidates=1, image=None, call_kwargs=call_kwargs)
        with pytest.raises(ValueError, match=re.escape(message)):
            compare.run_compare(args, SparseConfig(pattern="radial"), pipe=pipe)


@pytest.mark.parametrize("command", ["compare", "eval"])
@pytest.mark.parametrize("count", ["0", "-1"])
def test_still_candidates_below_one_is_refused_when_parsed(command, count, capsys, monkeypatch):
    # It was a plain int, refused by the config only once the model had loaded.
    from diffsparse import compare

    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--two-stage", "--still-candidates", count])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument --still-candidates: must be at least 1, got {count}" in err, err


def _subcommands(parser, name=""):
    """Every command's parser, by its name (`bench density`), whatever subcommands it has."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found.update(_subcommands(sub, f"{name} {sub_name}".strip()))
    return found or {name: parser}


def test_help_states_each_default_once():
    # ArgumentDefaultsHelpFormatter added "(default: None)" after help texts that state the real default
    # ("(default: fp32 on cpu, bf16 on other devices) (default: None)"), and after --correction, spelt none here.
    commands = _subcommands(build_parser())
    assert {"compare", "eval", "trace", "demo", "masks", "bench density", "bench pipeline"} <= set(commands)
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help is None or action.help == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action)
            where = f"{name} {'/'.join(action.option_strings) or action.dest}: {text!r}"
            assert text.count("(default:") <= 1 and "(default: None)" not in text, where
            assert "(default: [None])" not in text, where
    for name in ("compare", "trace", "eval", "bench pipeline"):
        parser = commands[name]
        correction = next(a for a in parser._actions if "--correction" in a.option_strings)
        assert parser._get_formatter()._expand_help(correction).endswith("(default: none)"), name


def test_help_states_each_list_default_as_the_option_takes_it():
    # A list default read as Python prints it, "(default: [0.25, 0.5])", which the option refuses when typed.
    commands = _subcommands(build_parser())
    seen = set()
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not isinstance(action.default, list):
                continue
            text = formatter._expand_help(action)
            typed = text[text.rindex("(default: ") + len("(default: "):-1]
            assert action.type(typed) == action.default, f"{name} {action.option_strings}: {text!r}"
            seen.add(action.option_strings[0])
    assert {"--density", "--pattern", "--frames", "--tile", "--dense-steps", "--correction"} <= seen


def test_help_states_a_tuple_or_empty_default_as_typed_and_a_placed_one_once():
    # No option has these defaults today; before, a tuple read "(default: (1, 2, 2))", an empty list
    # "(default: )", and a help placing its list default itself ("%(default)s") got it twice, once as Python's.
    from diffsparse.cli import _DefaultsHelpFormatter

    parser = argparse.ArgumentParser(formatter_class=_DefaultsHelpFormatter)
    defaults = {"--tile": ((1, 2, 2), "tile"), "--layers": ([], "layers"), "--none": ((), "none given"),
                "--steps": ([1, 2], "steps %(default)s, by default"),
                "--density": ([0.25, None], "densities (default: %(default)s)")}
    for option, (default, help) in defaults.items():
        parser.add_argument(option, default=default, help=help)
    formatter = parser._get_formatter()
    assert [formatter._expand_help(action) for action in parser._actions[1:]] == [
        "tile (default: 1,2,2)", "layers", "none given", "steps 1,2, by default", "densities (default: 0.25,none)"]


def test_a_device_torch_cannot_read_is_named_once():
    # It read "device='gpu': not a torch device: got device='gpu', expected ...".
    from diffsparse.devices import as_device

    with pytest.raises(ValueError, match="not a torch device") as error:
        as_device("gpu")
    assert str(error.value).count("'gpu'") == 1 and str(error.value).startswith("device='gpu': not a torch device")
