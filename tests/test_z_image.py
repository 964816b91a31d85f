"""diffsparse on diffusers' Z-Image pipelines (tiny, random weights, offline): the noise refiner's image-only
layout, the main blocks' `[image, pad, prompt, pad]` layout, prompts of different padded lengths in one batch; the
ControlNet pipeline with its ControlNet dense and untouched; diffusers' modular `ZImageCoreDenoiseStep` fed prompt
embeddings."""

import copy
import warnings
from collections import Counter

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.z_image.modular_blocks_z_image import ZImageCoreDenoiseStep
from transformers import Qwen3Config, Qwen3ForCausalLM

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.runtime import StepClock

from helpers import (
    QWEN3_TEMPLATE,
    chat_tokenizer,
    check_against_dense,
    check_controlnet_pipeline,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    first_transformer_call,
    open_zero_initialised,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "<think>", "</think>", "a",
              "red", "blue", "circle", "on", "grass"]
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
    vae = tiny_image_vae(shift_factor=0.1159, scaling_factor=0.3611)
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


def z_image_call(**overrides):
    # Prompts as strings: the pipeline writes the chat template into a caller's list of prompts in place, so a list
    # would be templated again on the next run.
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 40,
            "num_inference_steps": 3, "guidance_scale": 4.0, "max_sequence_length": 64, "output_type": "latent"}
    return {**call, **overrides}


@pytest.mark.parametrize("case", ["prompt and negative prompt", "prompts of different padded lengths", "tile order",
                                  "no image pad"])
def test_dense_identical_every_block_kept_and_the_layouts(z_image_pipe, case):
    # (Ignoring the mask of prompts of different padded lengths fails it.)
    call, order, prompt_pads = z_image_call(), None, {32}
    if case == "prompts of different padded lengths":  # one batch call padded to 64, the short prompt masked
        call, prompt_pads = z_image_call(prompt=LONG_PROMPT), {64, 32}
    elif case == "tile order":
        order = TileOrder((1, 2, 2))
    elif case == "no image pad":
        call = z_image_call(width=48)
    stats, calls = check_pipeline_against_dense(z_image_pipe, call, order=order)
    grid, image_pad = ((1, 8, 12), 0) if case == "no image pad" else (GRID, IMAGE_PAD)
    refiner = VideoLayout(*grid, text_len=image_pad, text_position="end")
    main = {VideoLayout(*grid, text_len=image_pad + n, text_position="end") for n in prompt_pads}
    assert {layout for layer, layout, _ in calls if layer == 0} == {refiner}
    assert {layout for layer, layout, _ in calls if layer > 0} == main
    # The transformer gets (1000 - t) / 1000: the clock still finds the scheduler's 3 steps, the first dense; the
    # main blocks make one runtime call per prompt length (the layouts above), logged as one call of the layer.
    assert [(s.layer, s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1, 2), (1, 1, 2), (2, 1, 2)]


def test_a_direct_transformer_call_the_pipelines_way(z_image_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run. Its
    # `sample` is a list, one latent per batch item.
    inputs = first_transformer_call(z_image_pipe, z_image_call())
    check_against_dense(z_image_pipe.transformer, lambda: inputs, block_size=16, select=torch.stack)


@pytest.mark.parametrize("change", ["a key mask", "one token more"])
def test_a_refiner_sequence_that_is_not_the_image_runs_the_original_counted_dense(z_image_pipe, change):
    # The noise refiner's calls are the image and its pad, of one size, unmasked: a call of the first refiner block
    # changed by a caller's hook (a key mask the kernel would not apply; a sequence one token longer than the image
    # and its pad) runs the original processor with what it was given, counted dense and said, the other layers
    # sparse. Without the check, the mask was dropped (and the call counted sparse) and the longer sequence raised.
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    transformer = z_image_pipe.transformer
    inputs = first_transformer_call(z_image_pipe, z_image_call())
    attention, seen = transformer.noise_refiner[0].attention, []

    def change_call(module, args, kwargs):
        x, freqs_cis = args[0], kwargs["freqs_cis"]
        if change == "a key mask":
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
            mask[:, -1] = False
            return (x,), {**kwargs, "attention_mask": mask}
        return (torch.cat([x, x[:, :1]], dim=1),), {**kwargs, "freqs_cis": torch.cat([freqs_cis, freqs_cis[:, :1]], 1)}

    def record(module, args, kwargs, out):
        seen.append((args[0], kwargs, out))
        return out if change == "a key mask" else out[:, :-1]

    hooks = [attention.register_forward_pre_hook(change_call, with_kwargs=True),
             attention.register_forward_hook(record, with_kwargs=True)]
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    try:
        with torch.no_grad(), diffsparse.sparse(transformer, config) as handle:
            with pytest.warns(diffsparse.DiffsparseWarning, match="not the layout read_call described"):
                transformer(**inputs)
            stats = handle.stats()
    finally:
        for hook in hooks:
            hook.remove()
    assert [(s.layer, s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1, 0), (1, 0, 1), (2, 0, 1)]
    [(x, kwargs, out)] = seen
    with torch.no_grad():
        expected = ZSingleStreamAttnProcessor()(attention, x, attention_mask=kwargs["attention_mask"],
                                                freqs_cis=kwargs["freqs_cis"])
    assert torch.equal(out, expected)


def test_image_to_image_keeps_every_block_within_dense(components):
    pipe = ZImageImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    check_pipeline_against_dense(pipe, z_image_call(image=image, strength=0.8))


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


def test_the_controlnet_pipeline_keeps_the_controlnet_dense_and_the_transformer_sparse(components):
    # The pipeline copies the transformer's embedders into the ControlNet (`from_transformer`); its control blocks
    # after main blocks 0 and 1 are its own.
    torch.manual_seed(1)
    controlnet = ZImageControlNetModel(control_layers_places=[0, 1], control_in_dim=4, dim=32, n_refiner_layers=1,
                                       n_heads=2, n_kv_heads=2)
    pipe = ZImageControlNetPipeline(**components, controlnet=open_zero_initialised(controlnet).eval())
    pipe.set_progress_bar_config(disable=True)
    call = z_image_call(control_image=torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(2)))
    stats, _ = check_controlnet_pipeline(pipe, call, {**call, "controlnet_conditioning_scale": 0.0})
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


