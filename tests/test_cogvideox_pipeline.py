"""diffsparse on a real diffusers CogVideoX pipeline (tiny, random weights, offline): text and video tokens in
one self-attention sequence, CFG batched into one transformer call."""

import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    CogVideoXVideoToVideoPipeline,
)
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from transformers import T5Config, T5EncoderModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_fused_projections,
    check_other_processors_are_refused,
    check_video_token_positions,
    first_transformer_call,
    recorded_attention_calls,
    run_pipeline,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "up", "low", "quality"]
TEXT_LEN = 8
ALL_BLOCKS = Window3D(window=(99, 99, 99))


def tiny_cogvideox_pipeline(rotary: bool = True, patch_size_t: int | None = None, image_to_video: bool = False):
    """A `CogVideoXPipeline`, or with `image_to_video` a `CogVideoXImageToVideoPipeline` shaped like 5B-I2V: the
    image latent concatenated on channels (twice the input channels), learned positions added to RoPE."""
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8 if image_to_video else 4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
        patch_size=2, patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=rotary, use_learned_positional_embeddings=image_to_video,
    )
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, pad_token_id=0, eos_token_id=1))
    pipeline_class = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    pipe = pipeline_class(tokenizer=word_tokenizer(VOCABULARY), text_encoder=text_encoder.eval(), vae=vae.eval(),
                          transformer=transformer.eval(), scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "num_frames": 9, "height": 64,
        "width": 48, "num_inference_steps": 3, "guidance_scale": 6.0, "max_sequence_length": TEXT_LEN}


def generate(pipe, **kwargs):
    call = {**CALL, "output_type": "pt", "generator": torch.Generator().manual_seed(0), **kwargs}
    with torch.no_grad():
        return pipe(**call).frames


@pytest.fixture(scope="module")
def cog_pipe():
    return tiny_cogvideox_pipeline()


def _processors(pipe):
    return [block.attn1.processor for block in pipe.transformer.transformer_blocks]


def test_dense_pattern_is_the_unmodified_pipeline_and_remove_restores_it(cog_pipe):
    originals = _processors(cog_pipe)
    reference = generate(cog_pipe)
    with diffsparse.sparse(cog_pipe, diffsparse.SparseConfig(pattern="dense")):
        assert all(p is not o for p, o in zip(_processors(cog_pipe), originals))
        assert torch.equal(generate(cog_pipe), reference)
        # CFG batched: one call per step and layer, on the "cond_uncond" branch.
        stats = diffsparse.stats(cog_pipe)
        assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(3, 0), (3, 0)]
        assert {r.branch for log in stats.calls.values() for r in log} == {"cond_uncond"}
    assert all(p is o for p, o in zip(_processors(cog_pipe), originals))
    assert torch.equal(generate(cog_pipe), reference)


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_sparse_path_with_every_block_kept_matches_dense(cog_pipe, order):
    # 9 frames -> 3 latent frames, 64 x 48 pixels -> 4 x 3 tokens after the 2x2 patchify: 36 video tokens behind
    # 8 text tokens; the tile order leaves the text in place and permutes the video tokens in partial tiles.
    reference = generate(cog_pipe)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    with diffsparse.sparse(cog_pipe, config):
        out = generate(cog_pipe)
        assert all(s.dense_calls == 0 and s.sparse_calls == 3 for s in diffsparse.stats(cog_pipe).layers)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


