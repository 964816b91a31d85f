"""diffsparse on diffusers' CogView4 pipeline (tiny, random weights, offline): one-frame layouts behind the GLM
prompt, left-padded to a multiple of 16 tokens."""

import pytest
import torch
from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import GlmConfig, GlmModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    first_transformer_call,
    run_pipeline,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]


@pytest.fixture(scope="module")
def cogview4_pipe():
    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4, rope_axes_dim=(2, 2),
    )
    vae = tiny_image_vae()
    glm = GlmModel(GlmConfig(vocab_size=len(VOCABULARY), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=4, pad_token_id=0))
    pipe = CogView4Pipeline(tokenizer=word_tokenizer(VOCABULARY), text_encoder=glm.eval(), vae=vae,
                            transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogview4_call(**overrides):
    # 32 x 48 pixels -> 16 x 24 latents (x2 VAE) -> 8 x 12 patches of 2 x 2; the prompt of 5 words and the negative
    # of 1 are each left-padded to 16 tokens.
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 48,
            "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent"}
    return {**call, **overrides}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_the_layout_is_the_patch_grid_behind_the_text(cogview4_pipe, order):
    # (Without the image tokens' RoPE on the sparse path, every block kept fails.)
    stats, calls = check_pipeline_against_dense(cogview4_pipe, cogview4_call(), order=order)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 8, 12, text_len=16, text_position="start")}
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(cogview4_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(cogview4_pipe, cogview4_call())
    check_against_dense(cogview4_pipe.transformer, lambda: inputs, block_size=16)


def test_a_text_mask_runs_the_original_and_counts_dense(cogview4_pipe):
    config = diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=16, dense_steps=1)
    masked = cogview4_call(guidance_scale=1.0, attention_kwargs=None)
    embeds = cogview4_pipe._get_glm_embeds("a red circle on grass")
    mask = torch.ones(1, embeds.shape[1])
    mask[:, :11] = 0  # the left padding
    reference = run_pipeline(cogview4_pipe, {**masked, "prompt": None, "prompt_embeds": embeds})
    transformer = cogview4_pipe.transformer
    forward = transformer.forward

    def with_mask(*args, **kwargs):
        return forward(*args, **{**kwargs, "attention_mask": mask})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformer, "forward", with_mask)
        masked_reference = run_pipeline(cogview4_pipe, {**masked, "prompt": None, "prompt_embeds": embeds})
        out, stats = run_pipeline(cogview4_pipe, {**masked, "prompt": None, "prompt_embeds": embeds}, config)
    assert not torch.equal(masked_reference, reference)
    assert torch.equal(out, masked_reference) and all(s.sparse_calls == 0 for s in stats.layers)


def test_other_processors_are_refused_and_the_model_left_untouched(cogview4_pipe):
    check_other_processors_are_refused(cogview4_pipe, "CogView4", layer=1)
