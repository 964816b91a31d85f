"""diffsparse on a diffusers FLUX.1 pipeline (tiny, random weights, offline): one-frame layouts read from
`img_ids`, text first, dual- and single-stream blocks; and its ControlNet pipeline. And diffusers' own modular denoise
blocks (`FluxCoreDenoiseStep`, `FluxKontextCoreDenoiseStep`) driving the same transformer, fed prompt embeddings."""

import warnings
from collections import Counter

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.modular_pipelines.flux.modular_blocks_flux import FluxCoreDenoiseStep
from diffusers.modular_pipelines.flux.modular_blocks_flux_kontext import FluxKontextCoreDenoiseStep
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.base import attend_kept_tokens, valid_text_key_groups
from diffsparse.pipelines.flux import image_grid, output_grid_and_references
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_controlnet_pipeline,
    check_fused_projections,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    first_transformer_call,
    open_zero_initialised,
    recorded_attention_calls,
    run_pipeline,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]
ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN = 8


@pytest.fixture(scope="module")
def flux_pipe():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_image_vae(shift_factor=0.0609, scaling_factor=1.5035)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(VOCABULARY), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, projection_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip.eval(),
        tokenizer=word_tokenizer(VOCABULARY, max_length=77), text_encoder_2=t5.eval(), tokenizer_2=word_tokenizer(VOCABULARY),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = {"prompt": "a red circle on grass", "num_inference_steps": 4, "height": 32, "width": 24,
        "max_sequence_length": TEXT_LEN, "guidance_scale": 3.5, "output_type": "latent"}


def generate(pipe, config=None):
    """`(images, stats)` (stats `None` without `config`)."""
    return (run_pipeline(pipe, CALL), None) if config is None else run_pipeline(pipe, CALL, config)


def test_dense_pattern_is_the_unmodified_pipeline_and_steps_are_counted(flux_pipe):
    reference, _ = generate(flux_pipe)
    out, stats = generate(flux_pipe, diffsparse.SparseConfig(pattern="dense"))
    assert torch.equal(out, reference)
    # FLUX passes t / 1000 to its transformer: the clock still finds 4 distinct steps, the first dense.
    sparse_steps = {r.step for r in stats.calls["transformer"]}
    assert sparse_steps == {0, 1, 2, 3} and [s.layer for s in stats.layers] == [0, 1]
    _, stats = generate(flux_pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=1))
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 3), (1, 3)]


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense(flux_pipe, order):
    reference, _ = generate(flux_pipe)
    out, _ = generate(flux_pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


def test_a_direct_transformer_call_the_pipelines_way(flux_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(flux_pipe, CALL)
    check_against_dense(flux_pipe.transformer, lambda: inputs, block_size=16)


def test_sparse_calls_see_the_image_grid_after_the_text(flux_pipe):
    reference, _ = generate(flux_pipe)
    with recorded_attention_calls() as calls:
        out, stats = generate(flux_pipe, diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=1))
    # 32 x 24 pixels -> 16 x 12 latents (x2 VAE) -> 8 x 6 packed 2x2 patches.
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 8, 6, text_len=TEXT_LEN, text_position="start")}
    assert all(s.mean_density < 1 for s in stats.layers)
    assert not torch.allclose(out, reference, atol=1e-4)


def masked_call(mask: torch.Tensor) -> dict:
    return {**CALL, "joint_attention_kwargs": {"attention_mask": mask}}


