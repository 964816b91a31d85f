"""diffsparse on diffusers' CogView3-Plus pipeline (tiny, random weights, offline): one-frame layouts behind the
T5 prompt, padded and kept whole."""

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel
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


@pytest.fixture(scope="module")
def cogview3_pipe():
    torch.manual_seed(0)
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=2, pos_embed_max_size=16, sample_size=16,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    pipe = CogView3PlusPipeline(tokenizer=word_tokenizer(VOCABULARY), text_encoder=t5.eval(), vae=tiny_image_vae(),
                                transformer=transformer.eval(), scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 32 x 48 pixels -> 16 x 24 latents (x2 VAE) -> 8 x 12 patches of 2 x 2, behind the prompt padded to 8 tokens.
CALL = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 48,
        "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent", "max_sequence_length": 8}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_the_layout_is_the_patch_grid_behind_the_text(cogview3_pipe, order):
    stats, calls = check_pipeline_against_dense(cogview3_pipe, CALL, order=order)
    # One batched call per step (CFG's two prompts together).
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(1, 8, 12, text_len=8, text_position="start"), (2, 104))
    }
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(cogview3_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(cogview3_pipe, CALL)
    check_against_dense(cogview3_pipe.transformer, lambda: inputs, block_size=16)


def test_other_processors_are_refused_and_the_model_left_untouched(cogview3_pipe):
    check_other_processors_are_refused(cogview3_pipe, "CogView3-Plus", layer=1)
