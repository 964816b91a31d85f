"""diffsparse on a diffusers Wan VACE pipeline (tiny, random weights, offline): the main blocks and the control
blocks, whose tokens come from the control video on the same grid; a reference image prepends a latent frame."""

import numpy as np
import pytest
import torch
from diffusers import WanVACEPipeline, WanVACETransformer3DModel
from PIL import Image

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    first_transformer_call,
    recorded_attention_calls,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
FRAMES, HEIGHT, WIDTH = 9, 64, 96


@pytest.fixture(scope="module")
def vace_pipe():
    components = tiny_wan_pipeline().components
    config = tiny_wan_config()["transformer"]
    torch.manual_seed(0)
    # Control input: inactive and reactive latents (2 x 16 channels) and the mask folded to 8 x 8 = 64 channels.
    transformer = WanVACETransformer3DModel(**config, vace_layers=[0, 1], vace_in_channels=2 * 16 + 64)
    pipe = WanVACEPipeline(
        tokenizer=components["tokenizer"], text_encoder=components["text_encoder"], vae=components["vae"],
        scheduler=components["scheduler"], transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(HEIGHT, WIDTH, 3) * 255).astype("uint8"))


def vace_call(reference_image: bool = True) -> dict:
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "num_frames": FRAMES,
            "height": HEIGHT, "width": WIDTH, "video": [_image(i) for i in range(FRAMES)], "num_inference_steps": 3,
            "guidance_scale": 5.0, "output_type": "pt"}
    if reference_image:
        call["reference_images"] = [_image(99)]
    return call


def generate(pipe, reference_image: bool = True):
    with torch.no_grad():
        return pipe(**vace_call(reference_image), generator=torch.Generator().manual_seed(0)).frames


def test_dense_pattern_is_the_unmodified_pipeline_and_layers_number_main_blocks_first(vace_pipe):
    transformer = vace_pipe.transformer
    modules = dict(adapter_for(transformer).self_attention_modules(transformer))
    # The main blocks keep Wan's numbering (dense_layers means the same blocks); the control blocks follow.
    assert [modules[i] for i in range(4)] == [b.attn1 for b in (*transformer.blocks, *transformer.vace_blocks)]
    reference = generate(vace_pipe)
    with diffsparse.sparse(vace_pipe, diffsparse.SparseConfig(pattern="dense")) as handle:
        assert torch.equal(generate(vace_pipe), reference)
        assert [(s.layer, s.dense_calls) for s in handle.stats().layers] == [(i, 3 * 2) for i in range(4)]
    assert all(m.processor.__class__.__name__ == "WanAttnProcessor" for m in modules.values())


@pytest.mark.parametrize("reference_image", [True, False])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense_on_main_and_control_blocks(vace_pipe, reference_image, order):
    reference = generate(vace_pipe, reference_image)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    with diffsparse.sparse(vace_pipe, config) as handle, recorded_attention_calls() as calls:
        out = generate(vace_pipe, reference_image)
        assert all(s.sparse_calls == 3 * 2 and s.dense_calls == 0 for s in handle.stats().layers)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    # 9 frames -> 3 latent frames (+1 for the reference image's latent), 64 x 96 -> 8 x 12 latents -> 4 x 6 tokens.
    assert {layout for _, layout, _ in calls} == {VideoLayout(3 + reference_image, 4, 6)}


@pytest.mark.parametrize("reference_image", [True, False])
def test_a_direct_transformer_call_the_pipelines_way(vace_pipe, reference_image):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(vace_pipe, vace_call(reference_image))
    check_against_dense(vace_pipe.transformer, lambda: inputs, block_size=8)


def test_sparse_calls_change_the_video(vace_pipe):
    reference = generate(vace_pipe)
    config = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=8, dense_steps=1)
    with diffsparse.sparse(vace_pipe, config) as handle:
        out = generate(vace_pipe)
        assert all(s.sparse_calls == 2 * 2 and s.mean_density < 1 for s in handle.stats().layers)
    assert not torch.allclose(out, reference, atol=1e-4)


def test_other_processors_are_refused(vace_pipe):
    check_other_processors_are_refused(vace_pipe, "Wan VACE", layer=3)