def test_calls_with_an_attention_mask_run_the_original_and_count_dense(flux_pipe):
    # A token-level mask other than the prompt's padding (here through `joint_attention_kwargs`: an image token
    # hidden from every query) is not something block boundaries follow: each call runs the original processor,
    # `stats()` counts it dense, and a warning says so once.
    mask = torch.ones(1, 1, 1, TEXT_LEN + 8 * 6, dtype=torch.bool)
    mask[..., TEXT_LEN + 5] = False
    reference = run_pipeline(flux_pipe, masked_call(mask))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = run_pipeline(flux_pipe, masked_call(mask),
                                  diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8))
    assert torch.equal(out, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(4, 0), (4, 0)]
    said = [str(w.message) for w in caught if "attention_mask" in str(w.message)]
    assert said == [(
        "diffsparse: transformer: FLUX self-attention calls with this attention_mask (shape (1, 1, 1, 56), torch.bool) "
        "run the original processor (dense, counted dense in stats()) as it is not a boolean (B, 1, 1, S) key mask of "
        "the prompt's padding"
    )]


def test_the_dense_mask_warning_names_the_line_that_called_the_pipeline(flux_pipe):
    # Said from inside the transformer's blocks, under diffusers' hooks: a fixed stacklevel named a line of
    # diffsparse's own (pipelines/base.py) rather than the user's call.
    mask = torch.ones(1, 1, 1, TEXT_LEN + 8 * 6, dtype=torch.bool)
    mask[..., TEXT_LEN + 5] = False
    with (warnings.catch_warnings(record=True) as caught, torch.no_grad(),
          diffsparse.sparse(flux_pipe, diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8))):
        warnings.simplefilter("always")
        flux_pipe(**{**masked_call(mask), "num_inference_steps": 1})
    said = [w for w in caught if "attention_mask" in str(w.message)]
    assert [(w.category, w.filename) for w in said] == [(diffsparse.DiffsparseWarning, __file__)]


@pytest.mark.parametrize("valid", [TEXT_LEN - 1, 3])
def test_calls_with_a_mask_of_the_prompts_padding_run_sparse_without_it(flux_pipe, valid):
    # The T5 padding after the prompt hidden as keys: each call attends the prompt's valid tokens and the image
    # sparsely, the padding left out. Before, every call of the run went to the original processor, without a word.
    mask = torch.ones(1, 1, 1, TEXT_LEN + 8 * 6, dtype=torch.bool)
    mask[..., valid:TEXT_LEN] = False
    reference = run_pipeline(flux_pipe, masked_call(mask))
    with recorded_attention_calls() as calls:
        out, stats = run_pipeline(flux_pipe, masked_call(mask),
                                  diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=1))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 3), (1, 3)]
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 8, 6, text_len=valid, text_position="start")}
    out, stats = run_pipeline(flux_pipe, masked_call(mask),
                              diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=1))
    assert all(s.sparse_calls == 3 and s.mean_density < 1 for s in stats.layers)
    assert not torch.allclose(out, reference, atol=1e-4)


def error_of(run, *args) -> Exception:
    """The exception `run(*args)` raises (failing the test where it raises none)."""
    with pytest.raises(Exception) as raised:
        run(*args)
    return raised.value


@pytest.mark.parametrize("rows, keys", [(2, TEXT_LEN + 8 * 6), (1, TEXT_LEN), (1, TEXT_LEN + 8 * 6 - 3)],
                         ids=["2 rows for 4 images", "the text's keys alone", "3 keys short"])
def test_a_mask_that_does_not_fit_the_call_is_refused_as_the_original_refuses_it(flux_pipe, rows, keys):
    # A boolean key mask of the prompts' padding for a call of 4 images whose rows are neither 1 nor 4, or whose keys
    # are not the call's 8 + 48 tokens: attention cannot apply it, so the original raises, and the sparse path must
    # raise as it does. Before, 2 rows attended images 3 and 4 with no output (zeros), a mask 3 keys short left the
    # image's last tokens out, and one of the text's keys alone (no image key) gave "text_len=-43".
    mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
    mask[-1, ..., 5:TEXT_LEN] = False  # the last row's prompt padded
    call = {**masked_call(mask), "num_images_per_prompt": 4, "num_inference_steps": 2}
    expected = error_of(run_pipeline, flux_pipe, call)
    for config in (diffsparse.SparseConfig(pattern="dense", dense_steps=0),
                   diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=0)):
        raised = error_of(run_pipeline, flux_pipe, call, config)
        assert (type(raised), str(raised)) == (type(expected), str(expected)), config.pattern


