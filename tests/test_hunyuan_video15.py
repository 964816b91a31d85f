"""diffsparse on a diffusers HunyuanVideo 1.5 transformer (tiny, random weights, called directly): dual-stream
blocks over `[video, text]`, the text being the valid image, ByT5 and MLLM tokens, then the padding, masked as
keys and queries."""

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.hunyuan_video15 import HunyuanVideo15SparseAttnProcessor

from helpers import check_other_processors_are_refused, check_prompts_attend_their_valid_tokens, run_transformer

ALL_BLOCKS = Window3D(window=(99, 99, 99))
MLLM_LEN, BYT5_LEN, IMAGE_LEN = 8, 4, 4
TEXT_LEN = MLLM_LEN + BYT5_LEN + IMAGE_LEN


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
        rope_axes_dim=(4, 6, 6),
    )
    return model.eval()


def inputs(valid=((2, 1), (MLLM_LEN, BYT5_LEN)), image=True, timestep=900.0, seed=0):
    """Videos of 3 latent frames of 8 x 6 (3 x 4 x 3 = 36 tokens after the 2x2 patchify); per video, `valid` holds
    how many of its MLLM and ByT5 prompt tokens are real (the rest padding). `image`: image-to-video (the image's
    tokens valid); otherwise text-to-video (zero image embedding, its tokens masked). The defaults give the two
    videos 4 + 2 + 1 = 7 and all 16 valid text tokens."""
    g = torch.Generator().manual_seed(seed)
    batch = len(valid)
    mllm, byt5 = (torch.tensor([v[i] for v in valid]) for i in (0, 1))
    embeds = torch.randn(batch, IMAGE_LEN, 8, generator=g)
    return {
        "hidden_states": torch.randn(batch, 4, 3, 8, 6, generator=g),
        "timestep": torch.full((batch,), timestep),
        "encoder_hidden_states": torch.randn(batch, MLLM_LEN, 16, generator=g),
        "encoder_attention_mask": (torch.arange(MLLM_LEN)[None] < mllm[:, None]).long(),
        "encoder_hidden_states_2": torch.randn(batch, BYT5_LEN, 8, generator=g),
        "encoder_attention_mask_2": (torch.arange(BYT5_LEN)[None] < byt5[:, None]).long(),
        "image_embeds": embeds if image else torch.zeros_like(embeds),
    }


def run(model, config=None, **kwargs):
    return run_transformer(model, inputs, config, **kwargs)


def test_dense_pattern_is_the_unmodified_model_and_remove_restores_it(transformer):
    originals = [b.attn.processor for b in transformer.transformer_blocks]
    refiner = transformer.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    reference = run(transformer)
    with diffsparse.sparse(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)):
        assert all(b.attn.processor is not o for b, o in zip(transformer.transformer_blocks, originals))
        assert transformer.context_embedder.token_refiner.refiner_blocks[0].attn.processor is refiner
        with torch.no_grad():
            assert torch.equal(transformer(**inputs()).sample, reference)
        assert [s.layer for s in diffsparse.stats(transformer).layers] == [0, 1]
    assert [b.attn.processor for b in transformer.transformer_blocks] == originals


@pytest.mark.parametrize("valid", [((2, 1), (MLLM_LEN, BYT5_LEN)), ((3, 2), (3, 2)), ((MLLM_LEN, BYT5_LEN),)])
@pytest.mark.parametrize("image", [True, False], ids=["i2v", "t2v"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense_with_padded_prompts(transformer, valid, image, order):
    # Different valid lengths in one batch take one sparse call each; padded text queries get zeros, as the
    # original's mask gives them.
    reference = run(transformer, valid=valid, image=image)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    torch.testing.assert_close(run(transformer, config, valid=valid, image=image), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padded_queries", [None, "dense"], ids=["shipped", "dense (control)"])
def test_padded_text_queries_get_what_the_original_gives_them(transformer, padded_queries, monkeypatch):
    # They never reach a video token (masked as keys), so only the first block's own text output shows them:
    # zeros from the attention, then the text output projection. The control lets them attend (HunyuanVideo 1.0's
    # rule), which this check must catch.
    if padded_queries is not None:
        monkeypatch.setattr(HunyuanVideo15SparseAttnProcessor, "padded_queries", padded_queries)
    outputs = []
    hook = transformer.transformer_blocks[0].attn.register_forward_hook(lambda m, i, out: outputs.append(out[1]))
    try:
        run(transformer)
        run(transformer, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0))
    finally:
        hook.remove()
    original, sparse = outputs
    if padded_queries is None:
        torch.testing.assert_close(sparse, original, atol=1e-5, rtol=0)
    else:
        assert not torch.allclose(sparse[0, 7:], original[0, 7:], atol=1e-3)  # video 0: 7 valid text tokens


def test_sparse_calls_cut_the_text_span_to_the_valid_tokens(transformer):
    check_prompts_attend_their_valid_tokens(transformer, inputs, grid=(3, 4, 3), text_len=TEXT_LEN)


def test_layout_of_a_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(3, 4, 3, text_len=TEXT_LEN, text_position="end") and float(timestep[0]) == 900.0


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "HunyuanVideo 1.5", layer=1)
