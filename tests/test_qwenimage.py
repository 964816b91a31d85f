"""diffsparse on a diffusers Qwen-Image transformer (tiny, random weights, called directly): joint [text, image]
double-stream attention with complex RoPE on both streams; Qwen-Image-Edit's reference images of the output's size
(frames) and of another size (kept whole beside the text); padded prompts run the original."""

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_against_dense, check_other_processors_are_refused, run_transformer

TEXT_LEN = 7
LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ).eval()


def inputs(references=(), valid_text=(TEXT_LEN,)):
    """An image of 4 x 6 packed tokens behind 7 text tokens, with reference images of the given `(rows, cols)`
    after it; prompts with `valid_text` real tokens, the pipeline's way (`t / 1000` as the timestep)."""
    shapes = [(1, 4, 6)] + [(1, *size) for size in references]
    tokens = sum(f * h * w for f, h, w in shapes)

    def call():
        g = torch.Generator().manual_seed(1)
        batch = len(valid_text)
        return {"hidden_states": torch.randn(batch, tokens, 16, generator=g),
                "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
                "encoder_hidden_states_mask": torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None],
                "timestep": torch.full((batch,), 0.5), "img_shapes": [shapes] * batch}

    return call


@pytest.mark.parametrize("references", [(), ((4, 6),), ((2, 3), (4, 6))], ids=["t2i", "edit", "edit other sizes"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, references, order):
    check_against_dense(transformer, inputs(references), block_size=8, order=order, sparse=LOCAL)


def test_layouts_of_a_call(transformer):
    read = adapter_for(transformer).read_call
    layout, timestep = read(transformer, (), inputs()())
    assert layout == VideoLayout(1, 4, 6, text_len=TEXT_LEN, text_position="start") and float(timestep) == 500.0
    layout, _ = read(transformer, (), inputs(((4, 6),))())
    assert layout == VideoLayout(2, 4, 6, text_len=TEXT_LEN, text_position="start")
    # 6 + 24 reference tokens of other sizes join the text: [text, image, references] as [text, references, image].
    layout, _, token_order = read(transformer, (), inputs(((2, 3), (4, 6)))())
    assert layout == VideoLayout(1, 4, 6, text_len=TEXT_LEN + 30, text_position="start")
    assert token_order.tolist() == [*range(7), *range(37, 61), *range(7, 37)]


def test_padded_prompts_run_the_original_and_count_as_dense(transformer):
    call = inputs(valid_text=(5, TEXT_LEN))
    reference = run_transformer(transformer, call)
    with torch.no_grad(), diffsparse.sparse(transformer, LOCAL) as handle:
        out = transformer(**call()).sample
        assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(1, 0), (1, 0)]
    assert torch.equal(out, reference)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Qwen-Image", layer=1)
