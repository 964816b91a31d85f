"""diffsparse on a diffusers Motif-Video transformer (tiny, random weights): HunyuanVideo-style joint [video, image,
text] blocks with padded prompts, text cross-attention, and decoder blocks whose video attends the encoder's video
tokens in place of the text, called directly; and the real `MotifVideoPipeline` built from tiny components (a
T5Gemma2 text encoder, the embedded Wan pipeline's word tokenizer and Wan VAE, a classifier-free guider), run end
to end."""

import numpy as np
import pytest
import torch
from diffusers import (
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    MotifVideoImage2VideoPipeline,
    MotifVideoPipeline,
    MotifVideoTransformer3DModel,
)
from PIL import Image

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
    run_transformer,
)

LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0)
TEXT_LEN, IMAGE_TOKENS, VIDEO = 12, 4, 72


@pytest.fixture(scope="module")
def transformer():
    # One dual-stream block, two single-stream ones of which the last is a decoder block.
    torch.manual_seed(0)
    return MotifVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_decoder_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
    ).eval()


def inputs(valid_text=(7, TEXT_LEN), left=None):
    """3 latent frames of 8 x 12 (3 x 4 x 6 = 72 video tokens), a 4-token image embedding, prompts with
    `valid_text` real tokens of TEXT_LEN, padded on the right, or on the left where `left` (one flag per prompt)
    says so: the same tokens, the padding moved in front of the prompt in its order, as a left-padding tokenizer
    puts it (Motif's Gemma tokenizer)."""
    def call():
        g = torch.Generator().manual_seed(1)
        batch = len(valid_text)
        text = torch.randn(batch, TEXT_LEN, 16, generator=g)
        mask = (torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None]).long()
        for row, n in enumerate(valid_text):
            if left and left[row]:
                text[row] = text[row].roll(TEXT_LEN - n, dims=0)
                mask[row] = mask[row].roll(TEXT_LEN - n, dims=0)
        return {"hidden_states": torch.randn(batch, 4, 3, 8, 12, generator=g), "timestep": torch.full((batch,), 900.0),
                "encoder_hidden_states": text, "encoder_attention_mask": mask,
                "image_embeds": torch.randn(batch, IMAGE_TOKENS, 8, generator=g)}

    return call


@pytest.mark.parametrize("valid_text", [(TEXT_LEN,), (7, TEXT_LEN)], ids=["one prompt", "two prompt lengths"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, valid_text, order):
    check_against_dense(transformer, inputs(valid_text), block_size=16, order=order, sparse=LOCAL)


LEFT_PADDED = {  # (valid text tokens per prompt, left-padded per prompt)
    "left padding": ((7,), (True,)),
    "two prompt lengths, left padded": ((7, 10), (True, True)),
    "left and right padding": ((7, 10), (True, False)),
    "left padding and a full prompt": ((7, TEXT_LEN), (True, True)),
}


@pytest.mark.parametrize(("prompts", "order"), [
    *((prompts, None) for prompts in LEFT_PADDED.values()),
    (LEFT_PADDED["left and right padding"], TileOrder((1, 2, 2))),
], ids=[*LEFT_PADDED, "left and right padding, tile order"])
def test_left_padded_prompts_every_block_kept_matches_dense(transformer, prompts, order):
    # The transformer passes the tokenizer's mask through unchanged (its padding in front of the prompt), which
    # the original processor takes as any boolean key mask: the sparse path must too.
    check_against_dense(transformer, inputs(*prompts), block_size=16, order=order, sparse=LOCAL)


def encoder_block_outputs(transformer, inputs, config=None, left=None):
    """The `sample`, then each encoder block's video and `[image, text]` outputs (`config` as `run_transformer`'s):
    the model's output hardly moves with the text (the decoder reads it through the encoder's video only), the blocks'
    outputs do. The text rows of the prompts `left` flags (`inputs`'s) are rolled back to their right-padded places."""
    outputs = []
    blocks = [transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]]
    handles = [block.register_forward_hook(lambda module, args, out: outputs.extend(out)) for block in blocks]
    try:
        outputs.insert(0, run_transformer(transformer, inputs, config))
    finally:
        for handle in handles:
            handle.remove()
    valid_text = inputs()["encoder_attention_mask"].sum(dim=1).tolist()
    for text in outputs[2::2]:
        for row, n in enumerate(valid_text):
            if left and left[row]:
                text[row, IMAGE_TOKENS:] = text[row, IMAGE_TOKENS:].roll(n - TEXT_LEN, dims=0)
    return outputs


