"""diffsparse on diffusers' Bria FIBO 2 transformer (tiny, random weights, offline, called directly as its pipeline
calls it): the noise refiner over the image and its context images, the main blocks over them and the gist."""

import pytest
import torch
from diffusers import BriaFibo2Transformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls, run_transformer

TEXT_LEN, TEXT_DIM = 10, 8
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    # Gist counts 2 to 6, one per valid text token above 2: prompts of 10 and 4 tokens get 6 and 3 gist tokens.
    torch.manual_seed(0)
    return BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=16, n_layers=3, n_refiner_layers=1, n_heads=2, cap_feat_dim=TEXT_DIM,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=2, max_num_gist_tokens=6, gist_step=1,
        gist_min_text_len=2, gist_max_text_len=6 + 4, axes_dims=(2, 2, 4), axes_lens=(64, 32, 32),
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