def test_a_direct_transformer_call_the_pipelines_way(cog_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(cog_pipe, {**CALL, "output_type": "pt"})
    check_against_dense(cog_pipe.transformer, lambda: inputs, block_size=16)


def test_the_layout_has_the_text_first_and_sparse_calls_drop_only_video_blocks(cog_pipe):
    config = diffsparse.SparseConfig(pattern="radial", block_size=8, dense_steps=1, density=0.3)
    with diffsparse.sparse(cog_pipe, config), recorded_attention_calls() as calls:
        out = generate(cog_pipe)
        layers = diffsparse.stats(cog_pipe).layers
        runtime = diffsparse.api._handles(cog_pipe)[0].runtimes["transformer"]
        plan = runtime.plan(calls[0][1], 2, torch.device("cpu")).plan
    layout = VideoLayout(3, 4, 3, text_len=TEXT_LEN, text_position="start")
    assert {(lay, shape) for _, lay, shape in calls} == {(layout, (2, TEXT_LEN + 36))}  # CFG's two branches batched
    assert all(s.sparse_calls == 2 and s.mean_density < 1 for s in layers)
    mask = plan.block_mask[0, 0]  # the first block holds the 8 text tokens: its row and column stay whole
    assert mask[0].all() and mask[:, 0].all() and not mask.all()
    assert torch.isfinite(out).all() and not torch.allclose(out, generate(cog_pipe), atol=1e-4)


@pytest.mark.parametrize("rotary, patch_size_t", [(False, None), (True, 2)])
def test_learned_positions_and_cogvideox_1_5_temporal_patches(rotary, patch_size_t):
    # CogVideoX 1.0 2B: sincos positions added to the tokens, no RoPE. 1.5: 2-frame patches, 17 frames -> 5 latent
    # frames, padded by the pipeline to 6 -> 3 patch frames.
    pipe = tiny_cogvideox_pipeline(rotary=rotary, patch_size_t=patch_size_t)
    frames = 9 if patch_size_t is None else 17
    reference = generate(pipe, num_frames=frames)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)):
        torch.testing.assert_close(generate(pipe, num_frames=frames), reference, atol=1e-4, rtol=0)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=8, dense_steps=1)):
        assert not torch.allclose(generate(pipe, num_frames=frames), reference, atol=1e-4)
    latents = torch.zeros(1, 3 * (patch_size_t or 1), 4, 8, 6)  # (B, F, C, H, W)
    layout, timestep = diffsparse.pipelines.adapter_for(pipe.transformer).read_call(
        pipe.transformer, (latents,), {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, 16), "timestep": torch.tensor([10])}
    )
    assert layout == VideoLayout(3, 4, 3, text_len=TEXT_LEN, text_position="start") and int(timestep) == 10


@pytest.mark.parametrize("patch_size_t", [None, 2], ids=["1.0", "1.5"])
def test_each_latent_pixel_moves_the_query_of_its_own_video_token(patch_size_t):
    # 3 x 5 x 7 tokens after the text: a layout of swapped axes has the same token count, so only the positions
    # tell it apart.
    transformer = tiny_cogvideox_pipeline(patch_size_t=patch_size_t).transformer
    p_t = patch_size_t or 1

    def inputs():
        g = torch.Generator().manual_seed(1)
        return {"hidden_states": torch.randn(1, 3 * p_t, 4, 10, 14, generator=g),  # (B, F, C, H, W)
                "encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=g), "timestep": torch.tensor([500]),
                "image_rotary_emb": get_3d_rotary_pos_embed(16, ((0, 0), (5, 7)), (5, 7), 3)}

    check_video_token_positions(transformer, inputs, grid=(3, 5, 7), patch=(p_t, 2, 2), axes="TCHW")


def test_image_to_video_pipeline():
    # 5B-I2V's learned positions fix the resolution to the transformer's sample size: 64 x 64 pixels, 9 frames.
    pipe = tiny_cogvideox_pipeline(image_to_video=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = generate(pipe, image=image, width=64)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="dense")):
        assert torch.equal(generate(pipe, image=image, width=64), reference)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)):
        torch.testing.assert_close(generate(pipe, image=image, width=64), reference, atol=1e-4, rtol=0)
        assert all(s.sparse_calls == 3 for s in diffsparse.stats(pipe).layers)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=8, dense_steps=1)):
        assert not torch.allclose(generate(pipe, image=image, width=64), reference, atol=1e-4)


def test_other_processors_are_refused_and_the_model_left_untouched(cog_pipe):
    check_other_processors_are_refused(cog_pipe, "CogVideoX", layer=1)


