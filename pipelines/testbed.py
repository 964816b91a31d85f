"""The testbed: a tiny text-to-video Wan model that diffsparse trains itself, so quality numbers mean something.

A `WanTransformer3DModel` (~1M parameters, `configs/testbed_wan.json`) denoises videos in pixel space through a
2x2 space-to-depth: a `(3, F, H, W)` video in [-1, 1] becomes `(12, F, H/2, W/2)` "latents", the transformer's
patch (1, 2, 2) makes one token of 4x4 pixels, and decoding is the exact inverse (no VAE: there are no weights to
train or ship for it, and nothing lossy between the model and the pixels the metrics compare). Prompts go through
a word-level tokenizer built in memory and a tiny T5 encoder (trainable; the shipped weights keep it at its seeded
initialisation, `train --freeze-text-encoder`, because training it erased the direction words' difference).
`TestbedPipeline` is a small diffusers `DiffusionPipeline` that calls the transformer and the
`FlowMatchEulerDiscreteScheduler` exactly as `WanPipeline` does (same arguments, `cache_context("cond"/"uncond")`,
CFG as two calls), so `diffsparse.apply`, `diffsparse compare` and the Wan adapter treat it like Wan.

The trained weights ship in the package (`weights/testbed/`, written by `python -m diffsparse.testbed.train`,
see `diffsparse.testbed`); `load()` reads them with no network. It is the embedded default model of
`diffsparse compare`, `diffsparse eval` and `make run`.

Example:
    >>> from diffsparse.pipelines.testbed import load
    >>> pipe = load()
    >>> video = pipe("a red circle moving left", num_frames=5, height=16, width=16, num_inference_steps=2).frames
    >>> video.shape
    (1, 5, 16, 16, 3)
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from ..devices import as_device, device_here
from .text import clean_prompt, prompt_words, word_tokenizer

logger = logging.getLogger(__name__)  # diffusers' `logging.get_logger` is this; pipelines warn through it

CONFIG_PATH = Path(__file__).parent / "configs" / "testbed_wan.json"
# The shipped trained weights: a `save_pretrained` folder of `TestbedPipeline` (model_index.json, transformer/, ...).
WEIGHTS_PATH = Path(__file__).parent / "weights" / "testbed"

__all__ = [
    "CONFIG_PATH",
    "WEIGHTS_PATH",
    "TestbedPipeline",
    "best_still",
    "build_pipeline",
    "depth_to_space",
    "encode_prompts",
    "load",
    "room_ahead",
    "sample",
    "space_to_depth",
    "space_to_depth_factor_of",
    "still_prompt",
    "testbed_config",
]


@lru_cache(maxsize=1)
def testbed_config() -> dict:
    """The model configuration (`pipelines/configs/testbed_wan.json`); treat it as read-only."""
    return json.loads(CONFIG_PATH.read_text())


def space_to_depth(video: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """`(B, C, F, H, W)` -> `(B, C * factor**2, F, H / factor, W / factor)`; channel `c * factor**2 + dy * factor + dx`.

    Example:
        >>> x = torch.randn(1, 3, 2, 8, 8)
        >>> torch.equal(depth_to_space(space_to_depth(x)), x)
        True
    """
    b, c, f, h, w = video.shape
    if h % factor or w % factor:
        raise ValueError(f"height and width must be multiples of {factor=}, got {h=} and {w=}")
    x = video.reshape(b, c, f, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * factor * factor, f, h // factor, w // factor)


def space_to_depth_factor_of(in_channels: int) -> int:
    """The space-to-depth factor of a transformer with `in_channels` channels, `3 * factor**2` of them.

    The pipeline, training and `fidelity.prompt_sensitivity` all derive it here: training with a fixed factor of 2
    broke on a `--config` the pipeline sampled (48 channels, factor 4).

    Example:
        >>> space_to_depth_factor_of(12), space_to_depth_factor_of(48)
        (2, 4)
    """
    factor = math.isqrt(in_channels // 3) if isinstance(in_channels, int) and in_channels > 0 else 0
    if factor < 1 or in_channels != 3 * factor * factor:
        raise ValueError(f"in_channels must be 3 * factor**2 for the RGB space-to-depth (3, 12, 27, 48, ...), got "
                         f"in_channels={in_channels!r}")
    return factor


def depth_to_space(latents: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The inverse of `space_to_depth`."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c // (factor * factor), factor, factor, f, h, w)
    return x.permute(0, 1, 4, 5, 2, 6, 3).reshape(b, c // (factor * factor), f, h * factor, w * factor)


def per_token_timesteps(timesteps: torch.Tensor, latents: torch.Tensor, patch_size) -> torch.Tensor:
    """One timestep per frame, `(B, F)`, as the one-per-token `(B, F * tokens per frame)` tensor that
    `WanTransformer3DModel` takes (Wan 2.2 TI2V's path): tokens are frame-major, so each frame's value repeats.
    Training (`--frame-noise`, `--clean-first-frame`) and image-to-video sampling both build it here."""
    p_t, p_h, p_w = patch_size
    if p_t != 1:
        raise ValueError(f"one timestep per frame needs a temporal patch size of 1, got {p_t}")
    height, width = latents.shape[-2:]
    return timesteps.repeat_interleave((height // p_h) * (width // p_w), dim=1)


def build_components(config: dict | None = None, seed: int | None = None) -> dict:
    """Fresh components with seeded random weights: `tokenizer`, `text_encoder`, `transformer`, `scheduler`.

    Args:
        config (`dict`, *optional*): defaults to `testbed_config()`.
        seed (`int`, *optional*): weight seed, defaults to the config's.
    """
    from transformers import T5Config, T5EncoderModel

    config = testbed_config() if config is None else config
    transformer_config = config["transformer"]
    factor = space_to_depth_factor_of(transformer_config.get("in_channels"))
    # The config's own key was read by nothing, so it could say 2 for a 48-channel model without a word.
    if config.get("space_to_depth", factor) != factor:
        raise ValueError(f"space_to_depth must be the factor in_channels={transformer_config['in_channels']} implies "
                         f"({factor}) or left out, got space_to_depth={config['space_to_depth']!r}")
    # The model predicts a velocity of the latents' shape: other out_channels failed at the first scheduler step.
    if transformer_config.get("out_channels") not in (None, transformer_config["in_channels"]):
        raise ValueError(f"out_channels must equal in_channels ({transformer_config['in_channels']}) or be left out, "
                         f"got out_channels={transformer_config['out_channels']!r}")
    vocabulary = config["vocabulary"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"] if seed is None else seed)
        transformer = WanTransformer3DModel(**config["transformer"])
        text_encoder = T5EncoderModel(
            T5Config(vocab_size=len(vocabulary), pad_token_id=0, eos_token_id=1, **config["text_encoder"])
        )
    return {
        "tokenizer": word_tokenizer(vocabulary, config["max_sequence_length"]),
        "text_encoder": text_encoder,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
    }


def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """`(B, max_sequence_length, d_model)` prompt embeddings, zero past each prompt's end (as `WanPipeline` does).

    Training and sampling both go through this function, so the model sees the same text path in both. Prompts are
    cleaned first (`text.clean_prompt`: lowercase words, punctuation dropped; the word tokenizer splits on spaces only);
    words the vocabulary lacks, and prompts cut to `max_sequence_length` tokens, are logged as warnings (the
    model would read `<unk>` or nothing for them), and so are vocabulary words no training prompt uses
    (`diffsparse.testbed.data.PROMPT_WORDS`): the model never learned what they draw, as are prompts that clean to
    nothing though not blank ("…", "🔴"): they are read as the empty, unconditional prompt.
    """
    given, prompts = prompts, [clean_prompt(prompt) for prompt in prompts]
    _warn_about_text(tokenizer, prompts, max_sequence_length, given)
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = text_encoder.device
    mask = inputs.attention_mask.to(device)
    hidden = text_encoder(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def _warn_about_text(tokenizer, prompts: list[str], max_sequence_length: int, given: list[str]) -> None:
    """Warn, as diffusers pipelines do when CLIP truncates a prompt, about what the model will not read in the
    cleaned `prompts` (`given`, as the caller wrote them)."""
    from ..testbed.data import PROMPT_WORDS

    vocabulary = tokenizer.get_vocab()
    # The vocabulary has room for words the data never draws ("cyan", "cat"): they have tokens but the model was
    # never shown what they mean, so a prompt with them draws nothing they name, as silently as an unknown word.
    trained = sorted(PROMPT_WORDS & vocabulary.keys())
    for prompt, written in zip(prompts, given):
        # Symbols and emoji alone clean to "": the model drew an unprompted sample, as for CFG's empty prompt.
        if not prompt and written.strip():
            logger.warning(f"The prompt {written!r} holds no word (letters or digits; punctuation, symbols and emoji "
                           f"are dropped): it is read as the empty, unconditional prompt; it knows {trained}")
        words = prompt.split()
        unknown = sorted({word for word in words if word not in vocabulary})
        untrained = sorted({word for word in words if word in vocabulary and word not in PROMPT_WORDS})
        if unknown:
            logger.warning(f"The testbed's vocabulary lacks {unknown} (read as {tokenizer.unk_token}) in the prompt "
                           f"{prompt!r}; it knows {trained}")
        if untrained:
            logger.warning(f"The testbed was never trained on {untrained} (in its vocabulary, but in no training "
                           f"prompt: the model does not draw what they name) in the prompt {prompt!r}; it knows "
                           f"{trained}")
        kept = max_sequence_length - 1  # the last token is </s>
        if len(words) > kept:
            logger.warning(f"The prompt {prompt!r} was cut to {max_sequence_length} tokens ({kept} words and "
                           f"{tokenizer.eos_token}); this part was dropped: {' '.join(words[kept:])!r}")


LOAD_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # what `load` casts the weights to
OUTPUT_TYPES = ("np", "pt", "pil", "latent")  # `VideoProcessor.postprocess_video`'s three, and the latents


def _check_count(name: str, value) -> int:
    """`value` as an int; `ValueError` unless it is an integer >= 1 (a float such as 3.0 failed later with a
    `TypeError`). numpy integers count, as `WanPipeline` takes them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    return int(value)


def _check_embeds(name: str, embeds, text_dim: int) -> None:
    """`ValueError` unless `embeds` is a floating `(prompts, tokens, text_dim)` tensor, as `encode_prompt` gives.

    Anything else failed deep in the model: an IndexError (2-D), an AttributeError (a list), a matmul
    RuntimeError (another width)."""
    if (not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point() or embeds.ndim != 3
            or embeds.shape[-1] != text_dim or 0 in embeds.shape):
        got = (f"a {embeds.dtype} tensor of shape {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor)
               else f"a {type(embeds).__name__}")
        raise ValueError(f"{name} must be a floating tensor of shape (prompts, tokens, {text_dim}) (the transformer's "
                         f"text_dim), as encode_prompt gives, got {name}={got}")


def _check_still_candidates(value) -> int:
    """`value` as an int; `ValueError` unless an integer >= 1, as `_check_count` (True was taken as 1), in the words
    `diffsparse compare --still-candidates` reports (`tests/test_cli.py` reads them)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"still_candidates must be an int >= 1, got {value!r}")
    return int(value)


def _is_prompt_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _accelerate_hooked(pipe) -> bool:
    """Whether accelerate hooks (`enable_model_cpu_offload`, `enable_sequential_cpu_offload`, a caller's own
    `cpu_offload`) place any component of `pipe`: they move the weights at each call, so `pipe.to` must not."""
    return any(
        hasattr(module, "_hf_hook")
        for component in pipe.components.values() if isinstance(component, torch.nn.Module)
        for module in component.modules()
    )


@dataclass
class TestbedPipelineOutput(BaseOutput):
    """`frames`: `np.ndarray` `(B, F, H, W, 3)`, `torch.Tensor` `(B, F, 3, H, W)` or lists of PIL images."""

    frames: object


class TestbedPipeline(DiffusionPipeline):
    """Text-to-video with the testbed model: `WanPipeline`'s denoising loop over space-to-depth pixels.

    Args:
        tokenizer (`PreTrainedTokenizerFast`): word-level tokenizer (its `model_max_length` is the text length).
        text_encoder (`T5EncoderModel`): tiny T5 encoder.
        transformer (`WanTransformer3DModel`): the denoiser; `in_channels` is `3 * factor**2` for a `factor` x
            `factor` space-to-depth (`3 * 2 * 2` in the shipped model).
        scheduler (`FlowMatchEulerDiscreteScheduler`): flow-matching Euler scheduler.

    Example:
        >>> pipe = build_pipeline()
        >>> out = pipe("a blue square moving up", num_frames=3, height=16, width=16, num_inference_steps=2,
        ...            output_type="pt")
        >>> tuple(out.frames.shape)
        (1, 3, 3, 16, 16)
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")

    def __init__(self, tokenizer, text_encoder, transformer, scheduler):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.space_to_depth_factor)
        self._current_timestep, self._interrupt, self._num_timesteps = None, False, None  # before any call

    @property
    def space_to_depth_factor(self) -> int:
        return space_to_depth_factor_of(self.transformer.config.in_channels)

    def encode_prompt(self, prompt, num_videos_per_prompt: int = 1, max_sequence_length: int | None = None):
        if max_sequence_length is not None:
            max_sequence_length = _check_count("max_sequence_length", max_sequence_length)
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        length = self.tokenizer.model_max_length if max_sequence_length is None else max_sequence_length
        embeds = encode_prompts(self.tokenizer, self.text_encoder, prompt, length)
        return embeds.to(self._execution_device).repeat_interleave(num_videos_per_prompt, dim=0)

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the current (or last) call, as `WanPipeline.num_timesteps`."""
        return self._num_timesteps

    @property
    def current_timestep(self):
        """The scheduler timestep being denoised, `None` outside the loop (`WanPipeline.current_timestep`)."""
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (in a `callback_on_step_end`) to skip the remaining steps (`WanPipeline`'s)."""
        return self._interrupt

    def check_video_size(self, num_frames, height, width, frames_name: str = "num_frames") -> tuple[int, int, int]:
        """`(num_frames, height, width)` as ints; `ValueError` unless they are ints >= 1 with height and width
        multiples of the pixels one token covers (space-to-depth factor x patch). `fidelity.prompt_sensitivity`
        checks its clip size here too, naming its frame count `frames_name`."""
        num_frames = _check_count(frames_name, num_frames)
        height, width = _check_count("height", height), _check_count("width", width)
        multiple = self.space_to_depth_factor * self.transformer.config.patch_size[1]
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} pixels, got {name}={value}")
        return num_frames, height, width

    def _check_inputs(self, height: int, width: int, num_frames: int, callback_inputs, prompt, prompt_embeds,
                      num_inference_steps: int, num_videos_per_prompt: int, negative_prompt=None,
                      negative_prompt_embeds=None, max_sequence_length: int | None = None,
                      guidance_scale: float = 3.0, output_type: str = "np") -> dict[str, int]:
        """Raise `ValueError` for an input the call cannot use; returns the counts as ints (numpy ints included)."""
        counts = {"num_inference_steps": num_inference_steps, "num_videos_per_prompt": num_videos_per_prompt}
        if max_sequence_length is not None:  # 0 read as "the default" before
            counts["max_sequence_length"] = max_sequence_length
        counts = {name: _check_count(name, value) for name, value in counts.items()}
        counts.update(zip(("num_frames", "height", "width"), self.check_video_size(num_frames, height, width)))
        # diffusers refuses an unknown one only when post-processing, after the whole denoising loop.
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got output_type={output_type!r}")
        if prompt_embeds is None and (prompt is None or isinstance(prompt, (list, tuple)) and len(prompt) == 0):
            raise ValueError(f"give a prompt (a str or a non-empty list of them) or prompt_embeds, "
                             f"got prompt={prompt!r}")
        # Anything else failed inside the tokenizer with a TypeError (None or a number in a list) or at len().
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is not None and not isinstance(text, str) and not _is_prompt_list(text):
                raise ValueError(f"{name} must be a str or a list of str, got {name}={text!r}")
        # nan compared False with 1.0 and ran without CFG, as if no guidance had been asked for.
        if isinstance(guidance_scale, torch.Tensor) and guidance_scale.numel() == 1:
            guidance_scale = guidance_scale.item()  # as diffusers' pipelines take a one-element tensor
        if (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
                or not math.isfinite(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite real number (1 or less: no CFG), got "
                             f"guidance_scale={guidance_scale!r}")
        # As WanPipeline.check_inputs: one of the two would be dropped without a word.
        for name, text, embeds in (("prompt", prompt, prompt_embeds),
                                   ("negative_prompt", negative_prompt, negative_prompt_embeds)):
            if text is not None and embeds is not None:
                raise ValueError(f"give {name} or {name}_embeds, not both: got {name}={text!r} and {name}_embeds")
        text_dim = self.transformer.config.text_dim
        if prompt_embeds is not None:
            _check_embeds("prompt_embeds", prompt_embeds, text_dim)
        if negative_prompt_embeds is not None:
            _check_embeds("negative_prompt_embeds", negative_prompt_embeds, text_dim)
            # One per prompt, as prompt_embeds: another batch failed inside the model, or (1 for several prompts)
            # ran with the one negative broadcast to every prompt.
            prompts = (prompt_embeds.shape[0] if prompt_embeds is not None
                       else 1 if isinstance(prompt, str) else len(prompt))
            if negative_prompt_embeds.shape[0] != prompts:
                raise ValueError(f"negative_prompt_embeds must be a (prompts, tokens, channels) tensor with one row "
                                 f"per prompt ({prompts}), before num_videos_per_prompt repeats it; got shape "
                                 f"{tuple(negative_prompt_embeds.shape)}")
        unknown = [k for k in callback_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {unknown}"
            )
        return counts

    def _first_frame_latent(self, first_frame, batch_size: int, height: int, width: int, device) -> torch.Tensor | None:
        """`first_frame` (`(B or 1, 3, H, W)` in [0, 1]) as a one-frame latent in the model's [-1, 1] pixel space."""
        if first_frame is None:
            return None
        if (
            not isinstance(first_frame, torch.Tensor)
            or first_frame.ndim != 4
            or first_frame.shape[0] not in (1, batch_size)
            or tuple(first_frame.shape[1:]) != (3, height, width)
        ):
            raise ValueError(
                f"first_frame must be a tensor of shape ({batch_size} or 1, 3, {height}, {width}) with values in "
                f"[0, 1], got {getattr(first_frame, 'shape', type(first_frame).__name__)}"
            )
        # uint8 0-255 or [-1, 1] images would otherwise be scaled as if in [0, 1]: a washed-out or clipped start.
        if not first_frame.is_floating_point() or not (first_frame.min() >= 0 and first_frame.max() <= 1):
            raise ValueError(
                f"first_frame must be a floating tensor with values in [0, 1], got dtype {first_frame.dtype} with "
                f"values in [{first_frame.min().item()}, {first_frame.max().item()}]"
            )
        pixels = first_frame.to(device=device, dtype=torch.float32) * 2 - 1
        latent = space_to_depth(pixels.unsqueeze(2), self.space_to_depth_factor)
        return latent.expand(batch_size, -1, -1, -1, -1)

    def _predict(self, branch: str, context: dict, latents, timestep, embeds, attention_kwargs) -> torch.Tensor:
        # One CFG branch, in its own cache context as WanPipeline does (hooks keep per-branch state by name).
        with self.transformer.cache_context(branch, **context):
            return self.transformer(
                hidden_states=latents,
                timestep=timestep,
                encoder_hidden_states=embeds,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 48,
        width: int = 48,
        num_frames: int = 17,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int | None = None,
        first_frame: torch.Tensor | None = None,
    ):
        """Generate videos; the arguments mean what they mean for `diffusers.WanPipeline`.

        Args:
            prompt (`str` or `list[str]`): what to draw, in the vocabulary of the config.
            negative_prompt (`str` or `list[str]`, *optional*, defaults to `""`): the unconditional branch of CFG.
            height (`int`, *optional*, defaults to 48) / width (`int`, *optional*, defaults to 48): pixels,
                multiples of 4.
            num_frames (`int`, *optional*, defaults to 17): frames (no temporal compression).
            num_inference_steps (`int`, *optional*, defaults to 20): Euler steps.
            guidance_scale (`float`, *optional*, defaults to 3.0): CFG scale; 1 or less runs the cond branch only.
            generator (`torch.Generator`, *optional*): for the initial noise.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): instead of `prompt` /
                `negative_prompt`, floating `(prompts, tokens, text_dim)` tensors as `encode_prompt` gives them, one
                row per prompt (`num_videos_per_prompt` repeats them); `text_dim` is the transformer config's (64).
            output_type (`str`, *optional*, defaults to `"np"`): `"np"`, `"pt"`, `"pil"` or `"latent"`.
            max_sequence_length (`int`, *optional*): text tokens, defaults to the tokenizer's `model_max_length`
                (the length the model was trained with).
            first_frame (`torch.Tensor` of shape `(B, 3, height, width)` in [0, 1], *optional*): image-to-video,
                the way Wan 2.2 TI2V does it and `train --clean-first-frame` trains: the first frame is this
                image, clean at every step (timestep 0 on its tokens), and the other frames are denoised around
                it. `B` is the number of videos (prompts x `num_videos_per_prompt`), or 1 for all of them.

        Returns:
            `TestbedPipelineOutput` (or a tuple when `return_dict=False`) with `frames` in [0, 1].
        """
        counts = self._check_inputs(height, width, num_frames, callback_on_step_end_tensor_inputs, prompt,
                                    prompt_embeds, num_inference_steps, num_videos_per_prompt, negative_prompt,
                                    negative_prompt_embeds, max_sequence_length, guidance_scale, output_type)
        height, width, num_frames = counts["height"], counts["width"], counts["num_frames"]
        num_inference_steps, num_videos_per_prompt = counts["num_inference_steps"], counts["num_videos_per_prompt"]
        max_sequence_length = counts.get("max_sequence_length")
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, num_videos_per_prompt, max_sequence_length)
        else:  # one per prompt, as `encode_prompt` gives them before repeating (before: num_videos_per_prompt ignored)
            prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        batch_size = prompt_embeds.shape[0]
        if do_cfg and negative_prompt_embeds is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * (batch_size // num_videos_per_prompt)
            elif len(negative_prompt) != batch_size // num_videos_per_prompt:
                raise ValueError(f"negative_prompt must be a str or one per prompt "
                                 f"({batch_size // num_videos_per_prompt}), got {len(negative_prompt)}")
            negative_prompt_embeds = self.encode_prompt(
                negative_prompt, num_videos_per_prompt, max_sequence_length or prompt_embeds.shape[1]
            )
        transformer_dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        factor = self.space_to_depth_factor
        shape = (batch_size, self.transformer.config.in_channels, num_frames, height // factor, width // factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: a list needs one per video ({batch_size}), got {len(generator)}")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:  # it would set the size, whatever height, width and num_frames say
            raise ValueError(f"latents must have shape {shape} for this call, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=torch.float32)

        condition = self._first_frame_latent(first_frame, batch_size, height, width, device)
        if condition is not None:  # not in place: `latents` may be the caller's tensor
            latents = torch.cat([condition, latents[:, :, 1:]], dim=2)
            given = torch.arange(num_frames, device=device) == 0

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                # Before the transformer calls: diffsparse's step clock reads it (`runtime.pipeline_timestep`).
                self._current_timestep = t
                model_input = latents.to(transformer_dtype)
                timestep = t.expand(batch_size)
                if condition is not None:  # one timestep per token: 0 on the given frame
                    per_frame = torch.where(given, 0.0, t.float()).expand(batch_size, -1)
                    timestep = per_token_timesteps(per_frame, latents, self.transformer.config.patch_size)
                context = {
                    "step_index": i,
                    "sigma": float(self.scheduler.sigmas[i]),
                    "num_inference_steps": len(timesteps),
                }
                velocity = self._predict("cond", context, model_input, timestep, prompt_embeds, attention_kwargs)
                if do_cfg:
                    velocity_uncond = self._predict(
                        "uncond", context, model_input, timestep, negative_prompt_embeds, attention_kwargs
                    )
                    velocity = velocity_uncond + guidance_scale * (velocity - velocity_uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if condition is not None:
                    latents = torch.cat([condition, latents[:, :, 1:]], dim=2)
                if callback_on_step_end is not None:
                    local = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    outputs = callback_on_step_end(
                        self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(depth_to_space(latents, factor), output_type=output_type)
        self.maybe_free_model_hooks()
        return TestbedPipelineOutput(frames=video) if return_dict else (video,)


def build_pipeline(components: dict | None = None) -> TestbedPipeline:
    """A `TestbedPipeline` from `components` (defaults to fresh seeded random ones), progress bar off, eval mode."""
    components = build_components() if components is None else components
    pipe = TestbedPipeline(**components)
    pipe.text_encoder.eval()
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> TestbedPipeline:
    """The trained testbed pipeline, offline: the shipped weights, or a training run's `<out>/pipeline` folder.

    Args:
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the components live; one torch
            cannot read or this machine lacks is a `ValueError`, before any weight is read.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): component dtype, one of `LOAD_DTYPES`
            (float32, float64, float16, bfloat16; the model was trained in float32; bfloat16 works on CUDA).
        path (`str` or `Path`, *optional*): a `save_pretrained` folder of a `TestbedPipeline`; defaults to the
            weights shipped in the package (`WEIGHTS_PATH`).

    Returns:
        `TestbedPipeline` in eval mode with its progress bar off.

    Example:
        >>> pipe = load()
        >>> pipe.transformer.config.num_layers
        4
    """
    # from_pretrained takes a string dtype such as "bfloat16" as "no dtype" and loads float32 without a word; a float8
    # dtype is floating but failed inside it with a TypeError about a missing storage class.
    if not isinstance(dtype, torch.dtype) or dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, LOAD_DTYPES))}, got dtype={dtype!r}")
    device = device_here(device)  # before: every weight read, then `.to` failed with torch's RuntimeError
    folder = WEIGHTS_PATH if path is None else Path(path)
    if not (folder / "model_index.json").is_file():
        where = "the package's shipped weights" if path is None else f"path={str(path)!r}"
        raise FileNotFoundError(
            f"no TestbedPipeline at {folder} ({where}): expected a save_pretrained folder with model_index.json, as "
            "`python -m diffsparse.testbed.train --out DIR` writes to DIR/pipeline"
        )
    _check_weights(folder, where="the package's shipped weights" if path is None else f"path={str(path)!r}")
    pipe = TestbedPipeline.from_pretrained(str(folder), dtype=dtype).to(device)
    pipe.text_encoder.eval()
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The weight files `from_pretrained` reads when no variant is asked for, in the order it looks for them: diffusers
# takes a shard index before the single file (and a `.bin` only when no safetensors file is there); transformers
# the single file before an index. Names of `save_pretrained(variant=...)` files (`model.fp16.safetensors`) are in
# none of these lists: `load` asks for no variant.
_WEIGHT_NAMES = {
    "transformer": ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                    "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"),
}


def _weight_files(directory: Path, part: str, where: str) -> list[Path]:
    """The files of `directory` (a pipeline's `part` folder) that `from_pretrained` loads: an index's shards, or the
    one weights file, picked as diffusers (`transformer`) or transformers (`text_encoder`) pick them.

    Globbing every weight file merged what loading never reads into the checked state dict: a consolidated file
    left beside shards, or an `.fp16` variant, could fill the gaps of the file actually loaded (which then loaded
    random weights there) or add keys it lacks (refusing a good folder).
    """
    names = list(_WEIGHT_NAMES[part])
    if part == "text_encoder":
        # transformers reads a file the config names (`transformers_weights`) and nothing else, missing or not.
        explicit = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("transformers_weights")
        if explicit:
            there = (directory / explicit).is_file()
            if not explicit.endswith((".safetensors", ".safetensors.index.json")) or not there:
                raise ValueError(f"{directory / 'config.json'} ({where}) names transformers_weights={explicit!r}, the "
                                 "only file transformers then reads: it must be a .safetensors file or a "
                                 ".safetensors.index.json beside it" + ("" if there else ", and there is no such file"))
            names = [explicit]
    for name in names:
        file = directory / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:
            index = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as error:  # not JSON, or not UTF-8 (both libraries read UTF-8, whatever the locale)
            raise ValueError(f"{file} ({where}) must be the JSON save_pretrained writes, got {error}") from None
        # Both libraries index `metadata` and `weight_map` unguarded and write into `metadata`: anything else failed
        # in them with a bare KeyError or TypeError.
        if not isinstance(index, dict):
            raise ValueError(f"{file} ({where}) must be a JSON object with 'metadata' and 'weight_map', as "
                             f"save_pretrained writes it, got a {type(index).__name__}")
        for key in ("metadata", "weight_map"):
            if not isinstance(index.get(key), dict):
                got = f"{key}={index[key]!r}" if key in index else f"no {key!r}"
                raise ValueError(f"{file} ({where}) must hold the objects 'metadata' and 'weight_map' that "
                                 f"from_pretrained reads, got {got}")
        if not all(isinstance(shard, str) for shard in index["weight_map"].values()):
            raise ValueError(f"{file} ({where}) must map each weight to a shard file name in its weight_map, got "
                             f"{sorted({repr(s) for s in index['weight_map'].values() if not isinstance(s, str)})}")
        shards = sorted(set(index["weight_map"].values()))
        absent = [shard for shard in shards if not (directory / shard).is_file()]
        if not shards or absent:
            raise ValueError(f"{file} ({where}) must name the shards beside it in its weight_map, got "
                             f"{'no shard' if not shards else f'missing shard files {absent}'}")
        return [directory / shard for shard in shards]
    if (directory / "diffusion_pytorch_model.bin.index.json").is_file():
        raise ValueError(f"{directory} ({where}) holds the {part}'s weights as .bin shards (save_pretrained with "
                         "safe_serialization=False), which diffusers loads only with use_safetensors=False: save them "
                         "again with safe_serialization=True (the default)")
    others = sorted(path.name for path in directory.glob("*") if path.suffix in (".safetensors", ".bin"))
    # Before: diffusers' OSError about a `.bin` it looked for, after a note on unsafe serialization.
    raise ValueError(
        f"{directory} ({where}) must hold the {part}'s weights as save_pretrained writes them ({', '.join(names)}), "
        "got " + (f"only {others}, which from_pretrained does not read (a variant such as *.fp16.safetensors is read "
                  "only when asked for)" if others
                  else "no weight file (a partial copy of a training run's DIR/pipeline?)")
    )


def _check_weights(folder: Path, where: str) -> None:
    """Raise `ValueError` unless the transformer's and text encoder's weight files that `from_pretrained` reads in
    `folder` (`_weight_files`) hold exactly the weights their `config.json` builds, with the same shapes, and every
    value is finite.

    `from_pretrained` would otherwise load an incomplete text encoder with fresh random weights in the gaps (a
    logged "newly initialized" note) and fail on an incomplete transformer with an error about meta tensors.
    """
    import zipfile

    from safetensors.torch import load_file
    from transformers import T5Config, T5EncoderModel

    builders = {
        "transformer": lambda d: WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(d)),
        "text_encoder": lambda d: T5EncoderModel(T5Config.from_pretrained(d)),
    }
    for part, build in builders.items():
        tensors: dict[str, torch.Tensor] = {}
        for file in _weight_files(folder / part, part, where):
            # mmap only for the zip format: torch.save's legacy format (torch < 1.6) refuses it, diffusers reads it.
            tensors.update(load_file(file) if file.suffix == ".safetensors" else torch.load(
                file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file)))
        stored = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
        # NaN or inf weights load without a word and sample NaN video; reading them all costs ~5 MB here.
        non_finite = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
        if non_finite:
            raise ValueError(f"{folder / part} ({where}) must hold finite weights, got NaN or inf in "
                             f"{sorted(non_finite)} (a training run that diverged?)")
        with torch.device("meta"):  # shapes and names only: no memory, no draws from the global RNG
            expected = build(folder / part).state_dict(keep_vars=True)
        # Tied weights (T5's embedding is also `encoder.embed_tokens`) are one tensor under several names; a file
        # holds one of them.
        names: dict[int, list[str]] = {}
        for name, tensor in expected.items():
            names.setdefault(id(tensor), []).append(name)
        missing = sorted(group[0] for group in names.values() if stored.keys().isdisjoint(group))
        unexpected = sorted(stored.keys() - expected.keys())
        wrong_shape = sorted(f"{key} {stored[key]} (config: {tuple(expected[key].shape)})"
                             for key in stored.keys() & expected.keys() if stored[key] != tuple(expected[key].shape))
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"{folder / part} ({where}) must hold every weight of its config.json at its shape and nothing else: "
                f"missing {missing}, unexpected {unexpected}, wrong shape {wrong_shape} (a partial or damaged copy "
                "of a training run's DIR/pipeline?)"
            )


