"""diffsparse on diffusers Qwen-Image (tiny, random weights, offline): the transformer called directly, joint [text,
image] double-stream attention with complex RoPE on both streams; Qwen-Image-Edit's reference images of the output's
size (frames) and of another size (kept whole beside the text); padded prompts, their valid text leading or not,
attended without their padding. And the whole
`QwenImagePipeline` built (Qwen2.5-VL text encoder, Qwen-Image VAE) and run with true CFG: the `t / 1000` timesteps
it passes land on the scheduler's steps. Then `QwenImageEditPlusPipeline` from the same VAE and transformer, with a
Qwen2-VL processor built in memory, so that the tiny vision tower encodes each reference image into the prompt: edits
with a reference of the output's size (a second frame), of another size (kept whole beside the text) and both. And
`QwenImageControlNetPipeline`: the ControlNet dense and untouched. And diffusers' modular denoise blocks
(text-to-image, Edit, Edit Plus, Layered, ControlNet) driving the transformer with a CFG guider, fed prompt
embeddings and latents."""

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage import (
    QwenImageControlNetCoreDenoiseStep,
    QwenImageCoreDenoiseStep,
)
from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage_edit import QwenImageEditCoreDenoiseStep
from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage_edit_plus import QwenImageEditPlusCoreDenoiseStep
from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage_layered import QwenImageLayeredCoreDenoiseStep
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from PIL import Image
from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    QWEN_VISION_TOKENS,
    check_against_dense,
    check_controlnet_pipeline,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    open_zero_initialised,
    qwen_tokenizer,
    qwen_vl_processor,
    recorded_attention_calls,
    run_pipeline,
    run_transformer,
    tiny_qwen25_vl,
)

TEXT_LEN = 7
LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)


def tiny_transformer(**kwargs):
    """4 latent channels packed 2x2 (16 in), text of the tiny Qwen2.5-VL's width (16)."""
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), **kwargs,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer()


def inputs(references=(), valid_text=(TEXT_LEN,)):
    """An image of 4 x 6 packed tokens behind 7 text tokens, with reference images of the given `(rows, cols)`
    after it; prompts with `valid_text` real tokens, the pipeline's way (`t / 1000` as the timestep)."""
    shapes = [(1, 4, 6)] + [(1, *size) for size in references]
    tokens = sum(f * h * w for f, h, w in shapes)

    def call():
        g = torch.Generator().manual_seed(1)
        batch = len(valid_text)
        return {"hidden_states": torch.randn(batch, tokens, 16, generator=g),
                "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
                "encoder_hidden_states_mask": torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None],
                "timestep": torch.full((batch,), 0.5), "img_shapes": [shapes] * batch}

    return call


