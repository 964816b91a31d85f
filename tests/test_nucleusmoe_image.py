"""diffsparse on diffusers' NucleusMoE-Image (tiny, random weights, offline): the transformer called directly as its
pipeline calls it (the image's queries over `[image, text]` keys, the prompt's padding masked as keys), and a tiny
`NucleusMoEImagePipeline` (Qwen3-VL text encoder and processor built in memory) generating from padded prompts with
CFG."""

import math
import warnings

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    NucleusMoEImagePipeline,
    NucleusMoEImageTransformer2DModel,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import (
    QWEN_VISION_TOKENS,
    assert_two_calls_per_step_first_dense,
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_steps_of_a_scheduler_trained_on_other_timesteps,
    recorded_attention_calls,
    run_transformer,
    tiny_qwen3_vl,
)

GRID, TEXT_LEN, TEXT_DIM = (1, 8, 12), 6, 16
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
ONE_TOKEN_DENSE_STEPS = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=100)


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def tiny_transformer():
    # Five blocks: the pipeline's default strategy makes the fourth a mixture of experts (expert-choice routing).
    torch.manual_seed(0)
    model = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=5, attention_head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4), num_experts=4,
        moe_intermediate_dim=16, capacity_factors=1.0,
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


def with_shapes(img_shapes, valid=(6, 3)):
    """`inputs(valid)` with the transformer's `img_shapes` given as `img_shapes`."""
    return lambda: {**inputs(valid)(), "img_shapes": img_shapes}


@pytest.mark.parametrize("img_shapes, grid", [
    ((1, 8, 12), GRID),  # one shape for the batch
    ([[GRID], [GRID]], GRID),  # Qwen-Image's nested form, one image per sample
    ([[(1, 4, 12), (1, 4, 12)]] * 2, (2, 4, 12)),  # two images of one size in each sample's sequence: two frames
], ids=["tuple", "nested", "two images"])
def test_img_shapes_in_the_forms_diffusers_reads(transformer, img_shapes, grid):
    # `NucleusMoEEmbedRope` reads the first sample's entry, a shape or a list of the images of one sequence, the
    # images numbered as frames.
    calls = check_against_dense(transformer, with_shapes(img_shapes), block_size=16, sparse=ONE_TOKEN)
    assert {(layout, shape[0]) for _, layout, shape in calls} == {
        (VideoLayout(*grid, text_len=n, text_position="start"), 1) for n in (6, 3)
    }


@pytest.mark.parametrize("img_shapes", [[(1, 8, 10)] * 2, [[(1, 4, 12), (1, 4, 10)]] * 2],
                         ids=["one image", "two images"])
def test_img_shapes_not_the_call_s_tokens_are_refused(transformer, img_shapes):
    # diffusers fails on them too (RoPE of another length than the image tokens).
    refused = pytest.raises(ValueError, match="`img_shapes` .*do not match the 96 image tokens")
    with torch.no_grad(), diffsparse.sparse(transformer, ONE_TOKEN), refused:
        transformer(**with_shapes(img_shapes)())


@pytest.mark.parametrize("config, said", [(ONE_TOKEN, True), (ONE_TOKEN_DENSE_STEPS, False)],
                         ids=["sparse steps", "dense steps"])
def test_images_of_different_sizes_in_one_sequence_run_the_original_counted_dense(transformer, config, said):
    # diffusers runs them (each image on its own grid), and every one of them is queries: no one grid of the layout.
    # Two calls (two steps of a bare transformer): each layer's calls dense, said once where they would have run
    # sparse; the schedule's own dense steps are counted, not said.
    two_sizes = [[(1, 4, 12), (1, 2, 24)]] * 2
    calls = [{**with_shapes(two_sizes)(), "timestep": torch.tensor([t, t])} for t in (0.9, 0.5)]
    with torch.no_grad():
        reference = [transformer(**call).sample for call in calls]
        with warnings.catch_warnings(record=True) as record, diffsparse.sparse(transformer, config) as handle:
            warnings.simplefilter("always")
            outputs = [transformer(**call).sample for call in calls]
            stats = handle.stats()
    assert all(torch.equal(out, ref) for out, ref in zip(outputs, reference))
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(2, 0)] * 5
    messages = [str(w.message) for w in record if issubclass(w.category, diffsparse.DiffsparseWarning)]
    assert len(messages) == said and all("images of different sizes in one sequence" in m for m in messages)


