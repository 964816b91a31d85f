"""diffsparse on a diffusers Mochi transformer (tiny, random weights, called directly): joint `[video, text]`
attention over each prompt's valid tokens, the padded text positions left at zero as in the original."""

import copy
import functools

import pytest
import torch
from diffusers import MochiTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.base import prefix_lengths

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_prompts_attend_their_valid_tokens,
    check_video_token_positions,
    run_pipeline,
    run_transformer,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN = 12
# diffusers' Mochi RoPE asks for a float32 autocast region, which CPU autocast declines with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=TEXT_LEN,
    )
    with torch.no_grad():
        model.pos_frequencies.normal_()  # zeros at initialisation, which would make RoPE the identity
    return model.eval()


def inputs(valid_text=(7, TEXT_LEN), seed=0, size=(8, 6)):
    """Two videos of 3 latent frames of 8 x 6 (3 x 4 x 3 = 36 tokens after the 2x2 patchify), prompts with
    `valid_text` real tokens out of TEXT_LEN. `size`: the latents' height and width."""
    g = torch.Generator().manual_seed(seed)
    batch = len(valid_text)
    return {
        "hidden_states": torch.randn(batch, 4, 3, *size, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_attention_mask": (torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None]).long(),
    }


def run(model, config=None, **kwargs):
    return run_transformer(model, inputs, config, **kwargs)


def test_dense_pattern_is_the_unmodified_model_and_remove_restores_it(transformer):
    originals = [b.attn1.processor for b in transformer.transformer_blocks]
    reference = run(transformer)
    assert torch.equal(run(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)), reference)
    assert [b.attn1.processor for b in transformer.transformer_blocks] == originals


@pytest.mark.parametrize("valid_text", [(7, TEXT_LEN), (5, 5), (TEXT_LEN,)])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense_with_padded_prompts(transformer, valid_text, order):
    check_against_dense(transformer, functools.partial(inputs, valid_text=valid_text), block_size=8, order=order)


def test_sparse_calls_cut_the_text_span_to_the_valid_tokens(transformer):
    check_prompts_attend_their_valid_tokens(transformer, inputs, grid=(3, 4, 3), text_len=TEXT_LEN)


def not_a_prefix(seed=1):
    """Three videos whose prompt masks are not prefixes, all different: left padding (5 tokens), a hole (tokens
    3-5) and a full prompt (as a caller's own `encoder_attention_mask` may give them)."""
    call = inputs(valid_text=(TEXT_LEN,) * 3, seed=seed)
    call["encoder_attention_mask"][0, :5] = 0
    call["encoder_attention_mask"][1, 3:6] = 0
    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_masks_that_are_not_a_prefix_attend_each_videos_valid_tokens(transformer, order):
    # MochiAttnProcessor2_0 picks each sample's valid tokens wherever they lie and packs their outputs first; the
    # sparse path must give the same, one sparse call per distinct mask on a text span of its valid tokens.
    window = diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=0)
    calls = check_against_dense(transformer, not_a_prefix, block_size=8, order=order, sparse=window)
    assert sorted(calls, key=lambda call: (call[0], call[1].text_len)) == [
        (layer, VideoLayout(3, 4, 3, text_len=n, text_position="end"), (1, 36 + n))
        for layer in (0, 1) for n in (7, 9, TEXT_LEN)
    ]


def test_layout_of_a_call_and_prefix_lengths(transformer):
    # 3 frames of 10 x 14 latents: a grid of three different sizes, so a layout of swapped axes shows.
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs(size=(10, 14)))
    assert layout == VideoLayout(3, 5, 7, text_len=TEXT_LEN, text_position="end")
    assert prefix_lengths(torch.tensor([[1, 1, 0], [1, 1, 1]])) == [2, 3]
    # The families that refuse such masks (HunyuanVideo's dense padded queries) name the field, the row, the rule.
    with pytest.raises(ValueError, match=r"encoder_attention_mask.*prefix.*row 1 .*pattern='dense'"):
        prefix_lengths(torch.tensor([[1, 1, 0], [1, 0, 1]]), name="encoder_attention_mask")


def test_each_latent_pixel_moves_the_query_of_its_own_video_token(transformer):
    # 3 x 5 x 7 tokens: the layout's grid is the model's token order, each axis told apart by its size.
    call = functools.partial(inputs, valid_text=(TEXT_LEN,), size=(10, 14))
    check_video_token_positions(transformer, call, grid=(3, 5, 7), patch=(1, 2, 2))


