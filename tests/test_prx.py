"""diffsparse on diffusers' PRX pipeline (tiny, random weights, offline): the image's queries over `[prompt,
image]` keys, the prompt's padding masked as keys."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel
from transformers import T5GemmaConfig, T5GemmaEncoderModel
from transformers.models.t5gemma import T5GemmaModuleConfig

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_steps_of_a_scheduler_trained_on_other_timesteps,
    first_transformer_call,
    recorded_attention_calls,
    run_pipeline,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]


@pytest.fixture(scope="module")
def prx_pipe():
    torch.manual_seed(0)
    transformer = PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=16, hidden_size=16, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=[4, 4],
    )
    # The blocks' modulation starts at zero (every attention gate closed, as before training): open it.
    for block in transformer.blocks:
        torch.nn.init.normal_(block.modulation.lin.weight, std=0.5)
        torch.nn.init.normal_(block.modulation.lin.bias, std=0.5)
    module = {"vocab_size": len(VOCABULARY), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "pad_token_id": 0}
    t5gemma = T5GemmaEncoderModel(T5GemmaConfig(encoder=T5GemmaModuleConfig(**module),
                                                decoder=T5GemmaModuleConfig(**module), is_encoder_decoder=False))
    pipe = PRXPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                       text_encoder=t5gemma.eval(), tokenizer=word_tokenizer(VOCABULARY, max_length=8),
                       vae=tiny_image_vae())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prx_call(**overrides):
    # 32 x 48 pixels -> 16 x 24 latents (x2 VAE) -> 8 x 12 patches of 2 x 2, behind the prompt padded to 8 tokens:
    # "a red circle on grass </s>" 6 valid, "blue </s>" 2.
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 48,
            "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent", "use_resolution_binning": False}
    return {**call, **overrides}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_each_prompt_over_its_valid_tokens(prx_pipe, order):
    # (Attending the masked padding fails every block kept.)
    stats, calls = check_pipeline_against_dense(prx_pipe, prx_call(), order=order)
    # CFG's negative and positive prompts in one call, each group of equal masks its own runtime call: the image's
    # queries over its prompt's valid tokens and the image.
    assert {(layout, shape[0]) for _, layout, shape in calls} == {
        (VideoLayout(1, 8, 12, text_len=valid, text_position="start"), 1) for valid in (6, 2)
    }
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(prx_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(prx_pipe, prx_call())
    check_against_dense(prx_pipe.transformer, lambda: inputs, block_size=16)


def test_an_unpadded_prompt_is_one_call_over_every_key(prx_pipe):
    config = diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=16, dense_steps=1)
    embeds, mask, _, _ = prx_pipe.encode_prompt("a red circle on grass", do_classifier_free_guidance=False,
                                                tokenizer_max_length=6)
    assert mask.all()
    call = prx_call(prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, guidance_scale=1.0)
    reference = run_pipeline(prx_pipe, call)
    with recorded_attention_calls() as calls:
        out, stats = run_pipeline(prx_pipe, call, config)
    assert not torch.allclose(out, reference, atol=1e-4)
    assert all(r.sparse for r in stats.calls["transformer"] if r.step > 0)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 8, 12, text_len=6, text_position="start")}


@pytest.mark.parametrize("shape", [(2, 7), (2, 1, 8), (2, 8 + 96)], ids=["short", "3d", "joint"])
def test_a_mask_not_the_text_s_is_the_original_s_error(prx_pipe, shape):
    # `PRXAttnProcessor2_0` takes the text's `(B, text_len)` key mask alone and raises a ValueError for any other;
    # the sparse path would read a short one with its keys shifted (text token 7 as an image key), silently wrong.
    g = torch.Generator().manual_seed(0)
    call = {"hidden_states": torch.randn(2, 4, 16, 24, generator=g), "timestep": torch.tensor([0.5, 0.5]),
            "encoder_hidden_states": torch.randn(2, 8, 16, generator=g), "attention_mask": torch.ones(shape).bool()}
    config = diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=16, dense_steps=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="attention_mask"):
            prx_pipe.transformer(**call)
        with diffsparse.sparse(prx_pipe.transformer, config), pytest.raises(ValueError, match="attention_mask"):
            prx_pipe.transformer(**call)


def test_the_steps_of_a_scheduler_trained_on_other_timesteps(prx_pipe):
    check_steps_of_a_scheduler_trained_on_other_timesteps(prx_pipe, prx_call())


def test_other_processors_are_refused_and_the_model_left_untouched(prx_pipe):
    check_other_processors_are_refused(prx_pipe, "PRX", layer=1)
