"""`diffsparse compare`: the same video dense and sparse, same seed; time, density, PSNR/SSIM, side-by-side mp4."""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import inspect
import json
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

from . import DiffsparseWarning, outside_stacklevel
from .api import sparse, suspended
from .bench import DTYPES, strict_json
from .config import API_NAMES, SparseConfig, density_replaces, given_parameters, warn_density_replaces
from .metrics import lpips, lpips_weights, psnr, ssim
from .patterns.registry import did_you_mean
from .pipelines import find_transformers


@dataclass
class CompareResult:
    model: str
    config: str
    # The size of the videos generated (the dense one's), which may differ from what was asked: the pipeline rounds
    # a frame count (Wan to 4k + 1) or size, or works out one the command leaves to it (`call_defaults`).
    frames: int
    height: int
    width: int
    steps: int
    seed: int
    device: str
    dtype: str  # the transformer's weights: fp32, fp16, bf16
    offload: str  # none, model, sequential (`load_pipeline`)
    sampler: str  # "one pass", or "two-stage, best of N stills" (then frame 0 is the shared still and not scored)
    dense_seconds: float
    sparse_seconds: float
    speedup: float
    dense_denoise_seconds: float
    sparse_denoise_seconds: float
    denoise_speedup: float
    mean_attention_density: float
    # Over the calls outside the dense steps, dense layers and masked calls counting 1.0 (`eval`'s measured density).
    sparse_steps_density: float
    # Self-attention calls of the sparse run that ran sparse; 0 (every call dense: dense steps, dense layers, a
    # correction or a mask refusing them) leaves the speedups as run-to-run noise (`speedup_note`).
    sparse_calls: int
    psnr_db: float
    ssim: float
    lpips: float | None  # None without the AlexNet weights (`metrics.lpips_weights`)
    video_path: str
    image_path: str | None = None  # one frame (image models, --frames 1): the side-by-side as a PNG too
    dense_path: str | None = None  # each video alone, unlabelled at its own size: dense.mp4 (one frame: dense.png)
    sparse_path: str | None = None  # sparse.mp4 (sparse.png)
    # What the pipeline was called with beyond the fields above, so that the run can be repeated.
    prompt: str | None = None  # None for a pipeline that takes no prompt (DiT: its inputs are in call_kwargs)
    image: str | None = None  # `--image`, the conditioning image file
    call_kwargs: dict | None = None  # `--call-kwargs`
    vae_tiling: bool = False  # the pipeline's VAE decoded in tiles (`--vae-tiling`)
    # diffsparse's warnings during the runs ("nothing runs sparse"), for readers of the result that see no stderr
    # (the demo's page).
    warnings: list[str] = field(default_factory=list)


# The frame rate of compare.mp4, dense.mp4 and sparse.mp4 unless `--fps` says otherwise (the testbed's clips,
# CogVideoX's).
VIDEO_FPS = 8
EMBEDDED_MODEL = "embedded testbed (trained tiny Wan, diffsparse.pipelines.testbed)"


def model_label(model: str | None, pipe=None) -> str:
    """`--model`; for a pipeline given without one (`run_compare(pipe=...)`, the demo's), where it was loaded from
    (`name_or_path`), else its class: only the shipped testbed is `EMBEDDED_MODEL`."""
    if model is not None:
        return model
    if pipe is None:
        return EMBEDDED_MODEL
    from .pipelines.testbed import WEIGHTS_PATH

    source = getattr(pipe, "name_or_path", None)  # a ModularCall's: its modular pipeline's
    if source is None:
        return pipeline_name(pipe)
    return EMBEDDED_MODEL if Path(source).resolve() == WEIGHTS_PATH.resolve() else str(source)


class ModularCall:
    """A diffusers modular pipeline (`ModularPipeline`: FLUX.3 and Cosmos 3 ship only as such) behind the keyword
    call the commands make of a `DiffusionPipeline`: its blocks' inputs are the call's parameters (with their
    defaults), and the call returns the blocks' videos as `.frames` or their images as `.images`. Everything else
    (`transformer`, `scheduler`, `to`, ...) is the modular pipeline's."""

    def __init__(self, pipe):
        self.pipe = pipe
        outputs = pipe.blocks.output_names
        self.output = next((name for name in ("videos", "images") if name in outputs), None)
        if self.output is None:
            raise ValueError(f"{type(pipe).__name__}'s blocks output {outputs}, neither videos nor images")
        empty = inspect.Parameter.empty
        self.parameters = {
            param.name: inspect.Parameter(param.name, inspect.Parameter.KEYWORD_ONLY,
                                          default=empty if param.required else param.default)
            for param in pipe.blocks.inputs if param.name
        }

    def __getattr__(self, name):
        if name == "pipe":  # not set yet (a copy being built): no recursion through the lookup below
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        result = self.pipe(**kwargs, output=self.output)
        return SimpleNamespace(**{"frames" if self.output == "videos" else "images": result})

    def to(self, device) -> ModularCall:
        self.pipe.to(device)
        return self


OFFLOADS = ("none", "model", "sequential")


def load_pipeline(
    model: str | None, device: str, dtype: torch.dtype | None = None, offload: str = "none", vae_tiling: bool = False
):
    """The embedded trained testbed (`model=None`), a testbed training folder, or a diffusers checkpoint.

    `dtype`: by default float32 on CPU (bfloat16 is slow there without native support) and bfloat16 elsewhere.
    `offload`: `"none"`, every component on `device`; `"model"`, diffusers' `enable_model_cpu_offload` (each
    model moved to `device` for its calls and back to the CPU after: the largest model, the transformer, must fit
    the device); `"sequential"`, `enable_sequential_cpu_offload` (weights moved per submodule call: the least
    memory, the slowest). For checkpoints larger than the device's memory (Wan 14B in bfloat16, 28 GB of
    transformer and 11 GB of text encoder: model offload on a GPU that holds the transformer, sequential on a
    smaller one). Timings then include the moves, for dense and sparse runs alike, so speedups come out lower.
    `vae_tiling`: decode (and encode) in tiles, `pipe.vae.enable_tiling()`, as diffusers' HunyuanVideo and
    CogVideoX examples do at their native sizes; dense and sparse videos alike.

    `model` is a hub id or a local `save_pretrained` folder; folders whose `model_index.json` names
    `TestbedPipeline` (what `python -m diffsparse.testbed.train` writes) load through the testbed's own class,
    which diffusers' `DiffusionPipeline.from_pretrained` does not know. A checkpoint with no `model_index.json`
    but a `modular_model_index.json` (a modular pipeline's) loads as a `ModularPipeline` with its components
    (`ModularCall`).
    """
    from .pipelines import testbed

    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got offload={offload!r}")
    if offload == "sequential" and torch.device(device).type == "cpu":
        # accelerate's per-submodule hooks fail on the CPU inside transformers' T5 encoders ("Cannot copy out of
        # meta tensor"), and offloading to the CPU from the CPU saves nothing.
        raise ValueError(f"offload='sequential' offloads to the CPU from an accelerator; got device={device!r}")
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if model is None:
        return _place(testbed.load(dtype=dtype), device, offload, vae_tiling)
    if is_testbed_model(model):
        return _place(testbed.load(dtype=dtype, path=model), device, offload, vae_tiling)
    from diffusers import DiffusionPipeline, ModularPipeline
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not Path(model).exists():
        try:
            validate_repo_id(model)
        except HFValidationError as error:  # a mistyped path ("/data/wan"): say so, not how hub ids are spelled
            raise ValueError(f"--model {model}: no such folder, and not a hub id either ({error})") from None
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except OSError as error:  # not in the cache while offline, no such repository, a folder without model_index.json
        try:
            pipe = ModularPipeline.from_pretrained(model)
            if pipe.blocks is None:  # no modular_model_index.json (nor a model_index.json naming its blocks)
                raise OSError(f"{model} holds no modular pipeline") from error
            pipe.load_components(dtype=dtype)
            pipe = ModularCall(pipe)
        except OSError:
            offline = " (HF_HUB_OFFLINE is set: hub ids load only from the local cache)" if _hub_offline() else ""
            raise ValueError(
                f"--model {model}: cannot load it as a diffusers pipeline{offline}; give a hub id such as "
                f"Wan-AI/Wan2.1-T2V-1.3B-Diffusers or a folder written by save_pretrained. Cause: {error}"
            ) from error
    return _place(pipe, device, offload, vae_tiling)


