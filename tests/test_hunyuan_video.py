"""diffsparse on a diffusers HunyuanVideo transformer (tiny, random weights, called directly): dual- and
single-stream blocks over `[video, text]`, prompts padded to a fixed length and masked as keys."""

import functools
import re

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.hunyuan_video import HunyuanJointAttention, key_rows, valid_lengths

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_padded_text_queries,
    check_prompts_attend_their_valid_tokens,
    check_video_token_positions,
    recorded_attention_calls,
    run_pipeline,
    run_transformer,
    tiny_clip_text_model,
    tiny_hunyuan_video_vae,
    tiny_llama,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN = 12


@pytest.fixture(scope="module", params=[None, "token_replace"], ids=["t2v", "i2v_token_replace"])
def transformer(request):
    # HunyuanVideo-I2V's "token_replace" transformer: other block classes (the first frame modulated as a clean
    # image), the same attention modules and processors.
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), image_condition_type=request.param,
    )
    return model.eval()


def inputs(valid_text=(7, TEXT_LEN), timestep=900.0, seed=0, size=(8, 6)):
    """A batch of two videos, 3 latent frames of 8 x 6 (3 x 4 x 3 = 36 tokens after the 2x2 patchify), whose
    prompts hold `valid_text` real tokens out of TEXT_LEN (the rest padding). `size`: the latents' height and width."""
    g = torch.Generator().manual_seed(seed)
    batch = len(valid_text)
    mask = torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None]
    return {
        "hidden_states": torch.randn(batch, 4, 3, *size, generator=g),
        "timestep": torch.full((batch,), timestep),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
        "encoder_attention_mask": mask.long(),
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "guidance": torch.full((batch,), 6000.0),
    }


def run(model, config=None, **kwargs):
    return run_transformer(model, inputs, config, **kwargs)


def _processors(model):
    return [b.attn.processor for b in (*model.transformer_blocks, *model.single_transformer_blocks)]


def test_dense_pattern_is_the_unmodified_model_and_remove_restores_it(transformer):
    originals = _processors(transformer)
    refiner = transformer.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    reference = run(transformer)
    with diffsparse.sparse(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)):
        assert len({id(p) for p in _processors(transformer)} & {id(p) for p in originals}) == 0
        assert transformer.context_embedder.token_refiner.refiner_blocks[0].attn.processor is refiner
        with torch.no_grad():
            assert torch.equal(transformer(**inputs()).sample, reference)
        assert [s.layer for s in diffsparse.stats(transformer).layers] == [0, 1, 2, 3]  # 2 dual, then 2 single
    assert _processors(transformer) == originals


@pytest.mark.parametrize("valid_text", [(7, TEXT_LEN), (5, 5), (TEXT_LEN,)])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense_with_padded_prompts(transformer, valid_text, order):
    # Different valid lengths in one batch take one sparse call each; padded text queries attend densely.
    check_against_dense(transformer, functools.partial(inputs, valid_text=valid_text), block_size=8, order=order)


@pytest.mark.parametrize("padded_queries", [None, "zero"], ids=["shipped", "zero (control)"])
def test_padded_text_queries_get_what_the_original_gives_them(transformer, padded_queries, monkeypatch):
    # The original lets them attend densely to the valid keys, then the text output projection. The control gives
    # them zeros from the attention (HunyuanVideo 1.5's rule), which this check must catch.
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
    check_padded_text_queries(transformer, run, config, padded_queries, HunyuanJointAttention, monkeypatch)


def test_a_batch_attended_in_groups_is_logged_once_per_layer_at_the_batch_density(transformer):
    # Prompts of different lengths take one runtime call each; stats() counts the layer's call once, its density
    # over the whole batch's pairs (each group weighted by its videos' pairs), not once per group.
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)

    def records(valid_text):
        with diffsparse.sparse(transformer, config), torch.no_grad():
            transformer(**inputs(valid_text=valid_text))
            return diffsparse.stats(transformer).calls["transformer"]

    short, full = records((2,)), records((TEXT_LEN,))
    batch = records((2, TEXT_LEN))
    assert [r.layer for r in batch] == [r.layer for r in short] == [0, 1, 2, 3]
    assert all(r.sparse for r in batch)
    video = 3 * 4 * 3
    weights = ((video + 2) ** 2, (video + TEXT_LEN) ** 2)
    for b, s, f in zip(batch, short, full):
        assert s.density < f.density  # the groups differ, so a mean that ignored one would show
        expected = (s.density * weights[0] + f.density * weights[1]) / sum(weights)
        assert b.density == pytest.approx(expected, rel=1e-9)


