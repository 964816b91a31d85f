"""diffsparse on diffusers Qwen-Image 2.1 (tiny, random weights, offline): the single-stream block-causal transformer
called directly over three denoising steps, as its pipeline calls it: with the KV cache (the first step computes
the whole sequence and stores the prefix's keys and values, later steps the target image's queries only) and
without; a condition image in the prompt's slots; padded prompt keys. And a tiny `QwenImage21Pipeline` (Qwen3-VL
text encoder and processor built in memory, the Qwen-Image 2.1 VAE) generating from text with true CFG, and from
text and a condition image. And diffusers' modular denoise blocks (text-to-image, image-conditioned, and their Turbo
variants, without guidance) driving the transformer, fed prompt embeddings and the condition image's latents."""

from collections import Counter

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache
from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21 import (
    QwenImage21CoreDenoiseStep,
    QwenImage21ImageConditionedCoreDenoiseStep,
)
from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21_turbo import (
    QwenImage21TurboCoreDenoiseStep,
    QwenImage21TurboImageConditionedCoreDenoiseStep,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    QWEN_VISION_TOKENS,
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
    run_pipeline,
    run_transformer,
    tiny_qwen3_vl,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
LOCAL = Window3D(window=(1, 1, 1))
# The vision-language sequence: 6 text tokens, a condition image of 4 x 6 latent tokens (6 slots of 2 x 2), 3 text
# tokens; the target image's 6 slots appended. Joint sequence: 6 + 24 + 3 = 33 prefix tokens, then 24 target ones.
SLOTS = [False] * 6 + [True] * 6 + [False] * 3 + [True] * 6
PREFIX, TARGET = 33, 24
PADDED = torch.tensor([True] * 13 + [False] * 2)  # the prompt's last two text tokens padding


def tiny_transformer():
    return QwenImage21Transformer2DModel(
        in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, context_in_dim=16,
        axes_dims_rope=(4, 6, 6),
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer()


def inputs(batch=1, seed=0):
    """The call's inputs, the same prompt and latents for every video of the `batch`."""
    g = torch.Generator().manual_seed(seed)
    return {
        # the condition image's latents, then the target's
        "hidden_states": torch.randn(1, 2 * TARGET, 8, generator=g).expand(batch, -1, -1),
        "encoder_hidden_states": torch.randn(1, 15, 16, generator=g).expand(batch, -1, -1),
        "timestep": torch.tensor([0.9] * batch),
        "img_shapes": [[(1, 4, 6), (1, 4, 6)]] * batch,
        "img_mask": torch.tensor([SLOTS] * batch),
    }


def denoise(model, config=None, cache=True, valid=None, batch=1, seed=0):
    """The target's outputs at three timesteps (the pipeline's `t / 1000`), with the KV cache the pipeline's way when
    `cache`; `valid`: the prompt's key mask. With `config` applied for the loop, `(outputs, stats)`."""
    kv_cache = QwenImage21KVCache(len(model.transformer_blocks)) if cache else None
    outputs = []
    handle = diffsparse.apply(model, config) if config is not None else None
    try:
        with torch.no_grad():
            for step, t in enumerate((0.9, 0.6, 0.3)):
                call = inputs(batch, seed) | {"timestep": torch.tensor([t] * batch), "kv_cache": kv_cache}
                call["kv_cache_mode"] = ("extract" if step == 0 else "cached") if cache else None
                if valid is not None:
                    call["encoder_hidden_states_mask"] = valid
                outputs.append(model(**call).sample[:, -TARGET:])
        return outputs if handle is None else (outputs, handle.stats())
    finally:
        diffsparse.remove(model)


def assert_close_all(outputs, references, atol):
    for out, reference in zip(outputs, references):
        torch.testing.assert_close(out, reference, atol=atol, rtol=0)


@pytest.mark.parametrize("cache", [True, False], ids=["kv cache", "no cache"])
def test_dense_pattern_is_the_unmodified_model(transformer, cache):
    reference = denoise(transformer, cache=cache)
    dense, stats = denoise(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0), cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(dense, reference))
    assert [s.layer for s in stats.layers] == [0, 1]


@pytest.mark.parametrize("cache", [True, False], ids=["kv cache", "no cache"])
@pytest.mark.parametrize("valid", [None, PADDED[None]], ids=["no padding", "padded prompt"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense_and_the_target_rows_are_sparse(transformer, cache, valid, order):
    # Every step sparse, the first included: the prefix's block-causal attention recomputed (and, with the cache,
    # stored) by the sparse path, the target's rows through the kernel over the whole sequence's keys.
    if not cache:  # one call, the first step's, also in bfloat16 (the helper runs no KV cache)
        mask = {} if valid is None else {"encoder_hidden_states_mask": valid}
        check_against_dense(transformer, lambda: inputs() | mask, block_size=8, order=order,
                            select=lambda sample: sample[:, -TARGET:])
    reference = denoise(transformer, cache=cache, valid=valid)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    with recorded_attention_calls() as calls:
        kept, stats = denoise(transformer, config, cache=cache, valid=valid)
    assert_close_all(kept, reference, atol=1e-4)
    assert all(r.sparse for r in stats.calls["transformer"])
    # The target's 24 queries, the prefix the layout's leading span (padded keys left out of it).
    text = PREFIX - (0 if valid is None else 2)
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(1, 4, 6, text_len=text, text_position="start"), (1, TARGET))
    }
    sparse, stats = denoise(transformer, diffsparse.SparseConfig(pattern=LOCAL, block_size=8, dense_steps=0),
                            cache=cache, valid=valid)
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(sparse, reference))
    assert stats.sparse_density < 1


