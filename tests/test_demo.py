"""The demo page: its request function on the tiny pipeline, and the Gradio page around it."""

import re

import numpy as np
import pytest
from test_dit import dit_pipe  # noqa: F401  (fixture)

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
    assert f"Mean attention density {result.mean_attention_density:.3f} (dense calls count 1.0)" in summary
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
                       ({"frames": 2.5}, "frames must be a whole number"),
                       # before, int() said "cannot convert float NaN to integer", naming no field, and the page
                       # showed inf's OverflowError as "the run failed"
                       ({"height": float("nan")}, "height must be a whole number >= 1, got height=nan"),
                       ({"width": float("inf")}, "width must be a whole number >= 1, got width=inf"),
                       ({"seed": float("-inf")}, "seed must be a whole number, got seed=-inf")]
)
def test_bad_settings_raise_errors_naming_the_field(tiny_pipe, tmp_path, setting, field):
    with pytest.raises(ValueError, match=field):
        compare_once(tiny_pipe, "a red circle", **{"block_size": 16, **SMALL, **setting}, out=tmp_path)


@pytest.mark.parametrize(
    "setting, taken",
    # Each a form `SparseConfig` takes, which the conversions refused: float(None) was a TypeError, an int step
    # count became a fraction of 2.0 (refused), and int() of a (query, key) pair a TypeError.
    [({"density": None}, {"density": None}), ({"dense_steps": 2}, {"dense_steps": 2}),
     ({"block_size": (16, 32)}, {"block_size": (16, 32)}), ({"block_size": 32.0}, {"block_size": 32})],
)
def test_sparse_settings_reach_the_config_in_each_form_it_takes(tiny_pipe, tmp_path, monkeypatch, setting, taken):
    from diffsparse import demo

    class Configured(Exception):
        pass

    def configured(args, config, pipe, names):
        raise Configured(config)

    monkeypatch.setattr(demo, "run_compare", configured)
    with pytest.raises(Configured) as stopped:
        compare_once(tiny_pipe, "a red circle", "window3d", **{"block_size": 16, **SMALL, **setting}, out=tmp_path)
    (config,) = stopped.value.args
    assert {name: getattr(config, name) for name in taken} == taken
    assert all(type(getattr(config, name)) is type(value) for name, value in taken.items())


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
    with pytest.raises(gr.Error, match="still_candidates must be 0"):  # the tiny Wan has no first_frame
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 2)
    # ... also where its frame count would fail first (an image model, its slider fixed at 1 frame): before, the
    # page asked for 2 frames, which it would not let the user set.
    with pytest.raises(gr.Error, match="still_candidates must be 0"):
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


def test_each_field_of_the_form_reaches_its_own_setting(tiny_pipe, tmp_path, monkeypatch):
    # The handler passes the form's values on by position: two fields of the same range swapped (density and the
    # dense-steps fraction, height and width) would still run, on settings nobody asked for. Such neighbours get
    # different values here that are valid in either place, so only the place each lands in tells.
    pytest.importorskip("gradio")
    from diffsparse import demo

    runs = []
    monkeypatch.setattr(demo, "run_compare",
                        lambda args, config, pipe, names: runs.append((args, config)) or result_stub(tmp_path))
    submit = make_handler(tiny_pipe, model="tiny", out=tmp_path / "page")
    video, _ = submit("a red circle", "window3d", 0.3, 0.4, 32.0, "residual", "[1]", 3, 9, 48, 64, 7.0, 0, None,
                      '{"guidance_scale": 2}')
    assert video == str(tmp_path / "compare.mp4")
    ((args, config),) = runs
    assert (config.pattern, config.density, config.dense_steps, config.block_size, config.correction) == (
        "window3d", 0.3, 0.4, 32, "residual")
    assert list(config.dense_layers) == [1]
    assert (args.prompt, args.steps, args.frames, args.height, args.width, args.seed) == ("a red circle", 3, 9, 48,
                                                                                         64, 7)
    assert (args.model, args.out, args.call_kwargs, args.two_stage) == ("tiny", str(tmp_path / "page"),
                                                                        {"guidance_scale": 2}, False)


