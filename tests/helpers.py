"""Shared test helpers."""

import torch


def generate(pipe, seed=0, **kwargs):
    """A short, small video from the tiny pipeline as a float32 tensor (F, C, H, W) or (B, F, C, H, W)."""
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
    return pipe(**call).frames
