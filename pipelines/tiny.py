"""The fast tests' model, tiny Wan: a real `WanPipeline` built offline from `configs/tiny_wan.json` (the commands'
default model is the trained testbed, `diffsparse.pipelines.testbed`).

Every component is a genuine diffusers/transformers class with tiny dimensions and seeded random weights,
and the tokenizer is a word-level vocabulary built in memory, so nothing touches the Hugging Face hub.
Its videos are noise-like (random weights); it exists to exercise shapes, schedules and timings.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from .text import word_tokenizer

CONFIG_PATH = Path(__file__).parent / "configs" / "tiny_wan.json"


@lru_cache(maxsize=1)
def tiny_wan_config() -> dict:
    return json.loads(CONFIG_PATH.read_text())


def tiny_wan_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build the embedded tiny Wan pipeline (deterministic: the same weights on every call).

    Args:
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the components live.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): component dtype.

    Example:
        >>> from diffsparse.pipelines.tiny import tiny_wan_pipeline
        >>> pipe = tiny_wan_pipeline()
        >>> type(pipe).__name__
        'WanPipeline'
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    config = tiny_wan_config()
    vocabulary = config["vocabulary"]
    fork_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config["seed"])
        transformer = WanTransformer3DModel(**config["transformer"])
        vae = AutoencoderKLWan(**config["vae"])
        text_encoder = T5EncoderModel(
            T5Config(vocab_size=len(vocabulary), pad_token_id=0, eos_token_id=1, **config["text_encoder"])
        )
    pipe = WanPipeline(
        tokenizer=word_tokenizer(vocabulary),
        text_encoder=text_encoder.eval(),
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
    )
    pipe.set_progress_bar_config(disable=True)
    # Components are built in float32; casting only when asked keeps diffusers' fp32-module warning away.
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