def test_still_candidates_choose_the_sampler(tmp_path):
    from diffsparse.pipelines import testbed

    pipe = testbed.load()
    small = {**SMALL, "frames": 5, "height": 32, "width": 32}
    result, _ = compare_once(pipe, "a red circle moving left", block_size=16, **small, still_candidates=2, out=tmp_path)
    assert result.sampler == "two-stage, best of 2 stills"
    assert compare_once(pipe, "a red circle", block_size=16, **small, out=tmp_path)[0].sampler == "one pass"
    for bad in (-1, True):
        with pytest.raises(ValueError, match="still_candidates must be an int >= 0"):
            compare_once(pipe, "a red circle", block_size=16, **small, still_candidates=bad, out=tmp_path)


def test_still_candidates_on_a_model_without_two_stages_name_the_pages_own_field(tiny_pipe, tmp_path):
    # The message came from compare's two-stage check and named `two_stage` and `model`, which the page does not have.
    message = (r"^still_candidates must be 0 \(one pass\) for WanPipeline: two-stage sampling from a still needs a "
               r"testbed model, got still_candidates=2$")
    with pytest.raises(ValueError, match=message):
        compare_once(tiny_pipe, "a red circle", "window3d", block_size=16, **SMALL, still_candidates=2, out=tmp_path)


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


def page_fields(pipe, out) -> dict:
    """The page's input fields for `pipe`, by their label up to its first parenthesis or colon."""
    import re

    gr = pytest.importorskip("gradio")
    fields = [b for b in build_demo(pipe, out=out).blocks.values()
              if isinstance(b, (gr.Slider, gr.Dropdown, gr.Image, gr.Number)) and b.label]
    return {re.split(r" \(|:|;", b.label)[0]: b for b in fields}


def test_the_page_starts_where_the_readme_says(tiny_pipe, tmp_path):
    # README's demo section: the page starts at `make run`'s config (searched at density 0.25); the steps and size
    # sliders at the model's own defaults, reaching twice them; still candidates 4 on testbed models, 0 otherwise; the
    # image field only for pipelines with an `image` argument. Before, none of this was checked: any of it could
    # change unnoticed.
    from diffsparse.pipelines import testbed

    wan, bed = page_fields(tiny_pipe, tmp_path), page_fields(testbed.load(), tmp_path)
    for page in (wan, bed):
        assert (page["pattern"].value, page["target block density"].value) == ("searched", 0.25)
    sliders = ("denoising steps", "frames", "height", "width")
    # The tiny Wan is a WanPipeline: 50 steps, 81 frames at 480 x 832 (the frame slider to 2F + 1, a 4k + 1 count).
    assert [(wan[name].value, wan[name].maximum) for name in sliders] == [(50, 100), (81, 163), (480, 960),
                                                                           (832, 1664)]
    # The testbed's evaluation size, inside the ranges of its CPU-sized model (up to 50 steps, 33 frames, 128 pixels).
    assert [(bed[name].value, bed[name].maximum) for name in sliders] == [(20, 50), (17, 33), (48, 128), (48, 128)]
    assert (bed["two-stage"].value, wan["two-stage"].value) == (4, 0)
    assert not wan["input image"].visible and not bed["input image"].visible


