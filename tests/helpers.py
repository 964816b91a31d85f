"""Shared test helpers."""

import torch


def tiny_call(seed=0, **kwargs):
    """The keyword arguments of a short, small call of the tiny pipeline; `kwargs` override them."""
    call = {
        "prompt": "a red circle moving left",
        "negative_prompt": "low quality",
        "num_frames": 17,
        "height": 64,
        "width": 96,
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "output_type": "pt",
        "max_sequence_length": 16,
        "generator": torch.Generator().manual_seed(seed),
    }
    call.update(kwargs)
    return call


def generate(pipe, seed=0, **kwargs):
    """A short, small video from the tiny pipeline as a float32 tensor (F, C, H, W) or (B, F, C, H, W)."""
    return pipe(**tiny_call(seed, **kwargs)).frames


def reordered_reference(pattern, layout, order):
    """The definition: the frame-major token mask, permuted on both axes by `order` (None: as is)."""
    tokens = pattern.token_mask(layout)
    if order is None:
        return tokens
    perm = order.permutation(layout)
    return tokens[:, perm][:, :, perm]


def check_block_masks_reduce_token_masks(pattern, layouts, order, block_sizes):
    """Every block mask of `pattern` equals `reduce_token_mask` of its (reordered) token mask."""
    from diffsparse.patterns import as_pair, reduce_token_mask

    for layout in layouts:
        reference = reordered_reference(pattern, layout, order)
        assert torch.equal(reference, pattern.token_mask(layout, order))
        n = layout.num_tokens
        for block_size in block_sizes:
            bq, bk = as_pair(block_size)
            block = pattern.block_mask(layout, block_size, order)
            assert block.dtype == torch.bool and block.shape == (pattern.num_heads, -(-n // bq), -(-n // bk))
            assert torch.equal(block, reduce_token_mask(reference, block_size)), (layout, block_size)
