"""diffsparse on diffusers SkyReels-V2 (Wan's architecture with its own processor copy), tiny with random weights:
the transformer called directly, and real `SkyReelsV2Pipeline` and `SkyReelsV2DiffusionForcingPipeline` calls (the
embedded Wan pipeline's T5 encoder, word tokenizer and Wan VAE, SkyReels' UniPC flow scheduler).

Diffusion forcing gives one timestep per frame and loops over the rows of its timestep matrix, not over
`scheduler.timesteps`; a call is logged at the scheduler position of its noisiest frame, and each frame follows the
dense-step schedule on its own position (the queries of early frames dense; the call dense only when every frame
is). Synchronous rows land on the scheduler's steps one by one. Asynchronous rows (`ar_step > 0`: each frame
`ar_step` rows behind the one before) are logged at step 0 until the last frame starts; a long video
(`overlap_history`) restarts the steps in each chunk, all in one call log. The causal frame-block mask
(`causal_block_size > 1`, which diffusers then keeps in the transformer's config) runs sparse and exact: the later
groups' blocks skipped where the kernel's blocks fill the groups, else one kernel call per group; fitted patterns
(`searched`, `spatial_temporal`) are fitted on the masked attention; a tile order that mixes the groups or a
correction leave the calls to the original processor, with a warning."""

import contextlib
import dataclasses
import functools
import json
import warnings

import pytest
import torch
from diffusers import (
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2Pipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
)

import diffsparse
from diffsparse.config import resolve_step_count
from diffsparse.patterns import FrameCausal, Searched, SpatialTemporal, TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.tiny import tiny_wan_pipeline
from diffsparse.pipelines.wan import frame_causal_groups

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    run_pipeline,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))


def tiny_transformer(frames_per_block: int = 1, text_dim: int = 32):
    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, num_frame_per_block=frames_per_block,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def inputs(per_frame: bool = False):
    """4 latent frames of 8 x 12 -> 4 x 4 x 6 = 96 tokens. `per_frame`: diffusion forcing's one timestep per
    frame (the earlier frames less noisy)."""
    g = torch.Generator().manual_seed(1)
    timestep = torch.tensor([[200, 400, 600, 800]]) if per_frame else torch.tensor([500])
    return {"hidden_states": torch.randn(1, 16, 4, 8, 12, generator=g), "timestep": timestep,
            "encoder_hidden_states": torch.randn(1, 8, 32, generator=g), "enable_diffusion_forcing": per_frame}


def run(model, config=None, **kwargs):
    with torch.no_grad():
        if config is None:
            return model(**inputs(**kwargs)).sample, None
        with diffsparse.sparse(model, config) as handle:
            return model(**inputs(**kwargs)).sample, handle.stats()


@pytest.mark.parametrize("per_frame", [False, True], ids=["one timestep", "diffusion forcing"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_is_identical_and_every_block_kept_matches_dense(transformer, per_frame, order):
    radial = diffsparse.SparseConfig(pattern="radial", density=0.3, block_size=16, dense_steps=0)
    calls = check_against_dense(transformer, functools.partial(inputs, per_frame=per_frame), block_size=16,
                                order=order, sparse=radial)
    assert sorted(layer for layer, _, _ in calls) == [0, 1]  # one sparse call per layer
    _, stats = run(transformer, radial, per_frame=per_frame)
    assert stats.mean_density < 1


@pytest.mark.parametrize(
    "order, block_size, density",
    [
        # Groups of 2 frames (2 x 24 = 48 tokens) fill whole blocks of 16 in either order: the later group's blocks
        # are skipped; the first group's 3 query blocks see 3 key blocks, the second's all 6.
        (None, 16, 27 / 36),
        (TileOrder((1, 2, 2)), 16, 27 / 36),
        # Blocks across the groups' boundary: each group's queries attend the keys up to the group's end, as its
        # own kernel call (key blocks of 32: 3 x 2 + 3 x 3 blocks of the whole sequence's 6 x 3).
        (None, (16, 32), 15 / 18),
        (None, 20, 24 / 25),  # 3 x 3 + 3 x 5 of 5 x 5: the partial blocks at the boundary count whole
        (TileOrder((1, 2, 2)), 20, 24 / 25),  # tiles of one frame keep the groups apart
    ],
)
def test_causal_frame_blocks_run_sparse_and_exact(order, block_size, density):
    # Asynchronous diffusion forcing: a causal mask over groups of 2 frames on every self-attention call. Without the
    # mask the same weights give another output, so a sparse path that attended a later group's keys could not match.
    model = tiny_transformer(frames_per_block=2)
    reference, _ = run(model, per_frame=True)
    unmasked, _ = run(tiny_transformer(), per_frame=True)
    assert not torch.allclose(unmasked, reference, atol=1e-3)
    dense, _ = run(model, diffsparse.SparseConfig(pattern="dense", dense_steps=0), per_frame=True)
    assert torch.equal(dense, reference)
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=block_size, dense_steps=0, order=order)
    out, stats = run(model, every_block, per_frame=True)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1)] * 2
    assert [s.mean_density for s in stats.layers] == pytest.approx([density] * 2)
    window = dataclasses.replace(every_block, pattern=Window3D(window=(1, 1, 1)))
    sparse, stats = run(model, window, per_frame=True)
    assert stats.sparse_density < density and not torch.allclose(sparse, reference, atol=1e-4)


