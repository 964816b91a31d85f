"""diffsparse on a diffusers AnyFlow transformer (tiny, random weights): called directly, and in a tiny
`AnyFlowPipeline` (the embedded Wan pipeline's T5 encoder, word tokenizer and Wan VAE) whose few flow-map steps
the step schedule must follow."""

import pytest
import torch
from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel, FlowMapEulerDiscreteScheduler

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
    run_transformer,
)

LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0)


def tiny_transformer(channels: int = 4, text_dim: int = 16) -> AnyFlowTransformer3DModel:
    torch.manual_seed(0)
    return AnyFlowTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def inputs(context_frames: int = 0):
    """4 latent frames of 8 x 12 (`(B, T, C, H, W)`: frames before channels), 96 tokens; one timestep per frame,
    0 on the first `context_frames` (a video continuation's clean frames)."""
    def call():
        g = torch.Generator().manual_seed(1)
        timestep = torch.full((1, 4), 700.0)
        timestep[:, :context_frames] = 0
        return {"hidden_states": torch.randn(1, 4, 4, 8, 12, generator=g), "timestep": timestep,
                "r_timestep": torch.full((1, 4), 300.0), "encoder_hidden_states": torch.randn(1, 6, 16, generator=g)}

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs(), block_size=16, order=order, sparse=LOCAL)


def test_layout_timestep_and_sparse_calls(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs(context_frames=1)())
    assert layout == VideoLayout(4, 4, 6)
    assert float(timestep.max()) == 700.0  # the clean context frame's 0 does not set the step
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(), LOCAL)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, 96)), (1, (1, 96))]  # attn1 only


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "AnyFlow", layer=1)


def test_pipeline_steps_follow_the_flow_map_schedule():
    base = tiny_wan_pipeline()
    z_dim = base.vae.config.z_dim
    pipe = AnyFlowPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
        transformer=tiny_transformer(z_dim, base.text_encoder.config.d_model), scheduler=FlowMapEulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 32, "width": 48,
            "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "latent",
            "max_sequence_length": 16}
    quarter_dense = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0.25)
    stats, _ = check_pipeline_against_dense(pipe, call, sparse=quarter_dense)
    # Four steps, CFG batched into one call each; a quarter of them dense: the first.
    assert [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0] == [
        (0, False), (1, True), (2, True), (3, True)
    ]
