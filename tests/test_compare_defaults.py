"""What the commands generate when `--steps`, `--frames`, `--height` or `--width` is left out (`call_defaults`): what
the pipeline's own call uses without it, or nothing passed where the call works the value out itself. And what
`compare` reports: the size of the video it made, and the density over every segment of a pipeline that denoises
in several."""

import argparse
import inspect
import json

import numpy as np
import pytest
import torch
from test_allegro import tiny_pipeline as tiny_allegro_pipeline
from test_hunyuan_video15 import hunyuan15_pipe  # noqa: F401  (fixture)

import diffsparse
from diffsparse.compare import call_defaults, fill_call_defaults, generation_kwargs

SIZES = ("frames", "height", "width")


class Prepared(Exception):
    pass


def the_call_uses(pipe, **call) -> dict:
    """The frame count, height and width `pipe(**call)` prepares its latents at (each of these pipelines passes
    them to `prepare_latents` in pixels, after working out the ones left unset); the call is stopped there."""
    seen = {}
    signature = inspect.signature(type(pipe).prepare_latents)

    def prepare_latents(*args, **kwargs):
        arguments = signature.bind(pipe, *args, **kwargs).arguments
        seen.update({name: arguments[key] for name, key in zip(SIZES, ("num_frames", "height", "width"))
                     if key in arguments})
        raise Prepared

    vars(pipe)["prepare_latents"] = prepare_latents  # the instance's, past DiffusionPipeline's config-aware setattr
    try:
        with pytest.raises(Prepared), torch.no_grad():
            pipe(**call)
    finally:
        del vars(pipe)["prepare_latents"]
    return seen


def defaults_of(pipe) -> dict:
    defaults = call_defaults(pipe)
    return {name: defaults[name] for name in SIZES}


def filled(pipe, image: str | None = None) -> dict:
    """What `fill_call_defaults` sets where the command's options leave them `None`, with `--image` or without."""
    args = argparse.Namespace(steps=None, frames=None, height=None, width=None, image=image, call_kwargs=None)
    fill_call_defaults(args, pipe)
    return {name: getattr(args, name) for name in SIZES}


def tiny_mochi_pipeline():
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from diffsparse.pipelines.text import word_tokenizer

    vocabulary = ["<pad>", "</s>", "<unk>", "a", "red", "circle"]
    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=16, time_embed_dim=4, max_sequence_length=8,
    )
    vae = AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32,) * 4,
                             decoder_block_out_channels=(32,) * 4, layers_per_block=(1,) * 5)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocabulary), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=t5.eval(),
                         tokenizer=word_tokenizer(vocabulary, max_length=8), transformer=transformer.eval())


def test_mochi_s_size_is_its_default_height_and_width():
    # Before, 512 x 512: Mochi's call leaves the size None and takes its `default_height` and `default_width`.
    pipe = tiny_mochi_pipeline()
    assert defaults_of(pipe) == {"frames": 19, "height": 480, "width": 848}
    assert defaults_of(pipe) == the_call_uses(pipe, prompt="a red circle", max_sequence_length=8)


def test_allegro_s_frame_count_is_its_latent_sample_frames_in_video_frames():
    # Before, 4: the transformer's sample_frames, which counts latent frames; the call multiplies it by the VAE's 4.
    pipe = tiny_allegro_pipeline()
    assert defaults_of(pipe) == {"frames": 4 * pipe.vae_scale_factor_temporal, "height": 64, "width": 96}
    assert defaults_of(pipe) == the_call_uses(pipe, prompt="a red circle", max_sequence_length=8)


