"""diffsparse on a diffusers Helios transformer (tiny, random weights, called directly): the chunk being generated
attends its multi-term memory (short-, mid- and long-term history latents patchified at 1x, 2x and 4x), which is
the layout's leading span, kept whole; the memory's keys amplified by a learned scale."""

import pytest
import torch
from diffusers import HeliosPipeline, HeliosScheduler, HeliosTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
    run_transformer,
)

RADIAL = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4), is_amplify_history=True,
    ).eval()
    with torch.no_grad():  # the learned amplification starts at sigmoid(0); another value, so it shows
        for block in model.blocks:
            block.attn1.history_key_scale.normal_()
    return model


def inputs(memory: bool = True):
    """A chunk of 4 latent frames of 8 x 12 (4 x 4 x 6 = 96 tokens) at frames 8-11; `memory`: 2 short-term frames
    (2 x 4 x 6 = 48 tokens), 2 mid-term (1 x 2 x 3 = 6) and 4 long-term (1 x 1 x 2 = 2, padded up): 56 tokens."""
    def call():
        g = torch.Generator().manual_seed(1)
        kwargs = {"hidden_states": torch.randn(1, 4, 4, 8, 12, generator=g), "timestep": torch.tensor([500]),
                  "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
                  "indices_hidden_states": torch.tensor([[8, 9, 10, 11]])}
        if memory:
            for name, frames, first in (("short", 2, 6), ("mid", 2, 4), ("long", 4, 0)):
                kwargs[f"latents_history_{name}"] = torch.randn(1, 4, frames, 8, 12, generator=g)
                kwargs[f"indices_latents_history_{name}"] = torch.arange(first, first + frames)[None]
        return kwargs

    return call


@pytest.mark.parametrize("memory", [False, True], ids=["first chunk", "with memory"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, memory, order):
    check_against_dense(transformer, inputs(memory), block_size=16, order=order, sparse=RADIAL)



def test_the_memory_is_the_leading_span(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs()())
    assert layout == VideoLayout(4, 4, 6, text_len=56, text_position="start")
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(), RADIAL)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, 56 + 96)), (1, (1, 56 + 96))]


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Helios", layer=1)


def test_pipeline_chunks_each_follow_the_schedule():
    # A tiny `HeliosPipeline` (the embedded Wan pipeline's T5 encoder, word tokenizer and Wan VAE): 8 latent frames
    # in 4 chunks of 2, each chunk its own 3-step loop with the memory of the frames before it (the pipeline pads
    # the memory to its full size from the first chunk on: 56 tokens in front of each chunk's 48).
    base = tiny_wan_pipeline()
    torch.manual_seed(0)
    model = HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=base.text_encoder.config.d_model, freq_dim=32, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4),
        is_amplify_history=True,
    ).eval()
    pipe = HeliosPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, transformer=model,
                          scheduler=HeliosScheduler(stages=1, stage_range=[0, 1]))
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 64, "width": 96,
            "num_frames": 17, "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "latent",
            "max_sequence_length": 16, "num_latent_frames_per_chunk": 2, "history_sizes": [4, 2, 1]}
    stats, calls = check_pipeline_against_dense(pipe, call)
    # Every chunk's first step (cond and uncond) dense, the other two sparse; `stats()` holds the last chunk's.
    assert [layer for layer, _, shape in calls if shape == (1, 56 + 48)] == [0, 1] * 4 * 2 * 2
    assert [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0] == [
        (0, False), (0, False), (1, True), (1, True), (2, True), (2, True)
    ]
