"""diffsparse on diffusers' AuraFlow pipeline (tiny, random weights, offline): joint MMDiT and single DiT blocks over
`[register tokens + prompt, image]`."""

import copy

import pytest
import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import UMT5Config, UMT5EncoderModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_fused_projections,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    first_transformer_call,
    run_transformer,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]
TEXT_LEN = 8


@pytest.fixture(scope="module")
def auraflow_pipe():
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4, pos_embed_max_size=256,
    )
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                       num_heads=2, pad_token_id=0, eos_token_id=1))
    pipe = AuraFlowPipeline(tokenizer=word_tokenizer(VOCABULARY), text_encoder=umt5.eval(), vae=tiny_image_vae(),
                            transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 32 x 48 pixels -> 16 x 24 latents (x2 VAE) -> 8 x 12 patches behind the 8 register and 8 prompt tokens.
CALL = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 48,
        "num_inference_steps": 3, "guidance_scale": 4.0, "max_sequence_length": TEXT_LEN, "output_type": "latent"}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_the_layout(auraflow_pipe, order):
    stats, calls = check_pipeline_against_dense(auraflow_pipe, CALL, order=order)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 8, 12, text_len=8 + TEXT_LEN, text_position="start")}
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(auraflow_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(auraflow_pipe, CALL)
    check_against_dense(auraflow_pipe.transformer, lambda: inputs, block_size=16)


def test_other_processors_are_refused_and_the_model_left_untouched(auraflow_pipe):
    check_other_processors_are_refused(auraflow_pipe, "AuraFlow", layer=1)


def test_fused_qkv_projections(auraflow_pipe):
    check_fused_projections(auraflow_pipe, CALL, "FusedAuraFlowAttnProcessor2_0")


def test_a_module_with_another_softmax_scale_runs_the_original_counted_dense(auraflow_pipe):
    # The sparse path attends with `1 / sqrt(head_dim)`: a module whose `scale` differs runs its original processor,
    # counted dense (as the README says), the others sparse. Nothing failed when that check was removed.
    model = copy.deepcopy(auraflow_pipe.transformer)
    model.joint_transformer_blocks[0].attn.scale *= 2
    inputs = first_transformer_call(auraflow_pipe, CALL)
    reference = run_transformer(model, lambda: inputs)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    with torch.no_grad(), diffsparse.sparse(model, every_block) as handle:
        out = model(**inputs).sample
        assert [(s.layer, s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(0, 1, 0), (1, 0, 1)]
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
