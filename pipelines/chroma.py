"""Chroma (`ChromaTransformer2DModel`): FLUX.1's architecture (`FluxAttnProcessor` on the dual- and single-stream
blocks, text first, `img_ids` giving the packed 2x2 latent grid) without the pooled projection, for the text-to-
image, image-to-image and inpainting pipelines.

What differs is the prompt mask. Chroma's pipelines pad the T5 prompt to `max_sequence_length` (512) and mark the
prompt with its first padding token, and the image, 1 and the rest of the padding 0; each block turns that into the
outer product of the marks, a float mask that `scaled_dot_product_attention` adds to the scores. So a marked query
scores every marked key 1 higher than a masked one (the padding keeps weight `1 / e`, it is not cut off), and a
masked query scores every key alike. The sparse path computes exactly that: the marked tokens attend one another on
the layout with the marked prompt as its text span, the masked padding keys are merged into those queries densely
at their lower score through the log-sum-exp, and the masked queries attend every key densely. The call's record
counts the dense pairs, so `stats()` shows the work done, and `SparseConfig.density` is the whole call's: the runtime
solves the marked layout for what the padding's dense pairs leave (`outside_pairs`). A mask of another kind (a
boolean one, or marks whose masked tokens are not a tail of the prompt: a caller's left-padded `prompt_attention_mask`)
runs the original processor, counted dense, with a warning once.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .base import merge_attention, prefix_lengths
from .flux import DenseMaskWarning, FluxAdapter, FluxCopyAttention
from .registry import register_adapter


def marked_prefixes(mask: torch.Tensor, text_len: int) -> list[int] | None:
    """Each sample's marked prompt length (the tokens before its masked padding) when a block's `(B, 1, S, S)`
    mask is the outer product of 0/1 marks whose zeros are a tail of the text's first `text_len` tokens, as Chroma's
    pipelines make it; else `None` (a mask of another kind: the original computes it)."""
    if not mask.is_floating_point() or mask.ndim != 4 or mask.shape[1] != 1:
        return None
    marks = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    binary = ((marks == 0) | (marks == 1)).all()
    if not binary or not torch.equal(mask[:, 0], marks[:, :, None] * marks[:, None, :]) or not marks[:, text_len:].all():
        return None
    try:
        return prefix_lengths(marks[:, :text_len])
    except ValueError:
        return None


class ChromaSparseAttnProcessor(DenseMaskWarning, FluxCopyAttention, FluxAttnProcessor):
    """`FluxAttnProcessor` on Chroma's blocks, whose joint self-attention runs block-sparse when the runtime says so,
    with Chroma's prompt mask computed exactly (module docstring): FLUX copies' sparse path, with Chroma's reading
    of the mask and its attention. Dense calls run the original `__call__` unchanged, as do calls with a mask of
    another kind, said once (`DenseMaskWarning`)."""

    mask_family = "Chroma"

    def read_prompt_mask(self, mask, text_len):
        lengths = marked_prefixes(mask, text_len)
        if lengths is None:
            self._warn_dense_mask(mask, "as it is not Chroma's prompt mask: the outer product of 0/1 marks whose zeros "
                                  "are the padding after the prompt (a left-padded prompt_attention_mask?)")
        return lengths

    def attend_prompts(self, query, key, value, lengths, text_len):
        if lengths is None:
            return self.runtime.attention(self.layer, query, key, value)
        return self.attend_marked(query, key, value, lengths, text_len)

    def attend_marked(self, query, key, value, lengths: list[int], text_len: int) -> torch.Tensor:
        """Attention of `(B, S, H, D)` `[text, image]` tensors under Chroma's mask, samples with equal marked
        prompts in one runtime call each, told its samples (`attention`'s `videos`: a fit or a correction's
        statistics made on other samples are not reused)."""
        runtime = self.runtime
        query, key, value = (runtime.to_layout_order(x) for x in (query, key, value))
        call_layout, length = runtime.call_layout(), query.shape[1]
        out, parts = torch.empty_like(query), []
        for marked in sorted(set(lengths)):
            samples = torch.tensor([i for i, n in enumerate(lengths) if n == marked], device=query.device)
            q, k, v = (x if len(samples) == len(lengths) else x.index_select(0, samples) for x in (query, key, value))
            if marked == text_len:  # nothing masked: every score shifted alike, as without a mask
                # The call's layout given explicitly: q, k, v are in its order already.
                out[samples] = runtime.attention(self.layer, q, k, v, layout=call_layout, parts=parts,
                                                 videos=samples)
                continue
            kept = torch.cat([torch.arange(marked, device=q.device), torch.arange(text_len, length, device=q.device)])
            padding = slice(marked, text_len)
            layout = dataclasses.replace(call_layout, text_len=call_layout.text_len - (text_len - marked))
            masked = text_len - marked
            kept_q = q.index_select(1, kept)
            kept_out, kept_lse = runtime.attention(
                self.layer, kept_q, k.index_select(1, kept), v.index_select(1, kept), layout=layout, return_lse=True,
                outside_pairs=(length - masked) * masked + masked * length, parts=parts, videos=samples,
            )
            padding_out, padding_lse = runtime.dense_attention(kept_q, k[:, padding], v[:, padding])
            padding_lse = padding_lse - 1  # the mask's 1 goes to marked pairs only
            merged = merge_attention(kept_out, kept_lse, padding_out, padding_lse)
            out[samples[:, None], kept] = merged.to(out.dtype)
            out[samples, padding] = runtime.dense_attention(q[:, padding], k, v)[0]
        runtime.log_parts(parts)
        return runtime.to_model_order(out)


class ChromaAdapter(FluxAdapter):
    transformer_classes = (ChromaTransformer2DModel,)
    family = "Chroma"
    sparse_processor = ChromaSparseAttnProcessor
    # `forward(hidden_states, encoder_hidden_states, timestep, img_ids, ...)`: no pooled projections.
    timestep_position, img_ids_position = 2, 3


register_adapter(ChromaAdapter())
