"""diffsparse on a diffusers Motif-Video transformer (tiny, random weights): HunyuanVideo-style joint [video, image,
text] blocks with padded prompts, text cross-attention, and decoder blocks whose video attends the encoder's video
tokens in place of the text, called directly; and the real `MotifVideoPipeline` built from tiny components (a
T5Gemma2 text encoder, the embedded Wan pipeline's word tokenizer and Wan VAE, a classifier-free guider), run end
to end."""

import pytest
import torch
from diffusers import (
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    MotifVideoPipeline,
    MotifVideoTransformer3DModel,
)

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


def inputs(valid_text=(7, TEXT_LEN)):
    """3 latent frames of 8 x 12 (3 x 4 x 6 = 72 video tokens), a 4-token image embedding, prompts with
    `valid_text` real tokens of TEXT_LEN."""
    def call():
        g = torch.Generator().manual_seed(1)
        batch = len(valid_text)
        return {"hidden_states": torch.randn(batch, 4, 3, 8, 12, generator=g), "timestep": torch.full((batch,), 900.0),
                "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
                "encoder_attention_mask": (torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None]).long(),
                "image_embeds": torch.randn(batch, IMAGE_TOKENS, 8, generator=g)}

    return call


@pytest.mark.parametrize("valid_text", [(TEXT_LEN,), (7, TEXT_LEN)], ids=["one prompt", "two prompt lengths"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, valid_text, order):
    check_against_dense(transformer, inputs(valid_text), block_size=16, order=order, sparse=LOCAL)



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


def test_pipeline_guider_calls_each_branch_on_its_prompt_and_follows_the_schedule():
    pipe = tiny_motif_pipeline()
    prompts = {"pred_cond": "a red circle moving left", "pred_uncond": "low quality"}
    call = {"prompt": prompts["pred_cond"], "negative_prompt": prompts["pred_uncond"], "height": 64, "width": 96,
            "num_frames": 9, "num_inference_steps": 3, "output_type": "latent", "max_sequence_length": 16}
    stats, calls = check_pipeline_against_dense(pipe, call)
    # The guider runs the cond and the uncond branch as two calls of batch 1; each prompt is padded to 16 tokens and
    # masked, so the encoder blocks attend its valid tokens only, and the decoder block the encoder's video. 9
    # frames of 64 x 96 -> 3 latent frames of 8 x 12 -> 3 x 4 x 6 video tokens after the 2x2 patchify.
    decoder = VideoLayout(3, 4, 6, text_len=VideoLayout(3, 4, 6).num_tokens)
    expected = []
    for prompt in prompts.values():
        text = VideoLayout(3, 4, 6, text_len=len(pipe.tokenizer(prompt).input_ids))
        expected += [(0, text), (1, text), (2, decoder)]
    assert [(layer, layout, shape) for layer, layout, shape in calls] == [
        (layer, layout, (1, layout.num_tokens)) for layer, layout in expected * 2
    ]
    records = stats.calls["transformer"]
    assert [(r.step, r.branch, r.layer, r.sparse) for r in records] == [
        (step, branch, layer, step > 0) for step in range(3) for branch in prompts for layer in range(3)
    ]
    assert all(r.density < 1 for r in records if r.sparse)