@pytest.mark.parametrize("references", [(), ((4, 6),), ((2, 3), (4, 6))], ids=["t2i", "edit", "edit other sizes"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, references, order):
    check_against_dense(transformer, inputs(references), block_size=8, order=order, sparse=LOCAL)


def test_image_shapes_that_do_not_add_up_to_the_tokens_are_refused(transformer):
    call = inputs()()
    call["img_shapes"] = [[(1, 4, 5)]]  # 20 tokens named, 24 given
    with pytest.raises(ValueError, match=r"`img_shapes` \[\(1, 4, 5\)\] do not add up to the 24 image tokens"):
        adapter_for(transformer).read_call(transformer, (), call)


def test_layouts_of_a_call(transformer):
    read = adapter_for(transformer).read_call
    layout, timestep = read(transformer, (), inputs()())
    assert layout == VideoLayout(1, 4, 6, text_len=TEXT_LEN, text_position="start") and float(timestep) == 500.0
    layout, _ = read(transformer, (), inputs(((4, 6),))())
    assert layout == VideoLayout(2, 4, 6, text_len=TEXT_LEN, text_position="start")
    # 6 + 24 reference tokens of other sizes join the text: [text, image, references] as [text, references, image].
    layout, _, token_order = read(transformer, (), inputs(((2, 3), (4, 6)))())
    assert layout == VideoLayout(1, 4, 6, text_len=TEXT_LEN + 30, text_position="start")
    assert token_order.tolist() == [*range(7), *range(37, 61), *range(7, 37)]


@pytest.mark.parametrize("references", [(), ((2, 3), (4, 6))], ids=["t2i", "edit other sizes"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_prompts_of_different_lengths_in_one_batch(transformer, references, order):
    # Each prompt's padding sits between its valid text and the image: left out, every block kept gives the
    # original (which masks it) and a sparse pattern changes it.
    check_against_dense(transformer, inputs(references, valid_text=(5, TEXT_LEN)), block_size=8, order=order,
                        sparse=LOCAL)


def test_each_image_of_a_padded_batch_gets_what_it_gets_alone(transformer):
    batch = inputs(valid_text=(3, 5, TEXT_LEN))()

    def alone(index):
        return lambda: {name: value if name == "img_shapes" else value[index:index + 1] for name, value in batch.items()}

    with recorded_attention_calls() as calls:
        together = run_transformer(transformer, lambda: batch, LOCAL)
    # One runtime call per prompt length and layer, each on the layout with that prompt's text span.
    assert [(layer, layout.text_len, shape) for layer, layout, shape in calls] == [
        (layer, n, (1, n + 24)) for layer in range(2) for n in (3, 5, TEXT_LEN)
    ]
    for index in range(3):
        torch.testing.assert_close(together[index:index + 1], run_transformer(transformer, alone(index), LOCAL),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("references", [(), ((2, 3), (4, 6))], ids=["t2i", "edit other sizes"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_masks_whose_valid_text_is_not_leading_run_sparse(transformer, references, order):
    # A caller's own mask (left-padded `prompt_embeds` with their `prompt_embeds_mask`; diffusers reads masks "without
    # assuming contiguous" ones): each prompt is attended without its masked tokens wherever they lie, every block
    # kept giving the original, a window changing it; before, every call ran the original, counted dense, unsaid.
    def left_padded():
        call = inputs(references, valid_text=(4, 5, TEXT_LEN))()
        call["encoder_hidden_states_mask"] = call["encoder_hidden_states_mask"].flip(1)
        return call

    calls = check_against_dense(transformer, left_padded, block_size=8, order=order, sparse=LOCAL)
    references_len = sum(rows * cols for rows, cols in references)
    assert sorted({(layout.text_len, shape) for _, layout, shape in calls}) == [
        (n + references_len, (1, n + 24 + references_len)) for n in (4, 5, TEXT_LEN)
    ]
    with diffsparse.sparse(transformer, LOCAL) as handle, torch.no_grad():
        transformer(**left_padded())
    assert [(s.sparse_calls, s.dense_calls) for s in handle.stats().layers] == [(1, 0), (1, 0)]


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Qwen-Image", layer=1)


# The placeholders Qwen2-VL's processor writes into an edit prompt; it counts the video one's id too, which must not
# be `<unk>`'s (every unknown word would count as a video token).
# Chat-template tokens first: the word tokenizer's own (pad, unk) and Qwen's special tokens; the template's other words
# are not needed (`<unk>`), the pipeline drops them. "Picture" opens the edit prompt's image list.
VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "a", "red", "circle", "on", "grass", "blurry",
              "Picture", *QWEN_VISION_TOKENS.values()]


@pytest.fixture(scope="module")
def qwen_pipe():
    torch.manual_seed(0)
    # One temporal-downsample flag: a 2x VAE (`vae_scale_factor` counts them), so small images still give a grid.
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                             text_encoder=tiny_qwen25_vl(VOCABULARY), tokenizer=qwen_tokenizer(VOCABULARY),
                             transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINE_CALL = {"prompt": "a red circle on grass", "negative_prompt": "blurry", "true_cfg_scale": 4.0,
                 "num_inference_steps": 3, "height": 64, "width": 48, "output_type": "latent"}


def test_pipeline_with_true_cfg_dense_every_block_kept_and_sparse_after_the_dense_step(qwen_pipe):
    template = qwen_pipe.prompt_template_encode
    # The pipeline's fixed drop is the system prompt, as with Qwen's own tokenizer.
    prefix = qwen_pipe.tokenizer(template[:template.index("{}")]).input_ids
    assert len(prefix) == qwen_pipe.prompt_template_encode_start_idx
    stats, calls = check_pipeline_against_dense(qwen_pipe, PIPELINE_CALL, block_size=8)
    records = stats.calls["transformer"]
    # The timestep arrives as t / 1000: scaled back, each call finds its own step (a wrong scale puts every call
    # on one step). Each step: the prompt's and the negative prompt's call, through both layers.
    assert Counter((r.step, r.branch) for r in records) == {(step, branch): 2 for step in range(3)
                                                            for branch in ("cond", "uncond")}
    assert all(r.sparse == (r.step > 0) for r in records)
    assert all(r.density < 1 for r in records if r.sparse)
    # 64 x 48 pixels -> 32 x 24 latents (2x VAE) -> 16 x 12 packed patches, behind each prompt's own text.
    text_lens = [qwen_pipe.encode_prompt(PIPELINE_CALL[p])[0].shape[1] for p in ("prompt", "negative_prompt")]
    assert {layout for _, layout, _ in calls} == {
        VideoLayout(1, 16, 12, text_len=n, text_position="start") for n in text_lens
    }


def test_pipeline_with_left_padded_prompt_embeds_runs_sparse(qwen_pipe):
    # The pipeline's own prompts are valid first; a caller's embeddings need not be: 3 padding tokens in front of the
    # prompt, masked in `prompt_embeds_mask`, as a left-padding tokenizer puts them.
    embeds, _ = qwen_pipe.encode_prompt("a red circle on grass", device="cpu")
    padded = torch.cat([torch.zeros(1, 3, embeds.shape[2]), embeds], dim=1)
    mask = (torch.arange(padded.shape[1]) >= 3)[None].long()
    call = {"prompt_embeds": padded, "prompt_embeds_mask": mask, "true_cfg_scale": 1.0, "num_inference_steps": 3,
            "height": 64, "width": 48, "output_type": "latent"}
    stats, calls = check_pipeline_against_dense(qwen_pipe, call, block_size=8)
    assert all(r.sparse == (r.step > 0) for r in stats.calls["transformer"])
    text_len = embeds.shape[1]  # the prompt's valid tokens alone
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 16, 12, text_len=text_len, text_position="start")}


@pytest.fixture(scope="module")
def qwen_edit_pipe(qwen_pipe):
    """The text-to-image fixture's VAE, transformer and scheduler; a Qwen2.5-VL whose vision tower reads the reference
    images, and a Qwen2-VL processor: the in-memory tokenizer, image patches as the tower takes them."""
    torch.manual_seed(0)
    text_encoder = tiny_qwen25_vl(VOCABULARY)
    # The model finds the placeholders the vision tower's tokens replace by id: Qwen's own ids by default.
    for name, token in QWEN_VISION_TOKENS.items():
        setattr(text_encoder.config, name, VOCABULARY.index(token))
    processor = qwen_vl_processor(Qwen2VLProcessor, Qwen2VLVideoProcessor, text_encoder.config.vision_config,
                                  VOCABULARY)
    tokenizer = processor.tokenizer
    components = {name: getattr(qwen_pipe, name) for name in ("vae", "transformer", "scheduler")}
    pipe = QwenImageEditPlusPipeline(text_encoder=text_encoder, tokenizer=tokenizer, processor=processor, **components)
    # The pipeline's drop (64) counts Qwen's BPE tokens of the system prompt and the user's header; the word tokenizer
    # splits some punctuation that BPE keeps in one token (as in "user's"), so it needs a few more.
    template = pipe.prompt_template_encode
    pipe.prompt_template_encode_start_idx = len(tokenizer(template[:template.index("{}")]).input_ids)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: distinct patches for the vision tower and the VAE."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# The output's 1:1 (a frame of its grid once the VAE's resize makes it 64 x 64) and 2:1 (another grid).
REFERENCES = {"square": noise_image(40, 40, seed=1), "wide": noise_image(80, 40, seed=2)}
EDIT_CALL = {"prompt": "a red circle on grass", "negative_prompt": "blurry", "true_cfg_scale": 4.0,
             "num_inference_steps": 3, "height": 64, "width": 64, "output_type": "latent"}


# Each edit's references, and whether they become frames of the output's grid (else they join the text, kept whole:
# any reference of another size takes every reference out of the frames).
@pytest.mark.parametrize(("references", "frames"), [(("square",), True), (("wide",), False), (("square", "wide"), False)],
                         ids=["same size", "other size", "both"])
def test_edit_pipeline_with_true_cfg_and_vision_tokens_in_the_prompt(qwen_edit_pipe, references, frames, monkeypatch):
    pipe = qwen_edit_pipe
    # The pipeline resizes each reference to about 1024² pixels for the VAE and 384² for the vision tower: smaller
    # areas keep the sequences short (the VAE's is the output's, so the square one is a frame).
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", 64 * 64)
    call = {**EDIT_CALL, "image": [REFERENCES[name] for name in references]}

    encoded, vision_calls = [], []
    hooks = [pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: encoded.append(kw), with_kwargs=True),
             pipe.text_encoder.model.visual.register_forward_hook(lambda m, i, out: vision_calls.append(m))]
    try:
        run_pipeline(pipe, call)
    finally:
        for hook in hooks:
            hook.remove()
    # One encoding per CFG branch, each through the vision tower, whose merged patches fill the prompt's
    # placeholders; the pipeline keeps the prompt after the system prompt, which starts with the image list.
    assert len(encoded) == len(vision_calls) == 2
    drop = pipe.prompt_template_encode_start_idx
    text_lens = []
    for inputs in encoded:
        patch_grids = inputs["image_grid_thw"]
        assert inputs["pixel_values"] is not None and len(patch_grids) == len(references)
        placeholders = int((inputs["input_ids"] == pipe.processor.image_token_id).sum())
        assert placeholders == int(patch_grids.prod(-1).sum()) // pipe.processor.image_processor.merge_size ** 2 > 0
        assert pipe.tokenizer.convert_ids_to_tokens(int(inputs["input_ids"][0, drop])) == "Picture"
        text_lens.append(inputs["input_ids"].shape[1] - drop)

    stats, calls = check_pipeline_against_dense(pipe, call)
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {(step, branch): 2 for step in range(3)
                                                            for branch in ("cond", "uncond")}
    assert all(r.sparse == (r.step > 0) for r in records)
    assert all(r.density < 1 for r in records if r.sparse)
    # 64 x 64 pixels -> 16 x 16 packed patches (2x VAE, 2x2 packing); each reference is resized to the VAE's area
    # at its aspect ratio, the square one to the output's grid.
    packed = pipe.vae_scale_factor * 2
    grids = {}
    for name in references:
        image = REFERENCES[name]
        width, height = pipeline_qwenimage_edit_plus.calculate_dimensions(
            pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE, image.width / image.height)
        grids[name] = (height // packed, width // packed)
    assert [grid == (16, 16) for grid in grids.values()] == [name == "square" for name in references]
    if frames:
        expected = {VideoLayout(1 + len(grids), 16, 16, text_len=n, text_position="start") for n in text_lens}
    else:
        reference_len = sum(rows * cols for rows, cols in grids.values())
        expected = {VideoLayout(1, 16, 16, text_len=n + reference_len, text_position="start") for n in text_lens}
    assert {layout for _, layout, _ in calls} == expected


def half_mask(width: int, height: int) -> Image.Image:
    """An inpainting mask repainting the left half."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


@pytest.mark.parametrize("pipeline_class", [QwenImageImg2ImgPipeline, QwenImageInpaintPipeline],
                         ids=["img2img", "inpaint"])
def test_img2img_and_inpaint_pipelines_count_their_steps_from_the_first_one_run(qwen_pipe, pipeline_class):
    # `strength=0.75` of 4 steps runs the scheduler's last 3 (750, 500, 250): the first of them is the dense step.
    pipe = pipeline_class(**qwen_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = noise_image(48, 64, seed=3)
    call = {**PIPELINE_CALL, "image": image, "num_inference_steps": 4, "strength": 0.75}
    if pipeline_class is QwenImageInpaintPipeline:
        call["mask_image"] = half_mask(48, 64)
    stats, calls = check_pipeline_against_dense(pipe, call, block_size=8)
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {(step, branch): 2 for step in range(3)
                                                            for branch in ("cond", "uncond")}
    assert all(r.sparse == (r.step > 0) for r in records)
    assert {(layout.frames, layout.height, layout.width) for _, layout, _ in calls} == {(1, 16, 12)}


@pytest.mark.parametrize(("reference", "frames"), [("square", True), ("wide", False)], ids=["same size", "other size"])
def test_edit_pipeline_with_true_cfg(qwen_edit_pipe, reference, frames, monkeypatch):
    # `QwenImageEditPipeline` (one reference): it resizes the reference to about 1024² pixels for the VAE and the
    # vision tower alike; 64² keeps the sequence short and the square reference a frame of the output's grid.
    calculate_dimensions = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions",
                        lambda area, ratio: calculate_dimensions(64 * 64, ratio))
    pipe = QwenImageEditPipeline(**{name: getattr(qwen_edit_pipe, name) for name in (
        "text_encoder", "tokenizer", "processor", "vae", "transformer", "scheduler")})
    template = pipe.prompt_template_encode  # its drop counts Qwen's tokens of its system prompt
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(template[:template.index("{}")]).input_ids)
    pipe.set_progress_bar_config(disable=True)
    stats, calls = check_pipeline_against_dense(pipe, {**EDIT_CALL, "image": REFERENCES[reference]})
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {(step, branch): 2 for step in range(3)
                                                            for branch in ("cond", "uncond")}
    assert all(r.sparse == (r.step > 0) for r in records)
    # The output's 16 x 16 patches; the square reference a second frame, the wide one beside the text.
    assert {(layout.frames, layout.height, layout.width) for _, layout, _ in calls} == {(2 if frames else 1, 16, 16)}


def test_the_controlnet_pipeline_keeps_the_controlnet_dense_and_the_transformer_sparse(qwen_pipe):
    torch.manual_seed(1)
    controlnet = QwenImageControlNetModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )
    pipe = QwenImageControlNetPipeline(**qwen_pipe.components, controlnet=open_zero_initialised(controlnet).eval())
    pipe.set_progress_bar_config(disable=True)
    control = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    call = {**PIPELINE_CALL, "control_image": control}
    stats, calls = check_controlnet_pipeline(pipe, call, {**call, "controlnet_conditioning_scale": 0.0})
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}
    assert {(layout.frames, layout.height, layout.width) for _, layout, _ in calls} == {(1, 16, 12)}


def test_the_layered_pipeline_attends_its_layers_and_the_input_image_as_frames(qwen_edit_pipe):
    # Qwen-Image-Layered: the composite and `layers` RGBA layers generated at the input's size, then the input image,
    # all one `img_shapes` list (the layers' own 3D RoPE, `use_layer3d_rope`); the pipeline sizes everything from
    # `resolution` (640 or 1024), so its VAE downsamples x16 here (640 x 640 -> 40 x 40 latents -> 20 x 20 patches).
    from diffusers import QwenImageLayeredPipeline

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), use_additional_t_cond=True, use_layer3d_rope=True,
    ).eval()
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1] * 5, num_res_blocks=1,
                                 temperal_downsample=[False] * 4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    components = {name: getattr(qwen_edit_pipe, name) for name in ("text_encoder", "tokenizer", "processor")}
    pipe = QwenImageLayeredPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), transformer=transformer,
                                    **components)
    template = pipe.prompt_template_encode  # its drop counts Qwen's tokens of its system prompt: the word tokenizer's
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(template[:template.index("{}")]).input_ids)
    pipe.set_progress_bar_config(disable=True)
    call = {"image": noise_image(64, 64, 0), "prompt": "a red circle on grass", "negative_prompt": "blurry",
            "true_cfg_scale": 4.0, "layers": 1, "resolution": 640, "num_inference_steps": 3, "output_type": "pt"}
    stats, calls = check_pipeline_against_dense(pipe, call)
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}
    # The composite, one layer and the input image: three frames of 20 x 20 behind each prompt's text.
    assert {(layout.frames, layout.height, layout.width) for _, layout, _ in calls} == {(3, 20, 20)}
    # The commands score a sample's layers as the frames of one video (the pipeline returns a list of them, its
    # generated layers without the composite; RGB with this VAE, RGBA with the real one).
    from diffsparse.compare import first_output

    with torch.no_grad():
        layers = first_output(pipe(**{**call, "output_type": "np", "num_inference_steps": 1}))
    assert layers.ndim == 4 and layers.shape[:3] == (1, 640, 640)


@pytest.fixture(scope="module")
def modular_pipes():
    """diffusers' modular Qwen-Image denoise blocks on tiny transformers, a flow-matching scheduler and a CFG guider
    (each branch its own call, outside any `cache_context`); the ControlNet's zero-initialised projections opened,
    so that its residuals reach the output."""
    torch.manual_seed(0)
    transformer = tiny_transformer()
    layered = tiny_transformer(use_additional_t_cond=True, use_layer3d_rope=True)
    controlnet = QwenImageControlNetModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )
    blocks = {"text2image": QwenImageCoreDenoiseStep, "edit": QwenImageEditCoreDenoiseStep,
              "edit plus": QwenImageEditPlusCoreDenoiseStep, "layered": QwenImageLayeredCoreDenoiseStep,
              "controlnet": QwenImageControlNetCoreDenoiseStep}
    pipes = {}
    for name, block in blocks.items():
        pipes[name] = block().init_pipeline()
        extra = {"controlnet": open_zero_initialised(controlnet).eval()} if name == "controlnet" else {}
        pipes[name].update_components(transformer=layered if name == "layered" else transformer,
                                      scheduler=FlowMatchEulerDiscreteScheduler(),
                                      guider=ClassifierFreeGuidance(guidance_scale=4.0), **extra)
        pipes[name].set_progress_bar_config(disable=True)
    return pipes


def modular_call(latents, **kwargs):
    """The blocks' arguments for their latents in 3 steps, with 7 prompt and 4 negative prompt tokens and the named
    image `latents` (shapes, drawn from seed 2), `kwargs` added."""
    g = torch.Generator().manual_seed(1)
    call = {"prompt_embeds": torch.randn(1, TEXT_LEN, 16, generator=g), "prompt_embeds_mask": torch.ones(1, TEXT_LEN),
            "negative_prompt_embeds": torch.randn(1, 4, 16, generator=g),
            "negative_prompt_embeds_mask": torch.ones(1, 4), "num_inference_steps": 3, "output": "latents", **kwargs}
    g = torch.Generator().manual_seed(2)
    for name, shapes in latents.items():
        drawn = [torch.randn(shape, generator=g) for shape in shapes]
        call[name] = drawn if name == "image_latents" and len(drawn) > 1 else drawn[0]
    return call


# Each block's image latents and other inputs, the frames of the output's grid and the reference tokens kept whole
# beside the text. Always a 64 x 96 output (8 x 12 latents, 4 x 6 packed tokens; the blocks read the size from the
# last image's latents where not given). Edit: a reference of the output's size, a second frame; Edit Plus: one of it
# and one of 4 x 6 latents (2 x 3 tokens), so both join the text; Layered: the composite, one layer and the input
# image, three frames.
SIZE = {"height": 64, "width": 96}
MODULAR_CASES = {
    "text2image": ({}, SIZE, 1, 0),
    "edit": ({"image_latents": [(1, 4, 1, 8, 12)]}, {}, 2, 0),
    "edit plus": ({"image_latents": [(1, 4, 1, 8, 12), (1, 4, 1, 4, 6)]}, SIZE, 1, 24 + 6),
    "layered": ({"image_latents": [(1, 1, 4, 8, 12)]}, {"layers": 1}, 3, 0),
    "controlnet": ({"control_image_latents": [(1, 4, 1, 8, 12)]}, {}, 1, 0),
}


@pytest.mark.parametrize("name", list(MODULAR_CASES))
def test_modular_blocks_dense_every_block_kept_and_sparse_after_the_dense_step(modular_pipes, name):
    latents, extra, frames, whole = MODULAR_CASES[name]
    pipe, call = modular_pipes[name], modular_call(latents, **extra)
    stats, calls = check_modular_against_dense(pipe, call)
    # The blocks pass `t / 1000`: each call lands on its own scheduler step, the guider's two calls per step two
    # branches, through both layers; the first step dense. The ControlNet is not adapted (only the transformer).
    assert list(stats.calls) == ["transformer"]
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {(step, f"call {b}"): 2 for step in range(3) for b in (0, 1)}
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    assert {layout for _, layout, _ in calls} == {
        VideoLayout(frames, 4, 6, text_len=n + whole, text_position="start") for n in (TEXT_LEN, 4)
    }
    if name == "controlnet":  # its residuals reach the output, so the checks above cover them
        with torch.no_grad():
            conditioned, unconditioned = (pipe(**c, generator=torch.Generator().manual_seed(0))
                                          for c in (call, {**call, "controlnet_conditioning_scale": 0.0}))
        assert not torch.allclose(unconditioned, conditioned, atol=1e-4)


def test_modular_perturbed_attention_guidance():
    # diffusers' PerturbedAttentionGuidance guider replaces layer 1's attention by its values in a third pass (a
    # layer-skip hook whose torch function mode turns the original's SDPA into the values). Before, `apply` made the
    # hook raise ("... QwenImageSparseAttnProcessor not registered"), and once past that the sparse kernel computed
    # real attention there, silently (0.11 off): the perturbed call now runs the original, unlogged.
    from diffusers.guiders import PerturbedAttentionGuidance

    pipe = QwenImageCoreDenoiseStep().init_pipeline()
    guider = PerturbedAttentionGuidance(
        guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
        perturbed_guidance_config={"indices": [1], "fqn": "transformer_blocks", "skip_attention": False,
                                   "skip_attention_scores": True, "skip_ff": False},
    )
    torch.manual_seed(0)
    pipe.update_components(transformer=tiny_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(), guider=guider)
    pipe.set_progress_bar_config(disable=True)
    stats, _ = check_modular_against_dense(pipe, modular_call({}, **SIZE))
    # The perturbed pass ("call 2", from the second step) logs layer 0 only.
    assert Counter((r.step, r.branch, r.layer) for r in stats.calls["transformer"]) == {
        **{(step, f"call {b}", layer): 1 for step in range(3) for b in (0, 1) for layer in (0, 1)},
        **{(step, "call 2", 0): 1 for step in (1, 2)},
    }
