"""diffsparse on real diffusers Wan pipelines (tiny, random weights, offline)."""

import contextlib
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import LucyEditPipeline, WanPipeline, WanTransformer3DModel
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.hooks import HookRegistry
from diffusers.modular_pipelines.wan.modular_blocks_wan import WanBlocks
from PIL import Image

import diffsparse
from diffsparse.patterns import Radial, SpatialTemporal, TileOrder, VideoLayout, Window3D
from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline
from diffsparse.runtime import HOOK_NAME

from helpers import (
    check_against_dense,
    check_video_token_positions,
    first_transformer_call,
    generate,
    recorded_attention_calls,
    tiny_call,
    tiny_image_to_video_pipeline,
)

# A window larger than any test canvas: every block kept, but through the sparse processor and kernel,
# so comparing it with dense tests the sparse path's q/k/v math and the token permutation.
ALL_BLOCKS = Window3D(window=(99, 99, 99))


def _self_attention_processors(pipe):
    return [block.attn1.processor for block in pipe.transformer.blocks]


def test_dense_pattern_matches_unmodified_pipeline_and_remove_restores_originals(tiny_pipe):
    originals = _self_attention_processors(tiny_pipe)
    cross = [block.attn2.processor for block in tiny_pipe.transformer.blocks]
    reference = generate(tiny_pipe)

    diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(pattern="dense"))
    assert all(p is not o for p, o in zip(_self_attention_processors(tiny_pipe), originals))
    assert [block.attn2.processor for block in tiny_pipe.transformer.blocks] == cross  # cross-attention untouched
    dense = generate(tiny_pipe)
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=0)
    stats = diffsparse.stats(tiny_pipe)
    assert all(s.sparse_calls == 0 and s.dense_calls == 3 * 2 for s in stats.layers)  # 3 steps x cond/uncond

    diffsparse.remove(tiny_pipe)
    assert all(p is o for p, o in zip(_self_attention_processors(tiny_pipe), originals))
    assert tiny_pipe.transformer._diffusers_hook.get_hook("diffsparse_context") is None
    assert torch.equal(generate(tiny_pipe), reference)


def test_sparse_path_with_every_block_kept_matches_dense(tiny_pipe):
    reference = generate(tiny_pipe)
    with diffsparse.sparse(tiny_pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)):
        out = generate(tiny_pipe)
        assert all(s.dense_calls == 0 for s in diffsparse.stats(tiny_pipe).layers)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


def test_a_direct_transformer_call_the_pipelines_way(tiny_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    call = {name: value for name, value in tiny_call().items() if name != "generator"}
    inputs = first_transformer_call(tiny_pipe, call)
    check_against_dense(tiny_pipe.transformer, lambda: inputs, block_size=16)


def test_tile_order_is_transparent(tiny_pipe):
    # 5 x 4 x 6 tokens in (1, 2, 4) tiles: edge tiles are partial, so the permutation is not block-aligned.
    reference = generate(tiny_pipe)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0, order=TileOrder((1, 2, 4)))
    with diffsparse.sparse(tiny_pipe, config):
        out = generate(tiny_pipe)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


def test_correction_measured_at_every_step_gives_the_dense_video(tiny_pipe):
    # correction_refresh=1 measures at every step, so every call runs dense through the kernel: the video is the
    # dense one, and the log says where the statistics were taken.
    reference = generate(tiny_pipe)
    config = diffsparse.SparseConfig(block_size=16, dense_steps=1, correction="residual", correction_refresh=1)
    with diffsparse.sparse(tiny_pipe, config) as handle:
        out = generate(tiny_pipe)
        records = handle.stats().calls["transformer"]
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert all(r.measured and not r.sparse for r in records)
    assert len(records) == 3 * 2 * 2  # steps x branches x layers


def test_correction_schedule_in_a_pipeline(tiny_pipe):
    config = diffsparse.SparseConfig(block_size=16, dense_steps=2, dense_layers=1, correction="residual")
    with diffsparse.sparse(tiny_pipe, config) as handle:
        out = generate(tiny_pipe, num_inference_steps=4)
        records = handle.stats().calls["transformer"]
    assert torch.isfinite(out).all()
    # Layer 1, both branches: dense, measured at the last dense step, then sparse; layer 0 stays dense.
    assert [(r.step, r.sparse, r.measured) for r in records if r.layer == 1 and r.branch == "cond"] == [
        (0, False, False), (1, False, True), (2, True, False), (3, True, False)
    ]
    assert {r.branch for r in records if r.measured} == {"cond", "uncond"}
    assert not any(r.sparse or r.measured for r in records if r.layer == 0)


def test_branches_outside_a_cache_context_keep_their_own_correction(tiny_pipe):
    # A guider that runs CFG's branches as calls one after another without `cache_context` (modular pipelines,
    # Kandinsky 5; here a bare loop): the calls of a step are told apart by their order, so each branch measures
    # and reuses its own statistics and gets the outputs it gets alone. Sharing one set (the rule before) gave the
    # conditional branch the unconditional branch's residual.
    transformer = tiny_pipe.transformer
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 5, 16, 24, generator=g)  # 5 x 8 x 12 tokens: the pattern keeps 73% of blocks
    prompts = {"cond": torch.randn(1, 8, 32, generator=g), "uncond": torch.randn(1, 8, 32, generator=g)}
    config = diffsparse.SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=1,
                                     correction="residual")

    def loop(branches):
        outputs = []
        with diffsparse.sparse(transformer, config) as handle, torch.no_grad():
            for t in (900.0, 600.0, 300.0):
                for branch in branches:
                    outputs.append(transformer(latents, torch.tensor([t]), prompts[branch]).sample)
            return outputs, handle.stats().calls["transformer"]

    both, records = loop(["cond", "uncond"])
    assert {(r.step, r.branch, r.measured) for r in records if r.layer == 0} == {
        (0, "call 0", True), (0, "call 1", True), (1, "call 0", False), (1, "call 1", False),
        (2, "call 0", False), (2, "call 1", False),
    }
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    cond, _ = loop(["cond"])
    uncond, _ = loop(["uncond"])
    for step in (1, 2):
        torch.testing.assert_close(both[2 * step], cond[step], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[2 * step + 1], uncond[step], atol=1e-5, rtol=0)


