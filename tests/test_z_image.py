"""diffsparse on diffusers' Z-Image pipelines (tiny, random weights, offline): the noise refiner's image-only
layout, the main blocks' `[image, pad, prompt, pad]` layout, prompts of different padded lengths in one batch."""

import copy

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import Qwen3Config, Qwen3ForCausalLM

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    QWEN3_TEMPLATE,
    chat_tokenizer,
    check_other_processors_are_refused,
    recorded_attention_calls,
    run_pipeline,
)

VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "<think>", "</think>", "a",
              "red", "blue", "circle", "on", "grass"]
ALL_BLOCKS = Window3D(window=(99, 99, 99))
# 32 x 40 pixels -> 16 x 20 latents (x2 VAE) -> 8 x 10 patches of 2 x 2: 80 image tokens, 16 pad tokens behind them.
GRID, IMAGE_PAD = (1, 8, 10), 16
# The chat template adds 9 tokens to the prompt's words: 5 words make 14 (one 32-token block), 30 make 39 (two).
LONG_PROMPT = " ".join(["red"] * 30)


@pytest.fixture(scope="module")
def components():
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=8, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2, shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(VOCABULARY), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=4, pad_token_id=0,
    ))
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae.eval(), "text_encoder": qwen.eval(),
            "tokenizer": chat_tokenizer(VOCABULARY, QWEN3_TEMPLATE, ["<think>", "</think>"]),
            "transformer": transformer.eval()}


@pytest.fixture(scope="module")
def z_image_pipe(components):
    pipe = ZImagePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, config=None, **overrides):
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 40,
            "num_inference_steps": 3, "guidance_scale": 4.0, "max_sequence_length": 64, "output_type": "latent"}
    # A deep copy per run: the pipeline writes the chat template into a list of prompts in place.
    return run_pipeline(pipe, copy.deepcopy({**call, **overrides}), config)


def test_dense_pattern_is_the_unmodified_pipeline_and_steps_follow_the_scheduler(z_image_pipe):
    reference = run(z_image_pipe)
    out, stats = run(z_image_pipe, diffsparse.SparseConfig(pattern="dense"))
    assert torch.equal(out, reference)
    # The transformer gets (1000 - t) / 1000: the clock still finds the scheduler's 3 steps.
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}
    _, stats = run(z_image_pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=1))
    assert [(s.layer, s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1, 2), (1, 1, 2), (2, 1, 2)]


@pytest.mark.parametrize("case", ["prompt and negative prompt", "prompts of different padded lengths", "tile order",
                                  "no image pad"])
def test_every_block_kept_matches_dense(z_image_pipe, case):
    overrides, order, prompt_pads = {}, None, {32}
    if case == "prompts of different padded lengths":  # one batch call padded to 64, the short prompt masked
        overrides, prompt_pads = {"prompt": LONG_PROMPT}, {64, 32}
    elif case == "tile order":
        order = TileOrder((1, 2, 2))
    elif case == "no image pad":
        overrides = {"width": 48}
    reference = run(z_image_pipe, **overrides)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0, order=order)
    with recorded_attention_calls() as calls:
        out, stats = run(z_image_pipe, config, **overrides)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    grid, image_pad = ((1, 8, 12), 0) if case == "no image pad" else (GRID, IMAGE_PAD)
    refiner = VideoLayout(*grid, text_len=image_pad, text_position="end")
    main = {VideoLayout(*grid, text_len=image_pad + n, text_position="end") for n in prompt_pads}
    assert {layout for layer, layout, _ in calls if layer == 0} == {refiner}
    assert {layout for layer, layout, _ in calls if layer > 0} == main
    assert all(s.dense_calls == 0 and s.sparse_calls > 0 for s in stats.layers)


def test_sparse_blocks_change_the_image(z_image_pipe):
    reference = run(z_image_pipe)
    out, stats = run(z_image_pipe, diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=16, dense_steps=1))
    assert all(s.mean_density < 1 for s in stats.layers)
    assert not torch.allclose(out, reference, atol=1e-4)


def test_image_to_image_keeps_every_block_within_dense(components):
    pipe = ZImageImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    reference = run(pipe, image=image, strength=0.8)
    out, stats = run(pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0), image=image,
                     strength=0.8)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert all(s.dense_calls == 0 and s.sparse_calls > 0 for s in stats.layers)


def test_omni_mode_and_mixed_image_sizes_are_refused(z_image_pipe):
    transformer = z_image_pipe.transformer
    adapter = adapter_for(transformer)
    image, prompt = torch.zeros(4, 1, 16, 20), torch.zeros(14, 8)
    layout, timestep = adapter.read_call(transformer, ([image], torch.tensor([0.25]), [prompt]), {})
    assert layout == VideoLayout(*GRID, text_len=IMAGE_PAD + 32, text_position="end") and float(timestep) == 750
    with pytest.raises(ValueError, match="omni mode"):
        adapter.read_call(transformer, ([[image]], torch.tensor([0.25]), [[prompt]]), {})
    with pytest.raises(ValueError, match="one size"):
        adapter.read_call(transformer, ([image, torch.zeros(4, 1, 16, 24)], torch.tensor([0.25] * 2), [prompt] * 2), {})


def test_other_processors_are_refused_and_the_model_left_untouched(z_image_pipe):
    check_other_processors_are_refused(z_image_pipe, "Z-Image", layer=1)