class LayoutOnly:
    """A runtime that only tells `attend_kept_tokens` the call's layout (8 text tokens, a 2 x 3 image)."""

    def to_layout_order(self, x):
        return x

    def call_layout(self):
        return VideoLayout(1, 2, 3, text_len=TEXT_LEN, text_position="start")


def test_kept_token_groups_that_leave_videos_or_image_tokens_out_are_refused():
    # `attend_kept_tokens` (each prompt of FLUX's and its copies' calls without its padding) gives every video of a
    # group its output: groups holding other videos than the batch's, or keeping fewer tokens than the image's or
    # more than the call's, would leave videos or tokens out (zeros) or attend another call's tokens.
    query = torch.randn(4, TEXT_LEN + 6, 2, 8)
    kept = torch.arange(TEXT_LEN + 6)
    with pytest.raises(ValueError, match=r"each of the batch's 4 videos once, got groups of 2 videos: .* 1 or 4 rows"):
        attend_kept_tokens(LayoutOnly(), 0, query, query, query, [(torch.tensor([0]), kept), (torch.tensor([1]), kept)])
    for tokens in (5, TEXT_LEN + 7):
        with pytest.raises(ValueError, match=f"every one of the 6 image tokens and at most the call's {TEXT_LEN + 6} "
                                             f"tokens, got a group keeping {tokens}"):
            attend_kept_tokens(LayoutOnly(), 0, query, query, query, [(torch.arange(4), torch.arange(tokens))])


def test_a_mask_of_the_text_s_keys_alone_is_not_read_as_the_prompts_padding():
    # No key past the text: `all()` of the image's (empty) keys is true, and read it as every image key valid.
    mask = torch.ones(2, 1, 1, TEXT_LEN, dtype=torch.bool)
    mask[1, ..., 5:] = False
    assert valid_text_key_groups(mask, TEXT_LEN) is None
    assert len(valid_text_key_groups(torch.cat([mask, torch.ones(2, 1, 1, 6, dtype=torch.bool)], -1), TEXT_LEN)) == 2


def test_fused_projections_are_read_through_the_fused_weights(flux_pipe):
    # `transformer.fuse_qkv_projections()`: one QKV weight per stream, the separate ones left (here zeroed) behind.
    check_fused_projections(flux_pipe, CALL, "FluxAttnProcessor", block_size=8)


