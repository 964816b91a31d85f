"""`diffsparse demo`: a Gradio page that generates one prompt dense and sparse, side by side, with the numbers.

The page is a thin form over `diffsparse.compare.run_compare`, the same code as `diffsparse compare`: one
pipeline is loaded at start-up and every request generates the dense video and the sparse one from the same
seed. Gradio is an optional dependency (`pip install -e ".[demo]"`); `compare_once` works without it.
"""

from __future__ import annotations

import argparse
import logging
import math
import numbers
import socket
from pathlib import Path

from .compare import (
    CompareResult,
    call_defaults,
    check_call_kwargs_before_loading,
    is_image_pipeline,
    parse_call_kwargs,
    pipeline_name,
    run_compare,
    scored_label,
    speedup_note,
    takes_image,
    takes_size,
)
from .config import CORRECTIONS, SparseConfig, StepCount, parse_dense_layers
from .metrics import lpips_missing_reason
from .patterns import PATTERNS

# The form's choices; `"none"` is the form's spelling of `SparseConfig.correction=None`.
CORRECTION_CHOICES = ("none", *CORRECTIONS)
# Every registered pattern by name (`searched`: one search whose budget is shared over the layer, the best quality
# at 25% density measured on the testbed), then the fastest search measured there near 30 dB (README, "End-to-end
# speed on the testbed"); the field also takes any pattern text with parameters.
PATTERN_CHOICES = (*sorted(PATTERNS), "searched(sample_rows=8)")
# Gradio's cache holds a copy of every request's video: checked hourly, those over an hour old deleted.
DELETE_CACHE = (3600, 3600)
# What the messages about the call arguments call the settings (`compare.COMMAND_NAMES` for the commands): the page's
# fields, by their labels (`build_demo`), not the CLI's options (`--call-kwargs`, `--frames`), which it does not have.
PAGE_NAMES = {
    "call_kwargs": "the field 'more pipeline call arguments'",
    "give_inputs": "give {it} in the field 'more pipeline call arguments', e.g. {example}",
    "pattern_given": "the 'pattern' field's {pattern!r}",
    "density_given": "the 'target block density' slider at {density:g}",
    "no_density": "set the 'target block density' slider to 0",
    "pattern_setting": "the 'pattern' field",
    "caller": "the page",
    "scores": "the page generates and scores",
    "give_image": "give one in the 'input image' field",
    "leave_image": "clear the 'input image' field",
    "prompt": "the 'prompt' field",
    "num_frames": "the 'frames' slider",
    "video_length": "the 'frames' slider",
    "height": "the 'height (pixels)' slider",
    "width": "the 'width (pixels)' slider",
    "num_inference_steps": "the 'denoising steps' slider",
    "generator": "the 'seed' field",
    "image": "the 'input image' field",
    "first_frame": "the 'two-stage: still candidates' slider",
}

logger = logging.getLogger(__name__)


