"""diffsparse on diffusers' HunyuanDiT pipeline (tiny, random weights, offline): each block's image
self-attention, with its 2D RoPE, on a one-frame layout; the cross-attention to the two prompts untouched; the PAG
and ControlNet pipelines."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    HunyuanDiT2DControlNetModel,
    HunyuanDiT2DModel,
    HunyuanDiTControlNetPipeline,
    HunyuanDiTPAGPipeline,
    HunyuanDiTPipeline,
)
from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_a_normalised_self_attention_runs_the_original,
    check_against_dense,
    check_controlnet_pipeline,
    check_fused_projections,
    check_other_processors_are_refused,
    check_pag_pipeline,
    check_pipeline_against_dense,
    first_transformer_call,
    open_zero_initialised,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]


@pytest.fixture(scope="module")
def hunyuan_dit_pipe():
    torch.manual_seed(0)
    # The pipeline pads the prompts to 77 (BERT) and 256 (mT5) tokens, the lengths the model's config must hold.
    transformer = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, hidden_size=16, in_channels=4, patch_size=2, sample_size=8,
        num_layers=4, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=77,
        text_len_t5=256,
    )
    bert = BertModel(BertConfig(vocab_size=len(VOCABULARY), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=77))
    t5 = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    # The pipeline reads the latent grid as pixels / 8 for the RoPE: a VAE that downsamples x8.
    pipe = HunyuanDiTPipeline(
        vae=tiny_image_vae(blocks=4), text_encoder=bert.eval(), tokenizer=word_tokenizer(VOCABULARY),
        transformer=transformer.eval(), scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, text_encoder_2=t5.eval(), tokenizer_2=word_tokenizer(VOCABULARY),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_dit_call(**overrides):
    # 128 x 192 pixels -> 16 x 24 latents -> 8 x 12 patches of 2 x 2.
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 128, "width": 192,
            "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent", "use_resolution_binning": False}
    return {**call, **overrides}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_the_layout_is_the_patch_grid(hunyuan_dit_pipe, order):
    # (Without the RoPE on the sparse path, every block kept fails.)
    stats, calls = check_pipeline_against_dense(hunyuan_dit_pipe, hunyuan_dit_call(), order=order)
    # One batched call per step (CFG's two prompts together): the self-attention of each block.
    assert {(layout, shape) for _, layout, shape in calls} == {(VideoLayout(1, 8, 12), (2, 96))}
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(hunyuan_dit_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(hunyuan_dit_pipe, hunyuan_dit_call())
    check_against_dense(hunyuan_dit_pipe.transformer, lambda: inputs, block_size=16)


def test_a_normalised_self_attention_runs_the_original_counted_dense(hunyuan_dit_pipe):
    # Before, the original ran uncounted (stats() showed no call of the layer) and unsaid.
    import copy

    import diffsparse

    inputs = first_transformer_call(hunyuan_dit_pipe, hunyuan_dit_call())
    model = copy.deepcopy(hunyuan_dit_pipe.transformer)
    config = diffsparse.SparseConfig(block_size=16, dense_steps=0)
    check_a_normalised_self_attention_runs_the_original(model, lambda: inputs, config, "group_norm",
                                                        [block.attn1 for block in model.blocks])


def test_other_processors_are_refused_and_the_model_left_untouched(hunyuan_dit_pipe):
    check_other_processors_are_refused(hunyuan_dit_pipe, "HunyuanDiT", layer=3)


def test_fused_qkv_projections(hunyuan_dit_pipe):
    check_fused_projections(hunyuan_dit_pipe, hunyuan_dit_call(), "FusedHunyuanAttnProcessor2_0")


def test_the_pag_pipeline_perturbs_its_layer_with_its_own_processor_and_the_others_stay_sparse(hunyuan_dit_pipe):
    pag = HunyuanDiTPAGPipeline(**hunyuan_dit_pipe.components, pag_applied_layers=["blocks.1"])
    check_pag_pipeline(pag, hunyuan_dit_call(pag_scale=3.0), sparse_layers={0, 2, 3})


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_the_controlnet_pipeline_keeps_the_controlnet_dense_and_the_transformer_sparse(hunyuan_dit_pipe, order):
    torch.manual_seed(1)
    controlnet = HunyuanDiT2DControlNetModel(
        num_attention_heads=2, attention_head_dim=8, hidden_size=16, in_channels=4, patch_size=2, sample_size=8,
        transformer_num_layers=4, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8,
        text_len=77, text_len_t5=256,
    )
    pipe = HunyuanDiTControlNetPipeline(**hunyuan_dit_pipe.components, controlnet=open_zero_initialised(controlnet).eval())
    pipe.set_progress_bar_config(disable=True)
    call = hunyuan_dit_call(control_image=torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(2)))
    _, calls = check_controlnet_pipeline(pipe, call, {**call, "controlnet_conditioning_scale": 0.0}, order=order)
    assert {(layout, shape) for _, layout, shape in calls} == {(VideoLayout(1, 8, 12), (2, 96))}
