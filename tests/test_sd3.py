"""diffsparse on a diffusers SD3 / SD 3.5 transformer (tiny, random weights, called directly): one-frame
layouts, joint `[image, text]` attention and SD 3.5's image-only `attn2`; and its pipelines (text to image, PAG,
ControlNet, and diffusers' modular `StableDiffusion3T2ICoreDenoiseStep` fed prompt embeddings)."""

import functools
from collections import Counter

import pytest
import torch
from diffusers import SD3Transformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import (
    check_against_dense,
    check_controlnet_pipeline,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pag_pipeline,
    check_read_call_by_position,
    open_zero_initialised,
    recorded_attention_calls,
    run_pipeline,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN = 10


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    return model.eval()


STEPS = (900.0, 500.0, 100.0)


def inputs(timestep=500.0):
    """A call at `timestep` on 12 x 16 latents -> 6 x 8 patches."""
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 12, 16, generator=g),
            "encoder_hidden_states": torch.randn(2, TEXT_LEN, 16, generator=g),
            "pooled_projections": torch.randn(2, 8, generator=g), "timestep": torch.full((2,), timestep)}


def denoise(model, config=None, steps=STEPS):
    """Three calls at falling timesteps, as a sampler makes them."""
    with torch.no_grad():
        if config is None:
            return [model(**inputs(t)).sample for t in steps]
        with diffsparse.sparse(model, config):
            return [model(**inputs(t)).sample for t in steps]


def test_dense_pattern_is_the_unmodified_model_and_every_attention_is_a_layer(transformer):
    reference = denoise(transformer)
    config = diffsparse.SparseConfig(pattern="dense", dense_steps=0)
    for out, ref in zip(denoise(transformer, config), reference):
        assert torch.equal(out, ref)
    diffsparse.apply(transformer, config)
    try:
        denoise(transformer)
        # Block 0's and 1's joint `attn`, then block 0's image-only `attn2` as layer 2 (num_layers + 0).
        assert [(s.layer, s.dense_calls) for s in diffsparse.stats(transformer).layers] == [(0, 3), (1, 3), (2, 3)]
    finally:
        diffsparse.remove(transformer)


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 4))])
def test_every_block_kept_matches_dense(transformer, order):
    for t in STEPS:
        check_against_dense(transformer, functools.partial(inputs, t), block_size=8, order=order)


def test_joint_calls_carry_the_text_and_attn2_calls_do_not(transformer):
    config = diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=1)
    with recorded_attention_calls() as calls:
        out = denoise(transformer, config)
    joint = VideoLayout(1, 6, 8, text_len=TEXT_LEN, text_position="end")
    seen = {layer: (layout, tokens) for layer, layout, (_, tokens) in calls}
    assert seen == {0: (joint, 48 + TEXT_LEN), 1: (joint, 48 + TEXT_LEN), 2: (VideoLayout(1, 6, 8), 48)}
    reference = denoise(transformer)
    assert torch.equal(out[0], reference[0]) and not torch.allclose(out[2], reference[2], atol=1e-4)


def test_an_attention_mask_the_original_ignores_keeps_the_call_sparse(transformer):
    # `JointAttnProcessor2_0` takes `attention_mask` and drops it (its SDPA gets none); routing such calls dense
    # turned a whole generation dense with no change to what the original computes.
    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=8, dense_steps=0)
    mask = {"attention_mask": torch.ones(2, 48 + TEXT_LEN, dtype=torch.bool)}
    with torch.no_grad(), diffsparse.sparse(transformer, config):
        unmasked = transformer(**inputs()).sample
        masked = transformer(**inputs(), joint_attention_kwargs=mask).sample
        assert all(s.dense_calls == 0 for s in diffsparse.stats(transformer).layers)
    assert torch.equal(masked, unmasked)
    with torch.no_grad():  # the original ignores it too
        assert torch.equal(transformer(**inputs(), joint_attention_kwargs=mask).sample, transformer(**inputs()).sample)


def test_latents_of_odd_size_are_read_without_their_partial_patches(transformer):
    # The patch embedding is a strided convolution: 13 x 17 latents are 6 x 8 patches, the last latent row and
    # column dropped (the model's output is 12 x 16). Rounding up read 7 x 9, a layout of the wrong length.
    from diffsparse.pipelines import adapter_for

    odd = {**inputs(), "hidden_states": torch.zeros(2, 4, 13, 17)}
    layout, _ = adapter_for(transformer).read_call(transformer, (), odd)
    assert layout == VideoLayout(1, 6, 8, text_len=TEXT_LEN, text_position="end")


def test_read_call_takes_every_argument_by_position(transformer):
    check_read_call_by_position(transformer, inputs(700.0))


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "SD3", layer=2)


def test_sparse_calls_under_context_parallelism_are_refused(transformer):
    # diffusers gives SD3 no context parallel plan: a user's own would split streams the adapter does not know, so
    # the sparse path refuses it (the families diffusers does give one shard: tests/test_parallelism.py).
    from diffusers import ContextParallelConfig, ParallelConfig

    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=8, dense_steps=0)
    diffsparse.apply(transformer, config)
    try:
        # What `enable_parallelism` sets on every attention processor.
        processor = transformer.transformer_blocks[0].attn.processor
        processor._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
        with pytest.raises(NotImplementedError, match="not on SD3SparseAttnProcessor"):
            denoise(transformer)
    finally:
        diffsparse.remove(transformer)
        transformer.transformer_blocks[0].attn.processor._parallel_config = None  # `remove` handed the config on