def test_modular_pipeline(tiny_pipe):
    # diffusers' modular Wan pipeline (`WanBlocks` on the tiny pipeline's components, a CFG guider running the two
    # branches as unnamed calls): dense identical, every block kept within 1e-4, and with a correction each branch
    # measures its own statistics at the last dense step.
    pipe = WanBlocks().init_pipeline()
    pipe.update_components(transformer=tiny_pipe.transformer, vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder,
                           tokenizer=tiny_pipe.tokenizer, scheduler=tiny_pipe.scheduler,
                           guider=ClassifierFreeGuidance(guidance_scale=5.0))

    def run(config=None):
        call = tiny_call(output="videos")  # a fresh generator, seed 0
        del call["max_sequence_length"], call["guidance_scale"]  # the modular pipeline's: its text step's, the guider's
        with torch.no_grad():
            if config is None:
                return pipe(**call), None
            with diffsparse.sparse(pipe, config) as handle:
                return pipe(**call), handle.stats()

    reference, _ = run()
    assert torch.equal(run(diffsparse.SparseConfig(pattern="dense"))[0], reference)
    kept, _ = run(diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0))
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    _, stats = run(diffsparse.SparseConfig(block_size=16, dense_steps=1, correction="residual"))
    records = stats.calls["transformer"]
    assert {(r.step, r.branch, r.measured, r.sparse) for r in records} == {
        (0, "call 0", True, False), (0, "call 1", True, False), (1, "call 0", False, True),
        (1, "call 1", False, True), (2, "call 0", False, True), (2, "call 1", False, True),
    }


def test_window3d_on_tiles_runs_sparse(tiny_pipe):
    config = diffsparse.SparseConfig(
        pattern=Window3D(window=(1, 2, 2)), block_size=16, dense_steps=0, order=TileOrder((1, 2, 2))
    )
    reference = generate(tiny_pipe, num_frames=33)
    with diffsparse.sparse(tiny_pipe, config) as handle:
        out = generate(tiny_pipe, num_frames=33)
        densities = {r.density for r in handle.stats().calls["transformer"]}
    assert torch.isfinite(out).all() and (out - reference).abs().max() > 1e-4
    assert len(densities) == 1 and densities.pop() < 0.5


@pytest.mark.parametrize(
    "config, fitted_as_asked",
    [
        ({"pattern": SpatialTemporal(frames=1, width=1)},
         lambda p: len(p.heads) == 2 and set(p.heads) <= {"spatial", "temporal"}),
        ({"pattern": "searched", "density": 0.3}, lambda p: p.keep == 0.3 and p.num_heads == 2),
    ],
    ids=["spatial_temporal", "searched"],
)
def test_data_dependent_patterns_are_fitted_once_per_layer_and_call(tiny_pipe, config, fitted_as_asked):
    config = diffsparse.SparseConfig(**config, block_size=16, dense_steps=1)
    with diffsparse.sparse(tiny_pipe, config) as handle:
        out = generate(tiny_pipe, num_frames=33)
        runtime = handle.runtimes["transformer"]
        chosen = dict(runtime._layer_patterns)
        records = handle.stats().calls["transformer"]
    assert torch.isfinite(out).all()
    assert sorted(layer for layer, *_ in chosen) == [0, 1]  # one fit per layer, reused across steps
    assert all(len(fitted) == 1 and fitted_as_asked(fitted[0]) for fitted in chosen.values())  # one video
    # Each layer's sparse calls all ran one plan: the density never changes across steps and branches.
    for layer in (0, 1):
        densities = {r.density for r in records if r.sparse and r.layer == layer}
        assert len(densities) == 1
        if config.density is not None:
            assert abs(densities.pop() - config.density) < 0.02


