"""diffsparse on a diffusers LTX-2 transformer (tiny, random weights, called directly): the video self-attention
of a joint audio-video model, in LTX-2.0's form and LTX-2.3's (perturbed-attention processors for spatio-temporal
guidance, per-head gates, split RoPE); appended keyframe tokens; IC-LoRA's soft self-attention mask."""

import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_other_processors_are_refused, recorded_attention_calls, run_transformer

ALL_BLOCKS = Window3D(window=(99, 99, 99))
GRID = (3, 4, 6)  # latent frames, rows, columns: 72 video tokens
VARIANTS = {
    "2.0": {},
    "2.3": {"perturbed_attn": True, "gated_attn": True, "audio_gated_attn": True, "rope_type": "split",
            "cross_attn_mod": True, "audio_cross_attn_mod": True},
}


def tiny_transformer(variant: str):
    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=16, base_height=256, base_width=256,
        **VARIANTS[variant],
    ).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def transformer(request):
    return tiny_transformer(request.param)


def make_inputs(model, batch: int = 1, keyframes: int = 0, **extra):
    """A call on `GRID` with 5 audio tokens; `keyframes`: that many tokens of a keyframe (frame 0's first tokens,
    placed at a later time) appended after the grid, with their coordinates, as LTX2ConditionPipeline does."""
    def inputs():
        g = torch.Generator().manual_seed(1)
        frames, height, width = GRID
        call = {
            "hidden_states": torch.randn(batch, frames * height * width + keyframes, 8, generator=g),
            "audio_hidden_states": torch.randn(batch, 5, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
            "audio_encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
            "timestep": torch.full((batch,), 500.0), "sigma": torch.full((batch,), 0.5),
            "num_frames": frames, "height": height, "width": width, "audio_num_frames": 5, "fps": 24.0, **extra,
        }
        if keyframes:
            coords = model.rope.prepare_video_coords(batch, frames, height, width, torch.device("cpu"), fps=24.0)
            keyframe = coords[:, :, :keyframes].clone()
            keyframe[:, 0] += 1.0  # a later time than frame 0
            call["video_coords"] = torch.cat([coords, keyframe], dim=2)
        return call

    return inputs


def sample(model, inputs, config=None):
    with torch.no_grad():
        if config is None:
            return model(**inputs()).sample
        with diffsparse.sparse(model, config) as handle:
            return model(**inputs()).sample, handle.stats()


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    inputs = make_inputs(transformer)
    reference = run_transformer(transformer, inputs)
    dense = run_transformer(transformer, inputs, diffsparse.SparseConfig(pattern="dense", dense_steps=0))
    assert torch.equal(dense, reference)
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0, order=order)
    torch.testing.assert_close(run_transformer(transformer, inputs, every_block), reference, atol=1e-4, rtol=0)
    sparse, stats = sample(transformer, inputs, diffsparse.SparseConfig(pattern="radial", density=0.3,
                                                                          block_size=16, dense_steps=0))
    assert stats.mean_density < 1 and not torch.allclose(sparse, reference, atol=1e-4)


def test_appended_keyframe_tokens_are_a_trailing_span_kept_whole(transformer):
    inputs = make_inputs(transformer, keyframes=10)
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(*GRID, text_len=10, text_position="end")
    reference = run_transformer(transformer, inputs)
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    torch.testing.assert_close(run_transformer(transformer, inputs, every_block), reference, atol=1e-4, rtol=0)
    with recorded_attention_calls() as calls:
        sample(transformer, inputs, diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=0))
    assert {(layout, shape) for _, layout, shape in calls} == {(layout, (1, 82))}


def test_spatio_temporal_guidance_on_ltx_2_3():
    # STG on block 1: a partly perturbed batch (element 0 takes the values) runs sparse and mixes in the values
    # as the original does; a wholly perturbed batch computes no attention on block 1, so only block 0 is counted.
    model = tiny_transformer("2.3")
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    for mask, counted in ((torch.tensor([0.0, 1.0]), [(0, 1), (1, 1)]), (torch.zeros(2), [(0, 1)])):
        inputs = make_inputs(model, batch=2, spatio_temporal_guidance_blocks=[1], perturbation_mask=mask)
        reference = run_transformer(model, inputs)
        out, stats = sample(model, inputs, every_block)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
        assert [(s.layer, s.sparse_calls) for s in stats.layers] == counted
    unperturbed = run_transformer(model, make_inputs(model, batch=2))
    assert not torch.allclose(reference, unperturbed, atol=1e-4)  # STG changed the output: the test sees it


def test_soft_self_attention_mask_runs_the_original_and_counts_as_dense(transformer):
    # IC-LoRA weighs attention between the video and reference tokens with a multiplicative mask.
    weights = torch.ones(1, 72, 72)
    weights[:, :, 36:] = 0.5
    inputs = make_inputs(transformer, video_self_attention_mask=weights)
    reference = run_transformer(transformer, inputs)
    out, stats = sample(transformer, inputs, diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16,
                                                                     dense_steps=0))
    assert torch.equal(out, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 0), (1, 0)]


@pytest.mark.parametrize("keyframes", [0, 10])
def test_a_call_with_coordinates_only_reads_the_grid_from_them(transformer, keyframes):
    # LTX-2.5's DFR pipeline passes no num_frames/height/width, only each tile's token coordinates.
    def coords_only():
        call = make_inputs(transformer, keyframes=keyframes)()
        if "video_coords" not in call:
            call["video_coords"] = transformer.rope.prepare_video_coords(1, *GRID, torch.device("cpu"), fps=24.0)
        for name in ("num_frames", "height", "width"):
            del call[name]
        return call

    expected = VideoLayout(*GRID, text_len=keyframes, text_position="end")
    layout, _ = adapter_for(transformer).read_call(transformer, (), coords_only())
    assert layout == expected
    reference = run_transformer(transformer, coords_only)
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    torch.testing.assert_close(run_transformer(transformer, coords_only, every_block), reference, atol=1e-4, rtol=0)
    # The same layout as the call that names its grid: the same sparse result.
    sparse = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)

    def named():
        return {**make_inputs(transformer, keyframes=keyframes)(), "video_coords": coords_only()["video_coords"]}

    torch.testing.assert_close(run_transformer(transformer, coords_only, sparse),
                               run_transformer(transformer, named, sparse), atol=1e-6, rtol=0)


def test_a_call_without_grid_or_coordinates_is_refused(transformer):
    inputs = make_inputs(transformer)()
    del inputs["num_frames"]
    with pytest.raises(ValueError, match="num_frames"):
        adapter_for(transformer).read_call(transformer, (), inputs)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "LTX-2", layer=1)