@pytest.mark.parametrize("prompts", LEFT_PADDED.values(), ids=LEFT_PADDED.keys())
def test_a_left_padded_prompt_gets_what_it_gets_right_padded(transformer, prompts):
    # No text token carries RoPE, so the original gives the same outputs for a prompt padded either side; moving the
    # valid text tokens first keeps that under a sparse pattern (blocks left out), it approximates nothing.
    valid_text, left = prompts
    right = encoder_block_outputs(transformer, inputs(valid_text), LOCAL)
    assert not torch.allclose(right[0], run_transformer(transformer, inputs(valid_text)), atol=1e-4)  # blocks left out
    for out, expected in zip(encoder_block_outputs(transformer, inputs(*prompts), LOCAL, left), right, strict=True):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_left_padded_text_stream_outputs_stay_in_place(transformer):
    # Each encoder block's outputs, every block kept, are the original's row for row: the text rows put back in
    # the model's order, the padded ones included (the `sample` alone would hardly show a misplaced text row).
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    prompts = inputs((7, 10), (True, False))
    with recorded_attention_calls() as calls:
        kept = encoder_block_outputs(transformer, prompts, every_block)
    assert [layer for layer, _, _ in calls] == [0, 0, 1, 1, 2]  # two prompt lengths: one sparse call each
    for sparse, dense in zip(kept, encoder_block_outputs(transformer, prompts), strict=True):
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)


def test_encoder_blocks_attend_the_text_and_the_decoder_block_the_encoders_video(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs()())
    text = VideoLayout(3, 4, 6, text_len=IMAGE_TOKENS + TEXT_LEN, text_position="end")
    assert layout == text
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs((TEXT_LEN,)), LOCAL)
    decoder = VideoLayout(3, 4, 6, text_len=VIDEO, text_position="end")
    assert [(layer, lay, shape) for layer, lay, shape in calls] == [
        (0, text, (1, VIDEO + IMAGE_TOKENS + TEXT_LEN)), (1, text, (1, VIDEO + IMAGE_TOKENS + TEXT_LEN)),
        (2, decoder, (1, 2 * VIDEO)),
    ]


def test_latent_sides_that_are_not_whole_patches(transformer):
    # The patchify drops a partial patch, as a strided convolution does: 9 x 13 latents make 4 x 6 tokens a frame
    # (a grid rounded up would not match the sequence).
    def call():
        odd = inputs()()
        odd["hidden_states"] = torch.randn(2, 4, 3, 9, 13, generator=torch.Generator().manual_seed(3))
        return odd

    layout, _ = adapter_for(transformer).read_call(transformer, (), call())
    assert layout == VideoLayout(3, 4, 6, text_len=IMAGE_TOKENS + TEXT_LEN, text_position="end")
    check_against_dense(transformer, call, block_size=16)


def test_a_video_gets_in_a_padded_batch_what_it_gets_alone(transformer):
    alone = run_transformer(transformer, lambda: {name: x[:1] for name, x in inputs()().items()}, LOCAL)
    torch.testing.assert_close(run_transformer(transformer, inputs(), LOCAL)[:1], alone, atol=1e-5, rtol=0)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Motif-Video", layer=1)


