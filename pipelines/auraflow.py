"""AuraFlow (`AuraFlowTransformer2DModel`, `AuraFlowPipeline`): text-to-image with joint MMDiT blocks and single DiT
blocks.

Both kinds of block attend over `[text, image]` (`AuraFlowAttnProcessor2_0`): the text is the model's 8 register
tokens then the prompt (the layout's leading span, kept whole), the image the latent patches in row-major order.
Layers number the joint blocks first. The pipeline passes `t / 1000` as the timestep. A module whose softmax scale
is not `1 / sqrt(head_dim)` runs the original processor, counted dense.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0, FusedAuraFlowAttnProcessor2_0
from diffusers.models.transformers.auraflow_transformer_2d import AuraFlowTransformer2DModel

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument, project_joint_output, project_qkv
from .registry import register_adapter


class AuraFlowSparseAttention(SparseProcessor):
    """The sparse path of AuraFlow's joint self-attention, placed before `AuraFlowAttnProcessor2_0` or its fused
    version; dense calls run the original `__call__` unchanged."""

    # AuraFlowTransformer2DModel has no diffusers context parallel plan.
    context_parallel = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        original = (attn, hidden_states, encoder_hidden_states, *args)
        if not self.runtime.route(self.layer):
            return super().__call__(*original, **kwargs)
        self.check_not_parallel()
        if not math.isclose(attn.scale, (attn.inner_dim // attn.heads) ** -0.5):
            self.runtime.log_dense(self.layer, why="a softmax scale other than 1 / sqrt(head_dim) (which the "
                                   "kernel is not given)")
            return super().__call__(*original, **kwargs)
        query, key, value = project_qkv(attn, hidden_states, fused=self.fused)
        if encoder_hidden_states is not None:
            text = project_qkv(attn, encoder_hidden_states, added=True, fused=self.fused)
            query, key, value = (torch.cat(pair, dim=1) for pair in zip(text, (query, key, value)))
        out = self.runtime.attention(self.layer, query, key, value).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        return project_joint_output(attn, out, hidden_states.shape[1], text_first=True)


class AuraFlowSparseAttnProcessor(AuraFlowSparseAttention, AuraFlowAttnProcessor2_0):
    """`AuraFlowAttnProcessor2_0` whose joint self-attention runs block-sparse when the runtime says so."""


class FusedAuraFlowSparseAttnProcessor(AuraFlowSparseAttention, FusedAuraFlowAttnProcessor2_0):
    """`FusedAuraFlowAttnProcessor2_0` (after `fuse_qkv_projections()`) whose joint self-attention runs block-sparse
    when the runtime says so."""

    fused = True


class AuraFlowAdapter(ModelAdapter):
    transformer_classes = (AuraFlowTransformer2DModel,)
    family = "AuraFlow"
    original_processor = AuraFlowAttnProcessor2_0
    sparse_processor = AuraFlowSparseAttnProcessor
    processor_pairs = (
        (AuraFlowAttnProcessor2_0, AuraFlowSparseAttnProcessor),
        (FusedAuraFlowAttnProcessor2_0, FusedAuraFlowSparseAttnProcessor),
    )
    block_lists = ("joint_transformer_blocks", "single_transformer_blocks")
    attention_name = "attn"

    def read_call(self, transformer, args, kwargs):
        latents = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 1)
        timestep = call_argument(args, kwargs, "timestep", 2)
        patch = transformer.config.patch_size
        registers = transformer.register_tokens.shape[1]
        layout = VideoLayout(1, latents.shape[-2] // patch, latents.shape[-1] // patch,
                             text_len=registers + text.shape[1], text_position="start")
        # The pipeline passes `t / 1000`; the scheduler's timesteps, which the step clock matches, are `t`.
        return layout, timestep * 1000


register_adapter(AuraFlowAdapter())
