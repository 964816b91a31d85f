"""diffsparse on a diffusers EasyAnimate transformer (tiny, random weights): joint [text, video] self-attention in
MMDiT blocks (text through `add_*_proj`) and plain blocks (one set of projections), with a second (T5) text
embedding and inpainting latents on channels, called directly; and the real `EasyAnimatePipeline` built from tiny
components (a Qwen2-VL text encoder behind an in-memory chat-templated tokenizer, a Magvit VAE), run end to end."""

import inspect

import pytest
import torch
from diffusers import (
    AutoencoderKLMagvit,
    EasyAnimatePipeline,
    EasyAnimateTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    masked_attention_calls,
    recorded_attention_calls,
    run_transformer,
)

LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    # 2 layers, the first an MMDiT block; inputs of 4 channels plus 5 of inpainting latents (mask + image).
    torch.manual_seed(0)
    return EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=9, out_channels=4, patch_size=2, sample_width=12,
        sample_height=8, num_layers=2, mmdit_layers=1, time_embed_dim=8, text_embed_dim=16, text_embed_dim_t5=12,
    ).eval()


def inputs():
    """4 frames of 8 x 12 latents -> 4 x 4 x 6 = 96 video tokens behind 6 + 5 text tokens."""
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 4, 4, 8, 12, generator=g), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
            "encoder_hidden_states_t5": torch.randn(1, 5, 12, generator=g),
            "inpaint_latents": torch.randn(1, 5, 4, 8, 12, generator=g)}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs, block_size=16, order=order, sparse=LOCAL)



def test_latent_sides_that_are_not_whole_patches(transformer):
    # The patchify drops a partial patch, as a strided convolution does: 9 x 13 latents make 4 x 6 tokens a frame
    # (a grid rounded up would not match the sequence).
    def call():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(2, 4, 3, 9, 13, generator=g), "timestep": torch.tensor([500, 500]),
                "encoder_hidden_states": torch.randn(2, 6, 16, generator=g),
                "encoder_hidden_states_t5": torch.randn(2, 5, 12, generator=g),
                "inpaint_latents": torch.randn(2, 5, 3, 9, 13, generator=g)}

    layout, _ = adapter_for(transformer).read_call(transformer, (), call())
    assert layout == VideoLayout(3, 4, 6, text_len=11, text_position="start")
    check_against_dense(transformer, call, block_size=16)


def test_both_texts_lead_the_layout(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(4, 4, 6, text_len=11, text_position="start")
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs, LOCAL)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, 107)), (1, (1, 107))]


def test_a_caller_s_attention_mask_runs_the_original_and_counts_dense(transformer):
    # The blocks pass their self-attention no mask, but the processor takes one (a caller's own block or processor
    # may pass it): a token-level mask, which the kernel does not apply, so that call runs the original with it and
    # is logged dense. Here the plain block's `attn1`, in the transformer's call, hides the last video token's key.
    from diffusers.models.transformers.transformer_easyanimate import EasyAnimateAttnProcessor2_0

    mask = torch.ones(1, 1, 1, 11 + 96, dtype=torch.bool)
    mask[..., -1] = False
    attention = transformer.transformer_blocks[1].attn1
    with masked_attention_calls(attention, "attention_mask", mask) as seen, torch.no_grad(), diffsparse.sparse(
            transformer, LOCAL) as handle:
        transformer(**inputs())
        assert [(s.layer, s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(0, 0, 1), (1, 1, 0)]
    [(_, kwargs, out)] = seen
    with torch.no_grad():
        original = EasyAnimateAttnProcessor2_0()(attention, **kwargs)
        unmasked = EasyAnimateAttnProcessor2_0()(attention, **{**kwargs, "attention_mask": None})
    assert all(torch.equal(a, b) for a, b in zip(out, original, strict=True))
    assert not torch.equal(out[0], unmasked[0])  # the mask reaches the output


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "EasyAnimate", layer=1)


# Qwen2-VL's chat template reduced to its shape, with the markers spaced out for the word-level tokenizer: the
# pipeline wraps every prompt as one user turn and asks for the assistant's reply.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% for part in message['content'] %}{{ part['text'] }} {% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)


def tiny_easyanimate_pipeline():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vocabulary = ["<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "a", "red", "circle",
                  "moving", "left", "low", "quality"]
    tokenizer = word_tokenizer(vocabulary)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    # EasyAnimate V5.1's encoder: its text model alone runs (the prompts hold no image); M-RoPE's sections split
    # the 8-wide heads' 4 frequencies.
    qwen = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config={"vocab_size": len(vocabulary), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1,
                     "eos_token_id": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                            "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "patch_size": 2,
                       "spatial_merge_size": 1, "temporal_patch_size": 1, "mlp_ratio": 2},
    ))
    # Only its compression ratios (8x spatial, 4x temporal, from the four blocks) are read: the output stays latent.
    vae = AutoencoderKLMagvit(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    model = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=12,
        sample_height=8, num_layers=2, mmdit_layers=1, time_embed_dim=8, text_embed_dim=qwen.config.text_config.hidden_size,
    )
    pipe = EasyAnimatePipeline(vae=vae.eval(), text_encoder=qwen.eval(), tokenizer=tokenizer, transformer=model.eval(),
                               scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_batches_the_guidance_and_follows_the_schedule():
    pipe = tiny_easyanimate_pipeline()
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 64, "width": 96,
            "num_frames": 9, "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "latent"}
    stats, calls = check_pipeline_against_dense(pipe, call)
    # `__call__` never passes `max_sequence_length`, so both prompts are padded to `encode_prompt`'s default and
    # reach the transformer unmasked: every padded token is text the video attends. 9 frames of 64 x 96 -> 3 latent
    # frames of 8 x 12 -> 3 x 4 x 6 video tokens after the 2x2 patchify.
    text_len = inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default
    layout = VideoLayout(3, 4, 6, text_len=text_len, text_position="start")
    # The uncond and cond halves in one batch: one call per layer and step, the first step dense.
    assert [(layer, lay, shape) for layer, lay, shape in calls] == [
        (layer, layout, (2, layout.num_tokens)) for _step in (1, 2) for layer in range(2)
    ]
    records = stats.calls["transformer"]
    assert [(r.step, r.layer, r.sparse) for r in records] == [
        (step, layer, step > 0) for step in range(3) for layer in range(2)
    ]
    assert all(r.density < 1 for r in records if r.sparse)
