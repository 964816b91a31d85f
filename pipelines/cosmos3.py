"""Cosmos 3 (`Cosmos3OmniTransformer`, run by diffusers' modular Cosmos 3 pipelines): one packed sequence per call,
the understanding tokens (the prompt) first, then the generation tokens (the video's latent patches; sound and
action tokens in the omni variants).

Every layer's attention has two pathways: the understanding tokens attend causally among themselves, and the
generation tokens attend every key, the understanding ones included, with grouped-query attention (fewer key and
value heads than query heads). The sparse path keeps the causal pathway as the original computes it and makes the
generation rows sparse: the layout is the video's patch grid behind the understanding tokens as the leading span,
kept whole, and the runtime attends the generation queries alone (`video_queries`), the key and value heads
repeated to the query heads as grouped-query attention shares them.

Cosmos Transfer packs its control videos (clean latents, each at the target's positions) before the target: the
target is the grid, the controls join the prompt in the leading span, kept whole (every target query attends every
control token; the controls' own rows are attended densely, as the original does). So all of a step's guidance
passes (with the controls, without them, unconditional) are sparse on the same target grid. Calls whose generation
tokens are not all vision items (the omni variants' sound and action tokens) run the original processor, counted
dense (`SparseRuntime.log_dense`: said once per `apply` where the settings would have run them sparse).
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_cosmos3 import (
    Cosmos3AttnProcessor,
    Cosmos3OmniTransformer,
    _rotate_half,
)

from ..patterns import VideoLayout
from .base import ModelAdapter, SparseProcessor, call_argument
from .registry import register_adapter

# `SparseRuntime.log_dense`'s `why` for the calls whose generation tokens are not all the vision items' patches.
NOT_ALL_VISION = "generation tokens that are not all vision items' patches (Cosmos 3's sound or action tokens)"


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Cosmos 3's rotary embedding of `(S, heads, head_dim)` tokens, `cos` and `sin` per token."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class Cosmos3SparseAttnProcessor(SparseProcessor, Cosmos3AttnProcessor):
    """`Cosmos3AttnProcessor` whose generation pathway runs block-sparse when the runtime says so; dense calls run
    the original `__call__` unchanged."""

    # No diffusers plan, and the sparse path attends the tensors it holds: under a user's plan those would be a
    # rank's share (diffusers itself refuses the understanding pathway's causal attention under one).
    context_parallel = False

    def __call__(self, attn, und_seq, gen_seq, rotary_emb):
        if not self.runtime.route(self.layer):
            return super().__call__(attn, und_seq, gen_seq, rotary_emb)
        if und_seq.shape[0] + gen_seq.shape[0] != self.runtime.call_layout().num_tokens:
            # Sound or action tokens beside the vision items (`read_call` laid out the vision items alone).
            self.runtime.log_dense(self.layer, why=NOT_ALL_VISION)
            return super().__call__(attn, und_seq, gen_seq, rotary_emb)
        self.check_not_parallel()

        def heads(projection, x, count):
            return projection(x).view(-1, count, attn.head_dim)

        q_und, k_und, v_und = (heads(p, und_seq, n) for p, n in (
            (attn.to_q, attn.num_attention_heads), (attn.to_k, attn.num_key_value_heads),
            (attn.to_v, attn.num_key_value_heads),
        ))
        q_gen, k_gen, v_gen = (heads(p, gen_seq, n) for p, n in (
            (attn.add_q_proj, attn.num_attention_heads), (attn.add_k_proj, attn.num_key_value_heads),
            (attn.add_v_proj, attn.num_key_value_heads),
        ))
        q_und, k_und = attn.norm_q(q_und), attn.norm_k(k_und)
        k_und_for_gen = k_und if attn.k_norm_und_for_gen is None else attn.k_norm_und_for_gen(k_und)
        q_gen, k_gen = attn.norm_added_q(q_gen), attn.norm_added_k(k_gen)
        cos_und, sin_und, cos_gen, sin_gen = rotary_emb
        q_und, k_und, k_und_for_gen = (rotate(x, cos_und, sin_und) for x in (q_und, k_und, k_und_for_gen))
        q_gen, k_gen = rotate(q_gen, cos_gen, sin_gen), rotate(k_gen, cos_gen, sin_gen)

        # The understanding pathway as the original computes it: causal, grouped-query.
        causal = dispatch_attention_fn(
            q_und.unsqueeze(0), k_und.unsqueeze(0), v_und.unsqueeze(0), is_causal=True, enable_gqa=True,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        # The generation rows over every key, sparse; each key and value head serves `num_key_value_groups`
        # consecutive query heads, as grouped-query attention shares it.
        all_k, all_v = torch.cat([k_und_for_gen, k_gen]), torch.cat([v_und, v_gen])
        key, value = (x.repeat_interleave(attn.num_key_value_groups, dim=1) for x in (all_k, all_v))
        # Vision items before the target (Cosmos Transfer's controls) are in the layout's leading span: their rows
        # over every key, dense, as the original computes them.
        leading = self.runtime.call_layout().text_len - und_seq.shape[0]
        full = self.runtime.attention(self.layer, q_gen[leading:].unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                                      video_queries=True, outside_pairs=leading * key.shape[0])
        if leading:
            leading_rows = dispatch_attention_fn(
                q_gen[None, :leading], all_k[None], all_v[None], enable_gqa=True, backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
            full = torch.cat([leading_rows, full], dim=1)
        return attn.to_out(causal.squeeze(0).flatten(-2, -1)), attn.to_add_out(full.squeeze(0).flatten(-2, -1))


class Cosmos3Adapter(ModelAdapter):
    transformer_classes = (Cosmos3OmniTransformer,)
    family = "Cosmos 3"
    original_processor = Cosmos3AttnProcessor
    sparse_processor = Cosmos3SparseAttnProcessor
    block_lists = ("layers",)
    attention_name = "self_attn"

    def read_call(self, transformer, args, kwargs):
        if transformer._cp_shard_fn is not None:
            # Its context parallelism shards the pathways outside diffusers' parallel config, which the sparse path
            # would not see.
            raise NotImplementedError(
                "diffsparse does not run Cosmos 3 under its context-parallel helper (`_cp_shard_fn`); "
                "remove one of them"
            )
        und_len = call_argument(args, kwargs, "und_len", 3)
        shapes = call_argument(args, kwargs, "vision_token_shapes", 6)
        vision_timesteps = call_argument(args, kwargs, "vision_timesteps", 9)
        # The pipeline gives each noisy patch the scheduler's timestep; a call with no noisy patch is at 0.
        timestep = vision_timesteps.max() if vision_timesteps.numel() else torch.tensor(0.0)
        sizes = [math.prod(shape) for shape in shapes]
        if not sizes:
            # No grid to lay out (diffusers' forward packs at least one vision item): the original, counted dense.
            return None, timestep
        # The target is the last vision item; those before it (Transfer's controls) join the leading span. Generation
        # tokens beyond the vision items' (the omni variants' sound or action tokens) are not in this layout: the
        # processor sees that and runs the original (`log_dense`), so the schedule still decides first whether the
        # call would have run sparse, and only such a call is said.
        return VideoLayout(*shapes[-1], text_len=und_len + sum(sizes[:-1]), text_position="start"), timestep


register_adapter(Cosmos3Adapter())