def test_sparse_calls_cut_the_text_span_to_the_valid_tokens(transformer):
    check_prompts_attend_their_valid_tokens(transformer, inputs, grid=(3, 4, 3), text_len=TEXT_LEN)


def test_layout_of_a_call(transformer):
    # 3 frames of 10 x 14 latents: a grid of three different sizes, so a layout of swapped axes shows.
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs(size=(10, 14)))
    assert layout == VideoLayout(3, 5, 7, text_len=TEXT_LEN, text_position="end") and float(timestep[0]) == 900.0


def test_each_latent_pixel_moves_the_query_of_its_own_video_token(transformer):
    # 3 x 5 x 7 tokens: the layout's grid is the model's token order, each axis told apart by its size.
    call = functools.partial(inputs, valid_text=(TEXT_LEN,), size=(10, 14))
    check_video_token_positions(transformer, call, grid=(3, 5, 7), patch=(1, 2, 2))


def test_masks_that_are_not_a_valid_prefix_are_refused():
    assert valid_lengths(None, 2, 10) == [10, 10]
    prefix = (torch.arange(10)[None] < torch.tensor([[4], [10]])).view(2, 1, 1, 10)
    assert valid_lengths(prefix, 2, 10) == [4, 10]
    holes = prefix.clone()
    holes[0, 0, 0, 1] = False
    with pytest.raises(ValueError, match="each row of encoder_attention_mask to be a prefix"):
        valid_lengths(holes, 2, 10)
    with pytest.raises(ValueError, match="boolean key mask"):
        valid_lengths(prefix.float(), 2, 10)


@pytest.mark.parametrize("shape", [(2, 1, 5, 5), (1, 1, 1, 5), (2, 1, 1, 6)],
                         ids=["token-level", "another batch", "another length"])
def test_boolean_masks_of_another_shape_are_refused_naming_the_expected_one(shape):
    # A boolean mask that is not (B, 1, 1, S) is a ValueError naming the shape expected, before reading its rows
    # (a reshape to (B, S) would raise torch's bare RuntimeError, or take a token-level mask's first rows).
    mask = torch.ones(shape, dtype=torch.bool)
    expected = re.escape(f"boolean key mask of shape (B, 1, 1, S) = (2, 1, 1, 5), got {shape} torch.bool")
    with pytest.raises(ValueError, match=expected):
        valid_lengths(mask, 2, 5)
    with pytest.raises(ValueError, match=expected):
        key_rows(mask, 2, 5)


def test_a_masked_video_token_is_refused_also_under_left_padded_text():
    # The text moved valid first leaves the grid in place: a masked video token is still not a prefix, and must be
    # refused as on a right-padded mask, not attended as a valid key while the last valid text token is cut off.
    processor = HunyuanJointAttention(runtime=None, layer=0)
    video, length = 4, 10
    keys = torch.ones(2, length, dtype=torch.bool)
    keys[0, video:video + 3] = False  # video 0's text left padded
    lengths = processor.read_text_mask(keys.view(2, 1, 1, length), 2, video, length)[1][1]
    assert lengths == [length - 3, length]
    keys[0, 1] = False
    with pytest.raises(ValueError, match="row 0 has a masked token before a valid one"):
        processor.read_text_mask(keys.view(2, 1, 1, length), 2, video, length)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "HunyuanVideo", layer=2)