def _mask_given_by_the_caller(kind):
    """A call without `encoder_hidden_states_mask` whose mask comes through `attention_kwargs` (the transformer hands
    it to every block as it is): the prompts' padding (6 and 3 valid tokens) as a boolean key mask of the model's
    `[image, text]` keys, broadcast over heads and queries, or as an additive float one, or a token-level one."""
    call = inputs((6, 3))()
    valid = call.pop("encoder_hidden_states_mask").bool()
    keys = torch.cat([torch.ones(2, math.prod(GRID), dtype=torch.bool), valid], dim=1)[:, None, None]
    mask = {"boolean keys": keys, "additive float": torch.zeros(keys.shape).masked_fill(~keys, float("-inf")),
            "token-level": keys.expand(-1, 1, math.prod(GRID), -1).clone()}[kind]
    return {**call, "attention_kwargs": {"attention_mask": mask}}


@pytest.mark.parametrize("kind", ["boolean keys", "additive float", "token-level"])
def test_a_mask_given_through_attention_kwargs_is_read_or_left_to_the_original(transformer, kind):
    # A boolean `(B, 1, 1, S)` key mask of the prompts' padding runs sparse over each prompt's valid keys; another
    # kind runs the original, counted dense. Before, the sparse path read any mask as a boolean `(B, S)` one: the
    # `(B, 1, 1, S)` one lost its text/image swap (0.03 off), a float one was inverted, a token-level one raised.
    call = _mask_given_by_the_caller(kind)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    with torch.no_grad():
        reference = transformer(**call).sample
        with warnings.catch_warnings(record=True) as record, diffsparse.sparse(transformer, every_block) as handle:
            warnings.simplefilter("always")
            out = transformer(**call).sample
            stats = handle.stats()
    read = kind == "boolean keys"
    assert torch.allclose(out, reference, atol=1e-4) and (read or torch.equal(out, reference))
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1) if read else (1, 0)] * 5
    said = [str(w.message) for w in record if "other than a boolean key mask" in str(w.message)]
    assert len(said) == (not read)


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


VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "system", "user", "assistant", "a", "red", "circle",
              "on", "dark", "blurry", *QWEN_VISION_TOKENS.values()]
# The pipeline's messages: a system prompt as plain text, the user's as a list of text parts.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
                 "{{ message['content'] }}{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
                 "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def nucleus_pipe():
    """A two-layer Qwen3-VL (the pipeline reads a hidden state before the last; `return_index=-1` in the calls), a
    4-channel VAE with 2x downsampling, the tiny transformer."""
    torch.manual_seed(0)
    text_encoder, processor = tiny_qwen3_vl(VOCABULARY, CHAT_TEMPLATE, layers=2)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = NucleusMoEImagePipeline(transformer=tiny_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(),
                                   vae=vae.eval(), text_encoder=text_encoder, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_pipeline_with_cfg_over_padded_prompts(nucleus_pipe, order):
    # Two prompts of different lengths padded to a multiple of 8 (the processor's `pad_to_multiple_of`), and their
    # empty negative prompts, each branch its own call; 32 x 48 pixels -> 16 x 24 latents -> 8 x 12 patches.
    call = {"prompt": ["a red circle on a dark", "blurry"], "height": 32, "width": 48, "num_inference_steps": 3,
            "guidance_scale": 4.0, "return_index": -1, "output_type": "pt"}
    stats, calls = check_pipeline_against_dense(nucleus_pipe, call, order=order)
    # `t / num_train_timesteps` read back lands on the scheduler's steps: each step's cond and uncond calls, the first
    # step dense.
    assert_two_calls_per_step_first_dense(stats)
    # Each prompt is attended over its own valid tokens, in the template: the two prompts of six words and one, and
    # the empty negative prompts (one length, no padding in their branch's call).
    lengths = sorted({layout.text_len for _, layout, _ in calls})
    assert {(layout.frames, layout.height, layout.width) for _, layout, _ in calls} == {GRID}
    assert len(lengths) == 3 and lengths[2] - lengths[1] == 5 and lengths[1] - lengths[0] == 1


def test_the_steps_of_a_scheduler_trained_on_other_timesteps(nucleus_pipe):
    call = {"prompt": ["a red circle on a dark"], "height": 32, "width": 48, "guidance_scale": 4.0,
            "return_index": -1, "output_type": "pt"}
    check_steps_of_a_scheduler_trained_on_other_timesteps(nucleus_pipe, call, steps=3)
