"""diffsparse on a diffusers HunyuanImage 2.1 transformer (tiny, random weights, called directly): HunyuanVideo's dual-
and single-stream blocks over `[image, text]`, prompts padded and masked as keys, with and without the ByT5 glyph
tokens, left-padded prompts without them, and the refiner's 5D latents; and a tiny `HunyuanImagePipeline` (Qwen2.5-VL,
ByT5, its VAE, the APG guider) and a tiny `HunyuanImageRefinerPipeline` whose tokenizer pads on the left."""

import functools

import pytest
import torch
from diffusers import HunyuanImageTransformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_prompts_attend_their_valid_tokens,
    qwen_tokenizer,
    run_transformer,
    tiny_qwen25_vl,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN, GLYPHS = 12, 4


def make_transformer(**overrides):
    torch.manual_seed(0)
    config = {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
              "num_single_layers": 2, "num_refiner_layers": 1, "patch_size": (1, 1), "text_embed_dim": 16,
              "rope_axes_dim": (8, 8)}
    return HunyuanImageTransformer2DModel(**(config | overrides)).eval()


@pytest.fixture(scope="module", params=["mllm", "mllm and byt5"])
def transformer(request):
    return make_transformer(**({"text_embed_2_dim": 8} if request.param == "mllm and byt5" else {}))


def inputs_for(model):
    def inputs(valid_text=(7, TEXT_LEN), timestep=900.0, seed=0):
        """A batch of 8 x 6 latent images (48 tokens), prompts with `valid_text` real tokens out of TEXT_LEN (and,
        with the glyph encoder, 4 ByT5 tokens of which the first 2 are real)."""
        g = torch.Generator().manual_seed(seed)
        batch = len(valid_text)
        call = {
            "hidden_states": torch.randn(batch, 4, 8, 6, generator=g),
            "timestep": torch.full((batch,), timestep),
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
            "encoder_attention_mask": (torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None]).long(),
        }
        if model.context_embedder_2 is not None:
            call["encoder_hidden_states_2"] = torch.randn(batch, GLYPHS, 8, generator=g)
            call["encoder_attention_mask_2"] = (torch.arange(GLYPHS) < 2).long()[None].expand(batch, -1)
        return call

    return inputs


def text_len(model):
    return TEXT_LEN + (GLYPHS if model.context_embedder_2 is not None else 0)


def test_dense_pattern_is_the_unmodified_model_and_both_block_kinds_are_layers(transformer):
    inputs = inputs_for(transformer)
    reference = run_transformer(transformer, inputs)
    with diffsparse.sparse(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)) as handle:
        with torch.no_grad():
            assert torch.equal(transformer(**inputs()).sample, reference)
        assert [s.layer for s in handle.stats().layers] == [0, 1, 2]  # the dual-stream block, then the two single


@pytest.mark.parametrize("valid_text", [(7, TEXT_LEN), (TEXT_LEN,)])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense_with_padded_prompts(transformer, valid_text, order):
    inputs = functools.partial(inputs_for(transformer), valid_text=valid_text)
    check_against_dense(transformer, inputs, block_size=8, order=order)


def test_sparse_calls_cut_the_text_span_to_the_valid_tokens(transformer):
    # Prompts of 7 and 12 valid tokens (and 2 valid glyph tokens each with ByT5, which the model puts with them ahead
    # of the padding); a 2D window, as radial keeps a single frame whole.
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 2, 2)), block_size=8, dense_steps=0)
    glyphs = 2 if transformer.context_embedder_2 is not None else 0
    check_prompts_attend_their_valid_tokens(transformer, inputs_for(transformer), grid=(1, 8, 6), text_len=TEXT_LEN,
                                            config=config, more_valid=glyphs)


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_left_padded_prompts_without_glyphs_match_dense(order):
    # Without ByT5 (the refiner, `text_embed_2_dim=None`) the transformer hands the tokenizer's mask to the attention
    # as it is: left padding puts it in front of the prompt. Each prompt's valid tokens are moved first and the
    # outputs put back, which the pattern cannot tell from right padding (the text span is kept whole), so every
    # block kept gives the original, and a window that leaves blocks out runs too (it failed with a ValueError).
    model = make_transformer()

    def inputs():
        call = inputs_for(model)()
        call["encoder_attention_mask"] = call["encoder_attention_mask"].flip(1)  # 7 and 12 valid tokens, padded left
        return call

    window = diffsparse.SparseConfig(pattern=Window3D(window=(1, 2, 2)), block_size=8, dense_steps=0, order=order)
    calls = check_against_dense(model, inputs, block_size=8, order=order, sparse=window)
    assert sorted({layout.text_len for _, layout, _ in calls}) == [7, TEXT_LEN]  # each prompt over its valid tokens


def test_layout_of_a_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs_for(transformer)())
    assert layout == VideoLayout(1, 8, 6, text_len=text_len(transformer), text_position="end")
    assert float(timestep[0]) == 900.0


def test_glyph_inputs_to_a_model_without_byt5_are_not_text():
    # The pipeline passes the ByT5 glyph tokens whatever the model; one without the glyph embedder
    # (`text_embed_2_dim=None`) drops them, so the text span is the MLLM's tokens alone. Nothing failed when the
    # layout counted the glyphs anyway.
    model = make_transformer()

    def inputs():
        call, g = inputs_for(model)(), torch.Generator().manual_seed(1)
        batch = call["hidden_states"].shape[0]
        call["encoder_hidden_states_2"] = torch.randn(batch, GLYPHS, 8, generator=g)
        call["encoder_attention_mask_2"] = (torch.arange(GLYPHS) < 2).long()[None].expand(batch, -1)
        return call

    layout, _ = adapter_for(model).read_call(model, (), inputs())
    assert layout == VideoLayout(1, 8, 6, text_len=TEXT_LEN, text_position="end")
    check_against_dense(model, inputs, block_size=8)


