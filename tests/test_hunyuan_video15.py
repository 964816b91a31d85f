"""diffsparse on diffusers HunyuanVideo 1.5 (tiny, random weights, offline): the transformer called directly,
dual-stream blocks over `[video, text]`, the text being the valid image, ByT5 and MLLM tokens, then the padding,
masked as keys and queries. And the whole `HunyuanVideo15Pipeline` built (Qwen2.5-VL text model, ByT5 glyph
encoder, HunyuanVideo 1.5 VAE) and run with its classifier-free guider: each branch's padded prompt cut to its
valid tokens, the scheduler's timesteps landing on their steps. Then `HunyuanVideo15ImageToVideoPipeline` from the
same components and a tiny SigLIP image encoder, run on a small image that decides the video's size: the image's
SigLIP tokens are real (valid) text tokens of every sparse call, ahead of the valid ByT5 and MLLM tokens. And
diffusers' modular denoise blocks (text- and image-to-video) on a tiny transformer, fed prompt embeddings."""

import functools

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.modular_pipelines.hunyuan_video1_5.modular_blocks_hunyuan_video1_5 import (
    HunyuanVideo15CoreDenoiseStep,
    HunyuanVideo15Image2VideoCoreDenoiseStep,
)
from diffusers.modular_pipelines.hunyuan_video1_5.modular_pipeline import HunyuanVideo15ModularPipeline
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input
from PIL import Image
from transformers import (
    ByT5Tokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.hunyuan_video15 import HunyuanVideo15SparseAttnProcessor

from helpers import (
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_padded_text_queries,
    check_pipeline_against_dense,
    check_prompts_attend_their_valid_tokens,
    qwen_tokenizer,
    recorded_attention_calls,
    run_transformer,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
MLLM_LEN, BYT5_LEN, IMAGE_LEN = 8, 4, 4
TEXT_LEN = MLLM_LEN + BYT5_LEN + IMAGE_LEN


def tiny_transformer(in_channels=4, out_channels=4, patch_size_t=1, **config):
    """MLLM text 16 wide, ByT5 text 8 wide, image embeddings 8 wide; 4 output channels unless told."""
    return HunyuanVideo15Transformer3DModel(
        in_channels=in_channels, out_channels=out_channels, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=patch_size_t, text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), **config,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer()


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
    check_against_dense(transformer, functools.partial(inputs, valid=valid, image=image), block_size=8, order=order)


@pytest.mark.parametrize("padded_queries", [None, "dense"], ids=["shipped", "dense (control)"])
def test_padded_text_queries_get_what_the_original_gives_them(transformer, padded_queries, monkeypatch):
    # The original gives them zeros from the attention, then the text output projection. The control lets them
    # attend (HunyuanVideo 1.0's rule), which this check must catch.
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
    check_padded_text_queries(transformer, run, config, padded_queries, HunyuanVideo15SparseAttnProcessor, monkeypatch)


def test_masks_that_are_not_a_prefix_attend_each_videos_valid_tokens(transformer):
    # The transformer puts the valid tokens first, so only a block called otherwise sees such a mask: each block's
    # text and mask rolled (video 0's valid tokens no longer leading) and its text output rolled back. The
    # original's mask applies where the tokens lie, so this is the unrolled model, which the sparse path must give.
    shifts = (3, 0)

    def roll(rows):
        return torch.stack([row.roll(shift, 0) for row, shift in zip(rows, shifts)])

    def unroll(rows):
        return torch.stack([row.roll(-shift, 0) for row, shift in zip(rows, shifts)])

    hooks = [hook for block in transformer.transformer_blocks for hook in (
        block.register_forward_pre_hook(lambda m, args: (args[0], roll(args[1]), args[2], roll(args[3]), *args[4:])),
        block.register_forward_hook(lambda m, args, out: (out[0], unroll(out[1]))),
    )]
    try:
        reference = run_transformer(transformer, inputs)
        config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
        with recorded_attention_calls() as calls:
            kept = run_transformer(transformer, inputs, config)
        window = run_transformer(transformer, inputs, diffsparse.SparseConfig(
            pattern="window3d", density=0.3, block_size=8, dense_steps=0))
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(reference, run_transformer(transformer, inputs), atol=1e-5, rtol=0)
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    assert sorted((layout.text_len, shape) for _, layout, shape in calls) == [(7, (1, 43))] * 2 + [(16, (1, 52))] * 2
    assert not torch.allclose(window, reference, atol=1e-4)


def test_sparse_calls_cut_the_text_span_to_the_valid_tokens(transformer):
    check_prompts_attend_their_valid_tokens(transformer, inputs, grid=(3, 4, 3), text_len=TEXT_LEN)


def test_layout_of_a_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(3, 4, 3, text_len=TEXT_LEN, text_position="end") and float(timestep[0]) == 900.0


def test_latent_sides_that_are_not_whole_patches(transformer):
    # The patchify drops a partial patch, as a strided convolution does: 9 x 7 latents make 4 x 3 tokens a frame
    # (a grid rounded up would not match the sequence).
    def call():
        odd = inputs()
        odd["hidden_states"] = torch.randn(2, 4, 3, 9, 7, generator=torch.Generator().manual_seed(3))
        return odd

    assert adapter_for(transformer).read_call(transformer, (), call())[0] == VideoLayout(
        3, 4, 3, text_len=TEXT_LEN, text_position="end")
    check_against_dense(transformer, call, block_size=8)


def test_a_temporal_patch_merges_latent_frames_into_token_frames():
    # `patch_size_t=2`: 5 latent frames make 2 token frames (the partial patch dropped, as the Conv3d does).
    torch.manual_seed(0)
    model = tiny_transformer(patch_size_t=2)

    def call():
        merged = inputs()
        merged["hidden_states"] = torch.randn(2, 4, 5, 8, 6, generator=torch.Generator().manual_seed(3))
        return merged

    layout = VideoLayout(2, 4, 3, text_len=TEXT_LEN, text_position="end")
    assert adapter_for(model).read_call(model, (), call())[0] == layout
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        kept = run_transformer(model, call, every_block)
    assert calls and {(lay.frames, lay.height, lay.width) for _, lay, _ in calls} == {(2, 4, 3)}
    torch.testing.assert_close(kept, run_transformer(model, call), atol=1e-4, rtol=0)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "HunyuanVideo 1.5", layer=1)


# The word tokenizer's own tokens and Qwen's chat tokens first; the system prompt's words are not needed (`<unk>`),
# the pipeline crops them.
VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "a", "sign", "reading", '"', "open", "blurry"]
# The tokenizer in memory has no chat template; the pipeline renders its prompts with one (Qwen's ChatML layout).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def crop_start(pipe) -> int:
    """How many tokens the rendered template holds before the user's prompt: the system prompt and the user's
    header, which the pipeline's crop is meant to drop."""
    text = pipe.tokenizer.apply_chat_template(
        format_text_input(["{}"], pipe.system_message), tokenize=False, add_generation_prompt=True
    )[0]
    return len(pipe.tokenizer(text[:text.index("{}")]).input_ids)