def test_sizes_a_pipeline_works_out_itself_start_at_its_own_and_are_not_passed(tiny_pipe, tmp_path, monkeypatch):
    # diffusers' modular Wan leaves its frame count and size to its blocks (`call_defaults` gives None): the sliders
    # start at 0, "the pipeline's own", which the page does not pass. Before, 17 frames at 512 x 512 were passed.
    pytest.importorskip("gradio")
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanBlocks

    from diffsparse import demo
    from diffsparse.compare import ModularCall

    modular = WanBlocks().init_pipeline()
    modular.update_components(**{name: getattr(tiny_pipe, name)
                                 for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")})
    pipe = ModularCall(modular)
    page = page_fields(pipe, tmp_path)
    for name in ("frames", "height", "width"):
        assert (page[name].value, page[name].minimum) == (0, 0) and "0: the pipeline's own" in page[name].label
    calls = []
    monkeypatch.setattr(demo, "run_compare",
                        lambda args, config, pipe, names: calls.append(args) or result_stub(tmp_path))
    make_handler(pipe, out=tmp_path)("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 0, 0, 0, 0, 0)
    assert (calls[0].steps, calls[0].frames, calls[0].height, calls[0].width) == (2, None, None, None)


def result_stub(tmp_path):
    from diffsparse.compare import CompareResult

    return CompareResult(model="tiny", config="SparseConfig()", frames=5, height=32, width=32, steps=2, seed=0,
                         device="cpu", dtype="fp32", offload="none", sampler="one pass", dense_seconds=1.0,
                         sparse_seconds=1.0, speedup=1.0, dense_denoise_seconds=1.0, sparse_denoise_seconds=1.0,
                         denoise_speedup=1.0, mean_attention_density=0.5, sparse_steps_density=0.5, sparse_calls=1,
                         psnr_db=30.0, ssim=0.9, lpips=None, video_path=str(tmp_path / "compare.mp4"))


def test_compare_once_defaults_to_the_models_own_size(tiny_pipe, tmp_path, monkeypatch):
    # As `diffsparse compare`: steps and size left out are the model's own (the tiny Wan's 50 steps, 81 frames at
    # 480 x 832), filled in by `run_compare`. Before, 20 steps and 17 frames at 48 x 48 whatever the model.
    from diffsparse import demo
    from diffsparse.compare import fill_call_defaults

    calls = []
    monkeypatch.setattr(demo, "run_compare",
                        lambda args, config, pipe, names: calls.append(args) or result_stub(tmp_path))
    compare_once(tiny_pipe, "a red circle", out=tmp_path)
    fill_call_defaults(calls[0], tiny_pipe)
    assert (calls[0].steps, calls[0].frames, calls[0].height, calls[0].width) == (50, 81, 480, 832)


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
    with pytest.raises(gr.Error, match="generates from an image: give one in the 'input image' field"):
        submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, None)
    # A file that is not there or not an image: the page said "the run failed: FileNotFoundError" after the warm-up.
    not_image = tmp_path / "not_image.png"
    not_image.write_text("hello")
    for path, message in ((tmp_path / "nowhere.png", "no such file"), (not_image, "not an image file PIL can read"),
                          (tmp_path, "a directory, not an image file")):
        with pytest.raises(gr.Error, match=re.escape(f"image={str(path)!r}: {message}")):
            submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, str(path))
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
    import socket

    gr = pytest.importorskip("gradio")
    from diffsparse import compare
    from diffsparse.demo import run_demo

    launched = {}
    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: tiny_pipe)
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    out = tmp_path / "elsewhere" / ".." / "videos"
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port: run_demo checks that it can listen on it
        port = probe.getsockname()[1]
    run_demo(argparse.Namespace(model=None, device="cpu", out=str(out), lpips_weights=None, host="127.0.0.1",
                                port=port))
    assert launched["allowed_paths"] == [str((tmp_path / "videos").resolve())]
    assert (launched["server_name"], launched["server_port"]) == ("127.0.0.1", port)


def test_the_summary_shows_the_results_own_numbers_and_warnings(tiny_pipe, tmp_path, monkeypatch):
    # A result whose every number differs, so that a swapped or constant field in the table shows.
    from diffsparse import demo
    from diffsparse.compare import CompareResult

    numbers = {"dense_seconds": 3.0, "sparse_seconds": 1.5, "speedup": 2.0, "dense_denoise_seconds": 3.75,
               "sparse_denoise_seconds": 1.25, "denoise_speedup": 3.0, "mean_attention_density": 0.4321,
               "sparse_steps_density": 0.2468, "sparse_calls": 12}
    result = CompareResult(model="tiny", config="SparseConfig()", frames=5, height=32, width=32, steps=2, seed=0,
                           device="cpu", dtype="fp32", offload="none", sampler="one pass", psnr_db=30.0, ssim=0.9,
                           lpips=None, video_path=str(tmp_path / "compare.mp4"), **numbers,
                           warnings=["diffsparse.apply: nothing runs sparse"])
    monkeypatch.setattr(demo, "run_compare", lambda args, config, pipe, names: result)
    _, summary = compare_once(tiny_pipe, "a red circle", "window3d", block_size=16, **SMALL, out=tmp_path)
    assert "| end-to-end seconds | 3.00 | 1.50 |" in summary
    assert "| text encoding + denoising seconds | 3.75 | 1.25 |" in summary
    assert "Mean attention density 0.432 (dense calls count 1.0); 0.247 outside the dense steps" in summary
    # Each speedup named by what it times, as the table's rows (before, "denoising" beside "text encoding +
    # denoising" in the table).
    assert "\nSpeedup 2.00x end-to-end, 3.00x text encoding + denoising (one run each).\n" in summary
    assert "**Warning:** diffsparse.apply: nothing runs sparse" in summary
    # Where nothing ran sparse the speedups time two dense runs: noise, and the page says so.
    result.sparse_calls = 0
    _, summary = compare_once(tiny_pipe, "a red circle", "window3d", block_size=16, **SMALL, out=tmp_path)
    assert ("\nSpeedup 2.00x end-to-end, 3.00x text encoding + denoising (one run each; nothing ran sparse: "
            "run-to-run noise).\n") in summary


