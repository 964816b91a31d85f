"""diffsparse on a diffusers SkyReels-V2 transformer (tiny, random weights, called directly): Wan's architecture
with its own processor copy; diffusion forcing's per-frame timesteps, and its causal frame-block mask, which the
sparse path leaves to the original processor."""

import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_other_processors_are_refused

ALL_BLOCKS = Window3D(window=(99, 99, 99))


def tiny_transformer(frames_per_block: int = 1):
    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, num_frame_per_block=frames_per_block,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def inputs(per_frame: bool = False):
    """4 latent frames of 8 x 12 -> 4 x 4 x 6 = 96 tokens. `per_frame`: diffusion forcing's one timestep per
    frame (the earlier frames less noisy)."""
    g = torch.Generator().manual_seed(1)
    timestep = torch.tensor([[200, 400, 600, 800]]) if per_frame else torch.tensor([500])
    return {"hidden_states": torch.randn(1, 16, 4, 8, 12, generator=g), "timestep": timestep,
            "encoder_hidden_states": torch.randn(1, 8, 32, generator=g), "enable_diffusion_forcing": per_frame}


def run(model, config=None, **kwargs):
    with torch.no_grad():
        if config is None:
            return model(**inputs(**kwargs)).sample, None
        with diffsparse.sparse(model, config) as handle:
            return model(**inputs(**kwargs)).sample, handle.stats()


@pytest.mark.parametrize("per_frame", [False, True], ids=["one timestep", "diffusion forcing"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, per_frame, order):
    reference, _ = run(transformer, per_frame=per_frame)
    dense, _ = run(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0), per_frame=per_frame)
    assert torch.equal(dense, reference)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0, order=order)
    out, stats = run(transformer, config, per_frame=per_frame)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert all(s.sparse_calls == 1 for s in stats.layers)
    sparse, stats = run(transformer, diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16,
                                                             dense_steps=0), per_frame=per_frame)
    assert stats.mean_density < 1 and not torch.allclose(sparse, reference, atol=1e-4)


def test_causal_frame_blocks_run_the_original_and_count_as_dense():
    # Asynchronous diffusion forcing: a causal mask over blocks of 2 frames on every self-attention call.
    model = tiny_transformer(frames_per_block=2)
    reference, _ = run(model, per_frame=True)
    out, stats = run(model, diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0),
                     per_frame=True)
    assert torch.equal(out, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 0), (1, 0)]


def test_layout_and_step_of_a_diffusion_forcing_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs(per_frame=True))
    assert layout == VideoLayout(4, 4, 6) and timestep.shape == (1, 4)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "SkyReels-V2", layer=1)
