"""The demo page: its request function on the tiny pipeline, and the Gradio page around it."""

import numpy as np
import pytest

from diffsparse.demo import build_demo, compare_once, make_handler
from diffsparse.patterns import PATTERNS

SMALL = {"steps": 2, "frames": 17, "height": 64, "width": 96, "seed": 0}  # 5 x 4 x 6 tokens


def test_one_request_generates_both_videos_and_reports_the_numbers(tiny_pipe, tmp_path):
    result, summary = compare_once(
        tiny_pipe, "a red circle moving left", "window3d", density=0.3, dense_steps=0.5, block_size=16,
        correction="residual", **SMALL, model="tiny", out=tmp_path,
    )
    assert (tmp_path / "compare.mp4").is_file() and result.video_path == str(tmp_path / "compare.mp4")
    assert result.mean_attention_density < 1.0  # the second step ran sparse
    assert f"PSNR {result.psnr_db:.2f} dB" in summary and "correction='residual'" in summary
    assert "density=0.3" in result.config


def test_a_request_scores_lpips_with_the_weights_the_page_was_given(tiny_pipe, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)  # random weights stand in for the checkpoint
    result, summary = compare_once(tiny_pipe, "a red circle", "window3d", density=0.3, dense_steps=0.5, block_size=16,
                                   **SMALL, out=tmp_path, lpips_weights=str(weights))
    assert result.lpips > 0 and f"LPIPS {result.lpips:.4f}" in summary


@pytest.mark.parametrize(
    "setting, field", [({"correction": "magic"}, "correction"), ({"density": 1.5}, "density"),
                       ({"pattern": "nope"}, "pattern"), ({"dense_steps": 1.0}, "dense_steps"),
                       ({"dense_layers": "first"}, "dense_layers"), ({"dense_layers": "[-1]"}, "dense_layers"),
                       # a cleared number box (None) or 0 steps: before, a TypeError or an IndexError from inside
                       ({"seed": None}, "seed must be a whole number"),
                       ({"steps": 0}, "steps must be a whole number >= 1"),
                       ({"frames": 2.5}, "frames must be a whole number")]
)
def test_bad_settings_raise_errors_naming_the_field(tiny_pipe, tmp_path, setting, field):
    with pytest.raises(ValueError, match=field):
        compare_once(tiny_pipe, "a red circle", **{"block_size": 16, **SMALL, **setting}, out=tmp_path)


def test_the_page_builds_and_shows_bad_settings_as_messages(tiny_pipe, tmp_path):
    gr = pytest.importorskip("gradio")
    assert isinstance(build_demo(tiny_pipe, out=tmp_path), gr.Blocks)
    submit = make_handler(tiny_pipe, out=tmp_path)
    with pytest.raises(gr.Error, match="density"):
        submit("a red circle", "radial", 1.5, 0.2, 16, "none", "0", 2, 5, 32, 32, 0, 0)
    video, summary = submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0)
    assert video.endswith("compare.mp4") and "SSIM" in summary
    video, summary = submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "[1]", 2, 5, 32, 32, 0, 0)
    assert "dense_layers=[1]" in summary
    with pytest.raises(gr.Error, match="dense_layers"):
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "[1", 2, 5, 32, 32, 0, 0)
    with pytest.raises(gr.Error, match="two_stage needs the testbed pipeline"):  # the tiny Wan has no first_frame
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 2)
    # ... also where its frame count would fail first (an image model, its slider fixed at 1 frame): before, the
    # page asked for 2 frames, which it would not let the user set.
    with pytest.raises(gr.Error, match="two_stage needs the testbed pipeline"):
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 1, 32, 32, 0, 2)
    # The pattern field offers every registered name and the measured best trade, and takes patterns with parameters.
    (field,) = [b for b in build_demo(tiny_pipe, out=tmp_path).blocks.values()
                if isinstance(b, gr.Dropdown) and b.label.startswith("pattern")]
    offered = [value for _, value in field.choices]
    assert set(PATTERNS) < set(offered) and "searched(sample_rows=8)" in offered
    assert field.allow_custom_value
    video, summary = submit("a red circle", "searched(sample_rows=8)", 0.5, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0)
    assert "sample_rows=8" in summary
    with pytest.raises(gr.Error, match="pattern"):
        submit("a red circle", "radial(nope=1)", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0)
    # The call-arguments field reaches the pipeline: guidance 1 turns classifier-free guidance off (one transformer
    # call per step, not two); bad JSON or a key the pipeline does not take is a message naming it.
    calls = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, None, "")
        with_cfg, calls[:] = len(calls), []
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, None, '{"guidance_scale": 1}')
    finally:
        hook.remove()
    assert len(calls) == with_cfg // 2
    with pytest.raises(gr.Error, match="call_kwargs: expected a JSON object"):
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, None, "{guidance: 1}")
    with pytest.raises(gr.Error, match="'guidance', which WanPipeline does not take"):
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, None, '{"guidance": 1}')


