"""diffsparse on diffusers Kandinsky 5 (tiny, random weights, offline): the transformer called directly, the visual
blocks' video-only self-attention, in frame-major token order and in the tiled ("fractal") order NABLA checkpoints
use. And the whole `Kandinsky5T2VPipeline` built (Qwen2.5-VL and CLIP text encoders, HunyuanVideo VAE) and run with
classifier-free guidance, its regular attention type (NABLA's mask needs flex attention)."""

from collections import Counter

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Kandinsky5I2IPipeline,
    Kandinsky5I2VPipeline,
    Kandinsky5T2IPipeline,
    Kandinsky5T2VPipeline,
    Kandinsky5Transformer3DModel,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.kandinsky5 import fractal_order
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    check_video_token_positions,
    qwen_tokenizer,
    recorded_attention_calls,
    run_transformer,
    tiny_clip_text_model,
    tiny_hunyuan_video_vae,
    tiny_qwen25_vl,
)

GRID = (2, 8, 16)  # latent frames 2 of 16 x 32, patchified 1 x 2 x 2: 256 tokens, two 8 x 8 tiles per row
# A window of 1 frame and 3 x 3 tokens: on two frames radial would keep nearly every block.
LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=32, dense_steps=0)


def tiny_transformer(visual_cond: bool = False):
    """Text 16 wide (the tiny Qwen2.5-VL's), pooled text 8 wide (the tiny CLIP's). `visual_cond`: the latents come
    with a conditioning latent and a mask on extra channels (image-to-video, image-to-image)."""
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4), visual_cond=visual_cond,
    ).eval()
    # Kandinsky zero-initialises its modulation layers: every gate would be 0 and the attention never reach the
    # output, so nothing below could fail. Random values instead.
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer()


def inputs(fractal: bool = False, grid=GRID):
    """`fractal`: the `sparse_params` a NABLA pipeline passes reduced to what the forward reads for the token
    order (the NABLA mask itself is built only by the original processor, i.e. on dense calls). `grid`: the
    patchified `(frames, height, width)`."""
    def call():
        g = torch.Generator().manual_seed(1)
        frames, height, width = grid
        return {
            "hidden_states": torch.randn(1, frames, 2 * height, 2 * width, 4, generator=g),
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "pooled_projections": torch.randn(1, 8, generator=g),
            "timestep": torch.tensor([500.0]),
            "visual_rope_pos": [torch.arange(frames), torch.arange(height), torch.arange(width)],
            "text_rope_pos": torch.arange(6), "sparse_params": {"to_fractal": True} if fractal else None,
        }

    return call


@pytest.mark.parametrize("order", [None, TileOrder((1, 4, 4))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, order):
    check_against_dense(transformer, inputs(), block_size=32, order=order, sparse=LOCAL)


def test_tiled_token_order_is_attended_as_frame_major(transformer):
    # The sparse path restores frame-major order for the pattern: with the tiled order the model gets what it gets
    # with frame-major tokens and the same pattern (a pattern applied to tiled positions would differ).
    assert sorted(fractal_order(*GRID).tolist()) == list(range(256))
    assert fractal_order(*GRID)[:8].tolist() == list(range(8))  # the first tile's first row
    assert fractal_order(*GRID)[8].item() == 16  # then the tile's next row, one token row (16) later
    frame_major = run_transformer(transformer, inputs(), LOCAL)
    tiled = run_transformer(transformer, inputs(fractal=True), LOCAL)
    torch.testing.assert_close(tiled, frame_major, atol=1e-5, rtol=0)
    assert not torch.allclose(frame_major, run_transformer(transformer, inputs()), atol=1e-4)


@pytest.mark.parametrize("fractal, grid", [(False, (3, 5, 7)), (True, (3, 8, 16))], ids=["frame-major", "fractal"])
def test_each_latent_pixel_moves_the_query_of_its_own_video_token(transformer, fractal, grid):
    # F, H and W all different, so a layout of swapped axes fails; the fractal order's 8 x 8 tiles need H and W
    # multiples of 8, and its queries must come back to frame-major for the same token to move.
    check_video_token_positions(transformer, inputs(fractal, grid), grid=grid, patch=(1, 2, 2), axes="THWC")


def test_layout_and_sparse_calls(transformer):
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs()())
    assert layout == VideoLayout(*GRID)
    with recorded_attention_calls() as calls:
        run_transformer(transformer, inputs(), LOCAL)
    assert [(layer, shape) for layer, _, shape in calls] == [(0, (1, 256)), (1, (1, 256))]  # visual blocks only


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Kandinsky 5", layer=1)


