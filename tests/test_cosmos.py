"""diffsparse on diffusers Cosmos (tiny, random weights): the transformer called directly, and tiny Cosmos Predict 2
video-to-world and Predict 2.5 pipelines, whose transformer timestep (`sigma / (sigma + 1)`, or sigma, one per latent
frame) is on another scale than the scheduler's, so the step schedule follows the pipeline's own timestep; and a tiny
Cosmos 1.0 text-to-world pipeline, whose transformer gets the scheduler's timestep as is; and Anima, diffusers' modular
image pipeline on the Cosmos transformer, which hands it `t / 1000`."""

import gc
import warnings
import weakref

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLCosmos,
    Cosmos2_5_PredictBasePipeline,
    Cosmos2TextToImagePipeline,
    Cosmos2VideoToWorldPipeline,
    CosmosTextToWorldPipeline,
    CosmosTransformer3DModel,
    CosmosVideoToWorldPipeline,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline
from diffsparse.runtime import StepScheduleWarning

from helpers import (
    assert_two_calls_per_step_first_dense,
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    qwen_tokenizer,
    tiny_qwen25_vl,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
RADIAL = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)


def tiny_transformer(in_channels=4, out_channels=4, text_dim=16):
    torch.manual_seed(0)
    return CosmosTransformer3DModel(
        in_channels=in_channels, out_channels=out_channels, num_attention_heads=2, attention_head_dim=12,
        num_layers=2, mlp_ratio=2, text_embed_dim=text_dim, adaln_lora_dim=4, max_size=(8, 32, 32),
        patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True, extra_pos_embed_type="learnable",
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def inputs(per_frame: bool = False):
    """4 latent frames of 8 x 12 -> 4 x 4 x 6 = 96 tokens; `per_frame`: Cosmos 2's `(B, 1, T, 1, 1)` timesteps."""
    def call():
        g = torch.Generator().manual_seed(1)
        timestep = torch.tensor([0.9, 0.5, 0.5, 0.5]).view(1, 1, 4, 1, 1) if per_frame else torch.tensor([0.5])
        return {"hidden_states": torch.randn(1, 4, 4, 8, 12, generator=g), "timestep": timestep,
                "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "padding_mask": torch.zeros(1, 1, 8, 12)}

    return call


@pytest.mark.parametrize("per_frame", [False, True], ids=["one timestep", "per frame"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, per_frame, order):
    check_against_dense(transformer, inputs(per_frame), block_size=16, order=order, sparse=RADIAL)



def test_layout_of_a_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs(per_frame=True)())
    assert layout == VideoLayout(4, 4, 6) and timestep.shape == (1, 1, 4, 1, 1)


class NoSafetyChecker(torch.nn.Module):
    """Stands in for `cosmos_guardrail`'s checker (not installed here), letting every prompt and video through."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device and dtype for the pipeline to read

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def check_text_safety(self, prompt):
        return True

    def check_video_safety(self, video):
        return video


def video_to_world_pipe():
    """A tiny Cosmos Predict 2 video-to-world pipeline."""
    base = tiny_wan_pipeline()  # its T5 text encoder, word tokenizer and Wan VAE (Cosmos 2 uses the Wan VAE)
    z_dim = base.vae.config.z_dim
    pipe = Cosmos2VideoToWorldPipeline(
        text_encoder=base.text_encoder, tokenizer=base.tokenizer, vae=base.vae,
        transformer=tiny_transformer(z_dim + 1, z_dim, base.text_encoder.config.d_model),  # + the condition mask
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), safety_checker=NoSafetyChecker(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return video_to_world_pipe()


CALL = {"image": Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)),
        "prompt": "a red circle", "negative_prompt": "low quality", "height": 64, "width": 96, "num_frames": 9,
        "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "latent", "max_sequence_length": 16}


def test_video_to_world_pipeline_steps_follow_the_scheduler(pipe):
    # The scheduler's timesteps are 1000 sigma (80000, 2515, 2); the transformer gets sigma / (sigma + 1), which
    # matched against them would put every call on the last step, so `dense_steps` would never hold.
    radial = diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1)
    stats, _ = check_pipeline_against_dense(pipe, CALL, sparse=radial)
    # Three steps, a cond and an uncond call each; the first step dense.
    assert [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0] == [
        (0, False), (0, False), (1, True), (1, True), (2, True), (2, True)
    ]


def test_a_dropped_pipeline_is_not_kept_alive_by_its_transformer():
    # The adapter reads the step from the pipeline's timestep; a transformer kept (for another pipeline, or under
    # `diffsparse` still) must not hold the pipeline, its text encoder and VAE, in memory once the user drops it.
    pipe = video_to_world_pipe()
    diffsparse.apply(pipe, diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1))
    with torch.no_grad():
        pipe(**{**CALL, "num_inference_steps": 2}, generator=torch.Generator().manual_seed(0))
    transformer, dropped = pipe.transformer, weakref.ref(pipe)
    del pipe
    gc.collect()
    assert dropped() is None
    assert [(r.step, r.sparse) for r in diffsparse.stats(transformer).calls["transformer"] if r.layer == 0] == [
        (0, False), (0, False), (1, True), (1, True)
    ]


def test_another_pipeline_driving_the_transformer_is_said():
    # Cosmos' transformer gets its timestep on a 0-1 scale, the scheduler's grid is in the thousands: a pipeline other
    # than the one applied to (or a dropped one) gives no timestep to read, and the call's own landed "on" the grid's
    # last step, so the run counted as one step, all dense, and the only warning said to lower dense_steps.
    pipe = video_to_world_pipe()
    diffsparse.apply(pipe, diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1))
    other = Cosmos2VideoToWorldPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            other(**{**CALL, "num_inference_steps": 2}, generator=torch.Generator().manual_seed(0))
    said = [str(w.message) for w in record if issubclass(w.category, StepScheduleWarning)]
    assert len(said) == 1 and "apply diffsparse to the pipeline that calls the transformer" in said[0], said
    with warnings.catch_warnings(), torch.no_grad():  # the applied pipeline itself still runs its schedule, unwarned
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        pipe(**{**CALL, "num_inference_steps": 2}, generator=torch.Generator().manual_seed(0))
    assert [(r.step, r.sparse) for r in diffsparse.stats(pipe).calls["transformer"] if r.layer == 0] == [
        (0, False), (0, False), (1, True), (1, True)
    ]


def test_a_run_that_raised_leaves_no_timestep_for_another_pipeline_to_read():
    # A run stopped by an exception leaves the pipeline's `_current_timestep` set. Read when another pipeline drove the
    # same transformer afterwards, every call took that stale timestep as its own: the whole run on one step, all
    # dense, unwarned. Now only a running pipeline's timestep is read: the other run is said, as without the failure.
    pipe = video_to_world_pipe()
    diffsparse.apply(pipe, diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1))

    def stop(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        pipe(**{**CALL, "num_inference_steps": 3}, generator=torch.Generator().manual_seed(0),
             callback_on_step_end=stop)
    assert pipe._current_timestep is not None  # what the failed run left behind
    other = Cosmos2VideoToWorldPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        other(**{**CALL, "num_inference_steps": 2}, generator=torch.Generator().manual_seed(0))
    said = [str(w.message) for w in record if issubclass(w.category, StepScheduleWarning)]
    assert len(said) == 1 and "apply diffsparse to the pipeline that calls the transformer" in said[0], said
    with warnings.catch_warnings(), torch.no_grad():  # the applied pipeline's next run follows its schedule, unwarned
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        pipe(**{**CALL, "num_inference_steps": 2}, generator=torch.Generator().manual_seed(0))
    assert [(r.step, r.sparse) for r in diffsparse.stats(pipe).calls["transformer"] if r.layer == 0] == [
        (0, False), (0, False), (1, True), (1, True)
    ]


def steps_and_layouts(pipe, call):
    """`check_pipeline_against_dense` with the first step dense: `(step, sparse)` of layer 0's calls, and the
    `(layout, (batch, tokens))` the sparse calls ran on, next to the layout the output latents `(B, C, T, H, W)` give
    through the transformer's patch size (the layout every call should see)."""
    radial = diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1)
    stats, calls = check_pipeline_against_dense(pipe, call, sparse=radial)
    latents = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    grid = tuple(n // p for n, p in zip(latents.shape[2:], pipe.transformer.config.patch_size))
    expected = {(VideoLayout(*grid), (1, grid[0] * grid[1] * grid[2]))}
    steps = [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0]
    return steps, {(layout, shape) for _, layout, shape in calls}, expected


# Three steps, a cond and an uncond call each (batch 1 apiece); the first step dense.
GUIDED_STEPS = [(0, False), (0, False), (1, True), (1, True), (2, True), (2, True)]

QWEN_VOCABULARY = ["<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "system", "user", "a", "red",
                   "circle", "low", "quality"]
# Qwen2.5-VL's template reduced to what a text-only conversation uses: `_get_prompt_embeds` tokenizes the system and
# user messages through `apply_chat_template`, which refuses a tokenizer without one.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'][0]['text'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture(scope="module")
def predict25_pipe():
    base = tiny_wan_pipeline()  # its Wan VAE, which Cosmos 2.5 uses too
    tokenizer = qwen_tokenizer(QWEN_VOCABULARY)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    torch.manual_seed(0)
    text_encoder = tiny_qwen25_vl(QWEN_VOCABULARY)
    z_dim = base.vae.config.z_dim
    # The prompt embedding concatenates every language layer's normalized hidden states: 1 layer x 16.
    text_dim = text_encoder.config.text_config.num_hidden_layers * text_encoder.config.text_config.hidden_size
    pipe = Cosmos2_5_PredictBasePipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, vae=base.vae,
        transformer=tiny_transformer(z_dim + 1, z_dim, text_dim),  # + the condition mask
        # The released checkpoints' scheduler: flow sigmas in [0, 1], which the transformer gets as its timestep,
        # against 1000 sigma in `scheduler.timesteps`.
        scheduler=UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
                                          prediction_type="flow_prediction", sigma_max=200.0, sigma_min=0.01),
        safety_checker=NoSafetyChecker(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frame(seed):
    return Image.fromarray((np.random.default_rng(seed).random((64, 96, 3)) * 255).astype(np.uint8))


PREDICT25_CALL = {"prompt": "a red circle", "negative_prompt": "low quality", "height": 64, "width": 96,
                  "num_frames": 9, "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "latent",
                  "max_sequence_length": 16}


@pytest.mark.parametrize("condition", [{}, {"image": frame(0)}, {"video": [frame(i) for i in range(5)]}],
                         ids=["text-to-world", "image-to-world", "video-to-world"])
def test_predict25_pipeline_steps_follow_the_scheduler(predict25_pipe, condition):
    # The transformer gets sigma (its conditioning frames 1e-4), the scheduler's timesteps are 1000 sigma: matched
    # against them, every call would land on the last step and the first would not stay dense.
    steps, seen, expected = steps_and_layouts(predict25_pipe, {**PREDICT25_CALL, **condition})
    assert steps == GUIDED_STEPS
    assert seen == expected


@pytest.fixture(scope="module")
def text2world_pipe():
    base = tiny_wan_pipeline()  # its T5 text encoder and word tokenizer
    torch.manual_seed(0)
    # With latent output only its compression ratios are read; three blocks make its layers match them (8x in space,
    # 4x in time), so the pipeline's latent grid is the one this VAE would decode.
    vae = AutoencoderKLCosmos(
        latent_channels=4, encoder_block_out_channels=(8, 8, 8), decode_block_out_channels=(8, 8, 8),
        attention_resolutions=(), resolution=64, num_layers=1, temporal_compression_ratio=4, latents_mean=None,
        latents_std=None,
    ).eval()
    pipe = CosmosTextToWorldPipeline(
        text_encoder=base.text_encoder, tokenizer=base.tokenizer, vae=vae,
        transformer=tiny_transformer(4, 4, base.text_encoder.config.d_model),
        # Cosmos 1.0's EDM scheduler: its timesteps are 0.25 log(sigma), some negative.
        scheduler=EDMEulerScheduler(sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras", rho=7.0,
                                    prediction_type="epsilon", final_sigmas_type="sigma_min"),
        safety_checker=NoSafetyChecker(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text_to_world_pipeline_steps_follow_the_scheduler(text2world_pipe):
    # Cosmos 1.0 hands the transformer the scheduler's own timestep, so either clock gives these steps.
    call = {**PREDICT25_CALL, "prompt": "a red circle moving left", "negative_prompt": "low quality"}
    steps, seen, expected = steps_and_layouts(text2world_pipe, call)
    assert steps == GUIDED_STEPS
    assert seen == expected


def test_cosmos1_run_by_another_pipeline_follows_the_schedule_unwarned(text2world_pipe):
    # Cosmos 1.0 passes the scheduler's own timestep: another pipeline of its components is timed right, and the
    # warning for timesteps on another scale (Predict 2 and 2.5) would be false there.
    call = {**PREDICT25_CALL, "prompt": "a red circle moving left", "negative_prompt": "low quality"}
    other = CosmosTextToWorldPipeline(**text2world_pipe.components)
    other.set_progress_bar_config(disable=True)
    config = diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1)
    with diffsparse.sparse(text2world_pipe, config), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        other(**call, generator=torch.Generator().manual_seed(0))
        stats = diffsparse.stats(other)
    assert [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0] == GUIDED_STEPS


@pytest.mark.parametrize("condition", [{"image": frame(0)}, {"video": [frame(i) for i in range(5)]}],
                         ids=["image-to-world", "video-to-world"])
def test_cosmos1_video_to_world_pipeline_steps_follow_the_scheduler(text2world_pipe, condition):
    # Cosmos 1.0 video-to-world: the text-to-world fixture's parts, a transformer taking the condition mask as one more
    # channel (`condition_mask`, which the transformer concatenates itself); EDM's timesteps as is.
    components = {**text2world_pipe.components, "transformer": tiny_transformer(
        5, 4, text2world_pipe.text_encoder.config.d_model)}
    pipe = CosmosVideoToWorldPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    call = {**PREDICT25_CALL, "prompt": "a red circle moving left", **condition}
    steps, seen, expected = steps_and_layouts(pipe, call)
    assert steps == GUIDED_STEPS
    assert seen == expected


def test_cosmos2_text_to_image_pipeline_steps_follow_the_scheduler(pipe):
    # Cosmos Predict 2 text-to-image: the video-to-world fixture's parts, a transformer without the condition mask's
    # channel; its timestep `sigma / (sigma + 1)`, one per sample, against 1000 sigma in the scheduler's timesteps.
    z_dim = pipe.vae.config.z_dim
    t2i = Cosmos2TextToImagePipeline(
        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, vae=pipe.vae,
        transformer=tiny_transformer(z_dim, z_dim, pipe.text_encoder.config.d_model),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), safety_checker=NoSafetyChecker(),
    )
    t2i.set_progress_bar_config(disable=True)
    call = {key: value for key, value in CALL.items() if key not in ("image", "num_frames")}
    # The default sparse config (a window of one token): radial keeps the one frame whole.
    stats, calls = check_pipeline_against_dense(t2i, call)
    assert [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0] == GUIDED_STEPS
    # 64 x 96 pixels -> 8 x 12 latents -> 4 x 6 patches, one frame.
    assert {(layout, shape) for _, layout, shape in calls} == {(VideoLayout(1, 4, 6), (1, 24))}


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Cosmos", layer=1)


def test_anima_modular_pipeline_follows_the_step_schedule():
    # Anima (diffusers' modular image pipeline on the Cosmos Predict2 transformer) hands the transformer `t / 1000`;
    # the Cosmos adapter reads the step from the pipeline's timestep, here its guider's (`set_state` gets it each
    # step). Before, every call landed on the last step: `dense_steps` never held.
    import warnings

    from diffusers.models.condition_embedders.condition_embedder_anima import AnimaTextConditioner
    from diffusers.modular_pipelines.anima.modular_blocks_anima import AnimaCoreDenoiseStep

    from diffsparse.runtime import StepScheduleWarning

    torch.manual_seed(0)
    conditioner = AnimaTextConditioner(source_dim=8, target_dim=16, model_dim=16, num_layers=1, num_attention_heads=2,
                                       target_vocab_size=32, min_sequence_length=8).eval()
    pipe = AnimaCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=tiny_transformer(16, 16), text_conditioner=conditioner,
                           scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    prompts = {f"{prefix}qwen_prompt_embeds": torch.randn(1, n, 8, generator=g) for prefix, n in (("", 5), ("negative_", 3))}
    for prefix, n in (("", 5), ("negative_", 3)):
        prompts[f"{prefix}qwen_attention_mask"] = torch.ones(1, n, dtype=torch.long)
        prompts[f"{prefix}t5_input_ids"] = torch.randint(0, 32, (1, n + 1), generator=g)
        prompts[f"{prefix}t5_attention_mask"] = torch.ones(1, n + 1, dtype=torch.long)
    # 128 x 128 pixels -> 16 x 16 latents -> 8 x 8 patches; the guider's two branches, one call each.
    call = {**prompts, "height": 128, "width": 128, "num_inference_steps": 3, "output": "latents"}
    # A step schedule the adapter cannot follow warns: an error here, in every run.
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepScheduleWarning)
        stats, _ = check_modular_against_dense(pipe, call, block_size=16)
    assert_two_calls_per_step_first_dense(stats)
