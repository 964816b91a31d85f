"""OmniGen (`OmniGenTransformer2DModel`, `OmniGenPipeline`): a Phi-3 language model that denoises images. Each
block's `self_attn` attends one sequence per row, `[left padding, prompt (with any input images), time token,
output image]`, the output image's 2 x 2 patches last in row-major order. The pipeline's mask makes the prompt
causal (bidirectional within each input image) and lets the output image attend every valid token. The output
image's rows are what diffsparse makes sparse: its queries over `[valid prompt, time token, image]` keys, the
prompt and time token the layout's leading span (kept whole), rows with equal padding together; the prompt's own
rows keep the original's masked attention, computed densely (counted into each call's density). Layer `i` is
`layers[i].self_attn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_omnigen import OmniGenAttnProcessor2_0, OmniGenTransformer2DModel

from ..patterns import VideoLayout
from .base import NOT_THE_LAYOUT, ModelAdapter, SparseProcessor, call_argument, valid_key_groups
from .registry import register_adapter


def image_key_groups(mask: torch.Tensor, image_len: int):
    """`valid_key_groups` of the output image's rows under OmniGen's additive `(B, 1, S, S)` mask (0 where allowed),
    or `False` when the image's rows do not all attend the same keys, every image token among them (padded output
    images of another size in the batch): the original applies it."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        return False
    allowed = mask[:, 0, -image_len:] == 0
    valid = allowed[:, -1]
    if not valid[:, -image_len:].all() or not torch.equal(allowed, valid[:, None].expand_as(allowed)):
        return False
    return valid_key_groups(valid)


class OmniGenSparseAttnProcessor(SparseProcessor, OmniGenAttnProcessor2_0):
    """`OmniGenAttnProcessor2_0` whose output-image rows run block-sparse when the runtime says so; dense calls run
    the original `__call__` unchanged."""

    context_parallel = False  # diffusers gives the family no context parallel plan

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if not self.runtime.route(self.layer):
            return super().__call__(*original)
        layout = self.runtime.call_layout()
        image_len, length = layout.num_video_tokens, hidden_states.shape[1]
        groups = None
        if attention_mask is not None:
            # Every block of a call gets the same mask: read it once (a host sync on a GPU).
            groups = self.runtime.once_per_call(attention_mask, lambda mask: image_key_groups(mask, image_len))
        same_heads = attn.to_k.out_features == attn.to_q.out_features
        if encoder_hidden_states is not hidden_states or groups is False or not same_heads or length != layout.num_tokens:
            if groups is False:
                why = ("an attention_mask under which the output image's rows do not all attend the same keys, every "
                       "image token among them (output images of different sizes in one batch)")
            elif not same_heads:
                why = "fewer key and value heads than query heads (which the sparse path does not repeat)"
            else:
                why = NOT_THE_LAYOUT
            self.runtime.log_dense(self.layer, why=why)
            return super().__call__(*original)
        self.check_not_parallel()
        # The original's projections and RoPE, over `(B, heads, S, head_dim)`.
        query, key, value = (p(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                             for p in (attn.to_q, attn.to_k, attn.to_v))
        if image_rotary_emb is not None:
            query, key = (apply_rotary_emb(x, image_rotary_emb, use_real_unbind_dim=-2) for x in (query, key))
        prefix = length - image_len
        # The prompt's and time token's rows: the original's masked attention, dense.
        prompt_mask = None if attention_mask is None else attention_mask[:, :, :prefix]
        prompt_out = F.scaled_dot_product_attention(query[:, :, :prefix], key, value, attn_mask=prompt_mask)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        image_out = self.attend_video_queries(query[:, prefix:], key, value, groups, outside_pairs=prefix * length)
        out = torch.cat([prompt_out.transpose(1, 2), image_out], dim=1).type_as(query)
        return attn.to_out[0](out.flatten(2, 3))


class OmniGenAdapter(ModelAdapter):
    transformer_classes = (OmniGenTransformer2DModel,)
    family = "OmniGen"
    original_processor = OmniGenAttnProcessor2_0
    sparse_processor = OmniGenSparseAttnProcessor
    block_lists = ("layers",)
    attention_name = "self_attn"

    def read_call(self, transformer, args, kwargs):
        latents = call_argument(args, kwargs, "hidden_states", 0)
        timestep = call_argument(args, kwargs, "timestep", 1)
        input_ids = call_argument(args, kwargs, "input_ids", 2)
        patch = transformer.config.patch_size
        # `[prompt, time token, image]`: the prompt and the time token lead.
        prompt_len = 0 if input_ids is None else input_ids.shape[1]
        layout = VideoLayout(1, latents.shape[-2] // patch, latents.shape[-1] // patch, text_len=prompt_len + 1,
                             text_position="start")
        return layout, timestep


register_adapter(OmniGenAdapter())