def room_ahead(image: torch.Tensor, prompt: str) -> float:
    """Pixels from the centre of the shapes drawn in `image` to the canvas edge the prompt's direction points to.

    `image`: a still `(3, H, W)` in [0, 1] on one of the testbed's dark backgrounds; the shapes are the pixels
    brighter than 0.5 in some channel. `inf` when the prompt names no direction, `-inf` when nothing is drawn.
    A prompt naming several directions ("moving left then up", never a training prompt) is measured towards the
    last one: the model reads all of them and no rule says which it follows, so this is a choice, not a finding.

    Example:
        >>> image = torch.zeros(3, 32, 32); image[0, 10:14, 4:8] = 1.0   # a red square near the left edge
        >>> room_ahead(image, "a red square moving left"), room_ahead(image, "a red square moving right")
        (6.0, 26.0)
    """
    from ..testbed.data import DIRECTIONS

    # A batch `(1, 3, H, W)` failed with "too many values to unpack" (or, `(3, H)`, read rows as columns).
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or 0 in image.shape:
        got = f"shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else f"a {type(image).__name__}"
        raise ValueError(f"image must be one still, a tensor of shape (3, H, W) in [0, 1], got image={got}")
    named = [word for word in prompt_words(prompt) if word in DIRECTIONS]  # the words the model reads
    if not named:
        return math.inf
    rows, cols = torch.nonzero(image.amax(0) > 0.5, as_tuple=True)
    if rows.numel() == 0:
        return -math.inf
    x, y = float(cols.float().mean()) + 0.5, float(rows.float().mean()) + 0.5  # pixel centres
    ux, uy = DIRECTIONS[named[-1]]
    if ux:
        return x if ux < 0 else image.shape[-1] - x
    return y if uy < 0 else image.shape[-2] - y