def test_ltx2_s_frame_count_is_121_or_left_to_its_duration_head():
    # Before, 17. LTX-2.0 and 2.3 make 121 frames; LTX-2.5's duration head predicts a count from the prompt, which
    # no fixed number gives: the commands leave it out of the call.
    from diffusers import LTX2Pipeline
    from diffusers.pipelines.ltx2.duration_head import LTX2DurationHead
    from test_ltx2 import tiny_ltx2_pipeline

    pipe = tiny_ltx2_pipeline("2.0")
    call = {"prompt": "a red circle", "max_sequence_length": 8}
    assert defaults_of(pipe) == {"frames": 121, "height": 512, "width": 768}
    assert defaults_of(pipe) == the_call_uses(pipe, **call)
    torch.manual_seed(0)
    head = LTX2DurationHead(video_cross_attention_dim=16, audio_cross_attention_dim=16, pooler_hidden_dim=8,
                            num_pooler_heads=2, mlp_hidden_dim=8)
    pipe = LTX2Pipeline(**{**pipe.components, "duration_head": head.eval()})
    assert filled(pipe) == {"frames": None, "height": 512, "width": 768}
    assert the_call_uses(pipe, **call)["frames"] != 121
    args = argparse.Namespace(steps=2, image=None, call_kwargs=None, **filled(pipe))
    assert "num_frames" not in generation_kwargs(pipe, args, "a red circle", 0)


def test_hunyuan_video15_s_size_is_its_own_16_by_9_bucket(hunyuan15_pipe):  # noqa: F811
    # Before, 512 x 512: the text-to-video call leaves both sides None and picks the crop bucket closest to 16:9 at
    # its transformer's target size.
    pipe = hunyuan15_pipe
    defaults = defaults_of(pipe)
    assert defaults["height"] < defaults["width"] and defaults["frames"] == 121
    assert defaults == the_call_uses(pipe, prompt="a red circle", num_inference_steps=2)


def test_an_input_image_leaves_a_size_the_pipeline_may_take_from_it_unset():
    # FLUX.2 sizes its output from its reference image where the size is unset: its default sample size, passed
    # explicitly, made a square 1024 image instead.
    from PIL import Image
    from test_flux2 import ENCODER_LAYERS, tiny_flux2_pipeline

    torch.manual_seed(0)
    pipe = tiny_flux2_pipeline()
    call = {"prompt": "a red circle", "max_sequence_length": 48, "text_encoder_out_layers": ENCODER_LAYERS}
    assert defaults_of(pipe) == {"frames": 1, **the_call_uses(pipe, **call)}
    assert the_call_uses(pipe, **call, image=Image.new("RGB", (96, 64))) == {"height": 64, "width": 96}
    assert filled(pipe, image="reference.png") == {"frames": 1, "height": None, "width": None}
    args = argparse.Namespace(steps=2, image=None, call_kwargs=None, **filled(pipe, image="reference.png"))
    assert not {"height", "width"} & set(generation_kwargs(pipe, args, "a red circle", 0))


