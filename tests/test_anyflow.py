"""diffsparse on a diffusers AnyFlow transformer (tiny, random weights): called directly, and in a tiny
`AnyFlowPipeline` (the embedded Wan pipeline's T5 encoder, word tokenizer and Wan VAE) whose few flow-map steps
the step schedule must follow; and a tiny chunk-wise autoregressive `AnyFlowFARPipeline` over its KV cache."""

import pytest
import torch
from diffusers import (
    AnyFlowFARPipeline,
    AnyFlowFARTransformer3DModel,
    AnyFlowPipeline,
    AnyFlowTransformer3DModel,
    FlowMapEulerDiscreteScheduler,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_video_token_positions,
    recorded_attention_calls,
    run_pipeline,
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


def test_each_latent_pixel_moves_the_query_of_its_own_video_token(transformer):
    # 3 frames of 4 channels, 5 x 7 tokens: `inputs()` has as many frames as channels (4), so a layout read with
    # frames and channels swapped passes every other test; here it has the wrong grid.
    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(1, 3, 4, 10, 14, generator=g), "timestep": torch.full((1, 3), 700.0),
                "r_timestep": torch.full((1, 3), 300.0), "encoder_hidden_states": torch.randn(1, 6, 16, generator=g)}

    check_video_token_positions(transformer, call, grid=(3, 5, 7), patch=(1, 2, 2), axes="TCHW")


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



@pytest.fixture(scope="module")
def far_pipe():
    """Chunks of 1, 2 and 2 latent frames of 4 x 6 tokens; the cache keeps one full chunk (`full_chunk_limit=2`),
    older ones at 2 x 3 tokens a frame."""
    base = tiny_wan_pipeline()
    torch.manual_seed(0)
    transformer = AnyFlowFARTransformer3DModel(
        patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=2, num_attention_heads=2,
        attention_head_dim=12, in_channels=base.vae.config.z_dim, out_channels=base.vae.config.z_dim,
        text_dim=base.text_encoder.config.d_model, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
        chunk_partition=(1, 2, 2),
    ).eval()
    pipe = AnyFlowFARPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                              transformer=transformer, scheduler=FlowMapEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


FAR_CALL = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 64, "width": 96,
            "num_frames": 17, "num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "latent",
            "max_sequence_length": 16}


def test_far_pipeline_chunks_attend_their_cache_whole_and_themselves_sparsely(far_pipe):
    # atol 1e-5 (measured 1.07e-6): the zero-padded keys the original attends are counted exactly, not nearly.
    stats, calls = check_pipeline_against_dense(far_pipe, FAR_CALL, block_size=8, atol=1e-5)
    # Each chunk's queries (CFG batched) against the original's zero padding to 128 queries, the cache (chunk 2: the
    # first chunk compressed, 6 tokens, the second full, 48), then the chunk itself.
    assert sorted({(layout, shape) for _, layout, shape in calls}, key=lambda x: x[0].text_len + x[0].frames) == [
        (VideoLayout(1, 4, 6, text_len=104 + 0, text_position="start"), (2, 24)),
        (VideoLayout(2, 4, 6, text_len=80 + 24, text_position="start"), (2, 48)),
        (VideoLayout(2, 4, 6, text_len=80 + 54, text_position="start"), (2, 48)),
    ]
    # `stats()` holds the last chunk: its first step dense, then sparse.
    assert [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0] == [(0, False), (1, True), (2, True)]


def test_far_cache_steps_run_the_original(far_pipe):
    # (`use_kv_cache=False` fails in diffusers itself: its uncached rollout returns one output, the pipeline
    # unpacks two.)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=8, dense_steps=0)
    with diffsparse.sparse(far_pipe, every_block) as handle:
        run_pipeline(far_pipe, FAR_CALL)
        totals = {layer.layer: (layer.dense_calls, layer.sparse_calls) for layer in handle.stats(since_apply=True).layers}
    # 3 chunks x 3 steps sparse; the 2 cache steps (after the first two chunks) dense, under their block mask.
    assert totals == {0: (2, 9), 1: (2, 9)}


def test_far_sparse_calls_count_the_originals_zero_padded_keys(far_pipe, monkeypatch):
    # diffusers' FAR processor pads its queries to the flex block (128) with zeros and pads the keys alike, with no
    # mask: every query attends those zero keys too. Leaving them out changes the result.
    from diffsparse.pipelines import anyflow

    reference = run_pipeline(far_pipe, FAR_CALL)
    monkeypatch.setattr(anyflow, "flex_padding", lambda queries: 0)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=8, dense_steps=0)
    assert (run_pipeline(far_pipe, FAR_CALL, every_block)[0] - reference).abs().max() > 1e-2


def test_far_other_processors_are_refused(far_pipe):
    check_other_processors_are_refused(far_pipe.transformer, "AnyFlow FAR", layer=1)