def test_the_page_runs_one_request_at_a_time_and_clears_its_video_cache(tiny_pipe, tmp_path):
    # Each request applies and removes sparse attention on the one shared pipeline: two at once failed.
    pytest.importorskip("gradio")
    page = build_demo(tiny_pipe, out=tmp_path)
    (event,) = [fn for fn in page.fns.values() if fn.api_name == "compare"]
    assert event.concurrency_limit == 1
    assert page.delete_cache == (3600, 3600)  # before, Gradio kept a copy of every request's video for good


def test_a_failure_inside_the_run_reaches_the_page_with_its_type_and_message(tiny_pipe, tmp_path):
    # Before, only ValueErrors became messages: a TypeError from inside the pipeline (a call argument of the wrong
    # type) reached the page as a bare "Error".
    gr = pytest.importorskip("gradio")
    processors = tiny_pipe.transformer.attn_processors
    submit = make_handler(tiny_pipe, out=tmp_path)
    with pytest.raises(gr.Error, match="the run failed: TypeError: "):
        submit("a red circle", "window3d", 0.3, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, None,
               '{"guidance_scale": "high"}')
    assert all(tiny_pipe.transformer.attn_processors[name] is p for name, p in processors.items())


def test_a_scoring_failure_on_the_page_says_the_videos_were_written(tiny_pipe, tmp_path, monkeypatch):
    # `run_compare` notes it on the error (`add_note`) when it is not a ValueError: the page showed the type and
    # message alone, as if the runs were lost.
    gr = pytest.importorskip("gradio")
    from diffsparse import compare

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory in SSIM")

    monkeypatch.setattr(compare, "ssim", out_of_memory)
    submit = make_handler(tiny_pipe, out=tmp_path)
    with pytest.raises(gr.Error, match=r"the run failed: RuntimeError: out of memory in SSIM \(scoring failed after "
                                       r"the runs; their videos were written \(.*compare\.mp4"):
        submit("a red circle", "window3d", 0.3, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0, None, "")
    assert (tmp_path / "compare.mp4").is_file() and not (tmp_path / "compare.json").exists()


@pytest.mark.parametrize(
    "correction, dense_steps, dense_layers, steps, warned",
    [
        # Dense layers covering every block: apply's "nothing runs sparse" went to the server's stderr only.
        ("none", 0.5, "10", 2, True),
        # The untimed warm-up runs one sparse step; with a correction that step has none before it to measure at,
        # and its "nothing runs sparse" reached the page although the timed run ran sparse.
        ("residual", 0.34, "0", 3, False),
    ],
)
def test_diffsparse_warnings_reach_the_page_and_the_warm_up_s_do_not(tiny_pipe, tmp_path, monkeypatch, correction,
                                                                       dense_steps, dense_layers, steps, warned):
    gr = pytest.importorskip("gradio")
    shown = []
    monkeypatch.setattr(gr, "Warning", shown.append)
    submit = make_handler(tiny_pipe, out=tmp_path)
    _, summary = submit("a red circle", "window3d", 0.3, dense_steps, 16, correction, dense_layers, steps, 5, 32, 32,
                        0, 0)
    if warned:
        assert len(shown) == 1 and "nothing runs sparse" in shown[0] and f"**Warning:** {shown[0]}" in summary
    else:
        assert not [message for message in shown if "nothing runs sparse" in message]
        assert "nothing runs sparse" not in summary