def load_pipeline_for(args):
    """`load_pipeline` with a command's `--model`, `--device`, `--dtype`, `--offload` and `--vae-tiling`."""
    dtype = getattr(args, "dtype", None)
    return load_pipeline(args.model, args.device, None if dtype is None else DTYPES[dtype],
                         getattr(args, "offload", "none"), getattr(args, "vae_tiling", False))


def _first_transformer(pipe) -> torch.nn.Module:
    return next(iter(find_transformers(pipe)[0].values()))


def weights_dtype(pipe) -> str:
    """The dtype of the pipeline's transformer weights, as `--dtype` names it."""
    transformer = _first_transformer(pipe)
    return {dtype: name for name, dtype in DTYPES.items()}.get(transformer.dtype, str(transformer.dtype))


def offload_mode(pipe) -> str:
    """How the pipeline's transformer is offloaded, as `--offload` names it, read from the accelerate hooks that
    diffusers' `enable_model_cpu_offload` (a `CpuOffload`) and `enable_sequential_cpu_offload` (an
    `AlignDevicesHook` that offloads) put on it: also right for a pipeline the caller offloaded."""
    hook = getattr(_first_transformer(pipe), "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])
    if any(type(h).__name__ == "CpuOffload" for h in hooks):
        return "model"
    if any(type(h).__name__ == "AlignDevicesHook" and getattr(h, "offload", False) for h in hooks):
        return "sequential"
    return "none"


def placement(pipe) -> str:
    """`weights_dtype`, and the offloading when there is any, for a result's header: "bf16, model offload"."""
    return placement_label(weights_dtype(pipe), offload_mode(pipe))


def placement_label(dtype: str, offload: str) -> str:
    return dtype + ("" if offload == "none" else f", {offload} offload")


def _place(pipe, device: str, offload: str, vae_tiling: bool = False):
    """`pipe` (loaded on the CPU) on `device`, or offloaded to the CPU between its calls; its VAE tiled or not
    (`load_pipeline`)."""
    if vae_tiling:
        vae = getattr(pipe, "vae", None)
        if not callable(getattr(vae, "enable_tiling", None)):
            raise ValueError(
                f"vae_tiling=True: {pipeline_name(pipe)} has no VAE that tiles (its vae is {type(vae).__name__})"
            )
        vae.enable_tiling()
    if offload == "none":
        return pipe.to(device)
    if isinstance(pipe, ModularCall):
        raise ValueError(
            f"offload={offload!r}: modular pipelines have no enable_model_cpu_offload; use offload='none' (or "
            "diffusers' ComponentsManager.enable_auto_cpu_offload in your own script)"
        )
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def pipeline_name(pipe) -> str:
    """The pipeline's class name for messages (a modular pipeline's own, not `ModularCall`)."""
    return type(pipe.pipe if isinstance(pipe, ModularCall) else pipe).__name__


def prompt_passed(pipe, prompt: str) -> str | None:
    """The prompt a generation passes `pipe` (`generation_kwargs`): `None` for a pipeline that takes none (DiT)."""
    return prompt if takes_prompt(pipe) else None


def _call_parameters(pipe) -> dict[str, inspect.Parameter]:
    if isinstance(pipe, ModularCall):
        return pipe.parameters
    return dict(inspect.signature(type(pipe).__call__).parameters)


def frames_parameter(pipe) -> str | None:
    """The pipeline call's frame-count argument: `num_frames`, or Latte's `video_length`; `None` for a pipeline
    that makes images (FLUX, SD3)."""
    parameters = _call_parameters(pipe)
    return next((name for name in ("num_frames", "video_length") if name in parameters), None)


def is_image_pipeline(pipe) -> bool:
    """Whether the pipeline's call makes images (it takes no frame count) rather than videos."""
    return frames_parameter(pipe) is None


def frames_argument(pipe, frames: int | None) -> dict:
    """The pipeline call's frame count: `{"num_frames": frames}` (`video_length` for Latte) for a video pipeline,
    `{}` for an image one, which makes one frame (there `frames` must be 1: a `ValueError` otherwise, rather than a
    silent 1). `frames=None` (`call_defaults` leaves it to the pipeline): `{}`, the call's own count."""
    name = frames_parameter(pipe)
    if name is not None:
        return {} if frames is None else {name: frames}
    if frames not in (None, 1):
        raise ValueError(f"frames={frames}: {pipeline_name(pipe)} generates images, so frames must be 1 (--frames 1)")
    return {}


def takes_prompt(pipe) -> bool:
    """Whether the pipeline's call takes a `prompt` (not a class-conditional one, DiT)."""
    return "prompt" in _call_parameters(pipe)


def takes_image(pipe) -> bool:
    """Whether the pipeline's call takes an `image` (image-to-video and editing pipelines)."""
    return "image" in _call_parameters(pipe)


def takes_size(pipe, name: str) -> bool:
    """Whether the pipeline's call takes `name` (`height`, `width`): HunyuanVideo 1.5's image-to-video does not."""
    return name in _call_parameters(pipe)


def check_image(path: str | None) -> None:
    """`--image` (`None`: none given) is a file PIL can read, before anything is loaded: a missing file or one that is
    no image ended in a traceback at the first generation, after the model (gigabytes of it) had loaded."""
    if path is None:
        return
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.convert("RGB")  # decoded as `generation_kwargs` will: a truncated file fails here, not after loading
    except FileNotFoundError:
        raise ValueError(f"image={path!r}: no such file; give an image file (PNG, JPEG, ...)") from None
    except IsADirectoryError:
        raise ValueError(f"image={path!r}: a directory, not an image file; give an image file (PNG, JPEG, ...)"
                         ) from None
    except Image.DecompressionBombError as error:  # not an OSError
        raise ValueError(f"image={path!r}: too large for PIL ({error}); give a smaller image") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"image={path!r}: not an image file PIL can read ({type(error).__name__}: {error})"
                         ) from None