@pytest.mark.parametrize(
    "pattern, fits_differ",
    [(SpatialTemporal(frames=1, width=1), False), ("searched", True)],  # both heads stay "spatial" here
    ids=["spatial_temporal", "searched"],
)
def test_data_dependent_patterns_give_each_video_of_a_batch_what_it_gets_alone(tiny_pipe, pattern, fits_differ):
    config = diffsparse.SparseConfig(pattern=pattern, density=0.3, block_size=16, dense_steps=1)
    prompts = ["a red circle moving left", "a blue square moving up"]
    with diffsparse.sparse(tiny_pipe, config) as handle:
        batch = generate(tiny_pipe, prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
        fitted = next(iter(handle.runtimes["transformer"]._layer_patterns.values()))
        alone = [generate(tiny_pipe, seed=seed, prompt=prompt) for seed, prompt in zip((0, 1), prompts)]
    assert len(fitted) == (2 if fits_differ else 1)  # each video fitted on its own tensors; equal fits shared
    torch.testing.assert_close(batch, torch.cat(alone), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pattern", ["radial", "window3d"])
def test_target_density_is_solved_per_resolution(tiny_pipe, pattern):
    config = diffsparse.SparseConfig(pattern=pattern, density=0.5, block_size=16, dense_steps=0)
    with diffsparse.sparse(tiny_pipe, config) as handle:
        for frames, height in ((33, 64), (33, 128)):  # 9 x 4 x 6 and 9 x 8 x 6 tokens: 14 and 27 block rows
            generate(tiny_pipe, num_frames=frames, height=height, num_inference_steps=1)
            densities = {r.density for r in handle.stats().calls["transformer"]}
            assert len(densities) == 1
            rows = -(-9 * (height // 16) * 6 // 16)
            assert abs(densities.pop() - 0.5) <= 2 / rows  # within a block row or two (the closest reachable)


def test_radial_schedule_dense_exactly_at_first_step_and_layer(tiny_pipe):
    reference = generate(tiny_pipe, num_frames=33)
    config = diffsparse.SparseConfig(
        pattern=Radial(decay=0.5, min_window=8), block_size=16, dense_steps=1, dense_layers=[0]
    )
    diffsparse.apply(tiny_pipe, config)
    out = generate(tiny_pipe, num_frames=33)
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() > 1e-4

    stats = diffsparse.stats(tiny_pipe)
    records = stats.calls["transformer"]
    assert len(records) == 3 * 2 * 2  # steps x branches x layers
    for r in records:
        assert r.sparse == (r.step > 0 and r.layer > 0), r
        assert r.density < 1.0 if r.sparse else r.density == 1.0
    # A listed block the model does not have (a typo for the one meant dense) is refused; what was applied stays.
    with pytest.raises(ValueError, match=r"dense_layers=\[0, 2\]: no transformer has block 2 \(self-attention "
                                         r"blocks: transformer 0..1\)"):
        diffsparse.apply(tiny_pipe, replace(config, dense_layers=[0, 2]))
    assert tiny_pipe.transformer._diffsparse_handle.config is config
    assert {r.branch for r in records} == {"cond", "uncond"}
    by_layer = {s.layer: s for s in stats.layers}
    assert (by_layer[0].dense_calls, by_layer[0].sparse_calls) == (6, 0)
    assert (by_layer[1].dense_calls, by_layer[1].sparse_calls) == (2, 4)
    assert 0 < by_layer[1].mean_density < 1
    # The sparse steps' work: layer 0's 4 calls there count as dense, step 0's calls not at all.
    assert [r.dense_step for r in records] == [r.step == 0 for r in records]
    assert (by_layer[0].dense_step_calls, by_layer[1].dense_step_calls) == (2, 2)
    assert stats.sparse_steps_density == pytest.approx((4 + 4 * by_layer[1].mean_density) / 8)
    assert f"outside the dense steps (dense layers, masked calls = 1.0): {stats.sparse_steps_density:.3f}" in str(stats)


def test_stats_describe_only_the_last_pipeline_call(tiny_pipe):
    diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    generate(tiny_pipe)
    generate(tiny_pipe, num_inference_steps=2, guidance_scale=1.0)  # no CFG: one call per step
    records = diffsparse.stats(tiny_pipe).calls["transformer"]
    assert sorted({r.step for r in records}) == [0, 1]
    assert len(records) == 2 * 2


@pytest.mark.parametrize("patch, size", [
    ((1, 2, 2), (3, 10, 14)),
    ((1, 2, 2), (3, 11, 15)),  # a partial patch on each spatial axis, dropped
    ((2, 2, 2), (7, 10, 14)),  # Wan's config allows a temporal patch too; the odd last frame is dropped
])
def test_each_latent_pixel_moves_the_query_of_its_own_video_token(patch, size):
    # 3 x 5 x 7 tokens: a layout of swapped axes has the same token count, so only the positions tell it apart.
    config = tiny_wan_config()["transformer"]
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**{**config, "patch_size": patch}).eval()

    def inputs():
        g = torch.Generator().manual_seed(1)
        latents = torch.randn(1, config["in_channels"], *size, generator=g)
        text = torch.randn(1, 6, config["text_dim"], generator=g)
        return {"hidden_states": latents, "timestep": torch.tensor([500]), "encoder_hidden_states": text}

    check_video_token_positions(transformer, inputs, grid=(3, 5, 7), patch=patch)


@pytest.mark.parametrize(
    "num_frames, height, width, block_size",
    [
        (9, 48, 80, 16),  # 3 x 3 x 5 = 45 tokens: divides no block size
        (13, 64, 64, (32, 16)),  # 4 x 4 x 4 = 64 tokens, block_q != block_k
        (21, 80, 48, 64),  # 6 x 5 x 3 = 90 tokens, fewer than two blocks
        (5, 112, 144, 16),  # 2 x 7 x 9 = 126 tokens
    ],
)
def test_any_resolution_and_frame_count(tiny_pipe, num_frames, height, width, block_size):
    reference = generate(tiny_pipe, num_frames=num_frames, height=height, width=width, num_inference_steps=2)
    config = diffsparse.SparseConfig(block_size=block_size, dense_steps=0)
    with diffsparse.sparse(tiny_pipe, config) as handle, recorded_attention_calls() as calls:
        out = generate(tiny_pipe, num_frames=num_frames, height=height, width=width, num_inference_steps=2)
        assert handle.stats().layers and all(s.sparse_calls == 4 for s in handle.stats().layers)
    # The token grid: 4x temporal and 8x spatial VAE compression, then 1 x 2 x 2 patches (height before width).
    assert {layout for _, layout, _ in calls} == {VideoLayout((num_frames - 1) // 4 + 1, height // 16, width // 16)}
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("guidance_scale, videos", [(1.0, 1), (5.0, 1), (5.0, 2)])
def test_cfg_and_several_videos_per_prompt(tiny_pipe, guidance_scale, videos):
    kwargs = {"num_frames": 33, "guidance_scale": guidance_scale, "num_videos_per_prompt": videos, "num_inference_steps": 2}
    reference = generate(tiny_pipe, **kwargs)
    config = diffsparse.SparseConfig(pattern=Radial(decay=0.5, min_window=8), block_size=16, dense_steps=0)
    with diffsparse.sparse(tiny_pipe, config) as handle:
        out = generate(tiny_pipe, **kwargs)
        records = handle.stats().calls["transformer"]
    assert out.shape == reference.shape and out.shape[0] == videos
    assert torch.isfinite(out).all()
    branches = {"cond", "uncond"} if guidance_scale > 1 else {"cond"}
    assert {r.branch for r in records} == branches
    assert all(r.sparse for r in records)


def test_two_pipelines_with_different_configs_in_one_process():
    pipe_a, pipe_b = tiny_wan_pipeline(), tiny_wan_pipeline()
    solo = {}
    for name, config in {
        "a": diffsparse.SparseConfig(pattern=Radial(decay=0.25, min_window=8), block_size=16, dense_steps=0),
        "b": diffsparse.SparseConfig(pattern="dense"),
    }.items():
        pipe = tiny_wan_pipeline()
        with diffsparse.sparse(pipe, config):
            solo[name] = generate(pipe, num_frames=33, num_inference_steps=2)
    diffsparse.apply(pipe_a, diffsparse.SparseConfig(pattern=Radial(decay=0.25, min_window=8), block_size=16, dense_steps=0))
    diffsparse.apply(pipe_b, diffsparse.SparseConfig(pattern="dense"))
    out_a = generate(pipe_a, num_frames=33, num_inference_steps=2)
    out_b = generate(pipe_b, num_frames=33, num_inference_steps=2)
    assert torch.equal(out_a, solo["a"]) and torch.equal(out_b, solo["b"])
    assert not torch.equal(out_a, out_b)
    assert diffsparse.stats(pipe_a).mean_density < 1.0 == diffsparse.stats(pipe_b).mean_density


def test_apply_again_replaces_previous_config(tiny_pipe):
    originals = _self_attention_processors(tiny_pipe)
    diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(pattern="radial", block_size=16))
    handle = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(pattern="dense"))
    assert handle.config.pattern == "dense"
    assert len(tiny_pipe.transformer._diffusers_hook._hook_order) == 1
    diffsparse.remove(tiny_pipe)
    assert all(p is o for p, o in zip(_self_attention_processors(tiny_pipe), originals))


def _wan22_pipeline():
    """The tiny Wan pipeline with a second expert for the low-noise steps, as Wan 2.2's."""
    config = tiny_wan_config()
    base = tiny_wan_pipeline()
    torch.manual_seed(1)
    pipe = WanPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        scheduler=base.scheduler,
        transformer=base.transformer,
        transformer_2=WanTransformer3DModel(**config["transformer"]).eval(),
        boundary_ratio=0.5,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_processor_refused_on_the_second_expert_leaves_both_untouched():
    # Before, the first expert was already made sparse (processors, hook) when the second's layer was refused.
    from diffsparse.pipelines import adapter_for

    pipe = _wan22_pipeline()
    adapter = adapter_for(pipe.transformer)
    before = [m.processor for _, m in adapter.self_attention_modules(pipe.transformer)]
    pipe.transformer_2.blocks[1].attn1.set_processor(type("Wrapped", (adapter.original_processor,), {})())
    with pytest.raises(ValueError, match="layer 1 of the Wan transformer has processor Wrapped"):
        diffsparse.apply(pipe, diffsparse.SparseConfig(dense_steps=0))
    assert [m.processor for _, m in adapter.self_attention_modules(pipe.transformer)] == before
    assert not hasattr(pipe.transformer, "_diffsparse_handle")
    assert HookRegistry.check_if_exists_or_initialize(pipe.transformer).get_hook(HOOK_NAME) is None


def test_wan22_two_experts_share_the_step_index():
    pipe = _wan22_pipeline()
    diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    generate(pipe, num_inference_steps=4)
    calls = diffsparse.stats(pipe).calls
    timesteps = pipe.scheduler.timesteps
    boundary = 0.5 * pipe.scheduler.config.num_train_timesteps
    expected_high = {i for i, t in enumerate(timesteps) if t >= boundary}
    assert {r.step for r in calls["transformer"]} == expected_high
    assert {r.step for r in calls["transformer_2"]} == set(range(4)) - expected_high
    assert all(r.sparse == (r.step >= 1) for log in calls.values() for r in log)
    # An expert asked about alone goes by the name the pipeline's handle gives it, not "transformer" for both.
    for name in ("transformer", "transformer_2"):
        alone = diffsparse.stats(getattr(pipe, name))
        assert {s.transformer for s in alone.layers} == {name} and alone.calls == {name: calls[name]}
    # With a correction, the second expert has no dense step of its own: its first call measures instead.
    diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1, correction="residual"))
    generate(pipe, num_inference_steps=4)
    calls = diffsparse.stats(pipe).calls
    first_low = min(set(range(4)) - expected_high)
    assert all(r.measured == (r.step == first_low) for r in calls["transformer_2"])
    assert all(r.measured == (r.step == 0) for r in calls["transformer"])
    diffsparse.remove(pipe)
    assert not hasattr(pipe.transformer_2, "_diffsparse_handle")


def test_stats_of_experts_applied_one_by_one():
    # Each expert with a config of its own: `stats(pipe)` reports both, under their component names (before, only
    # the first handle's transformer, and both handles call their lone transformer "transformer").
    pipe = _wan22_pipeline()
    diffsparse.apply(pipe.transformer, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    diffsparse.apply(pipe.transformer_2, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    generate(pipe, num_inference_steps=4)
    stats = diffsparse.stats(pipe)
    per_expert = {name: diffsparse.stats(getattr(pipe, name)) for name in ("transformer", "transformer_2")}
    assert list(stats.calls) == ["transformer", "transformer_2"]
    assert {s.transformer for s in stats.layers} == {"transformer", "transformer_2"}
    for name, alone in per_expert.items():
        assert stats.calls[name] == alone.calls["transformer"] and len(stats.calls[name]) > 0
    assert stats.layers == [*per_expert["transformer"].layers,
                            *[replace(s, transformer="transformer_2") for s in per_expert["transformer_2"].layers]]


def test_applying_to_one_expert_says_the_other_is_left_dense():
    pipe = _wan22_pipeline()
    diffsparse.apply(pipe, diffsparse.SparseConfig(dense_steps=0))
    with pytest.warns(UserWarning, match="from transformer_2 too"):
        diffsparse.apply(pipe.transformer, diffsparse.SparseConfig(dense_steps=0))
    assert not hasattr(pipe.transformer_2, "_diffsparse_handle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffsparse.apply(pipe.transformer_2, diffsparse.SparseConfig(dense_steps=0))  # each on its own: silent
        diffsparse.apply(pipe, diffsparse.SparseConfig(dense_steps=0))


def test_the_other_expert_left_dense_raised_as_an_error_leaves_both_as_they_were():
    # With `filterwarnings("error", category=DiffsparseWarning)`, the warning was raised after the new config was
    # installed on `transformer`: the pipeline's handle was gone from both experts.
    pipe = _wan22_pipeline()
    whole = diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=diffsparse.DiffsparseWarning)
        with pytest.raises(diffsparse.DiffsparseWarning, match="from transformer_2 too"):
            diffsparse.apply(pipe.transformer, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    assert whole.installed
    for name in ("transformer", "transformer_2"):
        expert = getattr(pipe, name)
        assert expert._diffsparse_handle is whole
        assert all(block.attn1.processor.runtime is whole.runtimes[name] for block in expert.blocks)
        assert list(expert._diffusers_hook.hooks) == [HOOK_NAME]


@torch.no_grad()
@pytest.mark.parametrize("variant", ["wan21_clip", "wan22", "wan22_ti2v"])
def test_image_to_video(variant):
    # Wan 2.1 I2V (CLIP image embedding in cross-attention, image latent concatenated on channels), Wan 2.2 I2V
    # (no CLIP, channels concatenated) and TI2V (the image latent replaces the first frame; timesteps become
    # per-token): the dense pattern leaves the video unchanged, every block kept through the sparse kernel gives
    # it back, and a real pattern runs sparse after the dense step.
    pipe = tiny_image_to_video_pipeline(variant)
    image = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    reference = generate(pipe, image=image, num_frames=33)

    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="dense")):
        torch.testing.assert_close(generate(pipe, image=image, num_frames=33), reference, atol=1e-5, rtol=0)
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    with diffsparse.sparse(pipe, every_block):
        torch.testing.assert_close(generate(pipe, image=image, num_frames=33), reference, atol=1e-4, rtol=0)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1)) as handle:
        out = generate(pipe, image=image, num_frames=33)
        records = handle.stats().calls["transformer"]
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert [r.step for r in records if r.layer == 0 and r.branch == "cond"] == [0, 1, 2]
    assert all(r.sparse == (r.step >= 1) for r in records)
    assert any(r.sparse and r.density < 1 for r in records)