def still_prompt(prompt: str) -> str:
    """The shapes of a testbed prompt without its motion: "a red circle moving left" -> "a red circle".

    The testbed's prompts name the shapes, then "moving" and the motion (`diffsparse.testbed.data.Clip.prompt`);
    single frames trained with `--image-prompts still` are prompted with the shapes alone. Read as the model reads
    it (`text.clean_prompt`), so "A red circle, moving left." gives "a red circle" too.
    """
    words = prompt_words(prompt)
    return " ".join(words[: words.index("moving")] if "moving" in words else words)


def best_still(
    pipe,
    prompts: str | list[str],
    height: int,
    width: int,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 3.0,
    device: str | torch.device | None = None,
    still_candidates: int = 1,
) -> torch.Tensor:
    """The first stage of two-stage sampling: one still per prompt, `(B, 3, height, width)` in [0, 1].

    Samples `still_candidates` single frames per prompt from `still_prompt(prompt)` (seeds `seed`, `seed + 1`, ...)
    and keeps the one with the most `room_ahead` for the prompt's direction word; `sample(..., two_stage=True)` and
    `diffsparse compare` / `eval --two-stage` start their clips from it. `pipe` and `device` are as `sample`'s
    `model` and `device` (`None`: the pipeline stays where it is; an offloaded one is never moved).

    Example:
        >>> still = best_still(build_pipeline(), "a red circle moving left", 16, 16, steps=1, still_candidates=2)
        >>> tuple(still.shape)
        (1, 3, 16, 16)
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)  # as `sample`; a str was read letter by letter
    still_candidates = _check_still_candidates(still_candidates)
    stills = torch.stack([
        sample(pipe, [still_prompt(p) for p in prompts], frames=1, height=height, width=width, steps=steps,
               seed=seed + candidate, guidance_scale=guidance_scale, device=device)[:, 0]
        for candidate in range(still_candidates)
    ], dim=1)  # (B, candidates, 3, H, W)
    best = [max(range(still_candidates), key=lambda c: room_ahead(stills[b, c], prompt))
            for b, prompt in enumerate(prompts)]
    return stills[torch.arange(len(prompts)), best]


def _placed(pipe, device):
    """`pipe` on `device`: moved there, or, when accelerate hooks offload it, checked to compute there."""
    if not _accelerate_hooked(pipe):
        return pipe.to(device_here(device))
    wanted = as_device(device)  # the hooks, already placed, say which devices exist
    # Moving an offloaded pipeline undoes the offloading (model offload: everything on the GPU, with a warning)
    # or fails (sequential offload: diffusers refuses), so the hooks keep it; they decide where it runs.
    runs_on = torch.device(pipe._execution_device)
    if runs_on.type != wanted.type or None not in (runs_on.index, wanted.index) and runs_on.index != wanted.index:
        raise ValueError(f"device={device!r}: the pipeline is offloaded by accelerate hooks that run it on "
                         f"{runs_on}; pass device=None or {str(runs_on)!r}, or offload it to {device!r}")
    return pipe


def sample(
    model,
    prompts: str | list[str],
    frames: int = 17,
    height: int = 48,
    width: int = 48,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 3.0,
    device: str | torch.device | None = None,
    first_frame: torch.Tensor | None = None,
    two_stage: bool = False,
    still_candidates: int = 1,
) -> torch.Tensor:
    """Videos for `prompts` as float32 `(B, frames, 3, height, width)` in [0, 1] (the layout of `output_type="pt"`).

    Args:
        model (`str`, `Path`, `TestbedPipeline` or `dict`): a folder written by `save_pretrained` (the training
            script's `<out>/pipeline`; `load()` gives the shipped model), a pipeline, or a dict of components.
        prompts (`str` or `list[str]`): one video per prompt.
        frames, height, width (`int`): video size in frames and pixels (multiples of 4).
        steps (`int`, *optional*, defaults to 20): flow-matching Euler steps.
        seed (`int`, *optional*, defaults to 0): seed of the initial noise.
        guidance_scale (`float`, *optional*, defaults to 3.0): classifier-free guidance scale.
        device (`str` or `torch.device`, *optional*): where to sample. `None` leaves a pipeline where it is (a
            folder or components load on the CPU); a device moves the pipeline there (the caller's own object:
            it stays there after). A pipeline offloaded by accelerate hooks (`enable_model_cpu_offload`,
            `enable_sequential_cpu_offload`, as `diffsparse compare --offload` sets up) is not moved, since its
            hooks place the weights at each call: `device` must then be the hooks' execution device, or `None`.
        first_frame (`torch.Tensor` of shape `(B, 3, height, width)` in [0, 1], *optional*): image-to-video, see
            `TestbedPipeline.__call__`.
        two_stage (`bool`, *optional*, defaults to `False`): text-to-video in two samplings: each first frame is
            sampled as a single image from `still_prompt(prompt)` (same seed), then the clip image-to-video from
            it with the full prompt. Lets a model whose direction word steers image-to-video (but not one-pass
            text-to-video) follow it from text alone; see `diffsparse.testbed.fidelity --two-stage`.
        still_candidates (`int`, *optional*, defaults to 1): with `two_stage`, how many still images to sample per
            prompt (seeds `seed`, `seed + 1`, ...); each clip starts from the one with the most `room_ahead` for
            its direction word. The still prompt names no direction, so a single still often puts the shape at
            the edge it is asked to move towards, a start no training clip has. 1 keeps the first still.

    Example:
        >>> video = sample(build_pipeline(), ["a red circle moving left"], frames=3, height=16, width=16, steps=2)
        >>> tuple(video.shape)
        (1, 3, 3, 16, 16)
    """
    if isinstance(model, (str, Path)):
        pipe = load("cpu" if device is None else device, path=model)
    elif isinstance(model, dict):
        pipe = build_pipeline(model)
    else:
        pipe = model
    if device is not None:
        pipe = _placed(pipe, device)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    still_candidates = _check_still_candidates(still_candidates)
    if still_candidates > 1 and not two_stage:
        raise ValueError(f"still_candidates={still_candidates} chooses among two-stage stills: pass two_stage=True")
    if two_stage:
        if first_frame is not None:
            raise ValueError("two_stage samples the first frame itself: pass first_frame=None with two_stage=True")
        first_frame = best_still(pipe, prompts, height, width, steps=steps, seed=seed,
                                 guidance_scale=guidance_scale, device=device, still_candidates=still_candidates)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    frames_out = pipe(
        prompt=prompts,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pt",
        first_frame=first_frame,
    ).frames
    return frames_out.float().cpu()
