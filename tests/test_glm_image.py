"""diffsparse on diffusers' GLM-Image transformer (tiny, random weights, offline, called directly as its pipeline
calls it): joint `[text, image]` attention; an edit's condition images cached as keys and values."""

import pytest
import torch
from diffusers import GlmImageTransformer2DModel
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls

TEXT_LEN, TEXT_DIM, CODEBOOK = 5, 8, 32
EVERY_BLOCK = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=TEXT_DIM, time_embed_dim=8, condition_dim=4, prior_vq_quantizer_codebook_size=CODEBOOK,
    ).eval()


def call(latents, text, timestep, kv_caches=None, drop=False, seed=2):
    """The keyword arguments of one transformer call as the pipeline makes it (`drop`: the unconditional call)."""
    g = torch.Generator().manual_seed(seed)
    tokens = latents.shape[-2] * latents.shape[-1] // 4
    prior = torch.randint(0, CODEBOOK, (latents.shape[0], tokens), generator=g)
    return {"hidden_states": latents, "encoder_hidden_states": text, "prior_token_id": prior,
            "prior_token_drop": torch.full_like(prior, drop, dtype=torch.bool), "timestep": torch.tensor([timestep]),
            "target_size": torch.tensor([[latents.shape[-2] * 8, latents.shape[-1] * 8]]),
            "crop_coords": torch.zeros(1, 2), "kv_caches": kv_caches}


def inputs():
    """Text to image: one 16 x 24 latent image (8 x 12 tokens) behind a prompt of `TEXT_LEN` tokens."""
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 4, 16, 24, generator=g), torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    return lambda: call(latents, text, 699.0)


def edit(transformer, config=None):
    """An edit as the pipeline runs it: the condition image's pass writes the cache, then a conditional call reads
    it and an unconditional one skips it. Both predictions, under `config` when given."""
    g = torch.Generator().manual_seed(3)
    condition, latents = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 24, generator=g)
    text = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)

    def run():
        caches = GlmImageKVCache(num_layers=len(transformer.transformer_blocks))
        caches.set_mode("write")
        transformer(**call(condition, text[:, :0], 0.0, caches, seed=4))
        caches.next_sample()
        predictions = []
        for mode, drop in (("read", False), ("skip", True)):
            caches.set_mode(mode)
            predictions.append(transformer(**call(latents, text, 699.0, caches, drop=drop)).sample)
        return torch.cat(predictions)

    with torch.no_grad():
        if config is None:
            return run()
        with diffsparse.sparse(transformer, config):
            return run()


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_text_to_image_dense_identical_every_block_kept_and_a_one_token_window_changes_it(transformer, order):
    # (Without the image RoPE every block kept fails.)
    check_against_dense(transformer, inputs(), block_size=16, order=order, sparse=ONE_TOKEN)


def test_an_edit_reads_the_condition_image_as_part_of_the_leading_span(transformer):
    reference = edit(transformer)
    assert torch.equal(edit(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)), reference)
    torch.testing.assert_close(edit(transformer, EVERY_BLOCK), reference, atol=1e-4, rtol=0)
    assert not torch.allclose(edit(transformer, ONE_TOKEN), reference, atol=1e-4)
    with recorded_attention_calls() as calls:
        edit(transformer, ONE_TOKEN)
    # The read call: the condition image's 64 tokens and the text lead; the skip call: the text alone. The write
    # pass runs the original.
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(1, 8, 12, text_len=64 + TEXT_LEN, text_position="start"), (1, 96)),
        (VideoLayout(1, 8, 12, text_len=TEXT_LEN, text_position="start"), (1, TEXT_LEN + 96)),
    }


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "GLM-Image", layer=1)