def test_context_parallelism_enabled_before_apply_is_refused_by_apply(transformer):
    from diffusers import ContextParallelConfig, ParallelConfig

    processor = transformer.transformer_blocks[1].attn.processor
    before = {name: type(p) for name, p in transformer.attn_processors.items()}
    processor._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    try:
        with pytest.raises(NotImplementedError, match="not on SD3SparseAttnProcessor"):
            diffsparse.apply(transformer, diffsparse.SparseConfig(pattern="radial", block_size=8, dense_steps=0))
        assert {name: type(p) for name, p in transformer.attn_processors.items()} == before
    finally:
        processor._parallel_config = None


def tiny_sd3_pipeline():
    """A real `StableDiffusion3Pipeline` (SD 3.5 shaped: one dual-attention block) with tiny CLIP and T5 encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffsparse.pipelines.text import word_tokenizer

    vocabulary = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocabulary), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval() for _ in range(2)]
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocabulary), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2, shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
        text_encoder=clips[0], tokenizer=word_tokenizer(vocabulary, max_length=77), text_encoder_2=clips[1],
        tokenizer_2=word_tokenizer(vocabulary, max_length=77), text_encoder_3=t5,
        tokenizer_3=word_tokenizer(vocabulary),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_pipeline_and_the_compare_command(tmp_path):
    # CFG batches both branches into one transformer call; 64 x 48 pixels -> 32 x 24 latents -> 16 x 12 patches.
    import json

    from diffsparse.cli import main

    pipe = tiny_sd3_pipeline()
    call = {"prompt": "a red circle on grass", "num_inference_steps": 3, "height": 64, "width": 48,
            "max_sequence_length": 8, "output_type": "latent"}

    reference = run_pipeline(pipe, call)
    assert torch.equal(run_pipeline(pipe, call, diffsparse.SparseConfig(pattern="dense"))[0], reference)
    kept, _ = run_pipeline(pipe, call, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0))
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    pipe.save_pretrained(tmp_path / "sd3")
    assert main(["compare", "--model", str(tmp_path / "sd3"), "--pattern", "window3d", "--density", "0.3",
                 "--block-size", "16", "--dense-steps", "1", "--steps", "2", "--frames", "1", "--height", "64",
                 "--width", "64", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["mean_attention_density"] < 1 and result["psnr_db"] > 0


def test_the_pag_pipeline_perturbs_its_layer_with_its_own_processor_and_the_others_stay_sparse():
    from diffusers import StableDiffusion3PAGPipeline

    pipe = tiny_sd3_pipeline()
    components = {name: c for name, c in pipe.components.items() if name not in ("image_encoder", "feature_extractor")}
    pag = StableDiffusion3PAGPipeline(**components, pag_applied_layers=["transformer_blocks.1"])
    call = {"prompt": "a red circle on grass", "num_inference_steps": 3, "height": 64, "width": 48,
            "max_sequence_length": 8, "output_type": "latent", "pag_scale": 3.0}
    # Layer 1 (block 1's joint attention) perturbed; layer 2 is block 0's image-only `attn2`.
    check_pag_pipeline(pag, call, sparse_layers={0, 2})


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_the_controlnet_pipeline_keeps_the_controlnet_dense_and_the_transformer_sparse(order):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    pipe = tiny_sd3_pipeline()
    torch.manual_seed(1)
    controlnet = SD3ControlNetModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8,
        pos_embed_max_size=32, qk_norm="rms_norm",
    )
    pipe = StableDiffusion3ControlNetPipeline(**pipe.components, controlnet=open_zero_initialised(controlnet).eval())
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    call = {"prompt": "a red circle on grass", "control_image": control, "num_inference_steps": 3, "height": 64,
            "width": 48, "max_sequence_length": 8, "output_type": "latent"}
    _, calls = check_controlnet_pipeline(pipe, call, {**call, "controlnet_conditioning_scale": 0.0}, order=order)
    # 64 x 48 pixels -> 32 x 24 latents -> 16 x 12 patches; both layers of the joint blocks and the dual one.
    assert {(layer, layout.grid) for layer, layout, _ in calls} == {(0, (1, 16, 12)), (1, (1, 16, 12)),
                                                                    (2, (1, 16, 12))}


def test_modular_denoise_step_dense_every_block_kept_and_sparse_after_the_dense_step(transformer):
    # diffusers' modular text-to-image denoise blocks with a CFG guider: the prompt (10 tokens) and the negative
    # prompt (4) are two transformer calls per step, each at the scheduler's `t`. 96 x 128 pixels -> 12 x 16
    # latents (x8, no VAE) -> 6 x 8 patches.
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                           guider=ClassifierFreeGuidance(guidance_scale=4.0))
    g = torch.Generator().manual_seed(1)
    call = {
        "prompt_embeds": torch.randn(1, TEXT_LEN, 16, generator=g),
        "negative_prompt_embeds": torch.randn(1, 4, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 8, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, 8, generator=g),
        "height": 96, "width": 128, "num_inference_steps": 3, "output": "latents",
    }
    stats, calls = check_modular_against_dense(pipe, call)
    records = stats.calls["transformer"]
    # Each step's two calls are two branches; the layers: both blocks' joint `attn`, block 0's `attn2`.
    assert Counter((r.step, r.branch) for r in records) == {(step, f"call {i}"): 3 for step in range(3) for i in (0, 1)}
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    joint = {VideoLayout(1, 6, 8, text_len=n, text_position="end") for n in (TEXT_LEN, 4)}
    assert {(layer, layout) for layer, layout, _ in calls} == {
        *((layer, layout) for layer in (0, 1) for layout in joint), (2, VideoLayout(1, 6, 8))
    }
