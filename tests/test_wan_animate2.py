"""diffsparse on diffusers' Wan-Animate-2 transformer (tiny, random weights, offline, called directly as the segment
loop of its modular pipeline calls it): the reference pass, then denoising calls over the generation and the cached
reference."""

import pytest
import torch
from diffusers.models.transformers import transformer_wan_animate_2
from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache, WanAnimate2Transformer3DModel
from torch.nn.attention.flex_attention import create_block_mask

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import check_other_processors_are_refused, recorded_attention_calls

# The full video: 8 pixel frames -> 3 latent frames of reference, 4 of generation; 64 x 96 pixels -> 4 x 6 tokens.
ORIGIN_LEN, ORIGIN_AREA, GRID = 8, [64, 96], (4, 4, 6)
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    # The model compiles its block mask (`_compile=True`): slow on CPU and needless for a tiny mask.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformer_wan_animate_2, "create_block_mask",
                      lambda *args, _compile=True, **kwargs: create_block_mask(*args, _compile=False, **kwargs))
        torch.manual_seed(0)
        model = WanAnimate2Transformer3DModel(
            text_len=8, in_dim=8, dim=16, ffn_dim=32, freq_dim=16, text_dim=8, out_dim=4, num_heads=2, num_layers=2,
            use_img_emb=False,
        ).eval()
        yield model


def generate(model, config=None):
    """The reference pass, then one denoising call; its prediction."""
    g = torch.Generator().manual_seed(1)
    frames = ORIGIN_LEN // 4 + 1
    reference, reference_condition = (torch.randn(4, frames, 8, 12, generator=g) for _ in range(2))
    latents, condition = (torch.randn(4, frames + 1, 8, 12, generator=g) for _ in range(2))
    text = [torch.randn(5, 8, generator=g)]
    reference_grid = torch.tensor([[frames, 4, 6]])

    def run():
        cache = WanAnimate2KVCache(len(model.blocks))
        model(hidden_states=[reference], timestep=torch.tensor([999.0]), encoder_hidden_states=text,
              condition_latents=[reference_condition], kv_cache=cache, kv_cache_mode="extract",
              seq_len=frames * 24, offset_grid_sizes=reference_grid)
        return model(hidden_states=[latents], timestep=torch.tensor([700.0]), encoder_hidden_states=text,
                     condition_latents=[condition], kv_cache=cache, kv_cache_mode="cached", seq_len=(frames + 1) * 24,
                     reference_grid_sizes=reference_grid, origin_len=ORIGIN_LEN, origin_area=ORIGIN_AREA).sample[0]

    with torch.no_grad():
        if config is None:
            return run()
        with diffsparse.sparse(model, config):
            return run()


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(transformer, order):
    # (Leaving out the reference frames, or giving generation frame f reference frame f, fails every block kept.)
    reference = generate(transformer)
    assert torch.equal(generate(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)), reference)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=8, dense_steps=0,
                                          order=order)
    torch.testing.assert_close(generate(transformer, every_block), reference, atol=1e-4, rtol=0)
    assert not torch.allclose(generate(transformer, ONE_TOKEN), reference, atol=1e-4)


def test_the_denoising_call_is_sparse_on_the_generation_grid_and_the_reference_pass_dense(transformer):
    with recorded_attention_calls() as calls, torch.no_grad(), diffsparse.sparse(transformer, ONE_TOKEN) as handle:
        generate(transformer)
        records = handle.stats().calls["transformer"]
    assert {layout for _, layout, _ in calls} == {VideoLayout(*GRID)}
    # The reference pass runs the original (dense), the denoising call is sparse, its density counting the
    # reference frames' dense pairs.
    assert [(r.layer, r.sparse) for r in records] == [(0, False), (1, False), (0, True), (1, True)]
    frame, frames = 24, GRID[0]
    dense_reference_pairs = (frames - 1) * frame * frame
    assert all(dense_reference_pairs / (frames * frame) ** 2 < r.density < 1 for r in records[2:])


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "Wan-Animate-2", layer=1)
