"""diffsparse on a diffusers Motif-Video transformer (tiny, random weights, called directly): HunyuanVideo-style
joint [video, image, text] blocks with padded prompts, text cross-attention, and decoder blocks whose video attends
the encoder's video tokens in place of the text."""

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls, run_transformer

LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0)
TEXT_LEN, IMAGE_TOKENS, VIDEO = 12, 4, 72


@pytest.fixture(scope="module")
def transformer():
    # One dual-stream block, two single-stream ones of which the last is a decoder block.
    torch.manual_seed(0)
    return MotifVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_decoder_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
    ).eval()


def inputs(valid_text=(7, TEXT_LEN)):
    """3 latent frames of 8 x 12 (3 x 4 x 6 = 72 video tokens), a 4-token image embedding, prompts with
    `valid_text` real tokens of TEXT_LEN."""
    def call():
        g = torch.Generator().manual_seed(1)
        batch = len(valid_text)
        return {"hidden_states": torch.randn(batch, 4, 3, 8, 12, generator=g), "timestep": torch.full((batch,), 900.0),
                "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
                "encoder_attention_mask": (torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None]).long(),
                "image_embeds": torch.randn(batch, IMAGE_TOKENS, 8, generator=g)}

    return call


@pytest.mark.parametrize("valid_text", [(TEXT_LEN,), (7, TEXT_LEN)], ids=["one prompt", "two prompt lengths"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, valid_text, order):
    check_against_dense(transformer, inputs(valid_text), block_size=16, order=order, sparse=LOCAL)



def test_encoder_blocks_attend_the_text_and_the_decoder_block_the_encoders_video(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs()())
    text = VideoLayout(3, 4, 6, text_len=IMAGE_TOKENS + TEXT_LEN, text_position="end")
    assert layout == text
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs((TEXT_LEN,)), LOCAL)
    decoder = VideoLayout(3, 4, 6, text_len=VIDEO, text_position="end")
    assert [(layer, lay, shape) for layer, lay, shape in calls] == [
        (0, text, (1, VIDEO + IMAGE_TOKENS + TEXT_LEN)), (1, text, (1, VIDEO + IMAGE_TOKENS + TEXT_LEN)),
        (2, decoder, (1, 2 * VIDEO)),
    ]


def test_a_video_gets_in_a_padded_batch_what_it_gets_alone(transformer):
    alone = run_transformer(transformer, lambda: {name: x[:1] for name, x in inputs()().items()}, LOCAL)
    torch.testing.assert_close(run_transformer(transformer, inputs(), LOCAL)[:1], alone, atol=1e-5, rtol=0)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Motif-Video", layer=1)
