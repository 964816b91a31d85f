"""diffsparse on diffusers HunyuanVideo Framepack (tiny, random weights): the transformer called directly, and a real
`HunyuanVideoFramepackPipeline` built offline (tiny Llama and CLIP text encoders, SigLIP image encoder, HunyuanVideo
VAE) generating an image-to-video clip section by section. HunyuanVideo's blocks over `[history, video, image, text]`,
the history (4x, 2x, 1x patchified) attended with the text span through the adapter's token order."""

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_video_token_positions,
    recorded_attention_calls,
    run_pipeline,
    run_transformer,
    tiny_clip_text_model,
    tiny_hunyuan_video_vae,
    tiny_llama,
)

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


# Each history term's name, frame count and first frame index.
HISTORY_TERMS = (("latents_clean", 2, 7), ("latents_history_2x", 2, 4), ("latents_history_4x", 4, 0))


def inputs(valid_text=(7,), size=(8, 12), history=HISTORY_TERMS):
    """3 latent frames of 8 x 12 (3 x 4 x 6 = 72 video tokens); prompts with `valid_text` real tokens of TEXT_LEN
    and a 5-token image embedding; the history (the transformer needs all three terms): 2 clean frames (2 x 4 x 6 =
    48 tokens), 2 frames at 2x (1 x 2 x 3 = 6) and 4 at 4x (1 x 1 x 2 = 2, padded up): 56 tokens. `size`, the
    latents' height and width, and `history`, the terms as in HISTORY_TERMS, change these."""
    def call():
        g = torch.Generator().manual_seed(1)
        batch = len(valid_text)
        kwargs = {
            "hidden_states": torch.randn(batch, 4, 3, *size, generator=g), "timestep": torch.full((batch,), 900.0),
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=g),
            "encoder_attention_mask": (torch.arange(TEXT_LEN)[None] < torch.tensor(valid_text)[:, None]).long(),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "image_embeds": torch.randn(batch, IMAGE_TOKENS, 8, generator=g),
            "indices_latents": torch.arange(9, 12), "guidance": torch.full((batch,), 6000.0),
        }
        for name, frames, first in history:
            kwargs[name] = torch.randn(batch, 4, frames, *size, generator=g)
            kwargs[f"indices_{name}"] = torch.arange(first, first + frames)
        return kwargs

    return call