def test_a_dense_layer_the_model_lacks_is_refused_before_any_sampling(tmp_path):
    # Before, it was refused at the sparse run's apply: after the two-stage stills and the dense warm-up (162
    # transformer calls, 100 s at the page's defaults).
    from diffsparse.pipelines import testbed

    pipe = testbed.load()
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"dense_layers=\[7\]: no transformer has block 7"):
            compare_once(pipe, "a red circle moving left", "window3d", density=0.25, block_size=16, dense_layers="[7]",
                         **{**SMALL, "frames": 5, "height": 32, "width": 32}, still_candidates=4, out=tmp_path)
    finally:
        hook.remove()
    assert calls == []


def test_a_busy_port_is_said_before_the_model_loads(tmp_path, monkeypatch):
    # Before, Gradio's launch failed with an OSError traceback after the model had loaded.
    import argparse
    import socket

    gr = pytest.importorskip("gradio")
    from diffsparse import compare
    from diffsparse.demo import run_demo

    loads = []
    monkeypatch.setattr(compare, "load_pipeline_for", loads.append)
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: None)
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on port {port} of host '127.0.0.1'.*another --port"):
            run_demo(argparse.Namespace(model=None, device="cpu", out=str(tmp_path), lpips_weights=None,
                                        host="127.0.0.1", port=port))
    assert loads == []


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "0.0.0.0"])
def test_a_free_port_passes_on_any_host_gradio_takes(host):
    # An IPv6 host failed the check, made for IPv4, although Gradio serves it.
    import socket

    from diffsparse.demo import check_port_free

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with socket.create_server((host.strip("[]"), 0), family=family) as held:
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match="cannot listen"):
            check_port_free(host, port)
    check_port_free(host, port)


def test_an_image_pipeline_s_sizes_start_blank_only_where_its_call_reads_them_from_the_image():
    # CogVideoX image-to-video resizes its image to its transformer's sample size (8 x 8 latents x 8 here): its
    # sliders start there. Before, every size such a pipeline leaves None started at 0, "the pipeline's own".
    # FLUX.2 sizes its output from its reference image where the size is unset: blank.
    from test_cogvideox_pipeline import tiny_cogvideox_pipeline
    from test_flux2 import tiny_flux2_pipeline

    from diffsparse.demo import UNSET, form_ranges

    cog = form_ranges(tiny_cogvideox_pipeline(image_to_video=True))
    assert (cog["height"][3], cog["width"][3], cog["frames"][3]) == (64, 64, 49)
    flux2 = form_ranges(tiny_flux2_pipeline())
    assert (flux2["height"][0], flux2["height"][3], flux2["width"][0], flux2["width"][3]) == (UNSET, None, UNSET, None)


def stub_run_compare(monkeypatch, result) -> list:
    """`demo.run_compare` replaced by one returning `result`; the list it returns collects each call's args."""
    from diffsparse import demo

    calls = []
    monkeypatch.setattr(demo, "run_compare", lambda args, config, pipe, names: calls.append(args) or result)
    return calls


@pytest.mark.parametrize("stills, two_stage", [(0, False), (1, True), (4, True)])
def test_the_seed_and_still_candidates_reach_the_run_and_the_summary_names_the_frames_scored(
        tmp_path, monkeypatch, stills, two_stage):
    # One still candidate is `compare --two-stage --still-candidates 1` (two stages from a single still), not one
    # pass: only 0 is. The seed is the request's, not 0. With two stages frame 0 is the shared still, which no run
    # generated and the metrics leave out: the summary's quality line says so, as `compare`'s table.
    from diffsparse.pipelines import testbed

    calls = stub_run_compare(monkeypatch, result_stub(tmp_path))
    # The testbed: the one model that samples in two stages (compare_once refuses still candidates for others).
    _, summary = compare_once(testbed.load(), "a red circle", "window3d", block_size=16, **{**SMALL, "seed": 7},
                              still_candidates=stills, out=tmp_path)
    assert (calls[0].seed, calls[0].two_stage, calls[0].still_candidates) == (7, two_stage, max(1, stills))
    scored = "frames 1 on (frame 0 is the shared still)" if two_stage else "every frame"
    assert f"\nSparse vs dense, {scored}: PSNR 30.00 dB, SSIM 0.9000, LPIPS not computed (" in summary