def test_still_candidates_choose_the_sampler(tmp_path):
    from diffsparse.pipelines import testbed

    pipe = testbed.load()
    small = {**SMALL, "frames": 5, "height": 32, "width": 32}
    result, _ = compare_once(pipe, "a red circle moving left", block_size=16, **small, still_candidates=2, out=tmp_path)
    assert result.sampler == "two-stage, best of 2 stills"
    assert compare_once(pipe, "a red circle", block_size=16, **small, out=tmp_path)[0].sampler == "one pass"
    with pytest.raises(ValueError, match="still_candidates must be an int >= 0"):
        compare_once(pipe, "a red circle", block_size=16, **small, still_candidates=-1, out=tmp_path)


def test_the_form_starts_at_each_models_own_size(tiny_pipe):
    # A real pipeline's call defaults (the tiny Wan is a WanPipeline: 50 steps, 81 frames at 480 x 832); the testbed
    # its evaluation size. Every default lies inside its slider.
    from diffsparse.demo import form_ranges
    from diffsparse.pipelines import testbed

    wan = form_ranges(tiny_pipe)
    assert {name: r[3] for name, r in wan.items()} == {"steps": 50, "frames": 81, "height": 480, "width": 832}
    assert {name: r[3] for name, r in form_ranges(testbed.load()).items()} == {
        "steps": 20, "frames": 17, "height": 48, "width": 48}
    assert all(low <= value <= high and (value - low) % step == 0 for low, high, step, value in wan.values())


def test_image_to_video_pipelines_take_the_pages_image(tmp_path):
    # The image field shows for pipelines with an `image` argument, and its file reaches the pipeline.
    gr = pytest.importorskip("gradio")
    from PIL import Image

    from helpers import tiny_image_to_video_pipeline

    pipe = tiny_image_to_video_pipeline()
    (field,) = [b for b in build_demo(pipe, out=tmp_path).blocks.values() if isinstance(b, gr.Image)]
    assert field.visible
    image_path = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(image_path)
    submit = make_handler(pipe, out=tmp_path)
    with pytest.raises(gr.Error, match="give one with --image"):
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, None)
    video, summary = submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, str(image_path))
    assert video.endswith("compare.mp4") and "SSIM" in summary


def test_the_pages_number_boxes_reach_compare_onces_checks_unconverted(tiny_pipe, tmp_path):
    # Before, the handler ran int() on them first: a cleared box (None) was a TypeError, not a message, and a seed
    # of 1.5 ran seed 1. A slider's whole float (4.0) still counts as its int.
    gr = pytest.importorskip("gradio")
    submit = make_handler(tiny_pipe, out=tmp_path)
    form = ("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32)
    for seed, stills, message in ((None, 0, "seed must be a whole number"), (1.5, 0, "seed must be a whole number"),
                                  (0, None, "still_candidates must be an int"), (0, 1.5, "still_candidates must be")):
        with pytest.raises(gr.Error, match=message):
            submit(*form, seed, stills)
    video, summary = submit(*form, 0.0, 0.0)
    assert video.endswith("compare.mp4") and "Sampler: one pass" in summary


def test_the_page_serves_the_videos_from_an_output_folder_anywhere(tiny_pipe, tmp_path, monkeypatch):
    # Gradio serves files only from the working directory and the temp folder unless launch() allows more: an --out
    # elsewhere gave videos the page would not show.
    import argparse

    gr = pytest.importorskip("gradio")
    from diffsparse import compare
    from diffsparse.demo import run_demo

    launched = {}
    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: tiny_pipe)
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    out = tmp_path / "elsewhere" / ".." / "videos"
    run_demo(argparse.Namespace(model=None, device="cpu", out=str(out), lpips_weights=None, host="127.0.0.1",
                                port=7860))
    assert launched["allowed_paths"] == [str((tmp_path / "videos").resolve())]
    assert (launched["server_name"], launched["server_port"]) == ("127.0.0.1", 7860)
