"""diffsparse on diffusers' NucleusMoE-Image transformer (tiny, random weights, offline, called directly as its
pipeline calls it): the image's queries over `[image, text]` keys, the prompt's padding masked as keys."""

import pytest
import torch
from diffusers import NucleusMoEImageTransformer2DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import check_against_dense, check_other_processors_are_refused, recorded_attention_calls, run_transformer

GRID, TEXT_LEN, TEXT_DIM = (1, 8, 12), 6, 16
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)


@pytest.fixture(scope="module")
def transformer():
    # Five blocks: the pipeline's default strategy makes the fourth a mixture of experts (expert-choice routing).
    torch.manual_seed(0)
    model = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, num_layers=5, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4), num_experts=4, moe_intermediate_dim=16, capacity_factors=1.0,
    ).eval()
    # diffusers leaves the experts' weights as `torch.empty` (whatever the memory held, NaN included): fill them.
    for name, weight in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            torch.nn.init.normal_(weight, std=0.2)
    return model


def inputs(valid=(TEXT_LEN, TEXT_LEN)):
    """Two images' packed latents (8 x 12 tokens each) and prompts of `valid` tokens, padded to `TEXT_LEN`."""
    def call():
        g = torch.Generator().manual_seed(1)
        mask = torch.arange(TEXT_LEN)[None] < torch.tensor(valid)[:, None]
        return {"hidden_states": torch.randn(2, 96, 16, generator=g), "img_shapes": [GRID] * 2,
                "encoder_hidden_states": torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g),
                "encoder_hidden_states_mask": mask, "timestep": torch.tensor([0.7, 0.7])}

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("valid", [(6, 6), (6, 3), (4, 4)])
def test_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(transformer, valid, order):
    # (Attending the padding fails every block kept with padded prompts; leaving out the RoPE or tiling the grouped
    # key heads fails it always.)
    check_against_dense(transformer, inputs(valid), block_size=16, order=order, sparse=ONE_TOKEN)


def test_each_prompt_is_attended_over_its_valid_tokens_behind_which_the_image_lies(transformer):
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs((6, 3)), ONE_TOKEN)
    assert {(layout, shape[0]) for _, layout, shape in calls} == {
        (VideoLayout(*GRID, text_len=n, text_position="start"), 1) for n in (6, 3)
    }


def test_the_first_image_gets_what_it_gets_alone(transformer):
    alone = {k: v[:1] for k, v in inputs((6, 3))().items()}  # tensors and the list of shapes alike
    with torch.no_grad(), diffsparse.sparse(transformer, ONE_TOKEN):
        together = transformer(**inputs((6, 3))()).sample[:1]
        torch.testing.assert_close(transformer(**alone).sample, together, atol=1e-5, rtol=0)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "NucleusMoE-Image", layer=1)


def test_diffusers_text_kv_cache_hands_every_block_its_cached_text_keys(transformer):
    # `enable_cache(TextKVCacheConfig())` projects each block's text keys and values once and passes them to the
    # processor (`cached_txt_key` / `cached_txt_value`); the sparse path attends them as given.
    from diffusers.hooks import TextKVCacheConfig

    reference = run_transformer(transformer, inputs((6, 3)))
    transformer.enable_cache(TextKVCacheConfig())
    try:
        cached = run_transformer(transformer, inputs((6, 3)))
        torch.testing.assert_close(cached, reference, atol=1e-6, rtol=0)
        every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
        torch.testing.assert_close(run_transformer(transformer, inputs((6, 3)), every_block), cached, atol=1e-4, rtol=0)
        assert not torch.allclose(run_transformer(transformer, inputs((6, 3)), ONE_TOKEN), cached, atol=1e-4)
    finally:
        transformer.disable_cache()