def test_the_summary_says_frames_too_small_for_lpips_are_why_it_is_missing(tiny_pipe, tmp_path, monkeypatch):
    # The result's own frame size (height x width): frames under LPIPS's 31 pixels have no score whatever weights
    # there are, and the page said the weights or packages were missing instead.
    from dataclasses import replace

    stub_run_compare(monkeypatch, replace(result_stub(tmp_path), height=16, width=24))
    _, summary = compare_once(tiny_pipe, "a red circle", "window3d", block_size=16, **SMALL, out=tmp_path)
    assert "LPIPS not computed (frames of 16x24 pixels, LPIPS (AlexNet) needs at least 31x31)." in summary


def test_the_page_runs_with_the_model_device_output_and_lpips_weights_it_was_given(tiny_pipe, tmp_path, monkeypatch):
    # `diffsparse demo --lpips-weights` (and the model, device and --out) reach every request's run, as
    # `compare --lpips-weights`: dropped, the page scored with the hub cache's weights or none.
    pytest.importorskip("gradio")
    calls = stub_run_compare(monkeypatch, result_stub(tmp_path))
    submit = make_handler(tiny_pipe, model="tiny", device="cpu", out=tmp_path / "videos", lpips_weights="w.pth")
    submit("a red circle", "window3d", 0.0, 0.5, 16, "none", "0", 2, 5, 32, 32, 0, 0)
    assert (calls[0].model, calls[0].device, calls[0].out, calls[0].lpips_weights) == (
        "tiny", "cpu", str(tmp_path / "videos"), "w.pth")


@pytest.mark.parametrize("fixed", ["height", "width"])
def test_a_size_the_pipeline_does_not_take_is_a_fixed_slider(tiny_pipe, tmp_path, monkeypatch, fixed):
    # HunyuanVideo 1.5's image-to-video sizes its video from its image, taking no height or width (`takes_size`):
    # a slider the user could move would change nothing. Each of the two on its own; the other stays movable.
    from diffsparse import demo

    monkeypatch.setattr(demo, "takes_size", lambda pipe, name: name != fixed)
    page = page_fields(tiny_pipe, tmp_path)
    assert {name: page[name].interactive for name in ("height", "width")} == {
        name: name != fixed for name in ("height", "width")}


def test_the_pages_call_argument_messages_name_its_fields_not_the_clis_options(tiny_pipe, tmp_path):
    # They said "--call-kwargs sets 'num_frames', which the command sets itself: use its option (--frames)
    # instead", options the page does not have.
    from diffsparse import compare
    from diffsparse.demo import PAGE_NAMES

    assert set(compare.COMMAND_NAMES) == set(PAGE_NAMES)  # a name for every setting the messages name
    field = "the field 'more pipeline call arguments' sets"
    for call_kwargs, message in (
        ('{"num_frames": 5}', f"{field} 'num_frames', which the page sets itself: use the 'frames' slider instead"),
        ('{"num_inference_steps": 3}', "which the page sets itself: use the 'denoising steps' slider instead"),
        ('{"output_type": "pt"}', f"{field} 'output_type', which the page sets itself (the frames come back"),
        ('{"num_videos_per_prompt": 2}', f"{field} num_videos_per_prompt=2: the page generates and scores one video"),
        ('{"guidance": 1}', f"{field} 'guidance', which WanPipeline does not take; it takes "),
    ):
        with pytest.raises(ValueError) as error:
            compare_once(tiny_pipe, "a red circle", block_size=16, **SMALL, call_kwargs=call_kwargs, out=tmp_path)
        said = str(error.value)
        assert message in said and "--call-kwargs" not in said and "--frames" not in said, said
        assert "the command" not in said and "option" not in said, said
    # The commands' own wording is as before.
    with pytest.raises(ValueError, match=r"^--call-kwargs sets 'num_frames', which the command sets itself: use its "
                                         r"option \(--frames\) instead$"):
        compare.check_call_kwargs({"num_frames": 5})