def compare_once(
    pipe,
    prompt: str,
    pattern: str = "radial",
    density: float | None = 0.0,
    dense_steps: StepCount = 0.2,
    block_size: int | tuple[int, int] = 64,
    correction: str = "none",
    dense_layers: int | list[int] | str = 0,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    still_candidates: int = 0,
    image: str | None = None,
    call_kwargs: str | dict | None = None,
    *,
    model: str | None = None,
    device: str = "cpu",
    out: str | Path = "outputs/demo",
    lpips_weights: str | None = None,
) -> tuple[CompareResult, str]:
    """One request of the page: `(result, markdown summary)`; the side-by-side video is `result.video_path`.

    `density=0` (or `None`) keeps the pattern's own parameters (`SparseConfig.density=None`); `dense_steps` and
    `block_size` take `SparseConfig`'s forms (an int step count or a float fraction; a size or a `(query, key)`
    pair); a bad value raises the `ValueError` of `SparseConfig` that names the field. `dense_layers`: as
    `SparseConfig.dense_layers`, or its text form (`"2"`, `"[3]"`: `parse_dense_layers`), as the page's field gives
    it. `still_candidates`: 0 samples in one pass; N >= 1 (testbed models) samples in two stages from the best of N
    stills, as `diffsparse compare --two-stage --still-candidates N` (what `make run` shows, with N = 4). `image`:
    an image file for image-to-video and editing pipelines (`diffsparse compare --image`). `call_kwargs`: more
    keyword arguments of the pipeline call, a dict or its JSON text, as the page's field gives it (`diffsparse
    compare --call-kwargs`); empty text: none. `steps`, `frames`, `height`, `width`: `None` (the default) takes the
    model's own, as `diffsparse compare` leaves them (`compare.call_defaults`: the testbed's evaluation size, Wan's
    50 steps and 81 frames at 480 x 832, or left to the pipeline where it works one out itself); the result holds the
    size of the video made.
    `lpips_weights`: the AlexNet checkpoint for LPIPS (`diffsparse demo --lpips-weights`; default: the torch hub
    cache's, when it holds one).
    """
    # Not a bool: True ran two stages from 1 still, where the seed's same check refuses it.
    if not isinstance(still_candidates, int) or isinstance(still_candidates, bool) or still_candidates < 0:
        raise ValueError(
            f"still_candidates must be an int >= 0 (0: one pass), got still_candidates={still_candidates!r}")
    from .pipelines.testbed import TestbedPipeline

    # Here, not in run_compare: its message names `two_stage` and `model`, settings the page does not have.
    if still_candidates > 0 and not isinstance(pipe, TestbedPipeline):
        raise ValueError(
            f"still_candidates must be 0 (one pass) for {pipeline_name(pipe)}: two-stage sampling from a still needs "
            f"a testbed model, got still_candidates={still_candidates}")
    # The page's number fields: a cleared box gives None; the CLI's own types refuse these before any work. None
    # for the video's steps and size is the model's own (`fill_call_defaults`).
    for name, value, least in (("steps", steps, 1), ("frames", frames, 1), ("height", height, 1), ("width", width, 1),
                               ("seed", seed, None)):
        if value is None and name != "seed":
            continue
        # isfinite first: int() of NaN or inf raised its own error, which named no field.
        whole = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                 and value == int(value))
        if not whole or least and value < least:
            allowed = "a whole number" + (f" >= {least}" if least else "")
            raise ValueError(f"{name} must be {allowed}, got {name}={value!r}")
    if isinstance(call_kwargs, str):
        call_kwargs = parse_call_kwargs(call_kwargs) if call_kwargs.strip() else None
    if correction not in CORRECTION_CHOICES:
        raise ValueError(f"correction must be one of {CORRECTION_CHOICES}, got correction={correction!r}")
    # Passed on as given, for `SparseConfig` to check and name: float() made a step count (2) a fraction it
    # refused, int() failed on a (query, key) pair, and None (a cleared box) failed in either.
    config = SparseConfig(
        pattern=pattern,
        density=density or None,
        dense_steps=dense_steps,
        block_size=_whole(block_size),
        correction=None if correction == "none" else correction,
        dense_layers=parse_dense_layers(dense_layers) if isinstance(dense_layers, str) else dense_layers,
    )
    args = argparse.Namespace(
        model=model,
        prompt=prompt,
        **{name: None if value is None else int(value)
           for name, value in (("steps", steps), ("frames", frames), ("height", height), ("width", width))},
        seed=int(seed),
        device=device,
        out=str(out),
        lpips_weights=lpips_weights,
        two_stage=still_candidates > 0,
        still_candidates=max(1, still_candidates),
        image=image,
        call_kwargs=call_kwargs,
    )
    # The page's names in run_compare's messages and warnings, which named the CLI's options; the call arguments
    # checked first, as before.
    check_call_kwargs_before_loading(args, pipe, names=PAGE_NAMES)
    result = run_compare(args, config, pipe=pipe, names=PAGE_NAMES)
    lpips_text = (f"not computed ({lpips_missing_reason((result.height, result.width))})" if result.lpips is None
                  else f"{result.lpips:.4f}")
    denoise = f"{result.dense_denoise_seconds:.2f} | {result.sparse_denoise_seconds:.2f}"
    # "text encoding + denoising", as the table's row and the CLI: the time up to the last step's end.
    note = speedup_note(result)
    speed = (f"Speedup {result.speedup:.2f}x end-to-end, {result.denoise_speedup:.2f}x text encoding + denoising (one "
             f"run each{'; ' + note if note else ''}).")
    # The density of the sparse steps alone: what the pattern gave where it ran (`eval`'s measured density).
    sparse_steps = (f"{result.sparse_steps_density:.3f} outside the dense steps (dense layers, masked calls count "
                    "1.0)")
    quality = (f"Sparse vs dense, {scored_label(args)}: PSNR {result.psnr_db:.2f} dB, SSIM {result.ssim:.4f}, "
               f"LPIPS {lpips_text}.")
    summary = "\n".join(
        [
            "| | dense | sparse |",
            "|---|---:|---:|",
            f"| end-to-end seconds | {result.dense_seconds:.2f} | {result.sparse_seconds:.2f} |",
            f"| text encoding + denoising seconds | {denoise} |",
            "",
            f"Mean attention density {result.mean_attention_density:.3f} (dense calls count 1.0); {sparse_steps}.",
            "",
            speed,
            "",
            quality,
            "",
            f"Sampler: {result.sampler}. `{result.config}`",
            *(f"\n**Warning:** {message}" for message in result.warnings),
        ]
    )
    return result, summary