def test_layout_and_step_of_a_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(1, 4, 6, text_len=PREFIX, text_position="start") and float(timestep) == 900.0


def test_the_layout_is_the_target_s_grid_behind_a_condition_image_of_another_size(transformer):
    # A condition image of 2 x 2 latent tokens (one slot) before the 4 x 6 target: the grid is the target's (the last
    # of `img_shapes`), the prefix 6 + 4 + 3 text and condition tokens; every block kept gives the dense output.
    g = torch.Generator().manual_seed(0)
    call = {"hidden_states": torch.randn(1, 4 + TARGET, 8, generator=g),
            "encoder_hidden_states": torch.randn(1, 10, 16, generator=g), "timestep": torch.tensor([0.9]),
            "img_shapes": [[(1, 2, 2), (1, 4, 6)]],
            "img_mask": torch.tensor([[False] * 6 + [True] + [False] * 3 + [True] * 6])}
    layout, _ = adapter_for(transformer).read_call(transformer, (), call)
    assert layout == VideoLayout(1, 4, 6, text_len=13, text_position="start")
    reference = run_transformer(transformer, lambda: call)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
    torch.testing.assert_close(run_transformer(transformer, lambda: call, config), reference, atol=1e-4, rtol=0)


def test_a_video_gets_in_a_padded_batch_what_it_gets_alone(transformer):
    # Two videos of one prompt in one batch, the second with its last two text tokens padding: each group of valid
    # keys is its own call, and each video gets what it gets alone.
    config = diffsparse.SparseConfig(pattern=LOCAL, block_size=8, dense_steps=0)
    valid = torch.stack([torch.ones(15, dtype=torch.bool), PADDED])
    batch, _ = denoise(transformer, config, valid=valid, batch=2)
    for video in range(2):
        alone, _ = denoise(transformer, config, valid=valid[video : video + 1])
        assert_close_all([out[video : video + 1] for out in batch], alone, atol=1e-5)
    assert not torch.allclose(batch[-1][0], batch[-1][1], atol=1e-4)  # the padding matters


def test_other_processors_are_refused(transformer):
    # The flex-attention processor (for compiled models) included: only the default SDPA processor is replaced.
    check_other_processors_are_refused(transformer, "Qwen-Image 2.1", layer=1)


VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "system", "user", "assistant", "Comprehend", "and",
              "analyze", "the", "provided", "prompt", ".", "a", "red", "circle", "on", "dark", "blurry",
              *QWEN_VISION_TOKENS.values()]
# The chat template the pipeline renders its system message with, to count the tokens it drops.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
                 "{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}")


@pytest.fixture(scope="module")
def qwen21_pipe():
    """A one-layer Qwen3-VL (and the one-block vision tower the class builds), a word tokenizer with the chat and
    vision tokens, an 8-channel VAE with the pipeline's 16x downsampling, the tiny transformer."""
    torch.manual_seed(0)
    text_encoder, processor = tiny_qwen3_vl(VOCABULARY, CHAT_TEMPLATE)
    vae = AutoencoderKLQwenImage21(
        base_dim=4, decoder_base_dim=4, z_dim=8, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False] * 4, latents_mean=[0.0] * 8, latents_std=[1.0] * 8,
    ).eval()
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                               processor=processor, transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["kv cache", "no cache"])
def test_pipeline_with_true_cfg_dense_every_block_kept_and_sparse_after_the_dense_step(qwen21_pipe, use_kv_cache):
    call = {"prompt": "a red circle on a dark", "negative_prompt": "blurry", "height": 64, "width": 96,
            "num_inference_steps": 3, "true_cfg_scale": 4.0, "output_type": "pt", "use_kv_cache": use_kv_cache}
    stats, calls = check_pipeline_against_dense(qwen21_pipe, call, block_size=8)
    # Each step's cond and uncond calls, the first dense (with the cache: the step that fills it, through the
    # original processor), then the target's 24 rows sparse; `t / 1000` lands on the scheduler's steps.
    records = stats.calls["transformer"]
    assert sorted({(r.step, r.branch, r.sparse) for r in records}) == [
        (step, branch, step > 0) for step in range(3) for branch in ("cond", "uncond")
    ]
    assert all(r.density < 1 for r in records if r.sparse)
    # The prefix is each branch's prompt: 6 words of the prompt against 1 of the negative one, in the template.
    assert {shape for _, _, shape in calls} == {(1, TARGET)}
    prefixes = sorted({layout.text_len for _, layout, _ in calls})
    assert len(prefixes) == 2 and prefixes[1] - prefixes[0] == 5
    assert {(layout.frames, layout.height, layout.width) for _, layout, _ in calls} == {(1, 4, 6)}


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["kv cache", "no cache"])
def test_pipeline_with_a_condition_image(qwen21_pipe, use_kv_cache):
    # The condition image enters the prompt (the Qwen3-VL vision tower) and, through the VAE, the prefix's image
    # slots: the prefix grows by its latent tokens, recomputed exactly; the target's rows alone are sparse.
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    call = {"prompt": "a red circle on a dark", "image": image, "height": 64, "width": 96, "num_inference_steps": 3,
            "output_type": "pt", "output_resolution": 96, "use_kv_cache": use_kv_cache}
    stats, calls = check_pipeline_against_dense(qwen21_pipe, call, block_size=8)
    records = stats.calls["transformer"]
    assert sorted({(r.step, r.sparse) for r in records}) == [(0, False), (1, True), (2, True)]
    assert {shape for _, _, shape in calls} == {(1, TARGET)}
    (layout,) = {layout for _, layout, _ in calls}
    assert (layout.frames, layout.height, layout.width) == (1, 4, 6)
    # Without the image the prefix is the template's text alone: the image adds its 4 x 6 latent tokens (and the
    # vision tokens the processor puts in the prompt).
    with recorded_attention_calls() as plain:
        run_pipeline(qwen21_pipe, {**call, "image": None},
                     diffsparse.SparseConfig(pattern=LOCAL, block_size=8, dense_steps=1))
    (plain_layout,) = {layout for _, layout, _ in plain}
    assert layout.text_len >= plain_layout.text_len + 24