def test_image_ids_give_one_grid_kontexts_two_or_a_reference_span_and_anything_else_is_refused(flux_pipe):
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.zeros(12, 1), grid.float()], dim=1)
    assert image_grid(ids) == (1, 3, 4) and image_grid(ids[None]) == (1, 3, 4)
    reference_image = ids.clone()
    reference_image[:, 0] = 1  # FLUX.1 Kontext's reference image, of the output's size
    assert image_grid(torch.cat([ids, reference_image])) == (2, 3, 4)
    smaller = reference_image[reference_image[:, 1] < 2]  # a reference image of another size: 8 tokens
    mixed = torch.cat([ids, smaller])
    assert image_grid(mixed) is None
    assert output_grid_and_references(mixed) == ((3, 4), 8) and output_grid_and_references(ids) == ((3, 4), 0)
    read = adapter_for(flux_pipe.transformer).read_call

    def call(img_ids):
        return {"hidden_states": torch.zeros(1, len(img_ids), 16), "encoder_hidden_states": torch.zeros(1, TEXT_LEN, 16),
                "timestep": torch.tensor([0.5]), "img_ids": img_ids}

    # The reference joins the text in the leading span: model order [text, image, reference] is attended as
    # [text, reference, image], each model token's index in the layout given as the call's token order.
    layout, timestep, token_order = read(flux_pipe.transformer, (), call(mixed))
    assert layout == VideoLayout(1, 3, 4, text_len=TEXT_LEN + 8, text_position="start") and float(timestep) == 500.0
    text, image, reference = TEXT_LEN, 12, 8
    assert token_order.tolist() == [*range(text), *range(text + reference, text + reference + image),
                                    *range(text, text + reference)]
    with pytest.raises(ValueError, match="do not start with a row-major grid of the output"):
        read(flux_pipe.transformer, (), call(torch.cat([smaller, ids])))
    # A reference placed below the output (first id 1, its rows after the output's): together one grid of rows and
    # columns, but two images, not one frame of 6 x 4 (the reference read as the output's lower half): the
    # reference joins the text's span.
    below = reference_image.clone()
    below[:, 1] += 3
    assert image_grid(torch.cat([ids, below])) is None
    layout, _, _ = read(flux_pipe.transformer, (), call(torch.cat([ids, below])))
    assert layout == VideoLayout(1, 3, 4, text_len=TEXT_LEN + 12, text_position="start")
    # FLUX's own image (first id 0) comes first, frame 0: not after its reference, nor after an image of first id -1;
    # and the images after it are references, numbered above 0.
    earlier = ids.clone()
    earlier[:, 0] = -1
    # Two images at the same ids (both first id 0) are not two frames either: frames' first ids increase.
    for refused in (torch.cat([reference_image, ids]), torch.cat([earlier, ids]), torch.cat([ids, earlier]),
                    torch.cat([ids, ids])):
        assert image_grid(refused) is None and output_grid_and_references(refused) is None
        with pytest.raises(ValueError, match="do not start with a row-major grid of the output"):
            read(flux_pipe.transformer, (), call(refused))


@pytest.mark.parametrize("reference_size", [(24, 32), (16, 48)], ids=["output's size", "another size"])
def test_kontext_edits_attend_the_reference_image(flux_pipe, reference_size):
    # A reference of the output's size is a second frame; one of another size is kept whole beside the text.
    from diffusers import FluxKontextPipeline
    from PIL import Image

    pipe = FluxKontextPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    call = {"image": Image.new("RGB", reference_size, (200, 40, 40)), "prompt": "a blue circle on grass",
            "height": 32, "width": 24, "num_inference_steps": 3, "max_sequence_length": TEXT_LEN,
            "output_type": "latent", "_auto_resize": False, "max_area": 32 * 24}  # Kontext scales to max_area

    def edit(config=None):
        with torch.no_grad():
            if config is None:
                return pipe(**call, generator=torch.Generator().manual_seed(0)).images
            with diffsparse.sparse(pipe, config), recorded_attention_calls() as calls:
                return pipe(**call, generator=torch.Generator().manual_seed(0)).images, calls

    reference = edit()
    kept, calls = edit(diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0))
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    # 32 x 24 pixels -> 16 x 12 latents -> 8 x 6 packed patches; a 48 x 16 reference -> 12 x 4 patches = 48 tokens.
    expected = (VideoLayout(2, 8, 6, text_len=TEXT_LEN, text_position="start") if reference_size == (24, 32) else
                VideoLayout(1, 8, 6, text_len=TEXT_LEN + 48, text_position="start"))
    assert {layout for _, layout, _ in calls} == {expected}
    sparse, _ = edit(diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=0))
    assert not torch.allclose(sparse, reference, atol=1e-4)


def test_other_processors_are_refused_and_the_model_left_untouched(flux_pipe):
    check_other_processors_are_refused(flux_pipe, "FLUX", layer=1)


