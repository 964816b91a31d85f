"""diffsparse on a diffusers ConsisID transformer (tiny, random weights), called directly and through a real
`ConsisIDPipeline` built from tiny components: CogVideoX's joint [text, video] blocks with RoPE, CFG batched into
one transformer call per step, plus face-identity perceiver cross-attention between blocks, left untouched."""

import pytest
import torch
from diffusers import CogVideoXDPMScheduler, ConsisIDTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

# The module itself, not diffusers' top-level name: that is a placeholder refusing to build without OpenCV, which
# the pipeline only needs to draw face keypoints (`kps_cond`, for checkpoints with `is_kps`), unused here.
from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline
from PIL import Image
from test_cogvideox_pipeline import tiny_cogvideox_pipeline

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines import adapter_for

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
    run_transformer,
)

TEXT_LEN, HEAD_DIM = 8, 16


def tiny_transformer(text_embed_dim: int = 8):
    # diffusers' own tiny ConsisID shapes, with RoPE as the released checkpoint and a face cross-attention after
    # every block (its key width, 2/3 of the model width, must be the face extractor's output width); the input
    # channels hold the noisy latent and the image latent (I2V).
    torch.manual_seed(0)
    return ConsisIDTransformer3DModel(
        num_attention_heads=3, attention_head_dim=HEAD_DIM, in_channels=8, out_channels=4, time_embed_dim=2,
        text_embed_dim=text_embed_dim, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True,
        is_train_face=True, cross_attn_interval=1, cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2,
        LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1,
        LFE_output_dim=32, LFE_ff_mult=1, LFE_num_scale=1,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def inputs():
    """3 latent frames of 8 x 12 -> 3 x 4 x 6 = 72 video tokens behind 8 text tokens, and a face's features."""
    g = torch.Generator().manual_seed(1)
    cos, sin = get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (4, 6)), grid_size=(4, 6), temporal_size=3)
    return {"hidden_states": torch.randn(1, 3, 8, 8, 12, generator=g),
            "encoder_hidden_states": torch.randn(1, TEXT_LEN, 8, generator=g), "timestep": torch.tensor([500]),
            "image_rotary_emb": (cos, sin), "id_cond": torch.randn(1, 2, generator=g),
            "id_vit_hidden": [torch.randn(1, 2, 2, generator=g)]}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs, block_size=8, order=order)



def test_text_first_layout_and_sparse_calls(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(3, 4, 6, text_len=TEXT_LEN, text_position="start")
    config = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        out = run_transformer(transformer, inputs, config)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, TEXT_LEN + 72)), (1, (1, TEXT_LEN + 72))]
    assert not torch.allclose(out, run_transformer(transformer, inputs), atol=1e-4)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "ConsisID", layer=1)


def test_pipeline_is_dense_exact_and_sparse_after_the_first_step():
    # A tiny `ConsisIDPipeline` on the tiny CogVideoX pipeline's T5 encoder, word tokenizer and CogVideoX VAE (which
    # encodes the image; the latent output skips decoding), with the DPM scheduler its `__init__` names.
    base = tiny_cogvideox_pipeline()
    pipe = ConsisIDPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                            transformer=tiny_transformer(base.text_encoder.config.d_model),
                            scheduler=CogVideoXDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    # 9 frames, 64 x 96 pixels -> 3 latent frames of 8 x 12 -> 72 video tokens behind 8 text tokens. The face
    # features are one face's, as the face models would give them; the transformer shares them between CFG's
    # branches.
    call = {"image": Image.new("RGB", (96, 64), (200, 40, 40)), "prompt": "a red circle moving left",
            "negative_prompt": "low quality", "height": 64, "width": 96, "num_frames": 9, "num_inference_steps": 3,
            "guidance_scale": 6.0, "output_type": "latent", "max_sequence_length": TEXT_LEN,
            "id_cond": torch.randn(1, 2, generator=g), "id_vit_hidden": [torch.randn(1, 2, 2, generator=g)]}
    stats, calls = check_pipeline_against_dense(pipe, call)
    # One call per step and layer with both CFG branches in its batch; the first step dense.
    layout = VideoLayout(3, 4, 6, text_len=TEXT_LEN, text_position="start")
    assert {(layer, lay, shape) for layer, lay, shape in calls} == {
        (layer, layout, (2, TEXT_LEN + 72)) for layer in (0, 1)
    }
    records = stats.calls["transformer"]
    assert [(r.step, r.layer, r.sparse) for r in records] == [
        (0, 0, False), (0, 1, False), (1, 0, True), (1, 1, True), (2, 0, True), (2, 1, True)
    ]
    assert all(r.density < 1 for r in records if r.sparse)