@pytest.mark.parametrize("guided", [True, False])
def test_modular_denoise_step_dense_every_block_kept_and_sparse_after_the_dense_step(components, guided):
    # diffusers' modular denoise blocks fed prompt embeddings of 14 and 40 tokens (one and two 32-token pad blocks):
    # guided, the prompt and the negative prompt are two calls per step (two branches); unguided (the blocks'
    # default guider, Turbo's), both prompts one batch call, masked to the longer. The transformer gets
    # `(1000 - t) / 1000`. 128 x 160 pixels -> 16 x 20 latents (x8, no VAE) -> the 8 x 10 patches of `GRID`.
    pipe = ZImageCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=components["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(),
                           guider=ClassifierFreeGuidance(guidance_scale=4.0, enabled=guided))
    g = torch.Generator().manual_seed(1)
    prompt, other = torch.randn(14, 8, generator=g), torch.randn(40, 8, generator=g)
    prompts = {"prompt_embeds": [prompt], "negative_prompt_embeds": [other]} if guided else {
        "prompt_embeds": [prompt, other]}
    call = {**prompts, "height": 128, "width": 160, "num_inference_steps": 3, "output": "latents"}
    stats, calls = check_modular_against_dense(pipe, call)
    records = stats.calls["transformer"]
    branches = ("call 0", "call 1") if guided else ("call 0",)
    assert {(r.step, r.branch) for r in records} == {(step, branch) for step in range(3) for branch in branches}
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    assert {layout for layer, layout, _ in calls if layer == 0} == {VideoLayout(*GRID, text_len=IMAGE_PAD,
                                                                                text_position="end")}
    assert {layout for layer, layout, _ in calls if layer > 0} == {
        VideoLayout(*GRID, text_len=IMAGE_PAD + n, text_position="end") for n in (32, 64)
    }


def test_a_bfloat16_modular_run_is_on_every_step(components):
    # The modular blocks cast `t` to the transformer's dtype and pass `(1000 - t) / 1000` there. Read back in
    # bfloat16 and matched within the clock's allowance for a rounding relative to `t`, 100 steps at Turbo's shift 3
    # had a timestep near t = 0 none of the scheduler's (the rounding of `1000 - t` is 2 off there), warned twice.
    transformer = copy.deepcopy(components["transformer"]).to(torch.bfloat16)
    pipe = ZImageCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                           guider=ClassifierFreeGuidance(enabled=False))
    pipe.set_progress_bar_config(disable=True)
    prompt = torch.randn(14, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    with warnings.catch_warnings(), torch.no_grad(), diffsparse.sparse(pipe, config) as handle:
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        pipe(prompt_embeds=[prompt], height=128, width=160, num_inference_steps=100, output="latents",
             generator=torch.Generator().manual_seed(0))
        stats = handle.stats()
    assert Counter(r.step for r in stats.calls["transformer"] if r.layer == 0) == {step: 1 for step in range(100)}


@pytest.mark.parametrize(("shift", "steps"), [(1.0, 200), (3.0, 100), (6.0, 200)])
def test_a_bfloat16_timestep_is_read_on_its_step_against_a_stepped_scheduler(components, shift, steps):
    # The test above without a pipeline (no guider's `t` to match): the modular blocks' rounded `(1000 - t) / 1000`
    # and the scheduler's count of its steps give each call its step, on the scheduler's timesteps (before, shift 1
    # put 2 of 200 calls on another's step; shifts 3 and 6 warned of timesteps none of the scheduler's).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
    clock, latents, steps_read = StepClock(scheduler), torch.zeros(4, 1, 4, 4), []
    transformer = components["transformer"]
    adapter = adapter_for(transformer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        for t in scheduler.timesteps:
            timestep = (1000 - t.expand(1).to(torch.bfloat16)) / 1000  # as the modular blocks pass it
            call = {"x": [latents], "t": timestep, "cap_feats": [torch.zeros(14, 8)]}
            steps_read.append(clock.tick(adapter.read_call(transformer, (), call)[1])[0])
            scheduler.step(torch.zeros(1), t, torch.zeros(1))
    assert steps_read == list(range(steps))
