"""CogView3-Plus (`CogView3PlusTransformer2DModel`, `CogView3PlusPipeline`): text-to-image on CogVideoX's
attention. Each block's `attn1` runs `CogVideoXAttnProcessor2_0` over the joint `[text, image]` sequence: the T5
prompt (padded to `max_sequence_length`, 224 by default, unmasked: the whole padded prompt is the text span, kept
dense), then the image's patches in row-major order, a one-frame layout; no RoPE (the positions are added to the
patch embeddings). CogVideoX's sparse processor serves unchanged. Layer `i` is block `i`'s `attn1`.
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_cogview3plus import CogView3PlusTransformer2DModel

from ..patterns import VideoLayout
from .base import call_argument
from .cogvideox import CogVideoXAdapter
from .registry import register_adapter


class CogView3PlusAdapter(CogVideoXAdapter):
    transformer_classes = (CogView3PlusTransformer2DModel,)
    family = "CogView3-Plus"

    def read_call(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        encoder_hidden_states = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 2)
        patch = transformer.config.patch_size
        height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        return VideoLayout(1, height, width, text_len=encoder_hidden_states.shape[1], text_position="start"), timestep


register_adapter(CogView3PlusAdapter())