def test_compare_takes_an_image_for_image_to_video(tmp_path, tiny_pipe):
    # The commands pass `--image` to pipelines that take an `image`; one that needs it says so without, and a
    # text-to-video pipeline refuses it by name rather than ignore it.
    from diffsparse.cli import build_parser
    from diffsparse.compare import run_compare

    image_path = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)).save(image_path)
    config = diffsparse.SparseConfig(block_size=16, dense_steps=1)
    pipe = tiny_image_to_video_pipeline("wan22")

    def args(*extra):
        return build_parser().parse_args(["compare", "--frames", "9", "--height", "64", "--width", "96", "--steps", "2",
                                          "--block-size", "16", "--dense-steps", "1", "--out", str(tmp_path), *extra])

    with pytest.raises(ValueError, match="WanImageToVideoPipeline generates from an image: give one with --image"):
        run_compare(args(), config, pipe=pipe)
    result = run_compare(args("--image", str(image_path)), config, pipe=pipe)
    assert result.frames == 9 and result.mean_attention_density < 1 and result.psnr_db > 0
    assert result.image == str(image_path)  # compare.json's record of what the run was called with
    with pytest.raises(ValueError, match="WanPipeline takes no `image`"):
        run_compare(args("--image", str(image_path)), config, pipe=tiny_pipe)