def _whole(value):
    """A float that is a whole number (a slider's 4.0) as an int; anything else (a cleared box's None, 1.5) as it
    is, for `compare_once` to refuse with a message naming the field."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def make_handler(pipe, *, model: str | None = None, device: str = "cpu", out: str | Path = "outputs/demo",
                 lpips_weights: str | None = None):
    """The page's submit function: form values in, `(video path, markdown summary)` out; bad settings raise
    `gradio.Error` with `SparseConfig`'s message, which the page shows, and so does any other failure (its type
    and message; the traceback goes to the server's log). diffsparse's warnings pop up as `gradio.Warning`s too.
    A frame count, height or width of `UNSET` (0) is the pipeline's own, left out of its call (`form_ranges`)."""
    import gradio as gr

    def on_submit(prompt, pattern, density, dense_steps, block_size, correction, dense_layers, steps, frames, height,
                  width, seed, stills, image=None, call_kwargs=""):
        # A size or frame count slider at UNSET: the pipeline's own (`form_ranges`).
        frames, height, width = (None if value == UNSET else value for value in (frames, height, width))
        try:
            result, summary = compare_once(
                pipe, prompt, pattern, density, dense_steps, block_size, correction, dense_layers, steps, frames,
                height, width, _whole(seed), _whole(stills), image or None, call_kwargs, model=model, device=device,
                out=out, lpips_weights=lpips_weights,
            )
        except ValueError as error:
            raise gr.Error(str(error)) from None
        except Exception as error:
            # Gradio shows an error that is not a gr.Error as a bare "Error": a wrong type in the call-arguments
            # field (a TypeError from inside the pipeline) or running out of memory said nothing on the page.
            logger.exception("diffsparse demo: the request failed")
            # Notes too: `run_compare` adds one saying the videos were written when scoring fails after the runs.
            notes = "".join(f" ({note})" for note in getattr(error, "__notes__", ()))
            raise gr.Error(f"the run failed: {type(error).__name__}: {error}{notes}") from error
        for message in result.warnings:
            gr.Warning(message)
        return result.video_path, summary

    return on_submit


# The slider ends for a size or frame count the pipeline works out itself (`call_defaults` gives None: no default to
# double): room for the native sizes of today's video models (HunyuanVideo's 129 frames, 1080p).
UNSET_RANGES = {"frames": 257, "height": 2048, "width": 2048}
# The page's spelling of a size or frame count left to the pipeline: a slider at 0 (sliders cannot be cleared).
UNSET = 0


def form_ranges(pipe) -> dict[str, tuple[int, int, int, int | None]]:
    """`(minimum, maximum, step, default)` of the page's steps, frames, height and width for `pipe`: the model's own
    defaults (`compare.call_defaults`: e.g. Wan 50 steps, 81 frames at 480 x 832; the testbed's evaluation size)
    inside ranges up to twice them (the testbed's: up to 50 steps, 33 frames, 128 pixels). A default of `None` is
    one the pipeline works out itself (a size it may take from its input image, LTX-2.5's predicted frame count): its
    slider runs from `UNSET` (0, which the page sends as "the pipeline's own") to `UNSET_RANGES`."""
    from .pipelines.testbed import TestbedPipeline

    # As `compare --image` would: a size the call reads from the page's image (FLUX.2, GLM-Image) starts at "the
    # pipeline's own"; one it defaults whatever the image (CogVideoX image-to-video resizes the image to its sample
    # size) at that number. Left at 0 with no image given, `fill_call_defaults` gives the text-only call its number.
    defaults = call_defaults(pipe, image=takes_image(pipe))
    ends = {name: defaults[name] for name in ("steps", "frames", "height", "width")}
    if isinstance(pipe, TestbedPipeline):
        ends.update(steps=25, frames=16, height=64, width=64)  # half the ranges: the slider ends of the CPU-sized model
    ranges = {"steps": (2, 2 * ends["steps"], 1, defaults["steps"])}
    for name, step, least, high in (("frames", 4, 1, max(33, 2 * (ends["frames"] or 0) + 1)),
                                    ("height", 16, 16, 2 * (ends["height"] or 0)),
                                    ("width", 16, 16, 2 * (ends["width"] or 0))):
        if defaults[name] is None:  # any multiple of 16 pixels, any frame count: the pipeline rounds its own way
            ranges[name] = (UNSET, UNSET_RANGES[name], 1 if name == "frames" else step, None)
        else:
            ranges[name] = (least, high, step, defaults[name])
    return ranges