def check_image_taken(parameters: dict[str, inspect.Parameter], pipeline: str, image: str | None,
                      first_frame: bool = False, names: dict[str, str] | None = None) -> None:
    """A `ValueError` naming `pipeline` (its call's `parameters`) when `--image` (`image`, `None`: not given) is
    given to a pipeline without an `image` argument, or missing for one whose `image` has no default (`first_frame`:
    the testbed's two-stage still is given instead). Before loading, from the pipeline's class
    (`check_call_kwargs_before_loading`), and at each generation (`generation_kwargs`). `names` as
    `check_call_kwargs`' (its "give_image" and "leave_image": how to give an image, how to take it away)."""
    names = COMMAND_NAMES if names is None else names
    takes = "image" in parameters
    if image is not None and not takes:
        raise ValueError(f"image={image!r}: {pipeline} takes no `image` (it is not an image-to-video or editing "
                         f"pipeline); {names['leave_image']}")
    if takes and parameters["image"].default is inspect.Parameter.empty and image is None and not first_frame:
        raise ValueError(f"{pipeline} generates from an image: {names['give_image']}")


def generation_kwargs(pipe, args, prompt: str, seed: int, first_frame: torch.Tensor | None = None) -> dict:
    """The keyword arguments of one generation of the commands: the prompt (for pipelines that take one; a
    class-conditional one, DiT, gets its inputs from `--call-kwargs`, a `ValueError` naming what is missing), the
    frame count, the size (for pipelines that take one: HunyuanVideo 1.5's image-to-video sizes the video from its
    image; each left out where `args` holds None, the pipeline's own: `call_defaults`), the steps, a CPU generator of
    `seed`, `output_type="np"`, and the conditioning image: the testbed's `first_frame` still, or `args.image` (a
    file) for pipelines with an `image` argument (image-to-video, editing); then `args.call_kwargs`
    (`--call-kwargs`).
    A `ValueError` names the pipeline when `--image` is given to one without an `image` argument, or missing for one
    that needs it, and names a `--call-kwargs` key the pipeline does not take or that an option sets."""
    parameters = _call_parameters(pipe)
    image_path = getattr(args, "image", None)
    check_image_taken(parameters, pipeline_name(pipe), image_path, first_frame is not None)
    # A class-conditional pipeline (DiT) takes no prompt: its inputs come with --call-kwargs.
    prompted = takes_prompt(pipe)
    kwargs = {**({"prompt": prompt} if prompted else {}), **frames_argument(pipe, args.frames)}
    # A size left None (`call_defaults`: the pipeline works it out itself) is not passed.
    kwargs.update({name: getattr(args, name) for name in ("height", "width")
                   if name in parameters and getattr(args, name) is not None})
    kwargs.update(num_inference_steps=args.steps, generator=torch.Generator(device="cpu").manual_seed(seed),
                  output_type="np")
    if first_frame is not None:
        kwargs["first_frame"] = first_frame
    elif image_path is not None:
        from PIL import Image

        kwargs["image"] = Image.open(image_path).convert("RGB")
    extra = getattr(args, "call_kwargs", None) or {}
    check_call_kwargs(extra)  # every name `kwargs` holds is refused here
    _check_taken(extra, parameters, pipeline_name(pipe))
    _check_inputs_given(parameters, pipeline_name(pipe), {*kwargs, *extra})
    return {**kwargs, **extra}


def _check_inputs_given(parameters: dict[str, inspect.Parameter], pipeline: str, given,
                        names: dict[str, str] | None = None) -> None:
    """A `ValueError` naming the inputs without a default that the call of `pipeline` (its `parameters`), one that
    takes no prompt (class-conditional: DiT), needs and `given` (the names the call passes) lacks; `names` as
    `check_call_kwargs`' (its "give_inputs": how to give them)."""
    if "prompt" in parameters:
        return
    missing = [name for name, p in parameters.items() if name != "self" and p.default is inspect.Parameter.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in given]
    if missing:
        how = (COMMAND_NAMES if names is None else names)["give_inputs"]
        raise ValueError(f"{pipeline} takes no prompt and needs {', '.join(missing)}: "
                         + how.format(it="it" if len(missing) == 1 else "them", example=f'{{"{missing[0]}": ...}}'))


@contextlib.contextmanager
def seeded_global_generator(seed: int):
    """Inside, torch's global generators (CPU and every CUDA device) start from `seed`; after, they are back where
    they were. The commands run each generation inside, with its seed: some pipelines draw from the global
    generator as well as from the call's `generator` (JoyImage Edit samples its reference image's latents there),
    and without this their dense and sparse runs would start from different draws."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def parse_call_kwargs(text: str) -> dict:
    """`--call-kwargs`' JSON object (the demo's field too); a `ValueError` says what was expected."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"call_kwargs: expected a JSON object, got {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f'call_kwargs: expected a JSON object ({{"name": value, ...}}), got {text!r}')
    return value


# Pipeline call arguments the commands' options own.
_SET_BY_OPTIONS = {
    "prompt": "--prompt", "num_frames": "--frames", "video_length": "--frames", "height": "--height",
    "width": "--width", "num_inference_steps": "--steps", "generator": "--seed", "image": "--image",
    "first_frame": "--two-stage",
}
# Pipeline call arguments the commands set themselves, or that change the output the commands read, and why.
_SET_BY_COMMANDS = {
    "output_type": "the frames come back as numpy arrays (np)",
    "return_dict": "the frames are read from the pipeline's output object",
    "callback_on_step_end": "the commands time the denoising steps with it",
    "callback_on_step_end_tensor_inputs": "the commands' step callback takes no tensors",
}
# Videos (images) per call: the commands score one, the first of the output; more would be generated unscored.
_BATCH_SIZES = ("num_videos_per_prompt", "num_images_per_prompt")
# What the call-argument checks' messages call the settings (their `names`): "call_kwargs", the setting the call
# arguments come in; "caller", what makes the call ("which the command sets itself"); "scores", what generates and
# scores one video per call; "give_image", "leave_image", how to give the conditioning image and how to take it
# away; "give_inputs", how to give the inputs a pipeline without a prompt needs (`{it}`: "it" or "them", `{example}`:
# a JSON object); and for each call argument of `_SET_BY_OPTIONS`, what to set instead. These are the commands'
# options; the demo's page gives its own fields (`demo.PAGE_NAMES`), which its messages must name.
COMMAND_NAMES = {
    "call_kwargs": "--call-kwargs",
    "give_inputs": "give {it} with --call-kwargs '{example}'",
    # `warn_if_density_replaces`: the pattern as typed (`{pattern}`), the density given (`{density}`), how to run
    # the pattern as written, and where the pattern is typed.
    "pattern_given": "--pattern {pattern!r}",
    "density_given": "--density {density:g}",
    "no_density": "give --density none",
    "pattern_setting": "--pattern",
    "caller": "the command",
    "scores": "the commands generate and score",
    "give_image": "give one with --image PATH",
    "leave_image": "leave out --image",
    **{argument: f"its option ({option})" for argument, option in _SET_BY_OPTIONS.items()},
}