def test_compare_passes_call_kwargs_to_the_pipeline(tmp_path, tiny_pipe, capsys):
    # `--call-kwargs` reaches the pipeline call (here: guidance 1 turns classifier-free guidance off, one transformer
    # call per step instead of two); a key the pipeline does not take, or one an option sets, is refused by name.
    from diffsparse.cli import build_parser, main
    from diffsparse.compare import run_compare

    config = diffsparse.SparseConfig(block_size=16, dense_steps=1)

    def args(*extra):
        return build_parser().parse_args(["compare", "--frames", "9", "--height", "48", "--width", "64", "--steps",
                                          "2", "--block-size", "16", "--dense-steps", "1", "--out", str(tmp_path),
                                          *extra])

    calls = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        run_compare(args(), config, pipe=tiny_pipe)
        with_cfg, calls[:] = len(calls), []
        result = run_compare(args("--call-kwargs", '{"guidance_scale": 1.0}'), config, pipe=tiny_pipe)
    finally:
        hook.remove()
    assert len(calls) == with_cfg // 2 and result.psnr_db > 0
    with pytest.raises(ValueError, match="'guidance', which WanPipeline does not take; it takes .*guidance_scale"):
        run_compare(args("--call-kwargs", '{"guidance": 1.0}'), config, pipe=tiny_pipe)
    with pytest.raises(ValueError, match=r"'guidance_scal', which WanPipeline .* \(did you mean 'guidance_scale'\?\)"):
        run_compare(args("--call-kwargs", '{"guidance_scal": 1.0}'), config, pipe=tiny_pipe)
    with pytest.raises(ValueError, match=r"'num_inference_steps', which the command sets itself: use its option \(--steps\)"):
        run_compare(args("--call-kwargs", '{"num_inference_steps": 3}'), config, pipe=tiny_pipe)
    for bad in ("{guidance_scale: 1}", "[1, 2]"):
        with pytest.raises(SystemExit):
            main(["compare", "--call-kwargs", bad])
        assert "expected a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("memory_saver", ["group offload (leaf)", "group offload (block)", "layerwise casting",
                                          "model cpu offload", "sequential cpu offload (transformer)"])
@pytest.mark.parametrize("apply_first", [False, True], ids=["saver first", "diffsparse first"])
def test_memory_savers_compose(memory_saver, apply_first):
    # diffusers' group offloading and layerwise casting hook the same modules diffsparse swaps processors on, and
    # the pipeline's model CPU offload wraps them in accelerate's hooks (here with the CPU as the "accelerator": the
    # hooks' wiring is what runs, not a move between devices); in either order every block kept
    # still gives the saver's own video, the calls run sparse, and `remove` leaves the saver working alone.
    # Sequential CPU offload (`enable_sequential_cpu_offload`: accelerate's `cpu_offload` on each component, weights
    # loaded per submodule call) is run on the transformer alone: on CPU accelerate fails in the T5 encoder.
    pipe = tiny_wan_pipeline()
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    if apply_first:
        handle = diffsparse.apply(pipe, every_block)
    if memory_saver == "model cpu offload":
        pipe.enable_model_cpu_offload(device="cpu")
    elif memory_saver.startswith("sequential"):
        from accelerate import cpu_offload

        cpu_offload(pipe.transformer, execution_device=torch.device("cpu"), offload_buffers=True)
    elif memory_saver == "layerwise casting":
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    else:
        offload_type = "leaf_level" if "leaf" in memory_saver else "block_level"
        blocks = {} if offload_type == "leaf_level" else {"num_blocks_per_group": 1}
        pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type=offload_type, **blocks)
    if not apply_first:
        handle = diffsparse.apply(pipe, every_block)
    out = generate(pipe)
    assert all(r.sparse for r in handle.stats().calls["transformer"])
    diffsparse.remove(pipe)
    if "cpu offload" in memory_saver:  # accelerate's hook still wraps the forward (before: dropped by `remove`)
        assert pipe.transformer.forward.func.__module__ == "accelerate.hooks"
    torch.testing.assert_close(out, generate(pipe), atol=1e-4, rtol=0)


@pytest.mark.parametrize("apply_first", [False, True], ids=["offload first", "diffsparse first"])
def test_model_cpu_offload_keeps_every_call_sparse(apply_first):
    # Each pipeline call ends in `maybe_free_model_hooks()`, which takes accelerate's hooks off (the forward back
    # to what they wrapped) and puts them on again. With the offload enabled first, the context hook wrapped
    # accelerate's forward and went with it: the first call ran sparse, every later one dense without a word.
    pipe = tiny_wan_pipeline()
    dense = generate(pipe, num_inference_steps=3)
    config = diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=1)
    if apply_first:
        handle = diffsparse.apply(pipe, config)
    pipe.enable_model_cpu_offload(device="cpu")
    if not apply_first:
        handle = diffsparse.apply(pipe, config)
    first = generate(pipe, num_inference_steps=3)
    one_run = sum(s.sparse_calls for s in handle.stats().layers)
    second = generate(pipe, num_inference_steps=3)
    assert one_run > 0 and sum(s.sparse_calls for s in handle.stats(since_apply=True).layers) == 2 * one_run
    assert torch.equal(first, second) and not torch.allclose(first, dense, atol=1e-3)
    pipe.enable_model_cpu_offload(device="cpu")  # again, by hand: the hook stays inside accelerate's
    torch.testing.assert_close(generate(pipe, num_inference_steps=3), first, atol=0, rtol=0)
    diffsparse.remove(pipe)
    assert pipe.transformer.forward.func.__module__ == "accelerate.hooks"
    for _ in range(2):
        torch.testing.assert_close(generate(pipe, num_inference_steps=3), dense, atol=0, rtol=0)


