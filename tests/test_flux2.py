"""diffsparse on a diffusers FLUX.2 transformer (tiny, random weights, called directly): dual-stream blocks with
`Flux2AttnProcessor`, single-stream ones with the fused `Flux2ParallelSelfAttnProcessor`, a reference image as a
second frame."""

import pytest
import torch
from diffusers import Flux2Transformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_other_processors_are_refused, recorded_attention_calls

ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN = 6


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    ).eval()


def ids(times, rows, cols):
    """FLUX.2's `(t, h, w, l)` ids of row-major grids, one per time."""
    return torch.cartesian_prod(torch.tensor(times), torch.arange(rows), torch.arange(cols), torch.arange(1))


def inputs(references=0, reference_size=(4, 6), seed=0):
    """An image of 4 x 6 packed tokens behind 6 text tokens, with `references` reference images (times 10, 20, ...)
    of `reference_size`, the pipeline's way (`t / 1000` as the timestep)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = [ids([0], 4, 6)] + [ids([10 * (i + 1)], *reference_size) for i in range(references)]
    img_ids = torch.cat(img_ids)[None]
    return {
        "hidden_states": torch.randn(1, img_ids.shape[1], 8, generator=g),
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=g),
        "timestep": torch.tensor([0.9]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(1, TEXT_LEN, 4),
        "guidance": torch.tensor([3.5]),
    }


def run(model, config=None, **kwargs):
    with torch.no_grad():
        if config is None:
            return model(**inputs(**kwargs)).sample
        with diffsparse.sparse(model, config):
            return model(**inputs(**kwargs)).sample


def test_dense_pattern_is_the_unmodified_model_and_both_block_kinds_are_layers(transformer):
    reference = run(transformer)
    with diffsparse.sparse(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)) as handle:
        with torch.no_grad():
            assert torch.equal(transformer(**inputs()).sample, reference)
        assert [s.layer for s in handle.stats().layers] == [0, 1, 2]  # the dual-stream block, then the two single


@pytest.mark.parametrize("references", [0, 1])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense(transformer, references, order):
    reference = run(transformer, references=references)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    with recorded_attention_calls() as calls:
        out = run(transformer, config, references=references)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    frames = 1 + references
    assert {(layer, layout) for layer, layout, _ in calls} == {
        (layer, VideoLayout(frames, 4, 6, text_len=TEXT_LEN, text_position="start")) for layer in range(3)
    }
    sparse = run(transformer, diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=0),
                 references=references)
    assert not torch.allclose(sparse, reference, atol=1e-4)


def test_layout_and_step_of_a_call(transformer):
    adapter = adapter_for(transformer)
    layout, timestep = adapter.read_call(transformer, (), inputs(references=2))
    assert layout == VideoLayout(3, 4, 6, text_len=TEXT_LEN, text_position="start") and float(timestep) == 900.0


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_references_of_another_size_are_kept_whole_beside_the_text(transformer, order):
    # Two references of 2 x 3 tokens: 12 tokens that join the text's leading span (attended as [text, references,
    # image], returned in the model's order), so every block kept matches dense and a sparse pattern still drops
    # image blocks.
    kwargs = {"references": 2, "reference_size": (2, 3)}
    layout, _, token_order = adapter_for(transformer).read_call(transformer, (), inputs(**kwargs))
    assert layout == VideoLayout(1, 4, 6, text_len=TEXT_LEN + 12, text_position="start")
    assert sorted(token_order.tolist()) == list(range(TEXT_LEN + 24 + 12))
    reference = run(transformer, **kwargs)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    torch.testing.assert_close(run(transformer, config, **kwargs), reference, atol=1e-4, rtol=0)
    sparse = run(transformer, diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8,
                                                      dense_steps=0), **kwargs)
    assert not torch.allclose(sparse, reference, atol=1e-4)


@pytest.mark.parametrize("layer", [0, 2])  # a dual-stream and a single-stream processor
def test_other_processors_are_refused(transformer, layer):
    check_other_processors_are_refused(transformer, "FLUX.2", layer=layer)