def test_a_class_conditional_pipelines_missing_input_is_asked_for_in_the_pages_field(dit_pipe, tmp_path):  # noqa: F811
    # DiT takes no prompt: its class labels come with the call arguments. Raised at the generation, the page's
    # message said "give it with --call-kwargs", an option the page does not have.
    import json
    from types import SimpleNamespace

    from diffsparse import compare

    pipe = dit_pipe
    with pytest.raises(ValueError) as error:
        compare_once(pipe, "a red circle", "window3d", density=0.3, block_size=16, steps=2, out=tmp_path)
    assert str(error.value) == ("DiTPipeline takes no prompt and needs class_labels: give it in the field 'more "
                                'pipeline call arguments\', e.g. {"class_labels": ...}')
    result, _ = compare_once(pipe, "a red circle", "window3d", density=0.3, block_size=16, steps=2, out=tmp_path,
                             call_kwargs=json.dumps({"class_labels": [3]}))
    assert result.psnr_db > 0 and result.call_kwargs == {"class_labels": [3]}
    # The commands' own wording, now said before the model loads (its class read from model_index.json).
    pipe.save_pretrained(tmp_path / "dit")
    args = SimpleNamespace(model=str(tmp_path / "dit"), call_kwargs=None, image=None)
    with pytest.raises(ValueError, match=r"^DiTPipeline takes no prompt and needs class_labels: give it with "
                                         r"--call-kwargs '\{\"class_labels\": \.\.\.\}'$"):
        compare.check_call_kwargs_before_loading(args)
    compare.check_call_kwargs_before_loading(SimpleNamespace(**{**vars(args), "call_kwargs": {"class_labels": [3]}}))


def test_a_seed_out_of_torchs_range_says_which_way_to_move_it(tiny_pipe, tmp_path):
    # Below the range it said "lower seed" too, away from the range.
    for seed, way in ((-(2**63) - 1, "raise"), (2**64, "lower")):
        with pytest.raises(ValueError, match=rf"take -2\*\*63 to 2\*\*64 - 1 \(64 bits\); {way} seed$"):
            compare_once(tiny_pipe, "a red circle", block_size=16, **{**SMALL, "seed": seed}, out=tmp_path)
    from diffsparse.compare import check_seed_range

    check_seed_range(-(2**63)), check_seed_range(2**64 - 1)  # the range's ends pass


def test_the_commands_settings_reach_the_page_and_a_missing_lpips_file_is_said_before_loading(tmp_path, monkeypatch):
    # `diffsparse demo --out/--lpips-weights/--model/--device` must reach the page's runs: only the allowed path was
    # checked, so videos written to the default folder (which the page is not allowed to serve) or scored without the
    # weights asked for went unnoticed. A weights file that is not there is said before the model loads.
    import argparse
    import socket

    pytest.importorskip("gradio")
    from diffsparse import compare, demo, metrics

    loads, built = [], []
    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: loads.append(args) or "the pipeline")

    class Page:
        def launch(self, **kwargs):
            pass

    monkeypatch.setattr(demo, "build_demo", lambda pipe, **kwargs: built.append((pipe, kwargs)) or Page())
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    weights = tmp_path / "alexnet.pth"
    command = argparse.Namespace(model="tiny", device="cpu", out=str(tmp_path / "videos"), lpips_weights=str(weights),
                                 host="127.0.0.1", port=port)
    with pytest.raises(ValueError, match=r"lpips_weights=.*alexnet\.pth'?: no such file"):
        demo.run_demo(command)
    assert loads == [] and built == []
    monkeypatch.setattr(metrics, "lpips_weights", lambda path: None)  # what the file holds: metrics' own tests
    demo.run_demo(command)
    assert built == [("the pipeline", {"model": "tiny", "device": "cpu", "out": str(tmp_path / "videos"),
                                       "lpips_weights": str(weights)})]