@pytest.mark.parametrize("rope_dtype", [torch.float32, torch.bfloat16], ids=["the model's float32 rope", "bf16 rope"])
def test_bf16_queries_and_keys_are_the_original_s_bit_for_bit(transformer, rope_dtype, monkeypatch):
    # MochiAttnProcessor2_0 rotates the video's bf16 queries and keys in float32 and rounds once to bf16: the sparse
    # processor's must be the same bits. On the model's own float32 cos and sin the products promote to float32
    # whatever the queries' dtype; on a bf16 rope (as a caller's block may pass it) only the float32 upcast keeps
    # them from being rounded product by product (before, bf16 there went unnoticed: the bf16 checks compared outputs
    # within a tolerance).
    model = copy.deepcopy(transformer).to(torch.bfloat16)
    attn = model.transformer_blocks[0].attn1
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs)

    hook = attn.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs().items()})
    hook.remove()
    call = {**seen, "image_rotary_emb": tuple(x.to(rope_dtype) for x in seen["image_rotary_emb"])}
    assert call["hidden_states"].dtype == torch.bfloat16 and call["attention_mask"].tolist() == [[1] * 7 + [0] * 5,
                                                                                                  [1] * TEXT_LEN]
    reached = []  # what reaches the original's attention: each video over its valid tokens, (1, heads, S, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kwargs: reached.append((q, k, v)) or sdpa(q, k, v, **kwargs))
    with torch.no_grad():
        attn.processor(attn, call["hidden_states"], call["encoder_hidden_states"], call["attention_mask"],
                       call["image_rotary_emb"])
        sparse = adapter_for(model).sparse_processor.joint_qkv(
            attn, call["hidden_states"], call["encoder_hidden_states"], call["image_rotary_emb"])
    assert len(reached) == 2
    for sample, (valid, original) in enumerate(zip((36 + 7, 36 + TEXT_LEN), reached)):
        for ours, theirs in zip(sparse, original):
            assert ours.dtype == theirs.dtype == torch.bfloat16
            assert torch.equal(ours[sample:sample + 1, :valid].transpose(1, 2), theirs)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "Mochi", layer=1)


def test_pipeline_with_classifier_free_guidance():
    # A real MochiPipeline: CFG batches the negative and the positive prompt (different valid lengths) in one call.
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline
    from transformers import T5Config, T5EncoderModel

    from diffsparse.pipelines.text import word_tokenizer

    vocabulary = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "low", "quality"]
    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=16, time_embed_dim=4, max_sequence_length=TEXT_LEN,
    )
    with torch.no_grad():
        transformer.pos_frequencies.normal_()
    vae = AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                             decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocabulary), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=t5.eval(),
                         tokenizer=word_tokenizer(vocabulary, max_length=TEXT_LEN), transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    # 13 frames of 128 x 96 -> 3 latent frames of 16 x 12 -> 3 x 8 x 6 tokens after the 2x2 patchify.
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "num_frames": 13, "height": 128,
            "width": 96, "num_inference_steps": 3, "guidance_scale": 4.5, "max_sequence_length": TEXT_LEN,
            "output_type": "latent"}

    def generate(config=None):
        return run_pipeline(pipe, call, config)

    reference = generate()
    dense, _ = generate(diffsparse.SparseConfig(pattern="dense"))
    assert torch.equal(dense, reference)
    kept, stats = generate(diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0))
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    assert all(s.sparse_calls == 3 for s in stats.layers)  # two prompt lengths in two groups, logged as one call
    sparse, stats = generate(diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=0))
    assert stats.mean_density < 1 and not torch.allclose(sparse, reference, atol=1e-4)


@pytest.mark.parametrize("run_timesteps", [(0.0, 12.5, 275.0), (900.0, 500.0, 100.0)])
def test_a_bare_loop_counts_the_steps_of_either_schedule(transformer, run_timesteps):
    # Mochi's released scheduler inverts its sigmas (timesteps rise from 0), diffusers' default falls: without a
    # scheduler each run's own direction counts its steps, and a timestep back at its start begins the next run.
    call = inputs()
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=1)
    with torch.no_grad(), diffsparse.sparse(transformer, config) as handle:
        for t in run_timesteps:
            transformer(**{**call, "timestep": torch.full((2,), t)})
        assert sorted({(r.step, r.sparse) for r in handle.stats().calls["transformer"]}) == [
            (0, False), (1, True), (2, True)]
        transformer(**{**call, "timestep": torch.full((2,), run_timesteps[0])})
        assert {(r.step, r.sparse) for r in handle.stats().calls["transformer"]} == {(0, False)}