@pytest.mark.parametrize(
    "config, reason",
    [
        (diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0, order=TileOrder((4, 2, 2))),
         "tiles of a frame count dividing 2"),  # tiles of 4 frames hold both groups' tokens
        (diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0, correction="residual"),
         "correction='residual'"),
    ],
    ids=["tiles across groups", "correction"],
)
def test_causal_frame_blocks_the_kernel_cannot_apply_run_the_original_with_a_warning(config, reason):
    model = tiny_transformer(frames_per_block=2)
    reference, _ = run(model, per_frame=True)
    with pytest.warns(UserWarning, match=reason):
        out, stats = run(model, config, per_frame=True)
    assert torch.equal(out, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 0), (1, 0)]



def test_a_causal_call_that_runs_the_original_warns_once_per_layout():
    # A correction's dense measurement knows no mask: every masked call runs the original processor, said once per
    # layout however many layers and calls, and again for a new layout.
    model = tiny_transformer(frames_per_block=2)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0, correction="residual")
    longer = {**inputs(per_frame=True), "timestep": torch.tensor([[100, 200, 300, 400, 500, 600]])}
    longer["hidden_states"] = torch.randn(1, 16, 6, 8, 12, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), diffsparse.sparse(model, config) as handle:
            for _ in range(2):
                model(**inputs(per_frame=True))
            said = [str(w.message) for w in caught if "causal mask" in str(w.message)]
            model(**longer)
            stats = handle.stats()
    assert len(said) == 1, said
    assert len([w for w in caught if "causal mask" in str(w.message)]) == 2
    assert all(s.sparse_calls == 0 for s in stats.layers)

@pytest.mark.parametrize("block_size", [16, 20], ids=["whole blocks", "per group"])
@pytest.mark.parametrize(
    "pattern", [Searched(keep=1.0), SpatialTemporal(frames=99, width=99)], ids=["searched", "spatial_temporal"]
)
def test_fitted_patterns_run_sparse_and_exact_under_causal_frame_blocks(block_size, pattern):
    # Fitted on the masked attention, cut into the groups' kernel calls when blocks cross the groups' boundary: with
    # every block kept, the masked original to rounding.
    model = tiny_transformer(frames_per_block=2)
    reference, _ = run(model, per_frame=True)
    config = diffsparse.SparseConfig(pattern=pattern, block_size=block_size, dense_steps=0)
    out, stats = run(model, config, per_frame=True)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1)] * 2


@pytest.mark.parametrize("budget", ["row", "layer"])
def test_searched_blocks_are_chosen_among_the_blocks_the_causal_mask_allows(budget):
    # Groups of 48 tokens, blocks of 16: the first group's 3 query blocks may attend 3 key blocks, the second's all
    # 6. Half the blocks (3 per query block) searched on the masked attention are all allowed: density 18 / 36. A
    # search blind to the mask would spend the first group's budget on masked blocks, skipped by the kernel; a
    # layer budget hands out the same total, among allowed blocks only.
    model = tiny_transformer(frames_per_block=2)
    reference, _ = run(model, per_frame=True)
    config = diffsparse.SparseConfig(pattern=Searched(budget=budget), density=0.5, block_size=16, dense_steps=0)
    out, stats = run(model, config, per_frame=True)
    assert [s.mean_density for s in stats.layers] == [0.5, 0.5]
    assert not torch.allclose(out, reference, atol=1e-4)


