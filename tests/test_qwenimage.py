"""diffsparse on diffusers Qwen-Image (tiny, random weights, offline): the transformer called directly, joint [text,
image] double-stream attention with complex RoPE on both streams; Qwen-Image-Edit's reference images of the output's
size (frames) and of another size (kept whole beside the text); padded prompts run the original. And the whole
`QwenImagePipeline` built (Qwen2.5-VL text encoder, Qwen-Image VAE) and run with true CFG: the `t / 1000` timesteps
it passes land on the scheduler's steps."""

from collections import Counter

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    qwen_tokenizer,
    run_transformer,
    tiny_qwen25_vl,
)

TEXT_LEN = 7
LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)


def tiny_transformer():
    """4 latent channels packed 2x2 (16 in), text of the tiny Qwen2.5-VL's width (16)."""
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
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


def test_padded_prompts_run_the_original_and_count_as_dense(transformer):
    call = inputs(valid_text=(5, TEXT_LEN))
    reference = run_transformer(transformer, call)
    with torch.no_grad(), diffsparse.sparse(transformer, LOCAL) as handle:
        out = transformer(**call()).sample
        assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(1, 0), (1, 0)]
    assert torch.equal(out, reference)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Qwen-Image", layer=1)


# Chat-template tokens first: the word tokenizer's own (pad, unk) and Qwen's special tokens; the template's other words
# are not needed (`<unk>`), the pipeline drops them.
VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "a", "red", "circle", "on", "grass", "blurry"]


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
