"""diffsparse on diffusers' Bria 3.2 pipeline (tiny, random weights, offline): FLUX.1's layout behind the T5 prompt,
the scheduler's timesteps as they are."""

import pytest
import torch
from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import T5Config, T5EncoderModel

from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    first_transformer_call,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]
TEXT_LEN = 8


@pytest.fixture(scope="module")
def bria_pipe():
    torch.manual_seed(0)
    transformer = BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=[4, 6, 6],
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    pipe = BriaPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=tiny_image_vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=t5.eval(),
                        tokenizer=word_tokenizer(VOCABULARY))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 32 x 24 pixels -> 16 x 12 latents (x2 VAE) -> 8 x 6 packed 2 x 2 patches behind the 8 text tokens.
CALL = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 24,
        "num_inference_steps": 3, "guidance_scale": 4.0, "max_sequence_length": TEXT_LEN, "output_type": "latent"}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_the_layout(bria_pipe, order):
    stats, calls = check_pipeline_against_dense(bria_pipe, CALL, block_size=8, order=order)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 8, 6, text_len=TEXT_LEN, text_position="start")}
    # The pipeline passes the scheduler's timesteps: the clock finds its 3 steps, the first dense.
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}
    assert all((s.dense_calls, s.sparse_calls) == (1, 2) for s in stats.layers)


def test_a_direct_transformer_call_the_pipelines_way(bria_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(bria_pipe, CALL)
    check_against_dense(bria_pipe.transformer, lambda: inputs, block_size=8)


def test_other_processors_are_refused_and_the_model_left_untouched(bria_pipe):
    check_other_processors_are_refused(bria_pipe, "Bria", layer=1)