def test_fused_qkv_projections(cog_pipe):
    # `transformer.fuse_qkv_projections()` (diffusers' speed recipe for CogVideoX, with torch.compile) swaps in its
    # fused processor, one QKV projection: paired with its own sparse processor, projecting as it does.
    call = {**CALL, "output_type": "pt"}
    stats = check_fused_projections(cog_pipe, call, "FusedCogVideoXAttnProcessor2_0", block_size=8)
    assert any(r.sparse for log in stats.calls.values() for r in log)


def test_compare_command_runs_a_saved_cogvideox_pipeline(cog_pipe, tmp_path):
    import json

    from diffsparse.cli import main

    cog_pipe.save_pretrained(tmp_path / "cogvideox")
    args = ["compare", "--model", str(tmp_path / "cogvideox"), "--pattern", "radial", "--density", "0.3",
            "--block-size", "16", "--dense-steps", "1", "--steps", "2", "--frames", "17", "--height", "128", "--width", "128",
            "--out", str(tmp_path / "out")]
    # The command pads prompts to CogVideoX's 226 text tokens (blocks holding text stay whole), so the video needs
    # more tokens than the other tests' for any block to be dropped: 5 x 8 x 8.
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["mean_attention_density"] < 1 and result["psnr_db"] > 0


def test_the_demo_form_starts_at_cogvideox_own_size(cog_pipe):
    # CogVideoXPipeline leaves the size unset: its transformer's sample size (8 x 8 latents x 8, 9 frames here).
    from diffsparse.demo import form_ranges

    ranges = form_ranges(cog_pipe)
    assert (ranges["height"][3], ranges["width"][3], ranges["frames"][3]) == (64, 64, 9)


def test_video_to_video_pipeline(cog_pipe):
    from PIL import Image

    pipe = CogVideoXVideoToVideoPipeline(**cog_pipe.components)
    video = [Image.new("RGB", (48, 64), (200, 40 + 20 * i, 40)) for i in range(9)]
    call = {"video": video, "prompt": "a red circle moving left", "negative_prompt": "low quality", "strength": 0.8,
            "height": 64, "width": 48, "num_inference_steps": 4, "guidance_scale": 6.0, "max_sequence_length": TEXT_LEN,
            "output_type": "pt"}

    reference = run_pipeline(pipe, call)
    assert torch.equal(run_pipeline(pipe, call, diffsparse.SparseConfig(pattern="dense"))[0], reference)
    kept, _ = run_pipeline(pipe, call, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0))
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    sparse, _ = run_pipeline(pipe, call, diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=8,
                                                                 dense_steps=0))
    assert not torch.allclose(sparse, reference, atol=1e-4)


def test_processors_replaced_after_apply_warn_once():
    # `fuse_qkv_projections()` (or `set_attn_processor`) after `apply` puts diffusers' processors back on every layer:
    # the pipeline then runs without sparse attention, which a warning says once; applying again makes it sparse.
    import warnings

    pipe = tiny_cogvideox_pipeline()
    config = diffsparse.SparseConfig(pattern="radial", block_size=8, dense_steps=0, density=0.3)
    diffsparse.apply(pipe, config)
    try:
        pipe.transformer.fuse_qkv_projections()
        with pytest.warns(UserWarning, match="every self-attention processor `apply` installed on transformer was "
                                             "replaced after it"):
            generate(pipe)
        assert not diffsparse.stats(pipe).calls["transformer"]
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="diffsparse: every self-attention processor")
            generate(pipe)
            diffsparse.apply(pipe, config)
            generate(pipe)
        assert all(r.sparse for r in diffsparse.stats(pipe).calls["transformer"])
        # Some layers replaced (by anything but PAG's per-call processors): those layers, by index.
        pipe.transformer.transformer_blocks[1].attn1.set_processor(CogVideoXAttnProcessor2_0())
        with pytest.warns(UserWarning, match=r"installed on layers \[1\] of transformer were replaced after it"):
            generate(pipe)
        assert {r.layer for r in diffsparse.stats(pipe).calls["transformer"]} == {0}
    finally:
        diffsparse.remove(pipe)