@pytest.mark.parametrize("valid_text", [(7,), (7, 12)], ids=["one video", "two prompt lengths"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, valid_text, order):
    check_against_dense(transformer, inputs(valid_text), block_size=16, order=order, sparse=LOCAL)


def test_history_terms_the_transformer_pads_up_are_counted_padded(transformer):
    # The transformer pads the 2x and 4x history terms up to whole patches (the clean one is a plain strided
    # patchify), so the layout counts their tokens rounded up. On 10 x 14 latents each term's count differs rounded
    # down: 3 frames at 2x give 2 x 3 x 4 = 24 tokens (6 rounded down), 5 at 4x 2 x 2 x 2 = 8 (1); the other tests'
    # 2x term gives 6 either way. Two prompt lengths: each video's valid prefix is cut where the layout counts it.
    history = (("latents_clean", 2, 8), ("latents_history_2x", 3, 5), ("latents_history_4x", 5, 0))
    check_against_dense(transformer, inputs((7, 12), size=(10, 14), history=history), block_size=16, sparse=LOCAL)


def test_the_clean_history_term_drops_a_partial_patch(transformer):
    # The 1x term's embedder is a plain stride-2 convolution, no padding: on 7 x 11 latents its 2 frames give
    # 2 x 3 x 5 = 30 tokens (48 were it padded up), the 2x term 1 x 2 x 3 = 6 and the 4x term 1 x 1 x 2 = 2 (padded
    # up), the video 3 x 3 x 5. (Sizes of 3 modulo 4: on others the transformer's own RoPE of the 2x and 4x terms,
    # pooled from the rounded-down grid, is not as long as the terms.)
    layout, _, _ = adapter_for(transformer).read_call(transformer, (), inputs(size=(7, 11))())
    assert layout == VideoLayout(3, 3, 5, text_len=30 + 6 + 2 + IMAGE_TOKENS + 7, text_position="end")
    one_frame = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    check_against_dense(transformer, inputs((7, 12), size=(7, 11)), block_size=8, sparse=one_frame)


def test_each_latent_pixel_moves_the_query_of_its_own_video_token(transformer):
    # 3 x 5 x 7 video tokens, put first by the token order: in the layout's order each latent pixel's token is where
    # the grid says, each axis told apart by its size.
    check_video_token_positions(transformer, inputs(size=(10, 14)), grid=(3, 5, 7), patch=(1, 2, 2))


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


# Two sections of 3 latent frames (windows of (3 - 1) * 4 + 1 = 9 frames cover 17), each 3 steps, true CFG with a
# negative prompt (two transformer calls per step) on top of the distilled guidance embedding. The word tokenizer
# makes the pipeline's default Llama template (crop_start=95) fewer than 95 tokens, which would crop into the prompt:
# this template's prefix is exactly its crop_start tokens, so the prompt survives the crop whole.
PIPELINE_CALL = {
    "prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 64, "width": 64,
    "num_frames": 17, "latent_window_size": 3, "num_inference_steps": 3, "guidance_scale": 6.0, "true_cfg_scale": 2.0,
    "prompt_template": {"template": "describe the video {}", "crop_start": 3}, "max_sequence_length": 12,
    "output_type": "latent",
}
SECTIONS, STEPS, LAYERS, BRANCHES = 2, 3, 2, 2
# 64 x 64 pixels: 8 x 8 latents, 4 x 4 tokens after the 2x2 patchify; the window's 3 frames are the grid. Inverted
# anti-drifting sampling always passes 1 + 2 + 16 history frames (zeros until a section is generated): the image and 1
# frame at 1x (2 x 4 x 4 = 32 tokens), 2 frames at 2x (1 x 2 x 2 = 4), 16 at 4x (4 x 1 x 1 = 4).
GRID, HISTORY = (3, 4, 4), 2 * 4 * 4 + 1 * 2 * 2 + 4 * 1 * 1


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
    from transformers import (
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from diffsparse.pipelines.text import word_tokenizer

    vocabulary = ["<pad>", "</s>", "<unk>", "describe", "the", "video", "a", "red", "circle", "moving", "left", "low",
                  "quality"]
    torch.manual_seed(0)
    transformer = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=8, has_clean_x_embedder=True,
    )
    vae = tiny_hunyuan_video_vae()
    # The pipeline takes the Llama's third-to-last hidden states: two layers at least.
    llama = tiny_llama(len(vocabulary))
    clip = tiny_clip_text_model(len(vocabulary))
    # Its last hidden states are the transformer's image embedding (image_proj_dim wide), one token per patch.
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=16, patch_size=8))
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=llama.eval(), tokenizer=word_tokenizer(vocabulary), transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip.eval(),
        tokenizer_2=word_tokenizer(vocabulary, max_length=77), image_encoder=siglip.eval(),
        feature_extractor=SiglipImageProcessor(size={"height": 16, "width": 16}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline_call():
    import numpy as np
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return {**PIPELINE_CALL, "image": Image.fromarray(image)}


def generated(frames):
    """The pipeline's latent output, one tensor per section, as one flat tensor."""
    return torch.cat([section.flatten() for section in frames])


@pytest.fixture(scope="module")
def pipeline_reference(pipe, pipeline_call):
    frames = run_pipeline(pipe, pipeline_call)
    assert len(frames) == SECTIONS
    return generated(frames)


def test_pipeline_dense_is_identical_and_every_block_kept_matches(pipe, pipeline_call, pipeline_reference):
    dense, stats = run_pipeline(pipe, pipeline_call, diffsparse.SparseConfig(pattern="dense"))
    assert torch.equal(generated(dense), pipeline_reference)
    assert not any(r.sparse for r in stats.calls["transformer"])
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    kept, stats = run_pipeline(pipe, pipeline_call, every_block)
    torch.testing.assert_close(generated(kept), pipeline_reference, atol=1e-4, rtol=0)
    assert {(r.sparse, r.density) for r in stats.calls["transformer"]} == {(True, 1.0)}


def test_pipeline_sections_each_take_their_dense_steps(pipe, pipeline_call, pipeline_reference):
    # The number of sparse-path calls made when each step ends splits the calls by step, hence by section.
    ends = []

    def mark_step_end(pipeline, step, timestep, callback_kwargs):
        ends.append(len(calls))
        return {}

    # Whether each transformer call's 2x history holds generated frames (the pipeline fills it with zeros first).
    history_generated = []

    def read_history(module, args, kwargs):
        history_generated.append(bool(kwargs["latents_history_2x"].abs().sum() > 0))

    call = {**pipeline_call, "callback_on_step_end": mark_step_end, "callback_on_step_end_tensor_inputs": []}
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=1)
    hook = pipe.transformer.register_forward_pre_hook(read_history, with_kwargs=True)
    try:
        with recorded_attention_calls() as calls:
            out, stats = run_pipeline(pipe, call, config)
    finally:
        hook.remove()
    assert not torch.allclose(generated(out), pipeline_reference, atol=1e-4)

    # Every section is its own scheduler run, so `stats()` holds the last section's calls only: step 0 dense, the
    # others sparse, for both CFG calls of every layer.
    records = stats.calls["transformer"]
    assert len(records) == STEPS * BRANCHES * LAYERS
    assert {(r.step, r.sparse) for r in records} == {(0, False), (1, True), (2, True)}
    assert all(r.density < 1 for r in records if r.sparse)

    # The recorder saw every section: none at its dense first step, both CFG calls of every layer at the sparse
    # ones. The history span is there in every section, the same size (kept in the layout's trailing span, with the
    # image tokens, SigLIP's patches, and each prompt cut to its valid tokens); from the second section on it holds
    # the frames the first generated.
    assert len(ends) == SECTIONS * STEPS
    assert history_generated == [False] * STEPS * BRANCHES + [True] * (SECTIONS - 1) * STEPS * BRANCHES
    per_step = [calls[start:end] for start, end in zip([0, *ends], ends)]
    image_tokens = (pipe.image_encoder.config.image_size // pipe.image_encoder.config.patch_size) ** 2
    layouts = {
        VideoLayout(*GRID, text_len=HISTORY + image_tokens + len(pipe.tokenizer(prompt).input_ids), text_position="end")
        for prompt in (pipeline_call["prompt"], pipeline_call["negative_prompt"])
    }
    assert len(layouts) == BRANCHES
    for section in range(SECTIONS):
        steps = per_step[section * STEPS:(section + 1) * STEPS]
        assert [len(step) for step in steps] == [0] + [BRANCHES * LAYERS] * (STEPS - 1), section
        for step in steps[1:]:
            assert {layout for _, layout, _ in step} == layouts, section
            assert all(shape == (1, layout.num_tokens) for _, layout, shape in step), section
            assert sorted(layer for layer, _, _ in step) == sorted([*range(LAYERS)] * BRANCHES), section
