"""diffsparse on a tiny diffusers `ChronoEditPipeline` (random weights): Wan 2.1 I2V's architecture with its own
processor copy, image editing as a two-frame video; with temporal reasoning the generation starts on more frames
and drops the middle ones after a few steps, so one generation runs on two layouts."""

import numpy as np
import pytest
import torch
from diffusers import ChronoEditPipeline, ChronoEditTransformer3DModel, UniPCMultistepScheduler
from PIL import Image

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    first_transformer_call,
    recorded_attention_calls,
    run_pipeline,
    tiny_clip_image_encoder,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
IMAGE = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipe():
    base = tiny_wan_pipeline()
    config = {**tiny_wan_config()["transformer"], "in_channels": 36, "image_dim": 16}
    config["added_kv_proj_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    torch.manual_seed(2)
    transformer = ChronoEditTransformer3DModel(**config, rope_temporal_skip_len=8).eval()
    image_encoder, image_processor = tiny_clip_image_encoder()
    # ChronoEdit's own scheduler: temporal reasoning trims the multistep history it keeps (Euler keeps none).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = ChronoEditPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, image_encoder=image_encoder,
        image_processor=image_processor, transformer=transformer, vae=base.vae, scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(reasoning: bool) -> dict:
    """An edit of a 64 x 96 image: two latent frames of 8 x 12 -> 2 x 4 x 6 tokens; with temporal reasoning, 9
    frames (3 latent frames) for the first 2 of 4 steps."""
    extra = {"enable_temporal_reasoning": True, "num_frames": 9, "num_temporal_reasoning_steps": 2} if reasoning else {}
    return {"image": IMAGE, "prompt": "a red circle", "negative_prompt": "low quality", "height": 64, "width": 96,
            "num_inference_steps": 4, "guidance_scale": 5.0, "output_type": "pt", "max_sequence_length": 16, **extra}


@pytest.mark.parametrize("reasoning", [False, True], ids=["edit", "temporal reasoning"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(pipe, reasoning, order):
    reference = run_pipeline(pipe, call(reasoning))
    dense, _ = run_pipeline(pipe, call(reasoning), diffsparse.SparseConfig(pattern="dense", dense_steps=0))
    assert torch.equal(dense, reference)
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    out, _ = run_pipeline(pipe, call(reasoning), every_block)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("reasoning", [False, True], ids=["edit", "temporal reasoning"])
def test_a_direct_transformer_call_the_pipelines_way(pipe, reasoning):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(pipe, call(reasoning))
    check_against_dense(pipe.transformer, lambda: inputs, block_size=8)


def test_temporal_reasoning_switches_layout_and_searches_each(pipe):
    # The searched pattern is fitted once per (layer, layout): the 3-frame steps and the 2-frame steps each get a
    # search on their own tensors, never a mask of the other layout.
    config = diffsparse.SparseConfig(pattern="searched", density=0.5, block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        out, stats = run_pipeline(pipe, call(reasoning=True), config)
    layouts = [layout for layer, layout, _ in calls if layer == 0]
    assert layouts == [VideoLayout(3, 4, 6)] * 4 + [VideoLayout(2, 4, 6)] * 4  # 2 steps x (cond, uncond) each
    assert torch.isfinite(out).all() and stats.mean_density < 1
    reference = run_pipeline(pipe, call(reasoning=True))
    assert out.shape == reference.shape and not torch.allclose(out, reference, atol=1e-4)


def test_other_processors_are_refused(pipe):
    check_other_processors_are_refused(pipe, "ChronoEdit", layer=1)