# Qwen2.5-VL's vision tokens, for the image-to-image pipeline's source image (the processor counts `<|video_pad|>`
# too: were it `<unk>`, every unknown word would count as one).
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
# The word tokenizer's tokens (CLIP's prompts end with `</s>`) and Qwen's chat and vision tokens first; the template's
# other words are not needed (`<unk>`), the pipeline drops them.
VOCABULARY = ["<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "a", "red", "circle", "moving", "left",
              "blurry", *VISION_TOKENS]


def qwen_vl_processor():
    """A `Qwen2VLProcessor` over the word tokenizer: the image-to-image pipeline's Qwen2.5-VL reads the source image
    with the prompt. Its image processor makes any image 56 x 56 pixels: 4 x 4 patches of 14, merged 2 x 2 into 4
    image tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = qwen_tokenizer(VOCABULARY)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS}, replace_extra_special_tokens=False)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
                            tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())


def tiny_image_vae():
    """An `AutoencoderKL` of 4 latent channels, 8x in space: the image pipelines'."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         norm_num_groups=4).eval()


IMAGE_SIZE = (256, 128)  # (width, height): latents 16 x 32, patchified 8 x 16


def tiny_kandinsky_pipeline(pipeline_class):
    """A tiny Kandinsky 5 pipeline of `pipeline_class`: Qwen2.5-VL and CLIP text encoders, the HunyuanVideo VAE for
    video (`AutoencoderKL` for images), a transformer that takes the image's latent and mask on extra channels
    (`visual_cond`) when given an image. The image pipelines snap every size to their `resolutions` (1024 x 1024
    and larger: 4096 tokens, seconds a call here); the tiny ones' list holds `IMAGE_SIZE` only."""
    image_pipeline = pipeline_class in (Kandinsky5T2IPipeline, Kandinsky5I2IPipeline)
    torch.manual_seed(0)
    text_encoder = tiny_qwen25_vl(VOCABULARY)
    if pipeline_class is Kandinsky5I2IPipeline:
        tokenizer = qwen_vl_processor()
        text_encoder.config.image_token_id = VOCABULARY.index("<|image_pad|>")
        text_encoder.config.vision_start_token_id = VOCABULARY.index("<|vision_start|>")
    else:
        tokenizer = qwen_tokenizer(VOCABULARY)
    pipe = pipeline_class(
        transformer=tiny_transformer(visual_cond=pipeline_class in (Kandinsky5I2VPipeline, Kandinsky5I2IPipeline)),
        vae=tiny_image_vae() if image_pipeline else tiny_hunyuan_video_vae(), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=tiny_clip_text_model(len(VOCABULARY)),
        tokenizer_2=word_tokenizer(VOCABULARY, max_length=77), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    if image_pipeline:
        pipe.resolutions = [IMAGE_SIZE]
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def kandinsky_pipe():
    return tiny_kandinsky_pipeline(Kandinsky5T2VPipeline)


PIPELINE_CALL = {"prompt": "a red circle moving left", "negative_prompt": "blurry", "guidance_scale": 5.0,
                 "num_inference_steps": 3, "height": 64, "width": 64, "num_frames": 9, "output_type": "latent"}


def check_pipeline_steps_and_layout(pipe, call: dict, layout: VideoLayout) -> None:
    """`check_pipeline_against_dense` through `pipe(**call)` with classifier-free guidance, and: each of the 3 steps
    is the prompt's and the negative prompt's call (outside any `cache_context`: "call 0" and "call 1", each
    branch on its own state) through both visual blocks, the first step dense (`dense_steps=1`), the others sparse
    with blocks left out; every sparse call attends `layout`'s tokens, no more.

    The model rounds queries and keys to bfloat16 (its RoPE): a float32 difference of 1e-6 upstream (the sparse
    kernel's sums against SDPA's) now and then moves a query element one bfloat16 step, and the output past 1e-3
    with other random weights than these. With these seeds every block kept gives 6e-6 to 3e-5 on one machine, and
    1.06e-4 for the image-to-image pipeline on another (an AMD EPYC: other float32 sums): checked within 1e-3."""
    stats, calls = check_pipeline_against_dense(pipe, call, block_size=8, atol=1e-3)
    records = stats.calls["transformer"]
    # The pipeline passes the scheduler's timesteps as they are.
    assert Counter((r.step, r.branch) for r in records) == {
        (step, branch): 2 for step in range(3) for branch in ("call 0", "call 1")
    }
    assert all(r.sparse == (r.step > 0) and r.dense_step == (r.step == 0) for r in records)
    assert all(r.density < 1 for r in records if r.sparse)
    assert sorted(layer for layer, _, _ in calls) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {(found, shape) for _, found, shape in calls} == {(layout, (1, layout.num_tokens))}


def test_pipeline_with_cfg_dense_every_block_kept_and_sparse_after_the_dense_step(kandinsky_pipe):
    template = kandinsky_pipe.prompt_template
    # The pipeline's fixed drop stays inside the template: the prompt reaches the transformer whole.
    prefix = kandinsky_pipe.tokenizer(template[:template.index("{}")]).input_ids
    assert len(prefix) >= kandinsky_pipe.prompt_template_encode_start_idx
    # 9 frames, 64 x 64 pixels -> 3 latent frames of 8 x 8 (4x, 8x VAE) -> 4 x 4 patches (1 x 2 x 2).
    check_pipeline_steps_and_layout(kandinsky_pipe, PIPELINE_CALL, VideoLayout(3, 4, 4))


def source_image(size: tuple[int, int]):
    """A small in-memory picture: a red disc on grey, `size` (width, height)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (128, 128, 128))
    ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(220, 30, 30))
    return image


# The pipelines that take or make images: the call beyond `PIPELINE_CALL`'s prompts, guidance and steps, and the
# token grid of its latents (1 x 2 x 2 patches of the 8x VAE's latents; 4x in time for videos).
IMAGE_PIPELINES = {
    # 17 frames of 64 x 128 pixels, the image's latent as the first latent frame (marked on the `visual_cond` mask
    # channel): 5 latent frames of 8 x 16 -> 4 x 8 patches. (Under 5 latent frames the pipeline's first-frame
    # normalisation has no reference frame and makes NaN.)
    "i2v": (Kandinsky5I2VPipeline, {"image": source_image((128, 64)), "num_frames": 17, "height": 64, "width": 128},
            VideoLayout(5, 4, 8)),
    # One frame of 128 x 256 pixels (height x width): latents 1 x 16 x 32 -> 1 x 8 x 16 patches.
    "t2i": (Kandinsky5T2IPipeline, {"height": IMAGE_SIZE[1], "width": IMAGE_SIZE[0]}, VideoLayout(1, 8, 16)),
    # The source image's size (no height / width given); its latent on the `visual_cond` channels, not as tokens:
    # one frame still.
    "i2i": (Kandinsky5I2IPipeline, {"image": source_image(IMAGE_SIZE)}, VideoLayout(1, 8, 16)),
}


@pytest.mark.parametrize("name", IMAGE_PIPELINES)
def test_image_pipelines_with_cfg_dense_every_block_kept_and_sparse_after_the_dense_step(name):
    pipeline_class, call, layout = IMAGE_PIPELINES[name]
    pipe = tiny_kandinsky_pipeline(pipeline_class)
    call = {key: PIPELINE_CALL[key] for key in ("prompt", "negative_prompt", "guidance_scale", "num_inference_steps",
                                                 "output_type")} | call
    check_pipeline_steps_and_layout(pipe, call, layout)


def test_compare_reads_the_image_pipelines_output(tmp_path):
    # Kandinsky 5's image pipelines name their output `image` (not `images`): `compare` scores it as one frame.
    from diffsparse.cli import build_parser
    from diffsparse.compare import run_compare

    pipe = tiny_kandinsky_pipeline(Kandinsky5T2IPipeline)
    args = build_parser().parse_args(["compare", "--height", str(IMAGE_SIZE[1]), "--width", str(IMAGE_SIZE[0]),
                                      "--steps", "2", "--prompt", "a red circle", "--pattern", "window3d",
                                      "--density", "0.3", "--block-size", "8", "--dense-steps", "1",
                                      "--out", str(tmp_path)])
    config = diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=1)
    result = run_compare(args, config, pipe=pipe)
    assert result.frames == 1 and result.mean_attention_density < 1 and result.psnr_db > 0