def check_call_kwargs(call_kwargs: dict | None, names: dict[str, str] | None = None) -> None:
    """A `ValueError` naming a `--call-kwargs` key that an option or the command itself sets, or a batch of more
    than one video (`num_videos_per_prompt`, `num_images_per_prompt`); before anything is loaded or generated.
    `names`: what the message calls the settings (`COMMAND_NAMES`, the default: the commands' options)."""
    names = COMMAND_NAMES if names is None else names
    for name, value in (call_kwargs or {}).items():
        if name in _SET_BY_OPTIONS:
            raise ValueError(f"{names['call_kwargs']} sets {name!r}, which {names['caller']} sets itself: use "
                             f"{names[name]} instead")
        if name in _SET_BY_COMMANDS:
            raise ValueError(f"{names['call_kwargs']} sets {name!r}, which {names['caller']} sets itself "
                             f"({_SET_BY_COMMANDS[name]}): leave it out")
        if name in _BATCH_SIZES and (isinstance(value, bool) or value != 1):
            raise ValueError(f"{names['call_kwargs']} sets {name}={value!r}: {names['scores']} one video per call, "
                             "so it must be 1 (or left out)")


def warn_if_density_replaces(config: SparseConfig, names: dict[str, str] | None = None) -> None:
    """A `DiffsparseWarning` for each parameter `config.pattern`'s text gives that `config.density` sets in its
    place (`density_replaces`). The density wins, as `SparseConfig.density` and the benches' `--density` have
    it, and `none` runs the pattern as written; said, since `--pattern 'searched(keep=0.5)' --density 0.25` ran
    keep=0.25 without a word. A pattern object is said by `SparseConfig` itself when it is made: not again here.
    `names`: what the message calls the settings (`COMMAND_NAMES`, the default)."""
    if isinstance(config.pattern, str):
        warn_density_replaces(config, COMMAND_NAMES if names is None else names, stacklevel=2)


def said_when_made(config: SparseConfig) -> list[str]:
    """The texts of the warnings `SparseConfig` gave when `config` was made from a pattern object giving a parameter
    its density replaces (`warn_density_replaces` with `API_NAMES`), not shown again: for a result's `warnings`,
    whose readers (compare.json, the demo's page) never saw the caller's stderr. Under the caller's warning filters,
    as the run's own warnings are kept (an ignored one is not); called before the runs, where a filter that makes it
    an error costs no work. A text pattern: none (the commands say it themselves, `warn_if_density_replaces`)."""
    if isinstance(config.pattern, str):
        return []
    with warnings.catch_warnings(record=True) as said:
        warn_density_replaces(config, API_NAMES, stacklevel=outside_stacklevel())
    return [str(warning.message) for warning in said]


def _check_taken(call_kwargs: dict, parameters: dict[str, inspect.Parameter], pipeline: str,
                 names: dict[str, str] | None = None) -> None:
    """A `ValueError` naming a `--call-kwargs` key that the call of `pipeline` (its `parameters`) does not take, and
    the closest one it does; `names` as `check_call_kwargs`'."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    for name in call_kwargs:
        if name not in parameters:
            others = sorted(set(parameters) - set(_SET_BY_OPTIONS) - set(_SET_BY_COMMANDS) - {"self"})
            setting = (COMMAND_NAMES if names is None else names)["call_kwargs"]
            raise ValueError(f"{setting} sets {name!r}, which {pipeline} does not take; it takes "
                             f"{', '.join(others)}{did_you_mean(name, others)}")


def pipeline_class_of(model: str | None) -> type | None:
    """The pipeline class `load_pipeline(model)` gives, read from its `model_index.json` (a hub id's from the cache
    or the hub: one small file), no weights loaded; `None` when that file cannot tell (a modular pipeline, a hub id
    missing from the cache offline, a class diffusers lacks): `load_pipeline` then says what is wrong."""
    from .pipelines import testbed

    if is_testbed_model(model):
        return testbed.TestbedPipeline
    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(model)
    except Exception:  # noqa: BLE001 - hub, validation and file errors alike: loading reports them itself
        return None
    pipeline = getattr(diffusers, str(index.get("_class_name")), None)
    return pipeline if isinstance(pipeline, type) and issubclass(pipeline, diffusers.DiffusionPipeline) else None


def check_call_kwargs_before_loading(args, pipe=None, names: dict[str, str] | None = None) -> None:
    """`check_call_kwargs`, `check_image`, and what the call of `args.model`'s pipeline refuses (its class read from
    its `model_index.json`; with `pipe`, the pipeline already loaded: the demo's): a `--call-kwargs` key it does not
    take, `--image` given to a pipeline without an `image` argument or missing for one that needs it
    (`check_image_taken`), an input a pipeline without a prompt needs missing from `--call-kwargs` (DiT's
    `class_labels`). Said before a checkpoint of many gigabytes loads (and before the two-stage stills), not
    after. `names`: what the call-argument messages call the settings (`check_call_kwargs`)."""
    call_kwargs = getattr(args, "call_kwargs", None)
    image = getattr(args, "image", None)
    check_call_kwargs(call_kwargs, names)
    check_image(image)  # first: a file that is not there is said as such, whatever the pipeline
    if pipe is None:
        pipeline = pipeline_class_of(args.model)
        if pipeline is None:  # a modular pipeline, a hub id not in the cache offline: checked at the generation
            return
        parameters, name = dict(inspect.signature(pipeline.__call__).parameters), pipeline.__name__
    else:
        parameters, name = _call_parameters(pipe), pipeline_name(pipe)
    _check_taken(call_kwargs or {}, parameters, name, names)
    check_image_taken(parameters, name, image, first_frame=bool(getattr(args, "two_stage", False)), names=names)
    # Here too, with `names`: raised at the generation, DiT's missing class labels named `--call-kwargs` on the
    # demo's page. The arguments the options and the command set count as given (`generation_kwargs` checks the
    # call it makes).
    _check_inputs_given(parameters, name, {*_SET_BY_OPTIONS, *_SET_BY_COMMANDS, *(call_kwargs or {})}, names)


# The values a pipeline call gives an argument it leaves `None` where its `__call__` says `name = name or EXPR` at its
# top level: EXPR as `ast.unparse` spells it ("{name}" standing for the argument), and that value on the pipeline.
# Read from the call's own source, so that a rule is applied only to a pipeline whose code says it (PRX's
# `default_sample_size` is in pixels, not latents: its call does not multiply it, and it gets no rule).
_OR_DEFAULTS = {
    "self.default_{name}": lambda pipe, name: getattr(pipe, f"default_{name}"),  # Mochi: 480 x 848
    # FLUX, SD3, Chroma, Lumina 2, Qwen-Image, HiDream, HunyuanDiT, ...
    "self.default_sample_size * self.vae_scale_factor": lambda pipe, name: (
        pipe.default_sample_size * pipe.vae_scale_factor),
    # PixArt, CogView 3 Plus and 4
    "self.transformer.config.sample_size * self.vae_scale_factor": lambda pipe, name: (
        pipe.transformer.config.sample_size * pipe.vae_scale_factor),
    # CogVideoX, Allegro
    "self.transformer.config.sample_{name} * self.vae_scale_factor_spatial": lambda pipe, name: getattr(
        pipe.transformer.config, f"sample_{name}") * pipe.vae_scale_factor_spatial,
    "self.transformer.config.sample_frames": lambda pipe, name: pipe.transformer.config.sample_frames,  # CogVideoX
    # Allegro: its transformer's sample_frames counts latent frames
    "self.transformer.config.sample_frames * self.vae_scale_factor_temporal": lambda pipe, name: (
        pipe.transformer.config.sample_frames * pipe.vae_scale_factor_temporal),
}
# Calls that work unset arguments out in statements of their own, matched by the start of their `ast.unparse` text
# (top-level statements of `__call__`, most given whole): the arguments, the statements, and the values they give on
# the pipeline.
_OWN_STATEMENTS = (
    # HunyuanVideo 1.5 text-to-video: the crop bucket of its 16:9 default aspect at its transformer's target size.
    (("height", "width"),
     (("if height is None and width is None:\n    height, width = self.video_processor.calculate_default_height_width("
       "self.default_aspect_ratio[1], self.default_aspect_ratio[0], self.target_size)"),),
     lambda pipe: pipe.video_processor.calculate_default_height_width(
         pipe.default_aspect_ratio[1], pipe.default_aspect_ratio[0], pipe.target_size)),
    # LTX-2: 121 frames; with a duration head (LTX-2.5 checkpoints) a count it predicts from the prompt, which only
    # the call itself can give: left to it.
    (("num_frames",),
     ("auto_duration = num_frames is None and getattr(self, 'duration_head', None) is not None",
      "if num_frames is None and (not auto_duration):\n    num_frames = 121"),
     lambda pipe: (121 if getattr(pipe, "duration_head", None) is None else None,)),
    # LTX-2.5's DFR call has no count of its own: its duration head predicts one, and without a head it raises
    # ("`num_frames` must be supplied"), so a number is needed there: the 121 of its docs' example and of LTX-2 (its
    # canvas takes (n - 1) % 8 == 0). With a head, left to it as above. Matched by the statement's start: the rest
    # is the head's prediction.
    (("num_frames",),
     ("if num_frames is None:\n    if getattr(self, 'duration_head', None) is None:\n        raise ValueError(",),
     lambda pipe: (121 if getattr(pipe, "duration_head", None) is None else None,)),
)


@functools.cache
def _call_statements(function) -> tuple[ast.stmt, ...] | None:
    """The top-level statements of a pipeline's `__call__`, parsed from its source; `None` without one to read."""
    try:
        definition = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):  # no source (built in, a lambda's line): nothing to read
        return None
    return tuple(definition.body) if isinstance(definition, ast.FunctionDef) else None