def test_compare_command_runs_a_saved_flux_pipeline(flux_pipe, tmp_path, capsys):
    # Image models make one frame: `--frames 1` (anything else is refused by name), a PNG beside the mp4.
    import json

    from diffsparse.cli import main

    flux_pipe.save_pretrained(tmp_path / "flux")
    args = ["compare", "--model", str(tmp_path / "flux"), "--pattern", "window3d", "--density", "0.3", "--block-size",
            "16", "--dense-steps", "1", "--steps", "2", "--height", "64", "--width", "64", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main([*args, "--frames", "17"])
    assert "frames=17: FluxPipeline generates images, so frames must be 1" in capsys.readouterr().err
    assert main([*args, "--frames", "1"]) == 0
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["mean_attention_density"] < 1 and result["psnr_db"] > 0 and result["frames"] == 1
    assert result["image_path"] == str(tmp_path / "out" / "compare.png") and (tmp_path / "out" / "compare.png").is_file()
    assert result["dense_path"] == str(tmp_path / "out" / "dense.png") and (tmp_path / "out" / "sparse.png").is_file()


def test_the_demo_page_serves_an_image_model_one_frame(flux_pipe, tmp_path):
    gr = pytest.importorskip("gradio")
    from diffsparse.demo import build_demo, make_handler

    (frames,) = [b for b in build_demo(flux_pipe, out=tmp_path).blocks.values()
                 if isinstance(b, gr.Slider) and b.label == "frames"]
    assert frames.value == 1 and not frames.interactive
    (height,) = [b for b in build_demo(flux_pipe, out=tmp_path).blocks.values()
                 if isinstance(b, gr.Slider) and b.label == "height (pixels)"]
    assert height.value == flux_pipe.default_sample_size * flux_pipe.vae_scale_factor  # FLUX's own default size
    video, summary = make_handler(flux_pipe, out=tmp_path)(
        "a red circle on grass", "window3d", 0.3, 0.5, 16, "none", "0", 2, 1, 64, 64, 0, 0
    )
    assert video.endswith("compare.mp4") and (tmp_path / "compare.png").is_file() and "PSNR" in summary


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_controlnet_pipeline_keeps_the_controlnet_dense_and_the_transformer_sparse(flux_pipe, order):
    torch.manual_seed(1)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxControlNetPipeline(**flux_pipe.components, controlnet=open_zero_initialised(controlnet).eval())
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(2))
    call = {"prompt": "a red circle on grass", "control_image": control, "num_inference_steps": 3, "height": 32,
            "width": 24, "max_sequence_length": TEXT_LEN, "guidance_scale": 3.5, "output_type": "latent"}
    _, calls = check_controlnet_pipeline(pipe, call, {**call, "controlnet_conditioning_scale": 0.0}, order=order)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 8, 6, text_len=TEXT_LEN, text_position="start")}


def visualcloze(pipeline_class, flux_pipe):
    """A tiny VisualCloze pipeline of `pipeline_class` on `flux_pipe`'s parts and its call's images: one row of an
    in-context example (two 32 x 32 pictures), then the query (a picture and its blank target)."""
    from PIL import Image

    torch.manual_seed(1)
    # Fill's input: the packed latents (4 channels x 2 x 2 = 16), the masked image's (16) and the mask's (one
    # channel, the tiny VAE's 2 x 2 pixels per latent, packed 2 x 2: 16).
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 + 16 + 16, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    components = {k: v for k, v in flux_pipe.components.items()
                  if k not in ("transformer", "image_encoder", "feature_extractor")}
    pipe = pipeline_class(**components, transformer=transformer, resolution=32)
    pipe.set_progress_bar_config(disable=True)
    picture = [Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte()
                               .numpy()) for seed in range(3)]
    return pipe, [[picture[0], picture[1]], [picture[2], None]]


def test_visualcloze_rows_of_images_are_frames(flux_pipe):
    # VisualCloze (FLUX.1 Fill): each row of images (in-context examples, then the query with its blank target) is
    # one wide image whose tokens carry the row's number, from 1, as their first id: the rows are the layout's frames.
    from diffusers import VisualClozeGenerationPipeline

    pipe, image = visualcloze(VisualClozeGenerationPipeline, flux_pipe)
    call = {"task_prompt": "a red circle", "content_prompt": "on grass", "image": image, "num_inference_steps": 3,
            "max_sequence_length": TEXT_LEN, "output_type": "latent"}
    _, calls = check_pipeline_against_dense(pipe, call)
    # Two rows of two 32 x 32 images: 32 x 64 pixels -> 16 x 32 latents -> 8 x 16 packed tokens per row.
    assert {layout for _, layout, _ in calls} == {VideoLayout(2, 8, 16, text_len=TEXT_LEN, text_position="start")}