@pytest.fixture(scope="module")
def hunyuan15_pipe():
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                      spatial_compression_ratio=8, temporal_compression_ratio=4)
    # Three layers: the pipeline reads the hidden states two layers before the last.
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(VOCABULARY), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=VOCABULARY.index("<|im_start|>"),
        eos_token_id=VOCABULARY.index("<|im_end|>"), rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]},
    ))
    byt5_tokenizer = ByT5Tokenizer()  # bytes: no vocabulary file to fetch
    byt5 = T5EncoderModel(T5Config(vocab_size=len(byt5_tokenizer), d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2))
    tokenizer = qwen_tokenizer(VOCABULARY)
    tokenizer.chat_template = CHAT_TEMPLATE
    pipe = HunyuanVideo15Pipeline(
        text_encoder=qwen.eval(), tokenizer=tokenizer, text_encoder_2=byt5.eval(), tokenizer_2=byt5_tokenizer,
        # The transformer's input: the latents, the (zero) condition latents and their mask.
        transformer=tiny_transformer(in_channels=2 * 4 + 1), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    # The pipeline's crop (108) counts Qwen's BPE tokens; the word tokenizer splits the system prompt into fewer, so
    # 108 would drop the prompt too.
    pipe.prompt_template_encode_start_idx = crop_start(pipe)
    # Shorter padding than the pipeline's (1000 MLLM, 256 ByT5, 729 image tokens) keeps the test fast; the prompts
    # still fill a fraction of it, and the transformer and the adapter read the lengths from the inputs.
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 32, 32, 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The quoted words are the glyph text, which the ByT5 encoder reads; the negative prompt has none (its ByT5 tokens are
# all padding).
PROMPTS = {"pred_cond": 'a sign reading "open"', "pred_uncond": "blurry"}
PIPELINE_CALL = {"prompt": PROMPTS["pred_cond"], "negative_prompt": PROMPTS["pred_uncond"], "height": 64, "width": 96,
                 "num_frames": 9, "num_inference_steps": 3, "output_type": "latent"}


def test_pipeline_with_cfg_dense_every_block_kept_and_sparse_after_the_dense_step(hunyuan15_pipe):
    pipe = hunyuan15_pipe
    valid = {}  # per branch: (valid MLLM tokens, valid ByT5 tokens), from the pipeline's own encoder
    for branch, prompt in PROMPTS.items():
        _, mask, _, mask_2 = pipe.encode_prompt(prompt)
        valid[branch] = (int(mask.sum()), int(mask_2.sum()))
    # The crop leaves the prompt and the template's tail; only the prompt with a glyph text has ByT5 tokens.
    assert valid["pred_cond"][0] > valid["pred_uncond"][0] > 0
    assert valid["pred_cond"][1] > 0 == valid["pred_uncond"][1]

    stats, calls = check_pipeline_against_dense(pipe, PIPELINE_CALL)
    records = stats.calls["transformer"]
    # The guider runs each branch as its own call of batch 1 in its own cache context. The transformer gets the
    # scheduler's timesteps as they are, so each step's calls land on that step.
    assert [(r.step, r.branch, r.layer, r.sparse) for r in records] == [
        (step, branch, layer, step > 0) for step in range(3) for branch in PROMPTS for layer in range(2)
    ]
    assert all(r.density < 1 for r in records if r.sparse)
    # 9 frames of 64 x 96 -> 3 latent frames of 8 x 12 (4x, 8x VAE) -> 3 x 4 x 6 tokens after the 2x2 patchify. Text
    # padded to the fixture's lengths (MLLM, ByT5 and the zero image tokens of text-to-video), cut to each branch's
    # valid tokens: the image tokens are masked, so none of them.
    expected = {branch: VideoLayout(3, 4, 6, text_len=sum(n), text_position="end") for branch, n in valid.items()}
    assert [(layer, layout, shape) for layer, layout, shape in calls] == [
        (layer, expected[branch], (1, expected[branch].num_tokens))
        for _sparse_step in range(1, 3) for branch in PROMPTS for layer in range(2)
    ]


@pytest.fixture(scope="module")
def hunyuan15_i2v_pipe(hunyuan15_pipe):
    """The text-to-video fixture's components (its transformer already takes the condition latents and mask) with
    a SigLIP vision tower as wide as the transformer's image embedding (8), and the fixture's shorter prompts."""
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=8))
    pipe = HunyuanVideo15ImageToVideoPipeline(**hunyuan15_pipe.components, image_encoder=siglip.eval(),
                                              feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}))
    for name in ("prompt_template_encode_start_idx", "tokenizer_max_length", "tokenizer_2_max_length"):
        setattr(pipe, name, getattr(hunyuan15_pipe, name))
    # The video's size is the bucket of the image's aspect ratio with an area near `target_size`² pixels (640² from
    # the transformer's config): 80² keeps it as small as the text-to-video call's.
    pipe.target_size = 80
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image_to_video_pipeline_attends_the_image_tokens_as_valid_text(hunyuan15_i2v_pipe):
    pipe = hunyuan15_i2v_pipe
    # 2:3 like the text-to-video call's 64 x 96, smaller than the video: the pipeline resizes it to its bucket. Noise,
    # so that the SigLIP tokens differ from one another (a flat image gives them all the same input).
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    call = {"image": Image.fromarray(pixels), "prompt": PROMPTS["pred_cond"], "negative_prompt": PROMPTS["pred_uncond"],
            "num_frames": 9, "num_inference_steps": 3, "output_type": "latent"}
    # Per branch: (valid MLLM tokens, valid ByT5 tokens), the masks of the pipeline's own encoder.
    valid = {branch: tuple(int(m.sum()) for m in pipe.encode_prompt(prompt)[1::2]) for branch, prompt in PROMPTS.items()}
    vision = pipe.image_encoder.config
    image_tokens = (vision.image_size // vision.patch_size) ** 2  # SigLIP's patches, no class token

    stats, calls = check_pipeline_against_dense(pipe, call)
    records = stats.calls["transformer"]
    assert [(r.step, r.branch, r.layer, r.sparse) for r in records] == [
        (step, branch, layer, step > 0) for step in range(3) for branch in PROMPTS for layer in range(2)
    ]
    assert all(r.density < 1 for r in records if r.sparse)
    # The image chose 64 x 96 pixels: the text-to-video call's 3 x 4 x 6 tokens. The transformer masks the image
    # tokens only when the image embedding is all zeros (text-to-video); here they are valid, placed first in the
    # text, so each branch's cut text span holds all of them beside its valid ByT5 and MLLM tokens.
    expected = {branch: VideoLayout(3, 4, 6, text_len=image_tokens + sum(n), text_position="end")
                for branch, n in valid.items()}
    assert [(layer, layout, shape) for layer, layout, shape in calls] == [
        (layer, expected[branch], (1, expected[branch].num_tokens))
        for _sparse_step in range(1, 3) for branch in PROMPTS for layer in range(2)
    ]


@pytest.mark.parametrize("blocks", [HunyuanVideo15CoreDenoiseStep, HunyuanVideo15Image2VideoCoreDenoiseStep],
                         ids=["text2video", "image2video"])
def test_modular_pipeline_dense_every_block_kept_and_sparse_after_the_dense_step(blocks, monkeypatch):
    # diffusers' modular denoise blocks, fed prompt embeddings, with their CFG guider (each branch in its own cache
    # context). Without a VAE they make 32 latent channels at 1/16 the size: 9 frames of 128 x 192 -> 3 x 8 x 12
    # latents, 3 x 4 x 6 tokens. The image-to-video blocks pass the next step's timestep as `timestep_r` to a
    # MeanFlow transformer, and the transformer also takes the condition latents and their mask.
    image2video = blocks is HunyuanVideo15Image2VideoCoreDenoiseStep
    # The blocks' zero image embedding has 729 tokens, all masked; 4 keep the test fast.
    monkeypatch.setattr(HunyuanVideo15ModularPipeline, "vision_num_semantic_tokens", IMAGE_LEN)
    torch.manual_seed(0)
    pipe = blocks().init_pipeline()
    pipe.update_components(transformer=tiny_transformer(2 * 32 + 1, 32, use_meanflow=image2video),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                           guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.set_progress_bar_config(disable=True)
    valid = {"pred_cond": (6, 2), "pred_uncond": (3, 0)}  # per branch: valid MLLM and ByT5 tokens of 8 and 4
    g = torch.Generator().manual_seed(1)
    call = {"height": 128, "width": 192, "num_frames": 9, "num_inference_steps": 3, "output": "latents"}
    for prefix, (mllm, byt5) in zip(("", "negative_"), valid.values()):
        call[f"{prefix}prompt_embeds"] = torch.randn(1, MLLM_LEN, 16, generator=g)
        call[f"{prefix}prompt_embeds_mask"] = (torch.arange(MLLM_LEN) < mllm)[None].long()
        call[f"{prefix}prompt_embeds_2"] = torch.randn(1, BYT5_LEN, 8, generator=g)
        call[f"{prefix}prompt_embeds_mask_2"] = (torch.arange(BYT5_LEN) < byt5)[None].long()
    if image2video:
        call["image_latents"] = torch.randn(1, 32, 1, 8, 12, generator=g)

    stats, calls = check_modular_against_dense(pipe, call)
    # The blocks pass the scheduler's timesteps as they are: each call on its own step, the first dense.
    assert [(r.step, r.branch, r.layer, r.sparse) for r in stats.calls["transformer"]] == [
        (step, branch, layer, step > 0) for step in range(3) for branch in valid for layer in range(2)
    ]
    # Each branch's text cut to its valid MLLM and ByT5 tokens. The image tokens are masked in both variants: the
    # image-to-video blocks run the text-to-video latents step first, whose zero `image_embeds` replace any given
    # (diffusers 0.42.1), so the SigLIP tokens never reach the transformer.
    layouts = {branch: VideoLayout(3, 4, 6, text_len=sum(n), text_position="end") for branch, n in valid.items()}
    assert calls == [(layer, layouts[branch], (1, layouts[branch].num_tokens))
                     for _sparse_step in range(1, 3) for branch in valid for layer in range(2)]