@pytest.mark.parametrize(
    "cache", ["first block cache", "pyramid attention broadcast", "TaylorSeer", "FasterCache", "MagCache", "SeaCache"]
)
def test_diffusers_caches_compose(cache):
    # diffusers' caching methods skip blocks or attention calls with hooks of their own: under them every block kept
    # gives the cached pipeline's video, and the calls they skip never reach diffsparse (its stats count what ran).
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
    )

    pipe = tiny_wan_pipeline()
    pipe.transformer.enable_cache({
        "first block cache": lambda: FirstBlockCacheConfig(threshold=0.2),
        "pyramid attention broadcast": lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep),
        "TaylorSeer": TaylorSeerCacheConfig,
        # Its CFG cache needs the branches batched (Wan runs them one call after another): attention reuse only.
        "FasterCache": lambda: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            current_timestep_callback=lambda: pipe.current_timestep, is_guidance_distilled=True,
            attention_weight_callback=lambda _: 0.5),
        "MagCache": lambda: MagCacheConfig(num_inference_steps=6, mag_ratios=[1.0] + [0.98] * 5, threshold=0.5),
        "SeaCache": SeaCacheConfig,
    }[cache]())
    cached = generate(pipe, num_inference_steps=6)
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    with diffsparse.sparse(pipe, every_block) as handle:
        torch.testing.assert_close(generate(pipe, num_inference_steps=6), cached, atol=1e-4, rtol=0)
        records = handle.stats().calls["transformer"]
    assert records and all(r.sparse for r in records)
    # 6 steps, cond and uncond, every block: the first block cache and the broadcast skip some of them here.
    every_call = 6 * 2 * len(pipe.transformer.blocks)
    assert len(records) < every_call if cache != "TaylorSeer" else len(records) == every_call


@torch.no_grad()
def test_lucy_edit():
    # Lucy Edit: Wan 2.2 weights whose input video's latents are concatenated to the noise on channels, so the
    # layout is the plain Wan one.
    config = tiny_wan_config()
    base = tiny_wan_pipeline()
    torch.manual_seed(2)
    transformer = WanTransformer3DModel(**{**config["transformer"], "in_channels": 32}).eval()
    pipe = LucyEditPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                            scheduler=base.scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    video = [Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8)) for _ in range(17)]
    reference = generate(pipe, video=video)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="dense")):
        assert torch.equal(generate(pipe, video=video), reference)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)):
        torch.testing.assert_close(generate(pipe, video=video), reference, atol=1e-4, rtol=0)
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1)) as handle:
        out = generate(pipe, video=video)
        records = handle.stats().calls["transformer"]
    assert [r.step for r in records if r.layer == 0 and r.branch == "cond"] == [0, 1, 2]
    assert all(r.sparse == (r.step >= 1) for r in records)
    assert not torch.allclose(out, reference, atol=1e-4)


@torch.no_grad()
def test_bare_transformer_counts_distinct_timesteps():
    transformer = tiny_wan_pipeline().transformer
    handle = diffsparse.apply(transformer, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    latents = torch.randn(1, 16, 5, 8, 12, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 4, tiny_wan_config()["transformer"]["text_dim"])
    for t in (999.0, 999.0, 700.0, 400.0):  # cond + uncond at the first timestep, then two steps
        transformer(latents, torch.tensor([t]), text, return_dict=False)
    assert [(r.step, r.sparse) for r in handle.stats().calls["transformer"] if r.layer == 1] == [
        (0, False), (0, False), (1, True), (2, True)
    ]
    transformer(latents, torch.tensor([999.0]), text, return_dict=False)  # a larger timestep: a new run
    assert [r.step for r in handle.stats().calls["transformer"]] == [0, 0]


def test_fractional_dense_steps_on_a_bare_transformer_is_refused():
    transformer = tiny_wan_pipeline().transformer
    with pytest.raises(ValueError, match="dense_steps"):
        diffsparse.apply(transformer, diffsparse.SparseConfig(dense_steps=0.2))


def test_stats_without_apply_raises(tiny_pipe):
    with pytest.raises(ValueError, match="not applied"):
        diffsparse.stats(tiny_pipe)


def test_unsupported_model_raises():
    with pytest.raises(ValueError, match="no adapter for Linear; supported: .*WanTransformer3DModel"):
        diffsparse.apply(torch.nn.Linear(2, 2), diffsparse.SparseConfig())


def test_a_refused_apply_keeps_what_was_applied_before(monkeypatch):
    # `apply` removes the earlier config before it installs the new one: when the new one is refused, the earlier
    # one must come back, not leave the pipeline dense.
    from diffsparse.pipelines import adapter_for

    pipe = tiny_wan_pipeline()
    outer = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=1)
    refused = diffsparse.SparseConfig(pattern="radial", block_size=16)
    diffsparse.apply(pipe, outer)
    expected = generate(pipe)
    make_processor = type(adapter_for(pipe.transformer)).make_processor

    def refusing(adapter, original, runtime, layer, transformer=None):
        if runtime.config is refused:
            raise ValueError("refused for the test")
        return make_processor(adapter, original, runtime, layer, transformer)

    monkeypatch.setattr(type(adapter_for(pipe.transformer)), "make_processor", refusing)
    with pytest.raises(ValueError, match="refused for the test"):
        diffsparse.apply(pipe, refused)
    assert torch.equal(generate(pipe), expected)
    with pytest.raises(ValueError, match="refused for the test"), diffsparse.sparse(pipe, refused):
        pass
    assert torch.equal(generate(pipe), expected)
    assert diffsparse.stats(pipe).mean_density < 1


def test_a_replaced_handle_leaves_the_one_that_replaced_it_alone():
    # Before, a replaced handle's remove() took the hook of the handle now applied (hooks go by name): its sparse
    # processors stayed but every call ran dense, in silence; and an apply inside a `sparse` block lost its hook
    # when the block ended.
    pipe = tiny_wan_pipeline()
    first = diffsparse.SparseConfig(pattern="radial", block_size=16, dense_steps=0)
    second = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    replaced = diffsparse.apply(pipe, first)
    diffsparse.apply(pipe, second)
    expected = generate(pipe)
    replaced.remove()
    assert torch.equal(generate(pipe), expected) and diffsparse.stats(pipe).mean_density < 1
    diffsparse.remove(pipe)
    with diffsparse.sparse(pipe, first):
        inside = diffsparse.apply(pipe, second)
    assert inside.installed and torch.equal(generate(pipe), expected)
    assert len(diffsparse.stats(pipe).calls["transformer"]) > 0


