"""Z-Image (`ZImageTransformer2DModel`): single-stream text-to-image (Z-Image, Z-Image-Turbo), image-to-image and
inpainting.

The transformer takes each image's latents and each prompt's valid embeddings as lists. Image patches are a
row-major grid (frame-major for several latent frames) followed by pad tokens up to a multiple of 32; a prompt's
embeddings too. The noise refiner blocks attend over the image alone (`[image, its pad]`), the context refiner
blocks over the prompt alone (left dense: a few dozen tokens), the main blocks over `[image, its pad, prompt, its
pad]`: a layout with the image grid first and the pads and the prompt as its trailing span, kept whole. The pad
tokens are attended like any other (learned pad embeddings, unmasked); samples of a batch with prompts of different
padded lengths (CFG's prompt and negative prompt, when one passes 32 tokens and the other does not) are padded to
the longest and masked: each is attended over its own length, on the layout with its own span. The pipelines pass
`(1000 - t) / 1000` as the timestep, mapped back to the scheduler's `t` for the step schedule.

Omni mode (several images and SigLIP features per sample, `ZImageOmniPipeline`) is refused with a `ValueError`.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZSingleStreamAttnProcessor

from ..patterns import VideoLayout
from .base import (
    NOT_THE_LAYOUT,
    ModelAdapter,
    SparseProcessor,
    attend_valid_prefixes,
    call_argument,
    half_precision,
    prefix_lengths,
    project_qkv,
)
from .registry import register_adapter


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's RoPE on `(B, S, H, D)`: consecutive pairs of the head dim as complex numbers times the `(B, S, D / 2)`
    complex frequencies, in float32, back in `x`'s dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def padded(length: int) -> int:
    """How many tokens the transformer makes of `length` (pad tokens up to a multiple of `SEQ_MULTI_OF`)."""
    return length + (-length) % SEQ_MULTI_OF


class ZImageSparseAttnProcessor(SparseProcessor, ZSingleStreamAttnProcessor):
    """`ZSingleStreamAttnProcessor` whose self-attention runs block-sparse when the runtime says so, on the noise
    refiner blocks (the image and its pad) and the main blocks (the call's layout); dense calls run the original
    `__call__` unchanged."""

    # ZImageTransformer2DModel has no diffusers context parallel plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        self.check_not_parallel()
        layout, length = self.runtime.call_layout(), hidden_states.shape[1]
        image_only = length != layout.num_tokens
        if image_only and (attention_mask is not None or length != layout.num_video_tokens + image_padding(layout)):
            # Not a sequence read_call described (the refiner's images are of one size, so never masked).
            self.runtime.log_dense(self.layer, why=NOT_THE_LAYOUT)
            return super().__call__(*original)
        query, key, value = project_qkv(attn, hidden_states)
        if freqs_cis is not None:
            query, key = rotate(query, freqs_cis), rotate(key, freqs_cis)
        if image_only:
            image_layout = dataclasses.replace(layout, text_len=image_padding(layout))
            out = self.runtime.attention(self.layer, query, key, value, layout=image_layout)
        else:
            # Every block of a call gets the same mask: read it once (a host sync on a GPU).
            lengths = [length] * query.shape[0] if attention_mask is None else self.runtime.once_per_call(
                attention_mask, prefix_lengths
            )
            # A sample's batch padding is masked as keys and dropped from the output: its queries reach nothing.
            out = attend_valid_prefixes(self.runtime, self.layer, query, key, value, lengths, padded_queries="zero")
        out = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def image_padding(layout: VideoLayout) -> int:
    """The pad tokens behind the image's grid."""
    return padded(layout.num_video_tokens) - layout.num_video_tokens


def _optional_argument(args: tuple, kwargs: dict, name: str, position: int, default):
    return call_argument(args, kwargs, name, position) if name in kwargs or len(args) > position else default


class ZImageAdapter(ModelAdapter):
    transformer_classes = (ZImageTransformer2DModel,)
    family = "Z-Image"
    original_processor = ZSingleStreamAttnProcessor
    sparse_processor = ZImageSparseAttnProcessor
    block_lists = ("noise_refiner", "layers")
    attention_name = "attention"

    def read_call(self, transformer, args, kwargs):
        images = call_argument(args, kwargs, "x", 0)
        timestep = call_argument(args, kwargs, "t", 1)
        prompts = call_argument(args, kwargs, "cap_feats", 2)
        patch = _optional_argument(args, kwargs, "patch_size", 7, 2)
        frame_patch = _optional_argument(args, kwargs, "f_patch_size", 8, 1)
        if isinstance(images[0], (list, tuple)):
            raise ValueError(
                "diffsparse does not support Z-Image's omni mode (several images and SigLIP features per sample, "
                "ZImageOmniPipeline): `diffsparse.remove(pipe)`"
            )
        shapes = {tuple(image.shape[1:]) for image in images}
        if len(shapes) != 1:
            raise ValueError(
                f"diffsparse needs every image of a Z-Image batch to have one size, got latent sizes {sorted(shapes)}: "
                "`diffsparse.remove(pipe)`"
            )
        frames, height, width = shapes.pop()
        grid = (frames // frame_patch, height // patch, width // patch)
        image_tokens = grid[0] * grid[1] * grid[2]
        text_len = padded(image_tokens) - image_tokens + max(padded(len(prompt)) for prompt in prompts)
        # The pipelines pass `(1000 - t) / 1000`; the scheduler's timesteps, which the step clock matches, are `t`.
        # Read back in float32: the modular blocks pass it in the transformer's dtype (`t` cast to it, then
        # `(1000 - t) / 1000` there), where `(1 - timestep) * 1000` rounds `t` again and the clock's own allowance
        # for a half-precision timestep (relative to `t`) misses the rounding of `1000 - t` near t = 0 (bfloat16:
        # a few units off in `t` there; the guider's full-precision `t` is taken only within that allowance, so
        # 100 steps at shift 3 warned StepScheduleWarning). The pipeline's roundings go with it, on `t`'s scale, for
        # the step clock to match within (`StepClock.tick`).
        read = (1 - timestep.float()) * 1000
        if half_precision(timestep):
            read.diffsparse_rounding = pipeline_rounding(timestep, read)
        return VideoLayout(*grid, text_len=text_len, text_position="end"), read


def pipeline_rounding(timestep: torch.Tensor, read: torch.Tensor) -> float:
    """How far `t` read back from `timestep` = `(1000 - t) / 1000` computed in `timestep`'s dtype (as the modular
    blocks do: `t` rounded, `1000 - t` rounded, the quotient rounded) can be from the scheduler's `t`, each rounding
    at most `u = eps / 2` relative: `u |t| + u |1000 - t| + u 1000 |timestep|`, with `t` and `1000 - t` bounded by
    `read` and `timestep` up to factors of `1 / (1 - u)` (taken as 1.02, for bfloat16's u = 2^-8 and below)."""
    u = torch.finfo(timestep.dtype).eps / 2
    return 1.02 * u * (float(read.abs().max()) + 2000 * float(timestep.detach().float().abs().max()))


register_adapter(ZImageAdapter())