def test_left_padded_text_is_attended_where_it_lies(transformer):
    # The transformer rebuilds its mask as a prefix, but the processor (HunyuanImage's and Motif-Video's too) takes
    # any boolean key mask: every block's text and the mask's text part rolled so that video 0's padding comes first
    # (left padding), its text outputs rolled back. No text token gets RoPE, so that is the unrolled model, which the
    # sparse path must give, the text moved valid first and put back (it raised a ValueError on a non-prefix mask).
    shifts = (TEXT_LEN - 7, 0)
    video = 3 * 4 * 3

    def roll(rows, sign=1):
        return torch.stack([row.roll(sign * shift, 0) for row, shift in zip(rows, shifts)])

    def roll_mask(mask):
        return torch.cat([mask[..., :video], roll(mask[:, 0, 0, video:])[:, None, None]], dim=-1)

    blocks = (*transformer.transformer_blocks, *transformer.single_transformer_blocks)
    hooks = [hook for block in blocks for hook in (
        block.register_forward_pre_hook(lambda m, a: (a[0], roll(a[1]), a[2], roll_mask(a[3]), *a[4:])),
        block.register_forward_hook(lambda m, a, out: (out[0], roll(out[1], -1))),
    )]
    try:
        reference = run(transformer)
        with recorded_attention_calls() as calls:
            kept = run(transformer, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0))
        window = run(transformer, diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8,
                                                          dense_steps=0))
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(reference, run(transformer), atol=1e-5, rtol=0)  # the roll changes nothing
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    assert sorted({(layout.text_len, shape) for _, layout, shape in calls}) == [(7, (1, video + 7)),
                                                                                 (TEXT_LEN, (1, video + TEXT_LEN))]
    assert not torch.allclose(window, reference, atol=1e-4)


def tiny_hunyuan_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    from diffsparse.pipelines.text import word_tokenizer

    vocabulary = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "up"]
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    )
    vae = tiny_hunyuan_video_vae()
    llama = tiny_llama(len(vocabulary))
    clip = tiny_clip_text_model(len(vocabulary))
    pipe = HunyuanVideoPipeline(
        text_encoder=llama.eval(), tokenizer=word_tokenizer(vocabulary), transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip.eval(),
        tokenizer_2=word_tokenizer(vocabulary, max_length=77),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_with_prompts_of_different_lengths():
    pipe = tiny_hunyuan_pipeline()
    call = {"prompt": ["a red circle moving left", "a blue square"],
            "prompt_template": {"template": "{}", "crop_start": 0},
            "num_inference_steps": 3, "height": 64, "width": 48, "num_frames": 9, "max_sequence_length": 10,
            "output_type": "latent"}

    def generate(config=None):
        return run_pipeline(pipe, call, config)

    reference = generate()
    dense, stats = generate(diffsparse.SparseConfig(pattern="dense"))
    assert torch.equal(dense, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(3, 0), (3, 0)]
    kept, stats = generate(diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=1))
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    # Two prompt lengths, attended in two groups: one sparse call per sparse step and layer all the same.
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 2), (1, 2)]
    sparse, _ = generate(diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=8, dense_steps=1))
    assert not torch.allclose(sparse, reference, atol=1e-4)


def test_a_correction_keeps_its_statistics_per_prompt_length(transformer):
    # Two prompt lengths attend on two layouts in every call: each keeps its own statistics, measured once at the
    # dense step before the sparse ones, instead of overwriting the other's and measuring (dense) every call.
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=1, correction="residual")
    timesteps = (900.0, 600.0, 300.0)
    with torch.no_grad():
        reference = [transformer(**inputs(timestep=t)).sample for t in timesteps]
        with diffsparse.sparse(transformer, config) as handle:
            outs = [transformer(**inputs(timestep=t)).sample for t in timesteps]
            runtime = handle.runtimes["transformer"]
            records, statistics = runtime.records, runtime._statistics
    for out, ref in zip(outs, reference):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # One record per layer call (its two groups logged as one), statistics per layer and prompt length.
    assert sorted((r.step, r.layer) for r in records if r.measured) == [(0, layer) for layer in range(4)]
    assert sorted((layer, layout.text_len) for layer, _, layout, _ in statistics) == [
        (layer, n) for layer in range(4) for n in (7, TEXT_LEN)]
    assert all(r.sparse for r in records if r.step > 0)


def test_the_padding_mask_is_read_once_per_call(transformer, monkeypatch):
    # Four layers get the same mask; reading it is a host sync on a GPU, so it is read once per transformer call.
    from diffsparse.pipelines import hunyuan_video

    reads = []
    read = hunyuan_video.prefix_lengths
    monkeypatch.setattr(hunyuan_video, "prefix_lengths", lambda mask, **kw: reads.append(mask) or read(mask, **kw))
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
    reference = run(transformer)
    with diffsparse.sparse(transformer, config), torch.no_grad():
        outs = [transformer(**inputs()).sample for _ in range(2)]
    assert len(reads) == 2 and all(torch.allclose(out, reference, atol=1e-4) for out in outs)