@pytest.mark.parametrize("compiled", ["wrapper", "regional"])
def test_torch_compile_before_or_after_apply(compiled):
    # `pipe.transformer = torch.compile(pipe.transformer)` is how diffusers users compile: apply finds the module
    # inside the wrapper, and a wrapper already traced dense recompiles for the sparse processors and back.
    # diffusers' regional compilation (`compile_repeated_blocks`) compiles each block alone: the hook runs eagerly
    # around them, the sparse attention calls between the blocks' graphs.
    # aot_eager: traced by dynamo and AOT autograd like inductor, with no C++ compiler needed here.
    pipe = tiny_wan_pipeline()
    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=1)
    reference = generate(pipe)
    with diffsparse.sparse(pipe, config):
        eager_sparse = generate(pipe)
    torch._dynamo.reset()
    if compiled == "wrapper":
        pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    else:
        pipe.transformer.compile_repeated_blocks(backend="aot_eager")
    assert torch.equal(generate(pipe), reference)
    with diffsparse.sparse(pipe, config):
        assert torch.equal(generate(pipe), eager_sparse)
        assert diffsparse.stats(pipe).mean_density < 1
    assert torch.equal(generate(pipe), reference)


def test_a_scheduler_swapped_after_apply_sets_the_steps():
    # `pipe.scheduler = OtherScheduler.from_config(pipe.scheduler.config)` is how diffusers users change samplers,
    # often on a pipeline already set up: the steps follow the pipeline's scheduler at each call. Before, the clock
    # kept the one `apply` saw: its stale timesteps gave wrong steps, no new run and a warning blaming the pipeline.
    from diffusers import UniPCMultistepScheduler

    from diffsparse.runtime import StepScheduleWarning

    pipe = tiny_wan_pipeline()
    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=0.5)
    handle = diffsparse.apply(pipe, config)
    generate(pipe, num_inference_steps=4)
    pipe.scheduler = UniPCMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepScheduleWarning)
        swapped = generate(pipe, num_inference_steps=6)
    records = [(r.step, r.sparse) for r in handle.stats().calls["transformer"] if r.layer == 0]
    assert records == [(step, step >= 3) for step in range(6) for _branch in range(2)]
    diffsparse.apply(pipe, config)
    assert torch.equal(generate(pipe, num_inference_steps=6), swapped)
    # A second-order sampler calls the transformer twice per step (the second at the next step's timestep): the
    # steps are its steps, so the last one's calls stay dense with dense_last_steps=1.
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    diffsparse.apply(pipe, diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=0.25,
                                                   dense_last_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepScheduleWarning)
        generate(pipe, num_inference_steps=4, guidance_scale=1.0)
    records = [(r.step, r.sparse) for r in diffsparse.stats(pipe).calls["transformer"] if r.layer == 0]
    assert records == [(0, False), (1, True), (1, True), (2, True), (2, True), (3, False), (3, False)]
    pipe.scheduler = UniPCMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    # A pipeline sharing the transformer with a scheduler of its own cannot be seen from the transformer: the
    # warning says what to do.
    other = WanPipeline.from_pipe(pipe, scheduler=tiny_wan_pipeline().scheduler)
    with pytest.warns(StepScheduleWarning, match="from_pipe"):
        generate(other, num_inference_steps=5)


def test_video_to_video_counts_steps_from_the_first_it_runs():
    # With strength < 1 the pipeline runs only the schedule's last int(num_inference_steps * strength) steps. The
    # steps count from the first it runs: counted as positions in the whole schedule, dense_steps=0.2 fell on
    # skipped steps and every step it ran was sparse.
    from diffusers import WanVideoToVideoPipeline

    pipe = WanVideoToVideoPipeline.from_pipe(tiny_wan_pipeline())
    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=0.2)
    video = [Image.new("RGB", (96, 64), (10 * i, 100, 50)) for i in range(17)]
    call = tiny_call(num_inference_steps=10)
    del call["num_frames"]
    with diffsparse.sparse(pipe, config) as handle:
        pipe(video=video, strength=0.5, **call)
        records = [(r.step, r.sparse) for r in handle.stats().calls["transformer"] if r.layer == 0]
    assert records == [(step, step >= 1) for step in range(5) for _branch in range(2)]


def test_a_sparse_block_puts_back_what_was_applied_before():
    # `with diffsparse.sparse(pipe, other):` on a pipeline already applied (to compare a config, or nested blocks):
    # on exit the earlier config is back, the same handle with its stats going on. Before, it left the pipeline dense.
    pipe = tiny_wan_pipeline()
    outer = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=1)
    inner = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=1)
    dense = generate(pipe)
    with diffsparse.sparse(pipe, outer):
        expected_outer = generate(pipe)
    with diffsparse.sparse(pipe, inner):
        expected_inner = generate(pipe)
    assert not torch.allclose(expected_outer, expected_inner, atol=1e-3)
    with diffsparse.sparse(pipe, outer) as handle:
        generate(pipe)
        with diffsparse.sparse(pipe, inner):
            assert torch.equal(generate(pipe), expected_inner)
        assert torch.equal(generate(pipe), expected_outer)
        calls = [layer.dense_calls + layer.sparse_calls for layer in handle.stats(since_apply=True).layers]
        assert calls == [2 * 3 * 2] * len(calls)  # two runs of 3 steps with CFG's two calls, on this handle
    assert torch.equal(generate(pipe), dense)
    handle = diffsparse.apply(pipe, outer)
    with diffsparse.sparse(pipe, inner):
        pass
    assert torch.equal(generate(pipe), expected_outer)
    handle.remove()
    assert torch.equal(generate(pipe), dense)


def test_fullgraph_compilation_says_why_it_cannot_run_sparse():
    # `compile_repeated_blocks(fullgraph=True)` (diffusers' documented call) allows no graph break, and the sparse
    # path is one: torch's error must say why and what to do.
    pipe = tiny_wan_pipeline()
    torch._dynamo.reset()
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=1)
    with diffsparse.sparse(pipe, config), pytest.raises(torch._dynamo.exc.Unsupported, match="fullgraph=False"):
        generate(pipe)
    torch._dynamo.reset()


