"""diffsparse on diffusers' Bria FIBO 2 (tiny, random weights, offline): the transformer called directly as its
pipeline calls it (the noise refiner over the image and its context images, the main blocks over them and the gist),
and a tiny `BriaFibo2Pipeline` (Qwen3-VL text encoder and processor built in memory) generating with CFG and
editing one image of the output's size or two of other sizes."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import BriaFibo2Pipeline, BriaFibo2Transformer2DModel, FlowMatchEulerDiscreteScheduler

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import (
    QWEN_VISION_TOKENS,
    assert_two_calls_per_step_first_dense,
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
    run_transformer,
    tiny_flux2_vae,
    tiny_qwen3_vl,
)

TEXT_LEN, TEXT_DIM = 10, 8
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def tiny_transformer(in_channels=4, text_dim=TEXT_DIM, min_text_len=2):
    # Gist counts 2 to 6, one per valid text token above `min_text_len`: prompts of 10 and 4 tokens get 6 and 3 gist
    # tokens (with the default).
    torch.manual_seed(0)
    return BriaFibo2Transformer2DModel(
        in_channels=in_channels, patch_size=2, dim=16, n_layers=3, n_refiner_layers=1, n_heads=2, cap_feat_dim=text_dim,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=2, max_num_gist_tokens=6, gist_step=1,
        gist_min_text_len=min_text_len, gist_max_text_len=min_text_len + 8, axes_dims=(2, 2, 4), axes_lens=(64, 32, 32),
    ).eval()


def inputs(valid=(TEXT_LEN,), context=None):
    """A call on 16 x 24 latents (8 x 12 tokens) per prompt of `valid` tokens (masked when they differ);
    `context`: the latent size of one image to edit."""
    def call():
        g = torch.Generator().manual_seed(1)
        batch = len(valid)
        kwargs = {"hidden_states": torch.randn(batch, 4, 16, 24, generator=g), "timestep": torch.full((batch,), 0.7),
                  "encoder_hidden_states": torch.randn(batch, 2, TEXT_LEN, TEXT_DIM, generator=g)}
        if len(set(valid)) > 1:
            kwargs["encoder_attention_mask"] = torch.arange(TEXT_LEN)[None] < torch.tensor(valid)[:, None]
        if context is not None:
            kwargs["context_latents"] = [torch.randn(batch, 4, *context, generator=g)]
        return kwargs

    return call


# (valid prompt lengths, context size): the layouts of the refiner and the main blocks.
CASES = {
    "text to image": ((TEXT_LEN,), None, {VideoLayout(1, 8, 12), VideoLayout(1, 8, 12, text_len=6, text_position="start")}),
    "padded gist": ((10, 4), None, {VideoLayout(1, 8, 12, text_position="end"),
                                    *(VideoLayout(1, 8, 12, text_len=n, text_position="end") for n in (6, 3))}),
    "edit, same size": ((TEXT_LEN,), (16, 24), {VideoLayout(2, 8, 12), VideoLayout(2, 8, 12, text_len=6, text_position="start")}),
    "edit, other size": ((TEXT_LEN,), (16, 16), {VideoLayout(1, 8, 12, text_len=64, text_position="end"),
                                                 VideoLayout(1, 8, 12, text_len=6 + 64, text_position="start")}),
    "edit, other size, padded gist": ((10, 4), (16, 16), {
        VideoLayout(1, 8, 12, text_len=64, text_position="end"),
        *(VideoLayout(1, 8, 12, text_len=64 + n, text_position="end") for n in (6, 3)),
    }),
}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("case", CASES)
def test_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(transformer, case, order):
    # (Without the RoPE every case fails; attending the gist padding fails the padded ones.)
    valid, context, _ = CASES[case]
    check_against_dense(transformer, inputs(valid, context), block_size=16, order=order, sparse=ONE_TOKEN)


@pytest.mark.parametrize("case", CASES)
def test_the_layouts_of_the_refiner_and_the_main_blocks(transformer, case):
    valid, context, layouts = CASES[case]
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(valid, context), ONE_TOKEN)
    assert {layout for _, layout, _ in calls} == layouts


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "Bria FIBO 2", layer=1)


def test_contexts_of_another_size_are_attended_after_the_gist_through_the_token_order(transformer):
    # The main blocks hold `[gist, image, context]`; the layout wants its span first: `[gist, context, image]`.
    from diffsparse.pipelines import adapter_for

    layout, _, order = adapter_for(transformer).read_call(transformer, (), inputs(context=(16, 16))())
    assert layout == VideoLayout(1, 8, 12, text_len=6 + 64, text_position="start")
    assert order.tolist() == [*range(6), *range(6 + 64, 6 + 64 + 96), *range(6, 6 + 64)]


VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "a", "red", "circle", "on",
              "dark", "make", "it", "blue", *QWEN_VISION_TOKENS.values()]


@pytest.fixture(scope="module")
def fibo2_pipe():
    """A two-layer Qwen3-VL whose hidden states 0-2 make the transformer's two text inputs (the pipeline's six
    bundles of three of a 36-layer model's, cut to the tiny model's), the three-block FLUX.2 VAE (x4, 2 latent
    channels), the tiny transformer (gist counts from prompts of 8 tokens, the template's, and more); sizes for
    several images to edit around 64 x 64 pixels (the default sample size shrunk)."""
    torch.manual_seed(0)
    text_encoder, processor = tiny_qwen3_vl(VOCABULARY, chat_template=None, layers=2)
    pipe = BriaFibo2Pipeline(transformer=tiny_transformer(in_channels=2, text_dim=3 * 16, min_text_len=8), vae=tiny_flux2_vae(),
                             scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, processor=processor)
    pipe.text_encoder_out_layers = ((1, 2, 2), (2, 1, 0))
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(height, width, seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# 64 x 96 pixels -> 16 x 24 latents (x4) -> 8 x 12 tokens (patch 2).
PIPELINE_CASES = {
    "text to image, two prompts (padded gist)": {"prompt": ["a red circle on a dark", "a circle"]},
    "edit, one image of the output's size": {"prompt": "make it blue", "image": [picture(64, 96, 0)]},
    "edit, two images of other sizes": {"prompt": "make it blue", "image": [picture(64, 64, 0), picture(48, 80, 1)]},
}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_with_cfg(fibo2_pipe, case, order):
    call = {**PIPELINE_CASES[case], "height": 64, "width": 96, "num_inference_steps": 3, "guidance_scale": 4.0,
            "output_type": "pt"}
    stats, calls = check_pipeline_against_dense(fibo2_pipe, call, order=order)
    # `t / 1000` lands on the scheduler's steps: each step's cond and uncond calls, the first step dense.
    assert_two_calls_per_step_first_dense(stats)
    layouts = {(layout.frames, layout.height, layout.width, layout.text_len, layout.text_position)
               for _, layout, _ in calls}
    # The refiner's `[image, contexts]` (no span without contexts of another size), then the main blocks' gist.
    if "two prompts" in case:
        # Prompts of 14 and 10 tokens in the template get 5 and 3 gist tokens: `[image, gist]`, each over its own;
        # the negative prompts (the pipeline's JSON one, twice: 6 gist tokens, unpadded) `[gist, image]`.
        assert layouts == {(1, 8, 12, 0, "end"), (1, 8, 12, 5, "end"), (1, 8, 12, 3, "end"), (1, 8, 12, 6, "start")}
    elif "output's size" in case:  # the image to edit is a second frame (the negative pass edits it too)
        assert layouts == {(2, 8, 12, 0, "end"), (2, 8, 12, 6, "start")}
    else:  # both images join the span: 8 x 8 and 6 x 10 tokens (their sizes near 64 x 64 pixels)
        assert layouts == {(1, 8, 12, 124, "end"), (1, 8, 12, 6 + 124, "start")}
