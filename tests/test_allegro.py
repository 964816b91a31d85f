"""diffsparse on a diffusers Allegro transformer (tiny, random weights), called directly and through a real
`AllegroPipeline` built from tiny components: video-only self-attention with the pipeline's 3D RoPE, CFG batched
into one transformer call per step; a video padding mask leaves the call to the original processor."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline

from helpers import (
    check_a_normalised_self_attention_runs_the_original,
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_video_token_positions,
    run_transformer,
)

RADIAL = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)


def tiny_transformer(caption_channels=16, **config):
    torch.manual_seed(0)
    return AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=24, sample_height=8, sample_width=12, sample_frames=4, caption_channels=caption_channels,
        **config,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def inputs(transformer, mask=None, frames=3):
    """`frames` latent frames of 8 x 12 -> 3 x 4 x 6 = 72 tokens by default (three different sizes, so a layout of
    swapped axes shows), with the RoPE the pipeline builds for them."""
    # The pipeline's own RoPE preparation, on a stand-in with what it reads (VAE scale 8: 64 x 96 pixels).
    rope = AllegroPipeline._prepare_rotary_positional_embeddings(
        SimpleNamespace(vae_scale_factor_spatial=8, transformer=transformer), 1, 64, 96, frames, torch.device("cpu")
    )

    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(1, 4, frames, 8, 12, generator=g),
                "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "timestep": torch.tensor([500]),
                "image_rotary_emb": rope, "attention_mask": mask}

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs(transformer), block_size=16, order=order, sparse=RADIAL)



def test_layout_and_a_video_padding_mask(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs(transformer)())
    assert layout == VideoLayout(3, 4, 6)
    mask = torch.ones(1, 3, 8, 12)
    mask[..., 8:] = 0  # the right third of the canvas is padding
    reference = run_transformer(transformer, inputs(transformer, mask))
    with torch.no_grad(), diffsparse.sparse(transformer, RADIAL) as handle:
        out = transformer(**inputs(transformer, mask)()).sample
        assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(1, 0), (1, 0)]
    assert torch.equal(out, reference)


def test_a_temporal_patch_size_keeps_a_token_frame_per_latent_frame():
    # `pos_embed` patchifies each latent frame in 2D; `patch_size_t` only shapes the unpatchify. A layout of
    # 4 // 2 token frames (half the sequence) made the first sparse call refuse its q and k.
    model = tiny_transformer(patch_size_t=2)
    assert adapter_for(model).read_call(model, (), inputs(model, frames=4)())[0] == VideoLayout(4, 4, 6)
    check_against_dense(model, inputs(model, frames=4), block_size=16)


@pytest.mark.parametrize("norm", ["group_norm", "spatial_norm"])
def test_a_normalised_self_attention_runs_the_original_not_the_sparse_path(norm):
    # `AllegroAttnProcessor2_0` applies it before the projections; before, the sparse path skipped it (0.05 off).
    model = tiny_transformer()
    attentions = [block.attn1 for block in model.transformer_blocks]
    check_a_normalised_self_attention_runs_the_original(model, inputs(model), RADIAL, norm, attentions)


def test_each_latent_pixel_moves_the_query_of_its_own_video_token(transformer):
    check_video_token_positions(transformer, inputs(transformer), grid=(3, 4, 6), patch=(1, 2, 2))


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Allegro", layer=1)


def tiny_pipeline():
    """A tiny `AllegroPipeline`: the embedded Wan pipeline's T5 encoder and word tokenizer, and a tiny Allegro VAE
    that the latent output never runs (it sets the 8x spatial, 4x temporal compression). DDIM, not the release's
    Euler ancestral: with random weights Euler's sigma-scaled latents reach the hundreds, where float32's own
    spacing is above the 1e-4 that the every-block check allows. `sample_frames` counts latent frames: the call's
    default is 4 of them, 16 video frames."""
    base = tiny_wan_pipeline()
    model = tiny_transformer(base.text_encoder.config.d_model)
    vae = AutoencoderKLAllegro(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                               norm_num_groups=2).eval()
    pipe = AllegroPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=vae, transformer=model,
                           scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_is_dense_exact_and_sparse_after_the_first_step():
    pipe = tiny_pipeline()
    # 13 frames, 64 x 96 pixels -> 4 latent frames of 8 x 12 -> 96 tokens. Caption cleaning needs bs4, not a dependency:
    # off, so the pipeline does not warn that it turned it off.
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 64, "width": 96,
            "num_frames": 13, "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "latent",
            "max_sequence_length": 16, "clean_caption": False}
    stats, calls = check_pipeline_against_dense(pipe, call)
    # One call per step and layer with both CFG branches in its batch; the first step dense.
    assert {(layer, layout, shape) for layer, layout, shape in calls} == {
        (layer, VideoLayout(4, 4, 6), (2, 96)) for layer in (0, 1)
    }
    records = stats.calls["transformer"]
    assert [(r.step, r.layer, r.sparse) for r in records] == [
        (0, 0, False), (0, 1, False), (1, 0, True), (1, 1, True), (2, 0, True), (2, 1, True)
    ]
    assert all(r.density < 1 for r in records if r.sparse)
