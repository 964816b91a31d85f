"""diffsparse on diffusers' JoyImage Edit and Edit Plus (tiny, random weights, offline): the transformers called
directly as their pipelines call them (`[image, text]` joint attention, an edit's references as further frames after
the target; Edit Plus: or, of another size, in the trailing span), and both pipelines (Qwen3-VL text encoder and
processor built in memory, a tiny Wan VAE) generating from text and editing with CFG."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    JoyImageEditPipeline,
    JoyImageEditPlusPipeline,
    JoyImageEditPlusTransformer3DModel,
    JoyImageEditTransformer3DModel,
)
from diffusers.pipelines.joyimage import image_processor as joyimage_image_processor

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
    tiny_qwen3_vl,
)

TEXT_LEN, TEXT_DIM = 5, 8
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)


def tiny_transformer(rope_type: str = "rope", layers: int = 2, text_dim: int = TEXT_DIM):
    torch.manual_seed(0)
    return JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=16, num_attention_heads=2, text_dim=text_dim,
        num_layers=layers, rope_dim_list=[2, 2, 4], rope_type=rope_type,
    ).eval()


@pytest.fixture(scope="module", params=["rope", "mrope"])  # "mrope": RoPE on the text too
def transformer(request):
    return tiny_transformer(request.param)


def inputs(items: int = 0):
    """A call on one 16 x 24 latent image (8 x 12 tokens); `items`: an edit's `(B, n, C, T, H, W)` latents instead,
    `items - 1` references then the target, as the pipeline passes them."""
    def call():
        g = torch.Generator().manual_seed(1)
        shape = (1, items, 4, 1, 16, 24) if items else (1, 4, 1, 16, 24)
        return {"hidden_states": torch.randn(*shape, generator=g), "timestep": torch.tensor([700.0]),
                "encoder_hidden_states": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)}

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("items", [0, 3])
def test_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(transformer, items, order):
    # (Without the image RoPE every case fails.)
    check_against_dense(transformer, inputs(items), block_size=16, order=order, sparse=ONE_TOKEN)


@pytest.mark.parametrize(("items", "frames"), [(0, 1), (3, 3)])
def test_the_layout_is_the_image_then_the_text_an_edit_s_items_as_frames(transformer, items, frames):
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(items), ONE_TOKEN)
    assert {layout for _, layout, _ in calls} == {VideoLayout(frames, 8, 12, text_len=TEXT_LEN, text_position="end")}


def test_each_item_of_an_edit_is_a_frame():
    # Under a one-frame window the target attends itself and the prompt only, so with one block (after it the prompt
    # carries what it read of the references) its prediction does not depend on the references.
    transformer = tiny_transformer(layers=1)
    one_frame = diffsparse.SparseConfig(pattern=Window3D(window=(1, 99, 99)), block_size=16, dense_steps=0)
    call = inputs(3)()
    other = {**call, "hidden_states": call["hidden_states"].clone()}
    other["hidden_states"][:, :2] = torch.randn_like(call["hidden_states"][:, :2])
    with torch.no_grad(), diffsparse.sparse(transformer, one_frame):
        target, target_with_other_references = (transformer(**c).sample[:, -1] for c in (call, other))
    torch.testing.assert_close(target, target_with_other_references, atol=1e-5, rtol=0)
    dense_target, dense_other = (run_transformer(transformer, lambda c=c: c)[:, -1] for c in (call, other))
    assert not torch.allclose(dense_target, dense_other, atol=1e-4)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "JoyImage", layer=1)


# JoyImage Edit Plus: rows of patches as its pipeline builds them, `[target, references, padding, text]`.
TARGET = (1, 8, 12)


@pytest.fixture(scope="module")
def plus_transformer():
    return tiny_plus_transformer()


def tiny_plus_transformer(text_dim: int = TEXT_DIM):
    torch.manual_seed(0)
    return JoyImageEditPlusTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=16, num_attention_heads=2, text_dim=text_dim, num_layers=2,
        rope_dim_list=[2, 2, 4],
    ).eval()


def plus_inputs(references=(), valid=(TEXT_LEN, TEXT_LEN)):
    """Two rows (CFG's prompt and negative prompt, `valid` text tokens each) of a 16 x 24 latent target (8 x 12
    patches) and `references` of the given patch grids, one spare padding patch at the end of each row."""
    def call():
        g = torch.Generator().manual_seed(1)
        shapes = [TARGET, *references]
        patches = sum(math.prod(shape) for shape in shapes) + 1
        return {"hidden_states": torch.randn(2, patches, 4, 1, 2, 2, generator=g),
                "timestep": torch.tensor([700.0] * 2),
                "encoder_hidden_states": torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g),
                "encoder_hidden_states_mask": torch.arange(TEXT_LEN)[None] < torch.tensor(valid)[:, None],
                "shape_list": [shapes, shapes]}

    return call


PLUS_CASES = {
    "no reference": ((), VideoLayout(*TARGET, text_len=1 + TEXT_LEN, text_position="end")),
    "a reference of the target's size": ((TARGET,), VideoLayout(2, 8, 12, text_len=1 + TEXT_LEN, text_position="end")),
    "a reference of another size": (((1, 4, 6),),
                                    VideoLayout(*TARGET, text_len=24 + 1 + TEXT_LEN, text_position="end")),
    # Frames only where every reference is of the target's size: one of another size puts them all after the target.
    "references of both sizes": ((TARGET, (1, 4, 6)),
                                 VideoLayout(*TARGET, text_len=96 + 24 + 1 + TEXT_LEN, text_position="end")),
}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("case", PLUS_CASES)
def test_edit_plus_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(plus_transformer, case,
                                                                                              order):
    # The padding patch's output, which the pipeline never reads, stays zero on the sparse path: compared without it.
    # (Attending the masked padding, or leaving out the RoPE, fails every block kept.)
    references, _ = PLUS_CASES[case]
    inputs = plus_inputs(references, valid=(5, 2))
    reference = run_transformer(plus_transformer, inputs)
    dense = diffsparse.SparseConfig(pattern="dense", dense_steps=0)
    assert torch.equal(run_transformer(plus_transformer, inputs, dense), reference)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0,
                                          order=order)
    torch.testing.assert_close(run_transformer(plus_transformer, inputs, every_block)[:, :-1], reference[:, :-1],
                               atol=1e-4, rtol=0)
    assert not torch.allclose(run_transformer(plus_transformer, inputs, ONE_TOKEN)[:, :-1], reference[:, :-1],
                              atol=1e-4)


@pytest.mark.parametrize("case", PLUS_CASES)
def test_edit_plus_layouts_and_one_call_per_row_mask(plus_transformer, case):
    references, layout = PLUS_CASES[case]
    with recorded_attention_calls() as calls:
        run_transformer(plus_transformer, plus_inputs(references, valid=(5, 2)), ONE_TOKEN)
    # Each row without its padding patch and its prompt's padding: the span cut to its valid text.
    spans = {layout.text_len - 1 - TEXT_LEN + n for n in (5, 2)}
    assert {(call.grid, call.text_len) for _, call, _ in calls} == {(layout.grid, n) for n in spans}


def test_edit_plus_refuses_a_batch_of_different_sizes(plus_transformer):
    call = plus_inputs(((1, 4, 6),))()
    call["shape_list"] = [[TARGET, (1, 4, 6)], [TARGET, (1, 6, 4)]]
    with pytest.raises(ValueError, match="every sample needs the same target and reference sizes"), torch.no_grad(), \
            diffsparse.sparse(plus_transformer, ONE_TOKEN):
        plus_transformer(**call)


def test_edit_plus_other_processors_are_refused(plus_transformer):
    check_other_processors_are_refused(plus_transformer, "JoyImage Edit Plus", layer=1)


# The pipelines: a one-layer Qwen3-VL, a Wan VAE (x8, 4 latent channels), the tiny transformers (text 16 wide).
VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "system", "user", "assistant", "make", "it", "blue",
              "a", "red", "circle", *QWEN_VISION_TOKENS.values()]
# Sizes are snapped to a table of buckets for a base size (diffusers holds 1024's: sides of 512-2048 pixels); the
# tests add one for 128 (128 x 192 pixels -> 16 x 24 latents -> 8 x 12 patches).
BUCKETS = {128: [(128, 128), (96, 192), (128, 192)]}


@pytest.fixture(scope="module")
def text_path():
    torch.manual_seed(0)
    return tiny_qwen3_vl(VOCABULARY, chat_template=None)


@pytest.fixture(scope="module")
def small_buckets():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(joyimage_image_processor, "BUCKETS", {**joyimage_image_processor.BUCKETS, **BUCKETS})
        yield joyimage_image_processor.JoyImageEditImageProcessor(vae_scale_factor=8, basesize=128)


def tiny_joyimage_pipeline(pipeline_class, transformer, text_path):
    text_encoder, processor = text_path
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = pipeline_class(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                          tokenizer=processor.tokenizer, transformer=transformer, processor=processor)
    # The pipelines drop the system prompt's tokens from the encoder's output (34 of Qwen's tokenizer): as many as
    # the word tokenizer makes of it.
    system = pipe.prompt_template_encode["multiple_images"].split("{}")[0]
    pipe.prompt_template_encode_start_idx = dict.fromkeys(pipe.prompt_template_encode,
                                                          len(processor.tokenizer(system).input_ids))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(height, width, seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("edit", [False, True], ids=["text to image", "edit"])
def test_edit_pipeline_with_cfg(text_path, small_buckets, edit, order):
    pipe = tiny_joyimage_pipeline(JoyImageEditPipeline, tiny_transformer(text_dim=16), text_path)
    pipe.vae_image_processor = small_buckets
    # The target's latents compared: the tiny random VAE's decoder (RMS norms over a few channels, some of them near
    # zero) turns differences of 1e-6 into 0.1 on some pixels.
    call = {"prompt": "make it blue", "height": 128, "width": 192, "num_inference_steps": 3, "guidance_scale": 4.0,
            "output_type": "latent"}
    if edit:
        call["image"] = picture(100, 150, 0)  # cropped to the bucket of its aspect ratio: 128 x 192
    stats, calls = check_pipeline_against_dense(pipe, call, order=order)
    # The scheduler's timesteps as given: each step's cond and uncond calls, the first step dense.
    assert_two_calls_per_step_first_dense(stats)
    # The image to edit is a second frame; each branch's prompt (unmasked) the trailing span.
    assert {layout.grid for _, layout, _ in calls} == {(2 if edit else 1, 8, 12)}
    assert len({layout.text_len for _, layout, _ in calls}) == 2


PLUS_PIPELINE_CASES = {
    "one reference of the output's size": ([picture(100, 150, 0)], VideoLayout(2, 8, 12, text_position="end")),
    "two references of other sizes": ([picture(60, 60, 0), picture(60, 120, 1)],  # 8 x 8 and 6 x 12 patches
                                      VideoLayout(1, 8, 12, text_len=8 * 8 + 6 * 12, text_position="end")),
}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("case", PLUS_PIPELINE_CASES)
def test_edit_plus_pipeline_with_cfg(text_path, small_buckets, case, order):
    pipe = tiny_joyimage_pipeline(JoyImageEditPlusPipeline, tiny_plus_transformer(text_dim=16), text_path)
    pipe.image_processor = small_buckets
    images, layout = PLUS_PIPELINE_CASES[case]
    call = {"prompt": "make it blue", "images": images, "height": 128, "width": 192, "num_inference_steps": 3,
            "guidance_scale": 4.0, "output_type": "latent"}  # latents compared, as in the Edit pipeline's test
    stats, calls = check_pipeline_against_dense(pipe, call, order=order)
    # CFG in one call, `[negative, prompt]` rows: each step's call, the first dense.
    assert sorted({(r.step, r.sparse) for r in stats.calls["transformer"]}) == [(0, False), (1, True), (2, True)]
    # Each row over its valid keys: its references and its own prompt, the longer prompt's padding left out (three
    # words more than the empty negative prompt).
    assert {call_layout.grid for _, call_layout, _ in calls} == {layout.grid}
    spans = sorted({call_layout.text_len for _, call_layout, _ in calls})
    assert len(spans) == 2 and spans[1] - spans[0] == 3 and spans[0] > layout.text_len