def tiny_motif_pipeline():
    from transformers import T5Gemma2Encoder, T5Gemma2EncoderConfig

    base = tiny_wan_pipeline()
    torch.manual_seed(0)
    # The encoder half of T5Gemma2 (its vision tower unused: the prompts hold no image). Built alone, its text config
    # lacks the `dropout_rate` that the full T5Gemma2Config hands down to it (and saved checkpoints carry), so it is
    # given here.
    encoder = T5Gemma2Encoder(T5Gemma2EncoderConfig(
        text_config={"vocab_size": len(base.tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "query_pre_attn_scalar": 8, "dropout_rate": 0.0},
        vision_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 8, "patch_size": 4},
        mm_tokens_per_image=4,
    ))
    z_dim = base.vae.config.z_dim
    model = MotifVideoTransformer3DModel(  # the fixture's blocks; the input adds the condition latents and mask
        in_channels=2 * z_dim + 1, out_channels=z_dim, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_decoder_layers=1, patch_size=2, patch_size_t=1,
        text_embed_dim=encoder.config.text_config.hidden_size, rope_axes_dim=(4, 6, 6),
        enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True,
    )
    pipe = MotifVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),  # the pipeline passes a shift `mu`
        vae=base.vae, text_encoder=encoder.eval(), tokenizer=base.tokenizer, transformer=model.eval(),
        guider=ClassifierFreeGuidance(guidance_scale=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pipeline_guider_calls_each_branch_on_its_prompt_and_follows_the_schedule(padding_side):
    pipe = tiny_motif_pipeline()
    # Motif's own tokenizer (Gemma's) pads on the left by default, and the pipeline hands its mask on unchanged.
    pipe.tokenizer.padding_side = padding_side
    prompts = {"pred_cond": "a red circle moving left", "pred_uncond": "low quality"}
    call = {"prompt": prompts["pred_cond"], "negative_prompt": prompts["pred_uncond"], "height": 64, "width": 96,
            "num_frames": 9, "num_inference_steps": 3, "output_type": "latent", "max_sequence_length": 16}
    padded = pipe.tokenizer(prompts["pred_cond"], padding="max_length", max_length=16).attention_mask
    assert padded[0 if padding_side == "left" else -1] == 0
    # The guider runs the cond and the uncond branch as two calls of batch 1; each prompt is padded to 16 tokens and
    # masked, so the encoder blocks attend its valid tokens only, and the decoder block the encoder's video.
    check_guided_pipeline_calls(pipe, call, prompts)


def check_guided_pipeline_calls(pipe, call, prompts, image_tokens=0):
    """`pipe(**call)` against dense, and its calls: per branch of `prompts` (guider name -> prompt), batch 1, the two
    encoder blocks on the video (9 frames of 64 x 96 -> 3 latent frames of 8 x 12 -> 3 x 4 x 6 tokens after the 2x2
    patchify) and the prompt's valid tokens (and `image_tokens`), the decoder block on the encoder's video; the
    first of 3 steps dense."""
    stats, calls = check_pipeline_against_dense(pipe, call)
    decoder = VideoLayout(3, 4, 6, text_len=VideoLayout(3, 4, 6).num_tokens)
    expected = []
    for prompt in prompts.values():
        text = VideoLayout(3, 4, 6, text_len=len(pipe.tokenizer(prompt).input_ids) + image_tokens)
        expected += [(0, text), (1, text), (2, decoder)]
    assert [(layer, layout, shape) for layer, layout, shape in calls] == [
        (layer, layout, (1, layout.num_tokens)) for layer, layout in expected * 2
    ]
    records = stats.calls["transformer"]
    assert [(r.step, r.branch, r.layer, r.sparse) for r in records] == [
        (step, branch, layer, step > 0) for step in range(3) for branch in prompts for layer in range(3)
    ]
    assert all(r.density < 1 for r in records if r.sparse)


def test_image_to_video_pipeline_attends_the_image_embedding_with_the_text():
    # `MotifVideoImage2VideoPipeline`: the first frame's latents in the condition channels, and its SigLIP embedding
    # (the T5Gemma2 encoder's vision tower: 8 x 8 pixels, 4 patches of 4 x 4) as `image_embeds`, which the encoder
    # blocks attend beside the prompt.
    from transformers import SiglipImageProcessor

    base = tiny_motif_pipeline()
    encoder, z_dim = base.text_encoder, base.vae.config.z_dim
    torch.manual_seed(0)
    model = MotifVideoTransformer3DModel(
        in_channels=2 * z_dim + 1, out_channels=z_dim, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_decoder_layers=1, patch_size=2, patch_size_t=1,
        text_embed_dim=encoder.config.text_config.hidden_size, image_embed_dim=encoder.config.vision_config.hidden_size,
        rope_axes_dim=(4, 6, 6), enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True,
    )
    pipe = MotifVideoImage2VideoPipeline(
        scheduler=base.scheduler, vae=base.vae, text_encoder=encoder, tokenizer=base.tokenizer,
        transformer=model.eval(), guider=base.guider,
        feature_extractor=SiglipImageProcessor(size={"height": 8, "width": 8}),
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = {"pred_cond": "a red circle moving left", "pred_uncond": "low quality"}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    call = {"image": image, "prompt": prompts["pred_cond"], "negative_prompt": prompts["pred_uncond"], "height": 64,
            "width": 96, "num_frames": 9, "num_inference_steps": 3, "output_type": "latent", "max_sequence_length": 16}
    # Each encoder block's layout: the video, then the prompt's valid tokens and the 4 image tokens.
    check_guided_pipeline_calls(pipe, call, prompts, image_tokens=4)