def test_causal_frame_blocks_under_torch_compile():
    # Compiled, the mask reading and the planning run eagerly (dynamo does not trace into the patterns' caches),
    # and the compiled model gives the eager sparse result.
    import warnings

    model = tiny_transformer(frames_per_block=2)
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=32, dense_steps=0)
    eager, _ = run(model, config, per_frame=True)
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = run(compiled, config, per_frame=True)
    assert torch.equal(out, eager)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1), (0, 1)]
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_only_the_causal_frame_block_mask_is_read_as_one():
    layout = VideoLayout(4, 4, 6)
    for frames in (1, 2, 4):
        assert frame_causal_groups(FrameCausal(frames).token_mask(layout)[None], layout) == frames
    mask = FrameCausal(2).token_mask(layout)[None]
    # One pair changed in a frame's first query row, in a frame's first key column, or both: another mask.
    for query, key in ((5, 24), (30, 0), (0, 30)):
        changed = mask.clone()
        changed[..., query, key] = ~changed[..., query, key]
        assert frame_causal_groups(changed, layout) is None
    assert frame_causal_groups(mask.float(), layout) is None  # an additive bias, not a boolean mask
    assert frame_causal_groups(torch.zeros_like(mask), layout) is None
    assert frame_causal_groups(mask[..., :48, :48], layout) is None


def test_a_token_level_mask_that_is_not_the_causal_one_runs_the_original_counted_dense(transformer):
    # A mask other than diffusion forcing's causal frame blocks (here layer 0's attention, in the transformer's call,
    # hides the last key: a caller's own block or processor may pass one) is not read as groups: the call runs the
    # original with it, is logged dense, and a warning says why; the other layer stays sparse.
    from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor

    call = inputs()
    mask = torch.ones(1, 1, 1, 4 * 4 * 6, dtype=torch.bool)
    mask[..., -1] = False
    attention, seen = transformer.blocks[0].attn1, []
    hooks = [attention.register_forward_pre_hook(lambda module, args: (*args[:2], mask, *args[3:])),
             attention.register_forward_hook(lambda module, args, out: seen.append((args, out)))]
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), \
                diffsparse.sparse(transformer, config) as handle:
            warnings.simplefilter("always")
            transformer(**call)
            layers = handle.stats().layers
    finally:
        for hook in hooks:
            hook.remove()
    said = [str(w.message) for w in caught if issubclass(w.category, diffsparse.DiffsparseWarning)]
    assert len(said) == 1 and "token-level attention_mask" in said[0], said
    assert [(s.layer, s.dense_calls, s.sparse_calls) for s in layers] == [(0, 1, 0), (1, 0, 1)]
    [(args, out)] = seen
    with torch.no_grad():
        assert torch.equal(out, SkyReelsV2AttnProcessor()(attention, *args))
        assert not torch.equal(out, SkyReelsV2AttnProcessor()(attention, args[0], None, None, *args[3:]))


def test_layout_and_step_of_a_diffusion_forcing_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs(per_frame=True))
    assert layout == VideoLayout(4, 4, 6) and timestep.shape == (1, 4)


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "SkyReels-V2", layer=1)


# -- real pipelines ---------------------------------------------------------------------------------------------------

# SkyReels-V2's T2V scheduler. Its first timestep is 999, the very value diffusion forcing gives frames that have not
# started yet, so those count as step 0 too.
SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 8.0}
# 5 latent frames of 8 x 12 (4 x 4 x 6 = 120 tokens per call).
CALL = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 64, "width": 96,
        "num_frames": 17, "num_inference_steps": 5, "guidance_scale": 5.0, "output_type": "latent",
        "max_sequence_length": 16}
FIRST_FIFTH_DENSE = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0.2)
BRANCHES = ("cond", "uncond")  # CFG: two transformer calls per step (or per row of the step matrix)