def test_visualcloze_pipeline_generates_then_upsamples_each_stage_sparse_after_its_dense_step(flux_pipe):
    # `VisualClozePipeline`: `VisualClozeGenerationPipeline` (the rows of images as frames), then, on its PIL output,
    # `VisualClozeUpsamplingPipeline` (FLUX.1 Fill on the target alone, one frame), the same transformer; each stage
    # sets the scheduler's timesteps anew, so each is a run of its own with its first step dense (`stats()`: the last).
    from diffusers import VisualClozePipeline

    pipe, image = visualcloze(VisualClozePipeline, flux_pipe)
    call = {"task_prompt": "a red circle", "content_prompt": "on grass", "image": image, "num_inference_steps": 3,
            "max_sequence_length": TEXT_LEN, "output_type": "latent", "upsampling_strength": 1.0,
            "upsampling_height": 32, "upsampling_width": 32}
    stats, calls = check_pipeline_against_dense(pipe, call)
    first_layer = [(r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0]
    assert first_layer == [(0, False), (1, True), (2, True)]
    # Steps 1 and 2 of each stage, both layers: the two rows of 8 x 16 tokens, then the 32 x 32 target's 8 x 8.
    assert Counter(layout for _, layout, _ in calls) == {
        VideoLayout(2, 8, 16, text_len=TEXT_LEN, text_position="start"): 4,
        VideoLayout(1, 8, 8, text_len=TEXT_LEN, text_position="start"): 4,
    }


@pytest.mark.parametrize("blocks, reference_size, layout", [
    (FluxCoreDenoiseStep, None, VideoLayout(1, 4, 6, text_len=TEXT_LEN, text_position="start")),
    (FluxKontextCoreDenoiseStep, (8, 12), VideoLayout(2, 4, 6, text_len=TEXT_LEN, text_position="start")),
    (FluxKontextCoreDenoiseStep, (4, 6), VideoLayout(1, 4, 6, text_len=TEXT_LEN + 2 * 3, text_position="start")),
], ids=["text2image", "kontext, reference of the output's size", "kontext, reference of another size"])
def test_modular_denoise_blocks_dense_every_block_kept_and_sparse_after_the_dense_step(flux_pipe, blocks,
                                                                                       reference_size, layout):
    # diffusers' modular FLUX.1 blocks (one call per step, no guider) pass `t / 1000` as the timestep; Kontext's
    # appends the reference latents' tokens and ids (first id 1). A 64 x 96 image is 4 x 6 packed tokens (no VAE:
    # the blocks' scale factor 8); the reference latents are 4 channels of 8 x 12 (the output's size) or 4 x 6.
    pipe = blocks().init_pipeline()
    pipe.update_components(transformer=flux_pipe.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    call = {"prompt_embeds": torch.randn(1, TEXT_LEN, 16, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 8, generator=g), "height": 64, "width": 96, "num_inference_steps": 3,
            "output": "latents"}
    if blocks is FluxKontextCoreDenoiseStep:
        call.update(max_area=64 * 96, image_latents=torch.randn(1, 4, *reference_size, generator=g))
    stats, calls = check_modular_against_dense(pipe, call)
    # `t / 1000` scaled back: each call on its own scheduler step (a wrong scale puts them all on one), the first dense.
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {(step, "call 0"): 2 for step in range(3)}
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    assert {(layout, shape) for _, layout, shape in calls} == {(layout, (1, layout.num_tokens))}