def test_a_modular_pipeline_s_sizes_are_left_to_its_blocks(tiny_pipe):
    # Its blocks work them out (diffusers' modular Wan: the components' 81 frames at 480 x 832); before, 17 frames at
    # 512 x 512 were passed.
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanBlocks

    from diffsparse.compare import ModularCall

    modular = WanBlocks().init_pipeline()
    modular.update_components(**{name: getattr(tiny_pipe, name)
                                 for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")})
    assert defaults_of(ModularCall(modular)) == {"frames": None, "height": None, "width": None}


def test_the_result_holds_the_size_of_the_video_made(tiny_pipe, tmp_path, monkeypatch, capsys):
    # Wan rounds a frame count to 4k + 1: 7 asked makes 5. Before, compare.json and the printout said 7.
    import imageio.v3 as iio

    from diffsparse import compare
    from diffsparse.cli import main

    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: tiny_pipe)
    assert main(["compare", "--steps", "2", "--frames", "7", "--height", "32", "--width", "48", "--block-size", "16",
                 "--pattern", "window3d", "--density", "0.5", "--dense-steps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    made = iio.imread(tmp_path / "dense.mp4").shape[:3]
    assert made == (5, 32, 48) and (result["frames"], result["height"], result["width"]) == made
    assert "video: 5 frames 32x48, 2 steps" in capsys.readouterr().out
    # eval's table and bench pipeline's JSON say so too (they gave the request).
    from diffsparse import evaluate

    monkeypatch.setattr(evaluate, "load_pipeline_for", lambda args: tiny_pipe)
    small = ["--steps", "1", "--frames", "7", "--height", "32", "--width", "48", "--block-size", "16",
             "--dense-steps", "1"]
    assert main(["eval", *small, "--prompts", "1", "--pattern", "window3d", "--density", "0.5",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "; 5 frames 32x48, 1 steps" in (tmp_path / "eval" / "eval.md").read_text()
    assert main(["bench", "pipeline", *small, "--repeats", "1", "--out", str(tmp_path / "bench")]) == 0
    assert json.loads((tmp_path / "bench" / "bench_pipeline.json").read_text())["video"] == "5 frames 32x48, 1 steps"


def test_the_density_covers_every_chunk_of_a_pipeline_that_denoises_in_several(tmp_path):
    # A tiny Helios: 8 latent frames in 4 chunks of 2, each chunk its own 3-step loop. Before this test, counting
    # only the last chunk (stats() without since_apply) went unnoticed.
    from diffusers import HeliosPipeline, HeliosScheduler
    from test_helios import tiny_pipeline

    from diffsparse.compare import run_compare

    torch.manual_seed(0)
    pipe = tiny_pipeline(HeliosPipeline, HeliosScheduler(stages=1, stage_range=[0, 1]))
    call_kwargs = {"negative_prompt": "low quality", "guidance_scale": 5.0, "max_sequence_length": 16,
                   "num_latent_frames_per_chunk": 2, "history_sizes": [4, 2, 1]}
    args = argparse.Namespace(model=None, prompt="a red circle moving left", steps=3, frames=17, height=64, width=96,
                              seed=0, device="cpu", out=str(tmp_path), lpips_weights=None, two_stage=False,
                              still_candidates=1, image=None, call_kwargs=call_kwargs)
    config = diffsparse.SparseConfig(pattern=diffsparse.patterns.Window3D(window=(1, 1, 1)), block_size=16,
                                     dense_steps=1)
    result = run_compare(args, config, pipe=pipe)
    # Per layer (2): 4 chunks x cond and uncond x 2 sparse steps; the last chunk alone has 4.
    assert result.sparse_calls == 2 * 4 * 2 * 2
    # Each chunk's first step (2 calls per layer) dense: 8 of 24 calls per layer count 1.0.
    assert 0 < result.sparse_steps_density < 1
    assert result.mean_attention_density == pytest.approx((8 + 16 * result.sparse_steps_density) / 24)


def tiny_dfr_pipeline(duration_head: bool):
    """A tiny `LTX2DFRPipeline` (as tests/test_ltx2.py builds it), with a duration head or without (the component is
    optional)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2DFRPipeline
    from diffusers.pipelines.ltx2.duration_head import LTX2DurationHead
    from test_ltx2 import tiny_ltx2_pipeline, tiny_transformer

    components = {name: module for name, module in tiny_ltx2_pipeline("2.0").components.items()
                  if name not in ("transformer", "scheduler", "duration_head")}
    transformer = tiny_transformer("2.0", use_keyframes_abs_pos_embedding=True, vae_scale_factors=(2, 8, 8))
    torch.manual_seed(0)
    head = LTX2DurationHead(video_cross_attention_dim=16, audio_cross_attention_dim=16, pooler_hidden_dim=8,
                            num_pooler_heads=2, mlp_hidden_dim=8).eval() if duration_head else None
    return LTX2DFRPipeline(**components, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           duration_head=head)


def _flux2():
    from test_flux2 import tiny_flux2_pipeline

    torch.manual_seed(0)
    return tiny_flux2_pipeline()


def _cogvideox_i2v():
    from test_cogvideox_pipeline import tiny_cogvideox_pipeline

    return tiny_cogvideox_pipeline(image_to_video=True)


def _glm():
    """GLM-Image's tiny pipeline, as its test module's fixtures build it (their functions called directly)."""
    import test_glm_image

    return test_glm_image.glm_pipe.__wrapped__(test_glm_image.transformer.__wrapped__())


def _glm_call(edit: bool) -> dict:
    from test_glm_image import glm_call

    return {name: value for name, value in glm_call(edit).items() if name not in ("height", "width")}


def _pil(width: int, height: int):
    from PIL import Image

    return Image.new("RGB", (width, height), (200, 30, 30))


TEXT = {"prompt": "a red circle", "max_sequence_length": 8}
FLUX2_TEXT = {**TEXT, "max_sequence_length": 48, "text_encoder_out_layers": (0, 1, 2)}
# Per case: the tiny pipeline (built from the request, for a fixture), and its call without the sizes and frame
# count: the inputs these tiny text encoders need, and the input image where the command would get `--image`.
CASES = {
    "wan": (lambda request: request.getfixturevalue("tiny_pipe"), lambda: TEXT),
    "flux": (lambda request: __import__("test_flux").flux_pipe.__wrapped__(), lambda: TEXT),
    "sd3": (lambda request: __import__("test_sd3").tiny_sd3_pipeline(), lambda: TEXT),
    "mochi": (lambda request: tiny_mochi_pipeline(), lambda: TEXT),
    "allegro": (lambda request: tiny_allegro_pipeline(), lambda: TEXT),
    "ltx2": (lambda request: __import__("test_ltx2").tiny_ltx2_pipeline("2.0"), lambda: TEXT),
    "ltx2-dfr": (lambda request: tiny_dfr_pipeline(duration_head=False), lambda: {**TEXT, "sigmas": [1.0, 0.5]}),
    "ltx2-dfr-head": (lambda request: tiny_dfr_pipeline(duration_head=True),
                      lambda: {**TEXT, "sigmas": [1.0, 0.5], "max_seconds": 2.0}),
    "hunyuanvideo15": (lambda request: request.getfixturevalue("hunyuan15_pipe"), lambda: {"prompt": "a red circle"}),
    "cogvideox-i2v": (lambda request: _cogvideox_i2v(),
                      lambda: {**TEXT, "image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))}),
    "flux2": (lambda request: _flux2(), lambda: FLUX2_TEXT),
    # A 96 x 64 reference image: the output takes its size.
    "flux2-image": (lambda request: _flux2(), lambda: {**FLUX2_TEXT, "image": _pil(96, 64)}),
    "glm": (lambda request: _glm(), lambda: _glm_call(False)),
    "glm-edit": (lambda request: _glm(), lambda: _glm_call(True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_size_left_unset_is_one_the_call_works_out_and_each_given_is_what_it_uses(case, request):
    # `call_defaults` leaves an argument None (out of the call) only where the pipeline's own call, without it, works
    # one out; a number is what the call then prepares its latents at. Run as the commands call it (the numbers
    # passed, the Nones left out), stopped at `prepare_latents`. Before, GLM-Image text-to-image got no size and
    # failed in `prepare_latents` (`int(None)`), and LTX-2.5's DFR without a duration head got no frame count and
    # raised "`num_frames` must be supplied".
    from diffsparse.compare import frames_argument

    build, call = CASES[case]
    pipe, call = build(request), call()
    defaults = call_defaults(pipe, image="image" in call)
    given = {name: defaults[name] for name in ("height", "width") if defaults[name] is not None}
    used = the_call_uses(pipe, **call, **frames_argument(pipe, defaults["frames"]), **given)
    assert None not in used.values(), (defaults, used)
    assert {name: used[name] for name in given} == given
    if defaults["frames"] is not None and "frames" in used:
        # DFR pads its canvas to whole keyframe segments; 121 is one already.
        assert used["frames"] == defaults["frames"]
    # With every one left out: where the call works them all out itself, it gets those same values; the numbers are
    # needed where it cannot (GLM-Image text-to-image passes None on to its latents; DFR without a head raises).
    try:
        own = the_call_uses(pipe, **call)
    except ValueError as error:
        assert case == "ltx2-dfr" and "`num_frames` must be supplied" in str(error)
    else:
        assert own == used or (case == "glm" and own == {"height": None, "width": None})


def test_a_score_that_fails_keeps_the_videos_and_no_earlier_compare_json(tiny_pipe, tmp_path, monkeypatch):
    # Before, scoring came first: a score that failed (a broken AlexNet file in the torch hub cache, say) lost the
    # runs' videos, and an earlier run's compare.json stayed, describing other videos.
    from diffsparse import compare
    from diffsparse.demo import compare_once

    for name in ("compare.json", "compare.png", "dense.png", "sparse.png"):  # an earlier one-frame run's
        (tmp_path / name).write_text("earlier run")

    def failing(*args, **kwargs):
        raise ValueError("SSIM cannot score this")

    monkeypatch.setattr(compare, "ssim", failing)
    with pytest.raises(ValueError, match=r"SSIM cannot score this \(scoring failed after the runs; their videos were "
                                         r"written .*dense\.mp4.*compare\.json was not\)"):
        compare_once(tiny_pipe, "a red circle", "window3d", density=0.5, block_size=16, steps=1, frames=5, height=32,
                     width=32, out=tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["compare.mp4", "dense.mp4", "sparse.mp4"]


def test_a_video_that_cannot_be_written_keeps_both_runs_frames(tiny_pipe, tmp_path, monkeypatch):
    # Before, an encoder that failed after the runs (an ffmpeg without libx264, say) lost both of them, an earlier
    # run's files already deleted. An earlier run's compare.mp4 must not stay beside them, nor their frames.npz
    # beside a later run that wrote its videos.
    from diffsparse import compare
    from diffsparse.demo import compare_once

    from helpers import grey_timed_runs

    grey_timed_runs(monkeypatch)

    def failing(path, pixels, fps):
        raise RuntimeError("no libx264")

    def run():
        return compare_once(tiny_pipe, "a red circle", "window3d", density=0.5, block_size=16, steps=1, frames=5,
                            height=32, width=32, out=tmp_path)

    run()
    write_mp4 = compare._write_mp4
    monkeypatch.setattr(compare, "_write_mp4", failing)
    with pytest.raises(RuntimeError, match="no libx264") as raised:
        run()
    assert any(f"frames were saved to {tmp_path / 'frames.npz'}" in note for note in raised.value.__notes__)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["frames.npz"]
    kept = np.load(tmp_path / "frames.npz")
    assert kept["dense"].shape == kept["sparse"].shape == (5, 32, 32, 3)
    assert np.all(kept["dense"] == np.float32(0.2)) and np.all(kept["sparse"] == np.float32(0.8))
    monkeypatch.setattr(compare, "_write_mp4", write_mp4)
    run()
    assert "frames.npz" not in {path.name for path in tmp_path.iterdir()}


def test_frames_that_cannot_be_kept_either_leave_the_first_error_and_no_broken_file(tiny_pipe, tmp_path, monkeypatch):
    # Before, the failing np.savez's OSError replaced the encoder's ValueError (which the commands print alone) and
    # left a truncated frames.npz that np.load could not read.
    from diffsparse import compare
    from diffsparse.demo import compare_once

    def no_encoder(path, pixels, fps):
        raise ValueError("no libx264")

    def disk_full(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"PK")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compare, "_write_mp4", no_encoder)
    monkeypatch.setattr(compare.np, "savez", disk_full)
    with pytest.raises(ValueError, match=r"no libx264 \(writing the videos failed after the runs; their frames could "
                                         r"not be saved either \(OSError: .*No space left on device\)\)"):
        compare_once(tiny_pipe, "a red circle", "window3d", density=0.5, block_size=16, steps=1, frames=5, height=32,
                     width=32, out=tmp_path)
    assert not (tmp_path / "frames.npz").exists()


def test_frames_that_cannot_be_kept_either_leave_the_encoder_s_own_error_with_a_note(tiny_pipe, tmp_path, monkeypatch):
    # Not a ValueError: the encoder's error itself is raised again (not the save's), its note saying both.
    from diffsparse import compare
    from diffsparse.demo import compare_once

    def no_encoder(path, pixels, fps):
        raise RuntimeError("no libx264")

    def disk_full(file, **arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compare, "_write_mp4", no_encoder)
    monkeypatch.setattr(compare.np, "savez", disk_full)
    with pytest.raises(RuntimeError, match="no libx264") as raised:
        compare_once(tiny_pipe, "a red circle", "window3d", density=0.5, block_size=16, steps=1, frames=5, height=32,
                     width=32, out=tmp_path)
    assert any("their frames could not be saved either (OSError: " in note for note in raised.value.__notes__)
