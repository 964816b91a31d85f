"""The runtime's warnings about configs that run but give no speedup: a pattern that keeps every block of a layout,
a density out of reach."""

import warnings

import pytest
import torch
from diffusers import FluxTransformer2DModel

import diffsparse
from diffsparse.runtime import out_of_reach

ROWS = COLS = 16
TEXT = 8


def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_inputs():
    generator = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(ROWS), torch.arange(COLS), indexing="ij"), -1).reshape(-1, 2)
    return {"hidden_states": torch.randn(1, ROWS * COLS, 16, generator=generator),
            "encoder_hidden_states": torch.randn(1, TEXT, 16, generator=generator),
            "pooled_projections": torch.randn(1, 8, generator=generator), "timestep": torch.tensor([0.5]),
            "img_ids": torch.cat([torch.zeros(ROWS * COLS, 1), grid.float()], 1), "txt_ids": torch.zeros(TEXT, 3)}


def every_block_warnings(config: diffsparse.SparseConfig) -> list[str]:
    """The "keeps every block" warnings of two calls of the tiny FLUX transformer under `config`."""
    model = tiny_flux()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), diffsparse.sparse(model, config) as handle:
        warnings.simplefilter("always")
        for _ in range(2):
            model(**flux_inputs())
            handle.new_run()
    sparse = 0 if config.resolved_pattern.name == "dense" else 2
    assert [s.sparse_calls for s in handle.stats(since_apply=True).layers] == [sparse, sparse]
    return [str(w.message) for w in caught if "keeps every block" in str(w.message)]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_pattern_that_keeps_every_block_of_an_image_says_so_once():
    # The default pattern (radial) keeps frame distance 0 whole, so on an image it keeps every block: before, every
    # layer of FLUX ran at density 1.0 through the sparse kernel (slower than SDPA) without a word.
    said = every_block_warnings(diffsparse.SparseConfig(dense_steps=0))
    assert len(said) == 1  # once per (pattern, layout), whatever the layers and calls
    assert said[0].startswith("diffsparse: transformer: radial(")
    assert "keeps every block on VideoLayout(frames=1, height=16, width=16, text_len=8" in said[0]
    assert 'so this layout runs dense, at the sparse kernel\'s cost' in said[0]
    assert 'pattern="window3d"' in said[0] and '"searched"' in said[0] and "density" in said[0]
    # A window shrinks within the frame (0.84 of the blocks here); "dense" is dense on purpose.
    assert every_block_warnings(diffsparse.SparseConfig(pattern="window3d", dense_steps=0)) == []
    assert every_block_warnings(diffsparse.SparseConfig(pattern="dense", dense_steps=0)) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_fitted_pattern_that_keeps_every_block_of_an_image_says_so_once():
    # spatial_temporal's spatial kind holds every key of one frame, so on an image every head is classified spatial
    # and each layer's fit keeps every block: before, fits were never checked and this ran dense without a word.
    said = every_block_warnings(diffsparse.SparseConfig(pattern="spatial_temporal", dense_steps=0))
    assert len(said) == 1 and said[0].startswith("diffsparse: transformer: spatial_temporal(")
    assert every_block_warnings(diffsparse.SparseConfig(pattern="searched", dense_steps=0)) == []


@pytest.mark.parametrize("target, reached, flagged", [
    (0.25, 0.220, False), (0.5, 0.483, False), (0.1, 0.141, False),  # ordinary steps of a solved density
    (0.25, 1.0, True), (0.25, 0.78, True), (0.25, 0.53, True), (0.1, 0.203, True),
    (0.8, 0.61, False), (0.8, 0.59, True),  # a quarter of a large target is the margin there
])
def test_the_out_of_reach_tolerance_shared_by_the_runtime_and_bench(target, reached, flagged):
    assert out_of_reach(target, reached) is flagged