def tiny_pipeline(cls):
    base = tiny_wan_pipeline()
    pipe = cls(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
               transformer=tiny_transformer(text_dim=base.text_encoder.config.d_model),
               scheduler=UniPCMultistepScheduler(**SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_frames(num_frames: int) -> int:
    return (num_frames - 1) // 4 + 1  # the Wan VAE's 4x temporal compression, first frame alone


def layout(num_frames: int) -> VideoLayout:
    return VideoLayout(num_frames, CALL["height"] // 16, CALL["width"] // 16)  # VAE 8x, then patch 2x2


FRAMES = latent_frames(CALL["num_frames"])
LAYOUT = layout(FRAMES)


def layer_0(stats):
    return [r for r in stats.calls["transformer"] if r.layer == 0]


@contextlib.contextmanager
def transformer_timesteps(pipe):
    """The `timestep` of every transformer call made inside, in call order."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    try:
        yield seen
    finally:
        hook.remove()


def test_t2v_pipeline_first_step_dense_then_sparse():
    pipe = tiny_pipeline(SkyReelsV2Pipeline)
    stats, calls = check_pipeline_against_dense(pipe, CALL)
    assert {(call_layout, shape) for _, call_layout, shape in calls} == {(LAYOUT, (1, LAYOUT.num_tokens))}
    assert [(r.step, r.branch, r.sparse) for r in layer_0(stats)] == [
        (step, branch, step > 0) for step in range(CALL["num_inference_steps"]) for branch in BRANCHES
    ]


def test_synchronous_diffusion_forcing_rows_are_the_scheduler_steps():
    pipe = tiny_pipeline(SkyReelsV2DiffusionForcingPipeline)
    stats, calls = check_pipeline_against_dense(pipe, CALL)
    assert {(call_layout, shape) for _, call_layout, shape in calls} == {(LAYOUT, (1, LAYOUT.num_tokens))}
    # The step matrix's rows, all frames level: the same steps as a plain T2V loop.
    assert [(r.step, r.branch, r.sparse) for r in layer_0(stats)] == [
        (step, branch, step > 0) for step in range(CALL["num_inference_steps"]) for branch in BRANCHES
    ]
    with transformer_timesteps(pipe) as seen:
        _, stats = run_pipeline(pipe, CALL, FIRST_FIFTH_DENSE)
    records = layer_0(stats)
    assert len(seen) == len(records)
    # One timestep per frame, all frames at the step the call is logged at.
    for record, timestep in zip(records, seen):
        assert timestep.shape == (1, FRAMES)
        assert torch.all(timestep == pipe.scheduler.timesteps[record.step])


def asynchronous_steps(new_frames: int, ar_step: int, num_steps: int) -> list[int]:
    """The step of each row of an asynchronous chunk generating `new_frames` frames (after any finished history):
    the last frame starts `(new_frames - 1) * ar_step` rows after the first, and until then stays at the noise level
    of step 0; from there each row is its next step."""
    return [0] * ((new_frames - 1) * ar_step) + list(range(num_steps))


def dense_frames(timestep: torch.Tensor, scheduler, dense_steps: int) -> tuple[int, ...]:
    """The frames of a call whose own step (their timestep's place in the scheduler's) is among the first
    `dense_steps`."""
    steps = torch.argmin((scheduler.timesteps.float()[None, :] - timestep[0].float()[:, None]).abs(), dim=1)
    return tuple(int(f) for f in torch.nonzero(steps < dense_steps).flatten())


def test_asynchronous_diffusion_forcing_schedules_each_frame_on_its_own_step():
    pipe = tiny_pipeline(SkyReelsV2DiffusionForcingPipeline)
    ar_step, num_steps = 2, 10
    # No causal mask (`causal_block_size=1`, the transformer's own).
    call = {**CALL, "num_inference_steps": num_steps, "ar_step": ar_step, "causal_block_size": 1}
    check_pipeline_against_dense(pipe, call, sparse=FIRST_FIFTH_DENSE)
    heads = pipe.transformer.config.num_attention_heads
    with torch.no_grad(), transformer_timesteps(pipe) as seen, diffsparse.sparse(pipe, FIRST_FIFTH_DENSE) as handle:
        pipe(**call, generator=torch.Generator().manual_seed(0))
        records = layer_0(handle.stats())
        runtime = handle.runtimes["transformer"]
        assert len(seen) == len(records)
        # Staggered: each frame at most as noisy as the next; the call is logged at its noisiest frame's step.
        assert any(len(timestep.unique()) > 1 for timestep in seen)
        for record, timestep in zip(records, seen):
            assert torch.all(timestep[:, :-1] <= timestep[:, 1:])
            assert timestep.max() == pipe.scheduler.timesteps[record.step]
        steps = asynchronous_steps(FRAMES, ar_step, num_steps)
        assert [(r.step, r.branch) for r in records] == [(step, branch) for step in steps for branch in BRANCHES]
        # `dense_steps=0.2` per frame: the queries of the frames in their own first fifth of the steps (frames not
        # yet started sit at step 0's noise level) attend every key, the others the pattern's blocks; a call is
        # dense only when every frame is. So 2 of the 18 rows are dense (the first frame's first fifth), where the
        # noisiest frame's step would have kept 10 dense.
        first_fifth = resolve_step_count(0.2, num_steps)
        plain = runtime.plan(LAYOUT, heads, torch.device("cpu")).density
        expected = []
        for timestep in seen:
            frames = dense_frames(timestep, pipe.scheduler, first_fifth)
            if len(frames) == FRAMES:
                expected.append((False, 1.0))
            else:
                expected.append((True, runtime.plan(LAYOUT, heads, torch.device("cpu"), dense_frames=frames).density))
    assert [(r.sparse, r.density) for r in records] == expected
    assert sum(not r.sparse for r in records) == first_fifth * len(BRANCHES)
    # Calls with frames still early carry their dense rows: more blocks than the pattern alone.
    assert any(sparse and density > plain for sparse, density in expected)
    assert any(sparse and density == plain for sparse, density in expected)


def test_a_frame_in_its_dense_steps_keeps_every_key():
    # The plan of a call whose frames 3 and 4 are early: every query block holding a token of theirs keeps every
    # key block (blocks of 16 over frames of 24 tokens).
    config = dataclasses.replace(FIRST_FIFTH_DENSE, dense_steps=1)
    runtime = diffsparse.apply(tiny_transformer(), config).runtimes["transformer"]
    plan = runtime.plan(LAYOUT, 2, torch.device("cpu"), dense_frames=(3, 4)).plan
    per_frame = LAYOUT.height * LAYOUT.width
    for block, row in enumerate(plan.block_mask[0, 0]):
        frames = {t // per_frame for t in range(block * 16, min((block + 1) * 16, LAYOUT.num_tokens))}
        assert bool(row.all()) == bool(frames & {3, 4}), block



def test_a_frame_in_its_dense_steps_keeps_only_the_keys_the_causal_mask_allows():
    # 6 frames in 3 causal groups of 2 (48 tokens: 3 blocks of 16), frames 2 to 5 in their dense steps: their rows
    # whole, then cut by the mask. The middle group's query blocks keep every key block of groups 0 and 1 and none of
    # group 2's (the mask applied before the dense rows were added would let them attend the later group).
    layout = VideoLayout(6, 4, 6)
    config = dataclasses.replace(FIRST_FIFTH_DENSE, dense_steps=1)
    runtime = diffsparse.apply(tiny_transformer(frames_per_block=2), config).runtimes["transformer"]
    plan = runtime.plan(layout, 2, torch.device("cpu"), frame_causal=2, dense_frames=(2, 3, 4, 5)).plan
    allowed = FrameCausal(2).block_mask(layout, 16)[0]
    for mask in plan.block_mask.flatten(0, 1):
        assert mask.shape == allowed.shape == (9, 9) and not (mask & ~allowed).any()
        assert mask[3:6, :6].all() and not mask[3:6, 6:].any()
        assert mask[6:].all()  # the last group's dense rows: every key
        assert not mask[:3, :3].all()  # the first group's rows: the pattern's blocks only

def test_causal_frame_blocks_in_a_pipeline():
    pipe = tiny_pipeline(SkyReelsV2DiffusionForcingPipeline)
    # 4 latent frames in 2 causal groups of 48 tokens, the second a row behind the first.
    call = {**CALL, "num_frames": 13, "ar_step": 1, "causal_block_size": 2}
    every_block = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    reference = run_pipeline(pipe, call)
    out, _ = run_pipeline(pipe, call, diffsparse.SparseConfig(pattern="dense"))
    assert torch.equal(out, reference)
    with transformer_timesteps(pipe) as seen:
        out, stats = run_pipeline(pipe, call, every_block)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    layers = len(pipe.transformer.blocks)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, len(seen))] * layers
    sparse, stats = run_pipeline(pipe, call, FIRST_FIFTH_DENSE)
    assert stats.sparse_density < 27 / 36 and not torch.allclose(sparse, reference, atol=1e-4)
    # Blocks of 32 straddle the groups: each group's queries against the keys up to its end, exact too.
    out, stats = run_pipeline(pipe, call, dataclasses.replace(every_block, block_size=32))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert all(s.dense_calls == 0 for s in stats.layers)
    # Searched blocks across the groups too: searched on the masked attention, per group, every call sparse.
    searched = diffsparse.SparseConfig(pattern="searched", density=0.5, block_size=32, dense_steps=0)
    out, stats = run_pipeline(pipe, call, searched)
    assert all(s.dense_calls == 0 for s in stats.layers) and stats.sparse_density < 1
    # Tiles of 4 frames mix the groups: the original processor, every call.
    with pytest.warns(UserWarning, match="tiles of a frame count dividing 2"):
        out, stats = run_pipeline(pipe, call, dataclasses.replace(every_block, order=TileOrder((4, 2, 2))))
    assert torch.equal(out, reference) and all(s.sparse_calls == 0 for s in stats.layers)
    # diffusers keeps `causal_block_size` in the transformer's config: a later call that does not give it, a
    # synchronous one too, carries the mask.
    assert pipe.transformer.config.num_frame_per_block == 2
    _, stats = run_pipeline(pipe, {**CALL, "num_frames": 13}, every_block)
    assert stats.layers and all(s.dense_calls == 0 for s in stats.layers)


@pytest.mark.parametrize("ar_step", [0, 3], ids=["synchronous", "asynchronous"])
def test_long_video_chunks_each_restart_the_steps_in_one_call_log(ar_step):
    pipe = tiny_pipeline(SkyReelsV2DiffusionForcingPipeline)
    num_steps = 5
    call = {**CALL, "num_frames": 33, "base_num_frames": 17, "overlap_history": 5, "num_inference_steps": num_steps,
            "ar_step": ar_step, "causal_block_size": 1}
    stats, calls = check_pipeline_against_dense(pipe, call, sparse=FIRST_FIFTH_DENSE)
    # The pipeline's chunking: a first chunk of `base_num_frames`, then chunks of the overlapped history (finished,
    # timestep 0) and as many new frames as fit.
    total, base, history = (latent_frames(call[name]) for name in ("num_frames", "base_num_frames", "overlap_history"))
    new_frames = [base]
    while sum(new_frames) < total:
        new_frames.append(min(total - sum(new_frames), base - history))
    chunk_frames = [new_frames[0]] + [history + n for n in new_frames[1:]]
    assert {call_layout for _, call_layout, _ in calls} == {layout(n) for n in chunk_frames}
    # `set_timesteps` runs once per pipeline call (the chunks step deep copies of the scheduler), so the log holds
    # every chunk, and each chunk starts over at step 0 (asynchronous: its new frames staggered as in a short video).
    steps = [step for n in new_frames for step in asynchronous_steps(n, ar_step, num_steps)]
    assert [(r.step, r.branch) for r in layer_0(stats)] == [(step, branch) for step in steps for branch in BRANCHES]
    # Each frame on its own step: the later chunks' history (finished, timestep 0) is never early, so their calls
    # are never wholly dense, their new frames' rows dense while those are early.
    with transformer_timesteps(pipe) as seen:
        _, stats = run_pipeline(pipe, call, FIRST_FIFTH_DENSE)
    first_fifth = resolve_step_count(0.2, num_steps)
    wholly_dense = [len(dense_frames(t, pipe.scheduler, first_fifth)) == t.shape[1] for t in seen]
    assert [r.sparse for r in layer_0(stats)] == [not dense for dense in wholly_dense]
    first_chunk_rows = len(asynchronous_steps(new_frames[0], ar_step, num_steps)) * len(BRANCHES)
    assert sum(wholly_dense[:first_chunk_rows]) == first_fifth * len(BRANCHES)
    assert not any(wholly_dense[first_chunk_rows:])


def test_each_chunk_of_a_long_video_searches_and_measures_anew(monkeypatch):
    # The chunks share one scheduler run, each starting over at step 0 on new frames. Before, the second chunk (of
    # the first one's layout) took the first one's searched blocks and statistics, made at later steps, so no
    # refresh came: it never searched, and measured at its dense step 0 on the first chunk's blocks only.
    pipe = tiny_pipeline(SkyReelsV2DiffusionForcingPipeline)
    num_steps = 6
    call = {**CALL, "num_frames": 33, "base_num_frames": 17, "overlap_history": 5, "num_inference_steps": num_steps,
            "ar_step": 0, "causal_block_size": 1}
    config = diffsparse.SparseConfig(pattern="searched(refresh=2)", density=0.5, block_size=16, dense_steps=1,
                                     correction="residual")
    handle = diffsparse.apply(pipe, config)
    runtime = handle.runtimes["transformer"]
    searches = []
    fit = Searched.fit
    monkeypatch.setattr(Searched, "fit", lambda self, q, k, v, layout, *args, **kwargs: searches.append(
        (runtime._state().step, layout.frames)) or fit(self, q, k, v, layout, *args, **kwargs))
    with torch.no_grad():
        pipe(**call)
    # 5, 5 and 3 latent frames (the last two of each chunk the history); every step is logged at the noisiest
    # frame's (with a correction, the call's step decides), so each chunk searches and measures at steps 0, 2, 4.
    chunks = [5, 5, 3]
    layers = pipe.transformer.config.num_layers
    assert searches == [(step, frames) for frames in chunks for step in (0, 2, 4) for _ in range(layers)]
    measured = [(r.step, r.branch) for r in layer_0(handle.stats()) if r.measured]
    assert measured == [(step, branch) for _ in chunks for step in (0, 2, 4) for branch in BRANCHES]


def test_compare_runs_asynchronous_diffusion_forcing_through_call_kwargs(tmp_path):
    # `diffsparse compare --call-kwargs '{"ar_step": 1, "causal_block_size": 2}'`: the masked calls run sparse.
    from diffsparse.cli import build_parser
    from diffsparse.compare import run_compare

    pipe = tiny_pipeline(SkyReelsV2DiffusionForcingPipeline)
    args = build_parser().parse_args([
        "compare", "--frames", "13", "--height", "64", "--width", "96", "--steps", "3", "--block-size", "32",
        "--dense-steps", "0", "--call-kwargs", '{"ar_step": 1, "causal_block_size": 2}', "--out", str(tmp_path),
    ])
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=32, dense_steps=0)
    result = run_compare(args, config, pipe=pipe)
    assert pipe.transformer.config.num_frame_per_block == 2  # the call was asynchronous, under the mask
    assert result.frames == 13 and result.mean_attention_density < 1 and result.psnr_db > 0


def test_compare_keeps_the_warning_that_a_causal_call_with_a_correction_runs_dense(tmp_path):
    # A correction's dense measurement knows no mask, so every masked call runs the original processor: the warning
    # saying so reached stderr only, since the result kept the texts starting with "diffsparse" and it began with the
    # transformer's name; and the speedup of a run in which nothing ran sparse read as a result.
    from diffsparse.cli import build_parser
    from diffsparse.compare import run_compare, speedup_note

    pipe = tiny_pipeline(SkyReelsV2DiffusionForcingPipeline)
    args = build_parser().parse_args([
        "compare", "--frames", "13", "--height", "64", "--width", "96", "--steps", "2", "--block-size", "32",
        "--dense-steps", "0", "--correction", "residual", "--call-kwargs", '{"ar_step": 1, "causal_block_size": 2}',
        "--out", str(tmp_path),
    ])
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=32, dense_steps=0,
                                     correction="residual")
    result = run_compare(args, config, pipe=pipe)
    assert [message for message in result.warnings if "causal mask" in message and "(dense)" in message]
    assert json.loads((tmp_path / "compare.json").read_text())["warnings"] == result.warnings
    assert result.sparse_calls == 0 and result.mean_attention_density == 1.0
    assert speedup_note(result) == "nothing ran sparse: run-to-run noise"
