"""diffsparse on a diffusers HunyuanVideo Framepack transformer (tiny, random weights, called directly):
HunyuanVideo's blocks over `[history, video, image, text]`, the history (4x, 2x, 1x patchified) attended with the
text span through the adapter's token order."""

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls, run_transformer

LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0)
TEXT_LEN, IMAGE_TOKENS = 12, 5


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=8, has_clean_x_embedder=True,
    ).eval()


def inputs(valid_text=(7,)):
    """3 latent frames of 8 x 12 (3 x 4 x 6 = 72 video tokens); prompts with `valid_text` real tokens of TEXT_LEN
    and a 5-token image embedding; the history (the transformer needs all three terms): 2 clean frames (2 x 4 x 6 =
    48 tokens), 2 frames at 2x (1 x 2 x 3 = 6) and 4 at 4x (1 x 1 x 2 = 2, padded up): 56 tokens."""
    def call():
        g = torch.Generator().manual_seed(1)
        batch = len(valid_text)
        kwargs = {
            "hidden_states": torch.randn(batch, 4, 3, 8, 12, generator=g), "timestep": torch.full((batch,), 900.0),
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
            "encoder_attention_mask": (torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None]).long(),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "image_embeds": torch.randn(batch, IMAGE_TOKENS, 8, generator=g),
            "indices_latents": torch.arange(9, 12), "guidance": torch.full((batch,), 6000.0),
        }
        for name, frames, first in (("latents_clean", 2, 7), ("latents_history_2x", 2, 4), ("latents_history_4x", 4, 0)):
            kwargs[name] = torch.randn(batch, 4, frames, 8, 12, generator=g)
            kwargs[f"indices_{name}"] = torch.arange(first, first + frames)
        return kwargs

    return call


@pytest.mark.parametrize("valid_text", [(7,), (7, 12)], ids=["one video", "two prompt lengths"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, valid_text, order):
    check_against_dense(transformer, inputs(valid_text), block_size=16, order=order, sparse=LOCAL)



def test_history_joins_the_text_span_through_the_token_order(transformer):
    # One video: the transformer cuts the prompt padding itself, so the span is 56 history + 5 image + 7 text.
    layout, _, token_order = adapter_for(transformer).read_call(transformer, (), inputs()())
    assert layout == VideoLayout(3, 4, 6, text_len=56 + IMAGE_TOKENS + 7, text_position="end")
    assert token_order.tolist() == [*range(72, 72 + 56), *range(72), *range(72 + 56, 72 + 56 + 12)]
    # A window pattern on the grid leaves the history whole: the tokens it attends are the same as those of a
    # model whose history came after the video, so the window must act on the video tokens, not on the history.
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(), LOCAL)
    assert {(shape, lay) for _, lay, shape in calls} == {((1, 72 + 56 + 12), layout)}
    # Two prompt lengths: each video over its valid prefix, cut in the layout's order.
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs((7, 12)), LOCAL)
    assert {lay.text_len for _, lay, _ in calls} == {56 + IMAGE_TOKENS + 7, 56 + IMAGE_TOKENS + 12}


def test_a_video_gets_in_a_padded_batch_what_it_gets_alone(transformer):
    # Alone, the transformer cuts the padding and the runtime reorders the whole call; in a batch with a longer
    # prompt, the video's valid prefix is cut in the layout's order. The same tokens at the same places either way.
    def first_alone():
        return {name: x if name.startswith("indices_") else x[:1] for name, x in inputs((7, 12))().items()}

    alone = run_transformer(transformer, first_alone, LOCAL)
    batched = run_transformer(transformer, inputs((7, 12)), LOCAL)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "HunyuanVideo Framepack", layer=1)