def _assigns(node: ast.AST, name: str) -> bool:
    """Whether `node` is an assignment to the local `name` (alone or among others: `height, width = ...`)."""
    targets = ([part for target in node.targets for part in ast.walk(target)] if isinstance(node, ast.Assign) else
               [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
    return any(isinstance(target, ast.Name) and target.id == name for target in targets)


def _own_default(pipe, name: str, image: bool = False) -> int | None:
    """The value the call of `pipe` gives its argument `name` when it is not passed (its default is `None`), where
    its `__call__` works it out in one of the ways `_OWN_STATEMENTS` and `_OR_DEFAULTS` reproduce; else `None`.
    `image`: the call gets an input image, so a size it sets inside a block (from that image) is left to it."""
    statements = None if isinstance(pipe, ModularCall) else _call_statements(type(pipe).__call__)
    if statements is None:  # a modular pipeline's blocks, or no source: only the call knows
        return None
    texts = [ast.unparse(statement) for statement in statements]
    for names, own, value in _OWN_STATEMENTS:
        if name in names and all(any(text.startswith(statement) for text in texts) for statement in own):
            given = value(pipe)[names.index(name)]
            return None if given is None else int(given)
    # Anything else that tests the argument for None (a size from the input image, a predicted frame count) takes
    # another path when it is unset than when given: not reproduced.
    none_tests = {f"{name} is None", f"{name} is not None"}
    definition = ast.Module(body=list(statements), type_ignores=[])
    if any(isinstance(node, ast.Compare) and ast.unparse(node) in none_tests for node in ast.walk(definition)):
        return None
    # Assignments inside a block (an `if image is not None:`, a loop over the input images): FLUX.2's and
    # GLM-Image's `height = height or image_height`. With an image the size may come from it (FLUX.2 makes its reference
    # image's size, not its 1024 square): left to the call. Without one those blocks do not run.
    nested = [node for statement in statements if not _assigns(statement, name) for node in ast.walk(statement)
              if _assigns(node, name)]
    if image and nested:
        return None
    for statement in statements:
        if not _assigns(statement, name):
            continue
        # The first top-level assignment to it decides: `name = name or EXPR`, EXPR a rule or a whole number.
        value = statement.value
        if not (isinstance(statement, ast.Assign) and isinstance(value, ast.BoolOp) and isinstance(value.op, ast.Or)
                and len(value.values) == 2 and ast.unparse(value.values[0]) == name):
            return None
        expression = value.values[1]
        if isinstance(expression, ast.Constant) and type(expression.value) is int:  # Z-Image: 1024
            return expression.value
        rule = _OR_DEFAULTS.get(ast.unparse(expression).replace(name, "{name}"))
        try:
            return None if rule is None else int(rule(pipe, name))
        except (AttributeError, TypeError):  # a component the rule reads is missing: the call would fail alike
            return None
    # No top-level assignment: a size set only inside a block (GLM-Image sets it only from its input image) reaches
    # the model `None` without an image, which fails (GLM-Image: `int(None)` in `prepare_latents`). What the user
    # needs there is the model's sample size, as the pipeline's own `__init__` defines it: GLM-Image 1024.
    if nested and name in ("height", "width"):
        try:
            return int(_OR_DEFAULTS["self.default_sample_size * self.vae_scale_factor"](pipe, name))
        except (AttributeError, TypeError):  # no sample size to give: the call's own failure says what is missing
            return None
    return None


def call_defaults(pipe, image: bool = False) -> dict[str, int | None]:
    """The model's own `steps`, `frames`, `height` and `width`: the testbed's evaluation size (20 steps), else what
    the pipeline call uses when they are not passed. Its defaults (Wan: 50 steps, 81 frames at 480 x 832; one frame
    for an image pipeline); for an argument it leaves `None`, the value its `__call__` works out, where that is one of
    the statements `_own_default` reproduces (Mochi's `default_height` and `default_width`, FLUX's and SD3's default
    sample size, CogVideoX's and Allegro's transformer sample size, HunyuanVideo 1.5's 16:9 size, LTX-2's 121
    frames, and LTX-2.5 DFR's 121 when it has no duration head, since its call then raises without a count); a size
    the call sets only from its input image (GLM-Image), without `image`: the model's sample size
    (`default_sample_size * vae_scale_factor`, 1024), since the call passes `None` on to its latents and fails.

    `None` where the call works it out in a way not reproduced here: LTX-2.5's duration head predicts the frame
    count from the prompt, a modular pipeline's blocks decide, a size the call does not take (HunyuanVideo 1.5's
    image-to-video sizes the video from its image); with `image` (the call gets an input image), a size the call
    reads from it: one its `__call__` sets inside a block or tests for `None` (FLUX.2, GLM-Image, Qwen-Image Edit),
    where a size it defaults at its top level whatever the image (CogVideoX image-to-video resizes the image to its
    sample size; Kontext makes 1024 x 1024) keeps its number. The commands leave those out of the call and report
    the size of the video it made.
    """
    from .pipelines.testbed import TestbedPipeline, testbed_config

    if isinstance(pipe, TestbedPipeline):
        return {"steps": 20, **testbed_config()["eval"]}
    parameters = _call_parameters(pipe)
    defaults = {p.name: p.default for p in parameters.values() if p.default is not inspect.Parameter.empty}

    def own(name: str) -> int | None:
        if name not in parameters:
            return None
        if defaults.get(name) is not None:
            return defaults[name]
        # The image rule is for sizes only, as before: a still's frame count says nothing of the video's.
        return _own_default(pipe, name, image=image and name in ("height", "width") and takes_image(pipe))

    frames = frames_parameter(pipe)
    return {
        # A call without a step count of its own (none by default) gets diffusers' usual 50.
        "steps": defaults.get("num_inference_steps") or 50,
        "frames": 1 if frames is None else own(frames),
        "height": own("height"),
        "width": own("width"),
    }


def fill_call_defaults(args, pipe) -> None:
    """Set each of `args.steps`, `frames`, `height`, `width` left `None` (the commands' default) to the model's own
    (`call_defaults`, given whether `args.image` is set); one the pipeline works out itself stays `None`, and is
    left out of its call (`generation_kwargs`)."""
    for name, value in call_defaults(pipe, image=getattr(args, "image", None) is not None).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def pipeline_outputs(output):
    """`(the batch of a pipeline output, whether it holds videos)`: its `frames`, or its images (`images`, or
    `image` as Kandinsky 5's image pipelines name them), or `video`, one sample's (Cosmos 3's non-modular pipeline)."""
    for name, videos in (("frames", True), ("images", False), ("image", False)):
        batch = getattr(output, name, None)
        if batch is not None:
            return batch, videos
    video = getattr(output, "video", None)
    if video is not None:
        return [video], True
    raise TypeError(f"{type(output).__name__} holds no `frames`, `images`, `image` or `video` to compare")


def first_output(output) -> np.ndarray:
    """The first video of a pipeline output (`output_type="np"`) as `(F, H, W, C)`; an image as one frame, and the
    images of one sample of a pipeline that makes several per sample (Qwen-Image-Layered's layers) as frames."""
    batch, videos = pipeline_outputs(output)
    first = np.asarray(batch[0])
    return first if videos or first.ndim == 4 else first[None]


def _generate(pipe, args, progress: tqdm, first_frame: torch.Tensor | None = None) -> tuple[np.ndarray, float, float]:
    """`(frames, end-to-end seconds, denoising seconds)`; denoising ends at the last step's callback, so it
    leaves out the VAE decode (which dominates end-to-end time on small models with a VAE). Pipelines without
    `callback_on_step_end` (HunyuanVideo 1.5): it ends with the last transformer call instead."""
    last_step_end = []

    def on_step_end(pipe, step, timestep, callback_kwargs):
        progress.update(1)
        synchronize_accelerators()
        last_step_end[:] = [time.perf_counter()]
        return callback_kwargs

    def on_transformer_end(module, inputs, output):
        synchronize_accelerators()
        last_step_end[:] = [time.perf_counter()]

    with_callback = "callback_on_step_end" in _call_parameters(pipe)
    step_ends = {"callback_on_step_end": on_step_end} if with_callback else {}
    hooks = [] if with_callback else [
        transformer.register_forward_hook(on_transformer_end) for transformer in find_transformers(pipe)[0].values()
    ]
    kwargs = generation_kwargs(pipe, args, args.prompt, args.seed, first_frame)
    synchronize_accelerators()
    start = time.perf_counter()
    try:
        with seeded_global_generator(args.seed):
            output = pipe(**kwargs, **step_ends)
        frames = first_output(output)
        synchronize_accelerators()
        end = time.perf_counter()
    finally:
        for hook in hooks:
            hook.remove()
    if not with_callback:
        progress.update(args.steps)
    return frames, end - start, last_step_end[0] - start


def synchronize_accelerators() -> None:
    """Wait for the work queued on every CUDA device (or on the current accelerator of another kind: XPU, MPS), so
    that a wall time read next covers it: kernels run asynchronously, and a step's callback would otherwise read
    the time its kernels were queued at."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)
    elif hasattr(torch, "accelerator") and torch.accelerator.is_available():
        torch.accelerator.synchronize()


def _pixels(frames: np.ndarray) -> np.ndarray:
    """Frames in [0, 1] as 8-bit pixels."""
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def sparse_label(config: SparseConfig) -> str:
    """The sparse video's label: what was asked. With a density, the pattern as given (a text as typed, an object's
    parameters other than their defaults: `given_parameters`) and the density, since the pattern's main parameter is
    solved per layout while it runs (the default instance's repr named parameters that never ran, the same for every
    density), less a parameter the density sets in its place (`density_replaces`); without one, the pattern with
    its parameters spelled out."""
    if config.density is None:
        return f"sparse {config.resolved_pattern!r}"
    pattern = config.pattern
    replaced = density_replaces(config)
    # A parameter the density set in its place never ran: `searched(keep=0.5) @ density 0.25` named it, and an
    # object's repr named `decay`, solved per layout, and the defaults the text form leaves out.
    if replaced or not isinstance(pattern, str):
        name, given = given_parameters(pattern)
        kept = ", ".join(f"{key}={value!r}" for key, value in given.items() if key not in replaced)
        pattern = f"{name}({kept})" if kept else name
    return f"sparse {pattern} @ density {config.density:g}"


def _wrap(text: str, width: float, measure) -> list[str]:
    """`text` in lines no wider than `width` (by `measure`), broken after a space, comma or parenthesis where one
    fits, else mid-word; nothing is left out."""
    lines = []
    while text:
        if measure(text) <= width:
            lines.append(text)
            break
        fits = 1  # at least one character a line, however narrow the frame
        while fits < len(text) and measure(text[: fits + 1]) <= width:
            fits += 1
        cut = next((i for i in range(fits, 0, -1) if text[i - 1] in " ,("), fits)
        lines.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return lines


def _labelled(frames: np.ndarray, label: str, min_side: int = 256) -> np.ndarray:
    from PIL import Image, ImageDraw

    scale = max(1, -(-min_side // min(frames.shape[1:3])))
    size = (frames.shape[2] * scale, frames.shape[1] * scale)
    draw = ImageDraw.Draw(Image.new("RGB", size))
    # Wrapped to the frame: a long label (a pattern with its parameters) was cut at the frame's right edge.
    lines = _wrap(label, size[0] - 8, draw.textlength)
    line_height = draw.textbbox((0, 0), "Ag")[3] + 3
    box = (0, 0, min(size[0] - 1, 8 + max(map(draw.textlength, lines))), 3 + line_height * len(lines))
    out = []
    for frame in _pixels(frames):
        image = Image.fromarray(frame).resize(size, Image.NEAREST)
        draw = ImageDraw.Draw(image)
        draw.rectangle(box, fill=(0, 0, 0))
        for row, line in enumerate(lines):
            draw.text((4, 2 + row * line_height), line, fill=(255, 255, 255))
        out.append(np.asarray(image))
    return np.stack(out)


def write_side_by_side(
    path: Path, dense: np.ndarray, sparse_frames: np.ndarray, sparse_label: str, fps: int = VIDEO_FPS
) -> Path | None:
    """The labelled dense | sparse video at `path` (mp4); with one frame (an image model) also that frame as a
    PNG beside it, whose path is returned (else `None`)."""
    import imageio.v3 as iio

    video = np.concatenate([_labelled(dense, "dense"), _labelled(sparse_frames, sparse_label)], axis=2)
    _write_mp4(path, video, fps)
    if len(video) != 1:
        return None
    image_path = path.with_suffix(".png")
    iio.imwrite(image_path, video[0])
    return image_path


def write_frames(stem: Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> Path:
    """`frames` `(F, H, W, C)` in [0, 1] as they are (their own size, no label): `stem`.mp4, or `stem`.png for one
    frame (an image model). Returns the path written."""
    import imageio.v3 as iio

    if len(frames) == 1:
        path = stem.with_suffix(".png")
        iio.imwrite(path, _pixels(frames)[0])
        return path
    path = stem.with_suffix(".mp4")
    _write_mp4(path, _pixels(frames), fps)
    return path


def _write_mp4(path: Path, pixels: np.ndarray, fps: int) -> None:
    import imageio.v3 as iio

    # yuv420p (what players expect) needs even sides
    pixels = pixels[:, : pixels.shape[1] // 2 * 2, : pixels.shape[2] // 2 * 2]
    iio.imwrite(path, pixels, fps=fps, codec="libx264", macro_block_size=1)


def is_testbed_model(model: str | None) -> bool:
    """Whether `--model` names a testbed pipeline: the embedded one (`None`) or a folder saved from one."""
    if model is None:
        return True
    from .pipelines import testbed

    index = Path(model) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == testbed.TestbedPipeline.__name__


def check_two_stage(args, pipe=None) -> None:
    """`args.two_stage` / `args.still_candidates` (of `compare` and `eval`) make sense before anything is loaded
    (with `pipe`, the pipeline already loaded: the demo's)."""
    if args.still_candidates != 1 and not args.two_stage:
        raise ValueError(f"still_candidates={args.still_candidates} chooses among two-stage stills: pass two_stage")
    if args.two_stage:  # first: a model that cannot sample in two stages is the setting to change, not its frames
        from .pipelines import testbed

        if not (is_testbed_model(args.model) if pipe is None else isinstance(pipe, testbed.TestbedPipeline)):
            raise ValueError(
                f"two_stage needs the testbed pipeline (its first_frame image-to-video input); model={args.model!r}"
                + ("" if pipe is None else f" loads {pipeline_name(pipe)}")
            )
    check_seed_range(args.seed, getattr(args, "seeds", 1), args.still_candidates if args.two_stage else 1)
    if args.two_stage and args.frames is not None and args.frames < 2:  # None: the model's default, checked later
        raise ValueError(f"two_stage gives frame 0 as the still and scores the frames after it: frames must be >= 2, "
                         f"got frames={args.frames}")


def check_seed_range(seed: int, seeds: int = 1, still_candidates: int = 1) -> None:
    """The seeds a run samples with, `seed` .. `seed + seeds - 1` (eval's `--seeds`), and with two stages each one's
    stills up to `still_candidates - 1` past it (`testbed.best_still`), must all be seeds torch's generators take
    (64 bits, as `--seed` checks): one out of range failed as "Overflow when unpacking long long" only when its turn
    came, after the model had loaded and generated the others."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r}: must be an int of at least 1")
    if not all(isinstance(x, int) for x in (seed, still_candidates)):
        return  # each is refused by its own check, which names it
    last = seed + seeds - 1 + max(still_candidates, 1) - 1
    if seed < -(2**63) or last >= 2**64:
        raise ValueError(f"seed={seed}, seeds={seeds}, still_candidates={still_candidates}: the run samples with seeds "
                         f"{seed} .. {last} (seed + seeds - 1 + still_candidates - 1), and torch's generators take "
                         f"-2**63 to 2**64 - 1 (64 bits); {'raise' if seed < -(2**63) else 'lower'} seed")


def sampler_label(args) -> str:
    if not args.two_stage:
        return "one pass"
    # The stills are sampled at `testbed.best_still`'s own settings (guidance 3.0, no call arguments).
    stills = "" if not getattr(args, "call_kwargs", None) else "; --call-kwargs reach the clips, not the stills"
    return f"two-stage, best of {args.still_candidates} stills{stills}"


def scored_label(args) -> str:
    return "frames 1 on (frame 0 is the shared still)" if args.two_stage else "every frame"


def scored_frames(args) -> slice:
    """The frames metrics compare: with `two_stage` the given still comes back as frame 0 of every video, an input
    that no run generated (and identical PSNR would be infinite)."""
    return slice(1, None) if args.two_stage else slice(None)


def shared_still(pipe, args, prompt: str, seed: int) -> torch.Tensor:
    """The first frame every run of `--two-stage` starts from for (`prompt`, `seed`): sampled once, dense and
    untimed, so dense and sparse videos differ only by the attention of the clip's sampling. The callers have
    checked the pipeline (`check_two_stage(args, pipe)`)."""
    from .pipelines import testbed

    return testbed.best_still(pipe, [prompt], args.height, args.width, steps=args.steps, seed=seed,
                              device=args.device, still_candidates=args.still_candidates)


@contextlib.contextmanager
def kept_warnings():
    """Inside, the text of every warning diffsparse raises (a `DiffsparseWarning`, whatever its text) is also kept
    in the list this yields; every warning is shown as before (stderr, or whatever recorder is outside), when it is
    shown, not after. By category, not by text (the causal-mask and Cosmos 3 messages lacked the "diffsparse" prefix
    results once filtered on) nor by the module that called `warnings.warn` (a warning torch or numpy raise in C
    code that diffsparse calls has diffsparse's frame). Not thread-safe, as `warnings.catch_warnings`."""
    caught = []
    with warnings.catch_warnings():
        show = warnings.showwarning

        def keep(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DiffsparseWarning):
                caught.append(str(message))
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = keep
        yield caught


def speedup_note(result: CompareResult) -> str:
    """Said beside the speedups: nothing when some call ran sparse; else that they time two dense runs against each
    other, run-to-run noise that a bare number passed off as a result."""
    return "" if result.sparse_calls else "nothing ran sparse: run-to-run noise"


def check_config_fits(pipe, config: SparseConfig) -> None:
    """`config` applied to `pipe` and removed again, so that what `apply` refuses for this model (a `dense_layers`
    block it lacks) is said before the stills and the warm-up (100 s of them at the demo's defaults), not at the
    sparse run. Quiet: `apply`'s warnings come again, in their place, when the sparse runs apply it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sparse(pipe, config):
            pass


# Everything `run_compare` writes beside compare.mp4 and compare.json, in one format or the other (one frame: PNGs).
_FRAME_FILES = ("compare.png", "dense.mp4", "dense.png", "sparse.mp4", "sparse.png")
_KEPT_FRAMES = "frames.npz"  # both runs' frames, written only when their videos could not be


def _saying_kept(error: Exception, kept: str) -> ValueError | None:
    """`error`, which came after the runs, made to say what of them was `kept`: a new `ValueError` to raise from it
    (the commands print a ValueError's message alone, without notes), else `None` with a note added to `error`."""
    if isinstance(error, ValueError):
        return ValueError(f"{error} ({kept})")
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(kept)
    return None


def run_compare(args, config: SparseConfig, pipe=None, names: dict[str, str] | None = None) -> CompareResult:
    """Generate `args.prompt` dense, then sparse under `config`; score, time, and write the side-by-side video.

    `args.two_stage`: text-to-video in two samplings (testbed pipelines only): a still from the shapes-only
    prompt, the best of `args.still_candidates` (`pipelines.testbed.best_still`), then the clip image-to-video
    from it, dense and sparse from the same still; frame 0 (the still) is left out of PSNR/SSIM/LPIPS.
    `pipe`: an already loaded pipeline for `args.model` (the demo keeps one); `None` loads it. `names`: what the
    messages about the settings call them (`COMMAND_NAMES`, the default; the demo's page: `demo.PAGE_NAMES`).
    A pattern text giving a parameter the density sets is warned of (`warn_if_density_replaces`): the density wins;
    a pattern object was warned of when `config` was made, and the result keeps that text too (`said_when_made`).
    The videos are written before they are scored: a score that fails raises with them kept and no compare.json (an
    earlier run's is deleted with its videos); a video that cannot be written raises with both runs' frames kept in
    `frames.npz` (arrays `dense` and `sparse`).
    """
    check_two_stage(args, pipe)
    # `--call-kwargs` and `--image` before loading; with the demo's loaded pipeline, before its still is sampled, not
    # at the clips' call.
    check_call_kwargs_before_loading(args, pipe, names=names)
    # A given file that is not there, or frames too small for it: before loading.
    lpips_weights(getattr(args, "lpips_weights", None), frame_size=(args.height, args.width))
    if pipe is None:
        pipe = load_pipeline_for(args)
    fill_call_defaults(args, pipe)
    check_two_stage(args, pipe)  # again: the frame count may have been the model's default
    check_config_fits(pipe, config)
    said_before = said_when_made(config)
    progress = tqdm(total=2 + 2 * args.steps, desc="warm-up, dense, sparse", unit="step")
    # A caller's applied config (a `pipe` given, the demo's) must not reach the dense runs: sparse against sparse.
    with kept_warnings() as caught, suspended(pipe), progress:
        warn_if_density_replaces(config, names)  # in compare.json's warnings and the page's too
        first_frame = shared_still(pipe, args, args.prompt, args.seed) if args.two_stage else None
        # One untimed step of each path first, so one-time costs (allocator, thread pools, lazy imports, and on
        # the sparse side compiling or loading the CPU kernel) do not land on the timed runs. Plans are not among
        # them: each apply builds its own, so the timed sparse run pays for its plans, as a user's run does.
        one_step = argparse.Namespace(**{**vars(args), "steps": 1})
        _generate(pipe, one_step, progress, first_frame)
        # Quiet: a one-step run of the config warns of itself (a correction has no step before it to measure at,
        # "nothing runs sparse"), which is no word about the timed run; that one applies anew and says its own.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with sparse(pipe, replace(config, dense_steps=0, dense_last_steps=0)):
                _generate(pipe, one_step, progress, first_frame)
        dense, dense_seconds, dense_denoise = _generate(pipe, args, progress, first_frame)
        with sparse(pipe, config) as handle:
            sparse_frames, sparse_seconds, sparse_denoise = _generate(pipe, args, progress, first_frame)
            call_stats = handle.stats(since_apply=True)  # every segment of a pipeline that runs several
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier run's files in the other format (one frame: PNGs; several: mp4s) would stay beside the new ones, and
    # its compare.json beside videos it does not describe.
    for name in ("compare.mp4", *_FRAME_FILES, "compare.json", _KEPT_FRAMES):
        (out_dir / name).unlink(missing_ok=True)
    video_path = out_dir / "compare.mp4"
    fps = getattr(args, "fps", VIDEO_FPS)
    try:
        image_path = write_side_by_side(video_path, dense, sparse_frames, sparse_label(config), fps=fps)
        # Each video unlabelled at its own size too, for other metrics or viewing apart.
        dense_path, sparse_path = (write_frames(out_dir / name, frames, fps)
                                   for name, frames in (("dense", dense), ("sparse", sparse_frames)))
    except Exception as error:
        # An encoder that failed (no libx264 in the ffmpeg found, say) lost both runs, the earlier run's files
        # already deleted: the frames themselves are kept instead.
        try:
            np.savez(out_dir / _KEPT_FRAMES, dense=dense, sparse=sparse_frames)
            kept = (f"their frames were saved to {out_dir / _KEPT_FRAMES} (arrays 'dense' and 'sparse', (F, H, W, C) "
                    "in [0, 1])")
        except Exception as keeping_error:  # noqa: BLE001 - a full disk, say: the first error is the one to read
            (out_dir / _KEPT_FRAMES).unlink(missing_ok=True)
            kept = f"their frames could not be saved either ({type(keeping_error).__name__}: {keeping_error})"
        said = _saying_kept(error, f"writing the videos failed after the runs; {kept}")
        if said is None:
            raise
        raise said from error
    scored = scored_frames(args)
    # Scored after the videos are written: a score that failed (an unreadable LPIPS file in the torch hub cache, say)
    # lost the runs, which can take hours on a GPU, leaving nothing to look at.
    try:
        weights = lpips_weights(getattr(args, "lpips_weights", None), frame_size=dense.shape[1:3])
        with kept_warnings() as scoring:  # a NaN score's warning, kept as `eval` keeps it
            psnr_db = psnr(sparse_frames[scored], dense[scored])
            ssim_score = ssim(sparse_frames[scored], dense[scored])
            lpips_score = None if weights is None else lpips(sparse_frames[scored], dense[scored], weights_path=weights)
    except Exception as error:
        said = _saying_kept(error, f"scoring failed after the runs; their videos were written ({video_path}, "
                                   f"{dense_path}, {sparse_path}), compare.json was not")
        if said is None:
            raise
        raise said from error
    result = CompareResult(
        model=model_label(args.model, pipe),
        config=repr(config),
        # The video made, not the request: pipelines round a frame count (Wan to 4k + 1: 7 makes 5) or size, and
        # work out what `call_defaults` leaves to them.
        frames=dense.shape[0],
        height=dense.shape[1],
        width=dense.shape[2],
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        dtype=weights_dtype(pipe),
        offload=offload_mode(pipe),
        sampler=sampler_label(args),
        dense_seconds=dense_seconds,
        sparse_seconds=sparse_seconds,
        speedup=dense_seconds / sparse_seconds,
        dense_denoise_seconds=dense_denoise,
        sparse_denoise_seconds=sparse_denoise,
        denoise_speedup=dense_denoise / sparse_denoise,
        mean_attention_density=call_stats.mean_density,
        sparse_steps_density=call_stats.sparse_steps_density,
        sparse_calls=sum(layer.sparse_calls for layer in call_stats.layers),
        psnr_db=psnr_db,
        ssim=ssim_score,
        lpips=lpips_score,
        video_path=str(video_path),
        image_path=None if image_path is None else str(image_path),
        dense_path=str(dense_path),
        sparse_path=str(sparse_path),
        prompt=prompt_passed(pipe, args.prompt),
        image=getattr(args, "image", None),
        call_kwargs=getattr(args, "call_kwargs", None),
        vae_tiling=bool(getattr(getattr(pipe, "vae", None), "use_tiling", False)),
        warnings=list(dict.fromkeys(said_before + caught + scoring)),
    )
    (out_dir / "compare.json").write_text(strict_json(asdict(result), indent=2))
    print(call_stats)
    return result