def build_demo(pipe, *, model: str | None = None, device: str = "cpu", out: str | Path = "outputs/demo",
               lpips_weights: str | None = None):
    """The Gradio `Blocks` page around `compare_once` for a loaded `pipe` (not launched)."""
    import gradio as gr

    from .pipelines.testbed import TestbedPipeline

    on_submit = make_handler(pipe, model=model, device=device, out=out, lpips_weights=lpips_weights)
    with gr.Blocks(title="diffsparse: dense vs sparse attention", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            "# diffsparse: dense vs sparse attention\nThe same prompt and seed, generated with dense self-attention "
            "and with diffsparse's block-sparse attention; PSNR/SSIM/LPIPS compare the sparse video to the dense one."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox("a red circle moving left", label="prompt")
                # `make run`'s config: the best trade measured on the testbed (README "Which pattern").
                # The example is one the density keeps: with the slider's 0.25, radial(decay=0.5) ran a solved decay.
                pattern = gr.Dropdown(list(PATTERN_CHOICES), value="searched", allow_custom_value=True,
                                      label="pattern (a name, or one with parameters: radial(min_window=32); a "
                                            "density other than 0 sets radial's decay and searched's keep)")
                density = gr.Slider(0.0, 1.0, value=0.25, step=0.05,
                                    label="target block density (0 = the pattern's own parameters)")
                dense_steps = gr.Slider(0.0, 0.9, value=0.2, step=0.05, label="dense steps (fraction of the steps)")
                block_size = gr.Dropdown([16, 32, 48, 64, 128], value=64, label="block size (tokens)")
                correction = gr.Dropdown(list(CORRECTION_CHOICES), value="none", label="softmax-statistics correction")
                dense_layers = gr.Textbox(
                    "0", label="dense layers: the first L blocks, or a list of block indices, e.g. [3]"
                )
                ranges = form_ranges(pipe)

                def slider(name, label, **kwargs):
                    low, high, step, value = ranges[name]
                    if value is None:  # the pipeline's own: not passed (`on_submit`)
                        value, label = UNSET, f"{label}; {UNSET}: the pipeline's own"
                    return gr.Slider(low, high, value=value, step=step, label=label, **kwargs)

                steps = slider("steps", "denoising steps")
                frames = slider("frames", "frames", interactive=not is_image_pipeline(pipe))  # images: one frame
                # A size the call does not take (HunyuanVideo 1.5's image-to-video sizes from its image): fixed.
                height = slider("height", "height (pixels)", interactive=takes_size(pipe, "height"))
                width = slider("width", "width (pixels)", interactive=takes_size(pipe, "width"))
                seed = gr.Number(0, precision=0, label="seed")
                stills = gr.Slider(0, 8, value=4 if isinstance(pipe, TestbedPipeline) else 0, step=1,
                                   label="two-stage: still candidates (0 = one pass; testbed models only)")
                image = gr.Image(type="filepath", label="input image (image-to-video and editing pipelines)",
                                 visible=takes_image(pipe))
                call_kwargs = gr.Textbox(
                    "", label='more pipeline call arguments, JSON, e.g. {"guidance_scale": 5.0} (optional)'
                )
                button = gr.Button("generate dense and sparse", variant="primary")
            with gr.Column():
                video = gr.Video(label="dense | sparse")
                summary = gr.Markdown()
        inputs = [
            prompt, pattern, density, dense_steps, block_size, correction, dense_layers, steps, frames, height, width,
            seed, stills, image, call_kwargs,
        ]
        # One request at a time: each one applies and removes sparse attention on the one shared pipeline.
        button.click(on_submit, inputs=inputs, outputs=[video, summary], api_name="compare", concurrency_limit=1)
    return demo


def check_port_free(host: str, port: int | None) -> None:
    """A `ValueError` (the command's usage error) when the page could not listen on `host`:`port` (in use, or an
    address not of this machine), said before the model loads: Gradio's launch failed with a traceback after it.
    `port=None`: Gradio picks a free one itself."""
    if port is None:
        return
    try:
        # The host's own address family: an IPv6 host ("::1", or "[::1]" as Gradio also takes it) failed as IPv4.
        family, _, _, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        socket.create_server(address, family=family).close()
    except OSError as error:
        raise ValueError(f"the page cannot listen on port {port} of host {host!r} ({error.strerror or error}): pick "
                         "another --port (or a --host of this machine)") from None


def run_demo(args) -> None:
    """`diffsparse demo`: load the model once, then serve the page."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('the demo needs gradio: pip install -e ".[demo]" (or pip install gradio)') from None
    from .compare import load_pipeline_for
    from .metrics import lpips_weights

    lpips_weights(args.lpips_weights)  # a path that is not there: said before anything loads
    check_port_free(args.host, args.port)
    pipe = load_pipeline_for(args)
    # Gradio serves only files under the working directory or the temp folder unless told: --out may be elsewhere.
    build_demo(pipe, model=args.model, device=args.device, out=args.out, lpips_weights=args.lpips_weights).launch(
        server_name=args.host, server_port=args.port, allowed_paths=[str(Path(args.out).resolve())]
    )
