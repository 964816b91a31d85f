"""diffsparse on diffusers Wan 2.2 Animate (tiny, random weights): the transformer called directly (Wan's
self-attention with its own copy of the processor class; the face adapters' cross-attention untouched), and a real
`WanAnimatePipeline` (the embedded Wan pipeline's T5 encoder, word tokenizer and Wan VAE, a tiny CLIP image encoder)
animating a reference image with random pose and face videos, in "animate" and "replace" modes, over two segments
that each run their own denoising loop on the same layout: the reference image's latent frame in front of the
segment's pose frames."""

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel
from PIL import Image

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline
from diffsparse.runtime import SparseRuntime

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    tiny_clip_image_encoder,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
FRAMES = 20  # pose frames; the reference image's latent is one more frame in front


def tiny_transformer(latent_channels: int = 4, text_dim: int = 16) -> WanAnimateTransformer3DModel:
    # The shapes diffusers' own tests use; the input holds the noise, the reference/previous-segment latents and
    # their 4 mask channels.
    torch.manual_seed(0)
    return WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=2 * latent_channels + 4,
        latent_channels=latent_channels, out_channels=latent_channels, text_dim=text_dim, freq_dim=256, ffn_dim=32,
        num_layers=2, image_dim=16, rope_max_seq_len=32, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=2,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    # At 8 x 8 latents: 21 frames x 4 x 4 tokens = 336.
    return tiny_transformer()


def inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 12, FRAMES + 1, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 12, 16, generator=g),
        "encoder_hidden_states_image": torch.randn(1, 12, 16, generator=g),
        "pose_hidden_states": torch.randn(1, 4, FRAMES, 8, 8, generator=g),
        "face_pixel_values": torch.randn(1, 3, 77, 16, 16, generator=g),  # one 77-frame segment of face crops
    }


def run(model, config=None):
    with torch.no_grad():
        if config is None:
            return model(**inputs()).sample
        with diffsparse.sparse(model, config) as handle:
            return model(**inputs()).sample, handle.stats()


def test_dense_pattern_is_the_unmodified_model_and_the_face_adapters_are_untouched(transformer):
    originals = [b.attn1.processor for b in transformer.blocks]
    face = [adapter.processor for adapter in transformer.face_adapter]
    reference = run(transformer)
    out, stats = run(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0))
    assert torch.equal(out, reference) and [s.layer for s in stats.layers] == [0, 1]
    assert [b.attn1.processor for b in transformer.blocks] == originals
    assert [adapter.processor for adapter in transformer.face_adapter] == face


@pytest.mark.parametrize("order", [None, TileOrder((2, 2, 2))])
def test_every_block_kept_matches_dense(transformer, order):
    radial = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)
    calls = check_against_dense(transformer, inputs, block_size=16, order=order, sparse=radial)
    assert sorted(layer for layer, _, _ in calls) == [0, 1]  # one sparse call per layer
    _, stats = run(transformer, radial)
    assert stats.mean_density < 0.5


def test_layout_of_a_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs())
    assert layout == VideoLayout(FRAMES + 1, 4, 4) and int(timestep) == 500


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Wan Animate", layer=1)


# -- the real pipeline ------------------------------------------------------------------------------------------------

HEIGHT, WIDTH = 64, 96  # 8 x 12 latents, 4 x 6 tokens a frame
SEGMENT = 9  # frames a segment generates; its first is the previous segment's last, so 8 are new
# 13 pose frames: the pipeline pads them (reflected) to the 17 of two whole segments and cuts the video back to 13.
POSE_FRAMES = 13
SEGMENTS = 2
STEPS = 3
BRANCHES = ("cond", "uncond")  # CFG: two transformer calls per step, the uncond one with a blank face


@pytest.fixture(scope="module")
def pipe():
    base = tiny_wan_pipeline()
    torch.manual_seed(3)
    image_encoder, image_processor = tiny_clip_image_encoder()
    pipe = WanAnimatePipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
        transformer=tiny_transformer(base.vae.config.z_dim, base.text_encoder.config.d_model),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        image_encoder=image_encoder, image_processor=image_processor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_frames(count: int, height: int, width: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)) for _ in range(count)]


def animate_call(pipe, mode: str) -> dict:
    face_size = pipe.transformer.config.motion_encoder_size
    call = {
        "image": random_frames(1, HEIGHT, WIDTH, seed=0)[0],
        "pose_video": random_frames(POSE_FRAMES, HEIGHT, WIDTH, seed=1),
        "face_video": random_frames(POSE_FRAMES, face_size, face_size, seed=2),
        "mode": mode, "prompt": "a red circle moving left", "negative_prompt": "low quality", "height": HEIGHT,
        "width": WIDTH, "segment_frame_length": SEGMENT, "num_inference_steps": STEPS, "guidance_scale": 5.0,
        # Not "latent": that returns the last segment's latents only, and every segment is decoded anyway (the
        # next one starts from its last frame), so the decoded video checks all segments at no extra cost.
        "output_type": "pt", "max_sequence_length": 16,
    }
    if mode == "replace":
        call["background_video"] = random_frames(POSE_FRAMES, HEIGHT, WIDTH, seed=3)
        call["mask_video"] = random_frames(POSE_FRAMES, HEIGHT, WIDTH, seed=4)
    return call


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_pipeline_segments(pipe, mode, monkeypatch):
    # Each segment sets the scheduler's timesteps again, which the step clock takes for a new pipeline call: the
    # runtime's log restarts. The logs it drops are kept here, with the runtime that kept them.
    finished = []
    new_run = SparseRuntime.new_run

    def keep_log(self):
        finished.append((self, list(self.records)))
        new_run(self)

    monkeypatch.setattr(SparseRuntime, "new_run", keep_log)
    shapes = set()

    def note_shapes(module, args, kwargs):
        shapes.add((kwargs["hidden_states"].shape[2:], kwargs["pose_hidden_states"].shape[2]))

    hook = pipe.transformer.register_forward_pre_hook(note_shapes, with_kwargs=True)
    try:
        stats, calls = check_pipeline_against_dense(pipe, animate_call(pipe, mode))
    finally:
        hook.remove()

    # Every call of every segment: the reference image's latent frame, then the segment's pose frames, one grid.
    [((frames, height, width), pose_frames)] = shapes
    assert pose_frames == frames - 1
    layout = VideoLayout(frames, height // 2, width // 2)
    assert {(lay, shape) for _, lay, shape in calls} == {(layout, (1, layout.num_tokens))}

    # Each segment is a whole denoising loop from noise: step 0 dense again, then sparse, cond and uncond per step.
    sparse_run = finished[-1][0]  # the helper's last run is its sparse one
    logs = [log for runtime, log in finished if runtime is sparse_run][1:] + [stats.calls["transformer"]]
    expected = [(step, branch, layer, step >= 1) for step in range(STEPS) for branch in BRANCHES for layer in (0, 1)]
    assert len(logs) == SEGMENTS
    assert all([(r.step, r.branch, r.layer, r.sparse) for r in log] == expected for log in logs)
    assert len(calls) == SEGMENTS * sum(sparse for *_, sparse in expected)