MODULAR_BLOCKS = {
    "text2image": QwenImage21CoreDenoiseStep, "image conditioned": QwenImage21ImageConditionedCoreDenoiseStep,
    "turbo": QwenImage21TurboCoreDenoiseStep,
    "turbo image conditioned": QwenImage21TurboImageConditionedCoreDenoiseStep,
}


@pytest.fixture(scope="module")
def modular_pipes(transformer):
    """diffusers' modular Qwen-Image 2.1 denoise blocks on the tiny transformer and a flow-matching scheduler; a CFG
    guider for the guided ones (each branch its own `cache_context`, its own KV cache), the Turbo ones unguided."""
    pipes = {}
    for name, blocks in MODULAR_BLOCKS.items():
        pipes[name] = blocks().init_pipeline()
        guider = {} if "turbo" in name else {"guider": ClassifierFreeGuidance(guidance_scale=4.0)}
        pipes[name].update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                      **guider)
        pipes[name].set_progress_bar_config(disable=True)
    return pipes


def modular_call(guided, conditioned, use_kv_cache):
    """The blocks' arguments for the latents of a 64 x 96 image (4 x 6 tokens) in 3 steps: a prompt of 9 text tokens
    (and, `conditioned`, 6 vision slots between them, a condition image of the target's size); when `guided` a
    negative prompt of 5 text tokens, the last one padding (and the same slots)."""
    g = torch.Generator().manual_seed(1)
    slots = [True] * 6 if conditioned else []
    prompt, negative = [False] * 6 + slots + [False] * 3, [False] * 3 + slots + [False] * 2
    call = {"prompt_embeds": torch.randn(1, len(prompt), 16, generator=g), "image_pad_mask": torch.tensor([prompt]),
            "prompt_embeds_mask": torch.ones(1, len(prompt), dtype=torch.bool), "height": 64, "width": 96,
            "num_inference_steps": 3, "output": "latents", "use_kv_cache": use_kv_cache}
    if guided:
        call |= {"negative_prompt_embeds": torch.randn(1, len(negative), 16, generator=g),
                 "negative_prompt_embeds_mask": torch.tensor([[True] * (len(negative) - 1) + [False]]),
                 "negative_image_pad_mask": torch.tensor([negative])}
    if conditioned:
        call["image_latents"] = [torch.randn(1, 8, 1, 4, 6, generator=g)]
    return call


@pytest.mark.parametrize(("name", "use_kv_cache"), [("text2image", True), ("text2image", False),
                                                    ("image conditioned", True), ("turbo", True),
                                                    ("turbo image conditioned", False)])
def test_modular_blocks_dense_every_block_kept_and_sparse_after_the_dense_step(modular_pipes, name, use_kv_cache):
    guided, conditioned = "turbo" not in name, "conditioned" in name
    pipe, call = modular_pipes[name], modular_call(guided, conditioned, use_kv_cache)
    stats, calls = check_modular_against_dense(pipe, call)
    # Every block kept runs every call through the kernel, the cache-filling step's included (the helper returns only
    # the one-token window's stats: this config is run again for its own).
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
    with torch.no_grad(), diffsparse.sparse(pipe, every_block) as handle:
        pipe(**call, generator=torch.Generator().manual_seed(0))
        assert all(r.sparse for r in handle.stats().calls["transformer"])
    # The blocks pass `t / 1000`: each call lands on its own scheduler step, the first dense (with the cache: the
    # step that fills it), through both layers; the guider's branches are its `cache_context`s.
    branches = ("pred_cond", "pred_uncond") if guided else ("cond",)
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {(step, b): 2 for step in range(3) for b in branches}
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    # The target's 24 rows sparse, behind each prompt's prefix: its valid text (the slots hold the condition image's
    # 24 latent tokens; the negative prompt's padding left out).
    condition, prompts = (TARGET if conditioned else 0), (9, 4)[:len(branches)]
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(1, 4, 6, text_len=n + condition, text_position="start"), (1, TARGET)) for n in prompts
    }