def test_peft_lora_on_the_attention_projections_is_kept():
    # diffusers loads LoRAs (`load_lora_weights`, `add_adapter`) into peft layers that replace `to_q`, `to_k`, ...:
    # the processors stay diffusers' own, and the sparse path, which calls the same projections, keeps the LoRA
    # at every adapter weight.
    from peft import LoraConfig

    pipe = tiny_wan_pipeline()
    without_lora = generate(pipe)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.transformer.add_adapter(lora, adapter_name="style")
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    for weight in (1.0, 0.5):
        pipe.transformer.set_adapters(["style"], weights=[weight])
        reference = generate(pipe)
        assert not torch.allclose(reference, without_lora, atol=1e-3)
        with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="dense")):
            assert torch.equal(generate(pipe), reference)
        with diffsparse.sparse(pipe, config):
            torch.testing.assert_close(generate(pipe), reference, atol=1e-4, rtol=0)


def test_training_a_lora_through_the_sparse_attention_gets_the_dense_gradients():
    # Fine-tuning with sparse attention (Radial Attention trains LoRAs for longer videos this way): the sparse path
    # must differentiate. Every block kept gives dense attention's gradients; a sparse pattern other ones.
    from peft import LoraConfig

    transformer = tiny_wan_pipeline().transformer
    torch.manual_seed(1)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                       init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    latents, prompt = torch.randn(1, 16, 5, 16, 24, generator=g), torch.randn(1, 8, 32, generator=g)

    def lora_gradients(config=None):
        """Two training calls (the second at a lower timestep: a later step) and each one's LoRA gradients."""
        grads, calls = [], None
        with contextlib.ExitStack() as stack:
            handle = None if config is None else stack.enter_context(diffsparse.sparse(transformer, config))
            for timestep in (500.0, 400.0):
                transformer.zero_grad()
                transformer(latents, torch.tensor([timestep]), prompt, return_dict=False)[0].square().mean().backward()
                grads.append(torch.cat([p.grad.flatten() for n, p in transformer.named_parameters() if "lora" in n]))
            if handle is not None:
                calls = [(r.step, r.sparse, r.measured) for r in handle.stats().calls["transformer"]]
        return torch.stack(grads), calls

    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    windowed = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    # A fit of the first sparse call kept for the next, and statistics measured at the first call, used at the second.
    fitted_corrected = diffsparse.SparseConfig(pattern="searched", density=0.5, block_size=16, dense_steps=0,
                                               correction="residual")
    dense, _ = lora_gradients()
    kept, _ = lora_gradients(every_block)
    assert dense.abs().max() > 0
    torch.testing.assert_close(kept, dense, atol=1e-6, rtol=0)
    results = {name: lora_gradients(config) for name, config in (("windowed", windowed),
                                                                 ("fitted", fitted_corrected))}
    assert not torch.allclose(results["windowed"][0], dense, atol=1e-4)
    assert results["fitted"][1] == [(0, False, True)] * 2 + [(1, True, False)] * 2
    # Gradient checkpointing recomputes each block in the backward pass, after the call ended: the recomputation
    # replays the call (its plan, fit, statistics), logging nothing. Before, the original processor ran there and
    # torch stopped at the mismatch ("a different number of tensors was saved").
    transformer.enable_gradient_checkpointing()
    for name, config in (("windowed", windowed), ("fitted", fitted_corrected)):
        grads, calls = lora_gradients(config)
        torch.testing.assert_close(grads, results[name][0], atol=1e-6, rtol=0)
        assert calls == results[name][1]
    torch.testing.assert_close(lora_gradients()[0], dense, atol=1e-6, rtol=0)
    # A checkpoint diffsparse does not see (torch's activation checkpointing wrapped around the blocks) cannot be
    # replayed: refused, saying why.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    transformer.disable_gradient_checkpointing()
    blocks = set(transformer.blocks)
    apply_activation_checkpointing(transformer, check_fn=lambda module: module in blocks)
    with pytest.raises(RuntimeError, match="by a checkpoint other than the model's own gradient checkpointing"):
        lora_gradients(windowed)


def test_a_transformer_call_that_raises_leaves_the_next_calls_their_own_branches(tiny_pipe):
    # A forward that raises (out of memory, an interrupt, a refused call) never reaches the hook's `post_forward`.
    # Before, the branch name it had set stayed: every later unnamed call ran as "call 0", one branch's state for all.
    transformer = tiny_pipe.transformer
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 5, 16, 24, generator=g)
    prompt = torch.randn(1, 8, 32, generator=g)
    config = diffsparse.SparseConfig(pattern=Radial(decay=0.25, min_window=4), block_size=16, dense_steps=1)
    with diffsparse.sparse(transformer, config) as handle, torch.no_grad():
        with pytest.raises(RuntimeError):  # inside the forward: text of the wrong width
            transformer(latents, torch.tensor([900.0]), prompt[..., :7])
        transformer(latents, torch.tensor([900.0]), prompt)
        with pytest.raises(ValueError):  # before it: a call whose layout cannot be read
            transformer(latents[0], torch.tensor([900.0]), prompt)
        transformer(latents, torch.tensor([900.0]), prompt)
        for _ in range(2):
            transformer(latents, torch.tensor([600.0]), prompt)
        records = handle.stats().calls["transformer"]
    assert [(r.step, r.branch) for r in records if r.layer == 0] == [
        (0, "call 0"), (0, "call 1"), (1, "call 0"), (1, "call 1")]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_transformer_call_that_raises_is_closed_at_once(compiled):
    # Between a forward that raised and the transformer's next call, a model that shares one of its attention
    # modules (Z-Image's ControlNet shares refiner blocks) may call it: it must get the original processor, unlogged,
    # not the sparse path with the failed call's state. Compiled: traced by dynamo (aot_eager, as above).
    transformer = tiny_wan_pipeline().transformer
    attn = transformer.blocks[0].attn1
    g = torch.Generator().manual_seed(0)
    latents, prompt = torch.randn(1, 16, 5, 16, 24, generator=g), torch.randn(1, 8, 32, generator=g)
    hidden = torch.randn(1, 3 * 8 * 12, attn.to_q.in_features, generator=g)  # another model's own sequence
    with torch.no_grad():
        original = attn(hidden)
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    with diffsparse.sparse(transformer, config) as handle, torch.no_grad():
        model = torch.compile(transformer, backend="aot_eager") if compiled else transformer
        with pytest.raises(RuntimeError):  # inside the forward: text of the wrong width
            model(latents, torch.tensor([900.0]), prompt[..., :7])
        assert torch.equal(attn(hidden), original)
        assert handle.stats().calls["transformer"] == []
        model(latents, torch.tensor([900.0]), prompt)
        assert [r.branch for r in handle.stats().calls["transformer"]] == ["call 0"] * 2
