"""DiT (`DiTTransformer2DModel`, `DiTPipeline`): class-conditional image generation, each block's self-attention
`attn1` over the image's patches in row-major order, the only attention there is (the class label enters through
the adaptive norms). PixArt's blocks without the cross-attention, so PixArt's adapter serves with the forward's
own argument order. Layer `i` is block `i`'s self-attention.
"""

from __future__ import annotations

from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from .pixart import PixArtAdapter
from .registry import register_adapter


class DiTAdapter(PixArtAdapter):
    transformer_classes = (DiTTransformer2DModel,)
    family = "DiT"
    timestep_position = 1


register_adapter(DiTAdapter())