def test_the_refiners_latents_are_frames():
    # The refiner's transformer takes 5D latents patchified in time too.
    model = make_transformer(patch_size=(1, 1, 1), rope_axes_dim=(4, 6, 6))
    call = inputs_for(model)()
    call["hidden_states"] = torch.randn(2, 4, 3, 8, 6, generator=torch.Generator().manual_seed(3))
    layout, _ = adapter_for(model).read_call(model, (), call)
    assert layout == VideoLayout(3, 8, 6, text_len=TEXT_LEN, text_position="end")
    radial = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=8, dense_steps=0)
    check_against_dense(model, lambda: call, block_size=8, sparse=radial)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "HunyuanImage", layer=2)



# The pipeline's system prompt and the test prompts, one token a word (its fixed drop of 34 tokens is the system
# prompt's under this tokenizer too).
WORDS = [
    "system", "user", "Describe", "the", "image", "by", "detailing", "color", "shape", "size", "texture",
    "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background", "a", "red", "circle",
    "on", "grass", "blurry", "sign", "saying"
]


@pytest.fixture(scope="module")
def hunyuan_image_pipe():
    from diffusers import AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline
    from diffusers.guiders import AdaptiveProjectedMixGuidance
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    vocabulary = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", ",", ":", *WORDS]
    torch.manual_seed(0)
    byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                    layers_per_block=1, spatial_compression_ratio=2, sample_size=32).eval()
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=tiny_qwen25_vl(vocabulary, layers=3),
        tokenizer=qwen_tokenizer(vocabulary), text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer(),
        transformer=make_transformer(text_embed_2_dim=8), guider=AdaptiveProjectedMixGuidance(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prompt, glyph_prompt", [("a red circle on grass", False), ('a sign saying "ok"', True)])
def test_pipeline_with_its_guider(hunyuan_image_pipe, prompt, glyph_prompt):
    # Each prompt is padded to 1,000 MLLM tokens (and its quoted text to 128 ByT5 ones): only its valid tokens are
    # attended, each branch behind its own.
    template = hunyuan_image_pipe.prompt_template_encode
    assert len(hunyuan_image_pipe.tokenizer(template[:template.index("{}")]).input_ids) == 34
    call = {"prompt": prompt, "negative_prompt": "blurry", "num_inference_steps": 3, "height": 32, "width": 24,
            "output_type": "latent"}
    stats, calls = check_pipeline_against_dense(hunyuan_image_pipe, call, block_size=8)
    # The guider names its two calls per step; the first step dense. 32 x 24 pixels -> 16 x 12 latent tokens.
    assert sorted({(r.step, r.branch, r.sparse) for r in stats.calls["transformer"]}) == [
        (step, branch, step > 0) for step in range(3) for branch in ("pred_cond", "pred_uncond")
    ]
    valid = {}
    for text in (prompt, "blurry"):
        _, mask, _, glyph_mask = hunyuan_image_pipe.encode_prompt(text)
        assert mask.shape[1] == 1000 and glyph_mask.shape[1] == 128
        valid[text] = (int(mask.sum()), int(glyph_mask.sum()))
    assert (valid[prompt][1] > 0) == glyph_prompt and valid["blurry"][1] == 0
    assert {layout for _, layout, _ in calls} == {
        VideoLayout(1, 16, 12, text_len=sum(valid[text]), text_position="end") for text in (prompt, "blurry")
    }


def test_refiner_pipeline_with_a_left_padding_tokenizer():
    # `HunyuanImageRefinerPipeline` has no ByT5, so the transformer hands its tokenizer's mask to the attention as it
    # is; a tokenizer padding on the left (the refiner's checkpoint does not say which side) put the padding in front
    # of the prompt, and the first sparse step raised a ValueError.
    from diffusers import AutoencoderKLHunyuanImageRefiner, FlowMatchEulerDiscreteScheduler, HunyuanImageRefinerPipeline

    vocabulary = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", ",", ":", *WORDS]
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanImageRefiner(latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                                           spatial_compression_ratio=2, temporal_compression_ratio=1).eval()
    tokenizer = qwen_tokenizer(vocabulary)
    tokenizer.padding_side = "left"
    transformer = make_transformer(in_channels=8, patch_size=(1, 1, 1), rope_axes_dim=(4, 6, 6), guidance_embeds=True)
    pipe = HunyuanImageRefinerPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, tokenizer=tokenizer,
                                       text_encoder=tiny_qwen25_vl(vocabulary, layers=3), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    masks = []
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["encoder_attention_mask"]), with_kwargs=True)
    # The image as latents (the VAE's 4 channels): the pipeline takes them as they are.
    image = torch.randn(1, 4, 1, 16, 12, generator=torch.Generator().manual_seed(0))
    call = {"prompt": "a red circle on grass", "image": image, "num_inference_steps": 3, "height": 32, "width": 24,
            "output_type": "latent"}
    try:
        _, calls = check_pipeline_against_dense(pipe, call, block_size=8)
    finally:
        hook.remove()
    valid = masks[0].sum(dim=1)
    assert masks[0].shape[0] == 1 and not masks[0][0, 0] and masks[0][0, -1]  # padded on the left
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 16, 12, text_len=int(valid), text_position="end")}
