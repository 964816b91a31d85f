"""`apply`, `remove`, `sparse` and `suspended` on the tiny Wan pipeline: what they put back, and what they say."""

import gc
import warnings
import weakref

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import diffsparse
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.base import SparseProcessor
from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline
from diffsparse.runtime import HOOK_NAME, register_context_hook, sparse_steps

from helpers import generate


def _nothing_sparse_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "nothing runs sparse" in str(w.message)]


@torch.no_grad()
def test_a_config_that_leaves_nothing_sparse_says_so(tiny_pipe):
    # Valid configs (the same one may go to a deeper model or a longer run), but without a word they would only
    # show up as a missing speedup.
    blocks = len(tiny_pipe.transformer.blocks)
    with pytest.warns(UserWarning, match=rf"dense_layers={blocks} keeps every self-attention block dense"):
        diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(dense_layers=blocks, dense_steps=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_layers=blocks - 1, dense_steps=1,
                                                            dense_last_steps=1))
        generate(tiny_pipe, num_inference_steps=3)  # step 1 is sparse
        assert not _nothing_sparse_warnings(caught)
        generate(tiny_pipe, num_inference_steps=2)
        generate(tiny_pipe, num_inference_steps=2)
        diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(pattern="dense", dense_layers=blocks, dense_steps=2))
        generate(tiny_pipe, num_inference_steps=2)  # dense on purpose: no warning
    # Once per run (each of the two 2-step runs), whatever the number of transformer calls in it.
    assert _nothing_sparse_warnings(caught) == 2 * [(
        "diffsparse: SparseConfig.dense_steps=1 and dense_last_steps=1 keep every step of this 2-step run dense "
        "(1 first, 1 last), so nothing runs sparse: lower them to leave some steps sparse"
    )]
    assert sum(s.sparse_calls for s in diffsparse.stats(tiny_pipe, since_apply=True).layers) == 0


@torch.no_grad()
def test_a_correction_that_leaves_nothing_sparse_says_so(tiny_pipe):
    # A correction measures (dense) at a sparse step without statistics, and again every correction_refresh steps:
    # before, a refresh of 1 (every sparse step measures) or a run with one sparse step and no dense step before it
    # ran wholly dense, slower than dense, without a word. The warning foresees the run with the runtime's own
    # rule, so the steps it foresees sparse are those that ran sparse.
    small = {"num_frames": 5, "height": 32, "width": 32}
    runs = [({"correction_refresh": 1, "dense_steps": 1}, 3), ({"dense_steps": 0}, 1),
            ({"correction_refresh": 2, "dense_steps": 1}, 4), ({"dense_steps": 0}, 2)]
    caught, sparse = [], []
    for fields, steps in runs:
        config = diffsparse.SparseConfig(block_size=16, correction="residual", **fields)
        diffsparse.apply(tiny_pipe, config)
        with warnings.catch_warnings(record=True) as run_caught:
            warnings.simplefilter("always")
            generate(tiny_pipe, num_inference_steps=steps, **small)
        caught += _nothing_sparse_warnings(run_caught)
        records = diffsparse.stats(tiny_pipe).calls["transformer"]
        sparse.append(sorted({r.step for r in records if r.sparse}))
        assert sparse[-1] == sparse_steps(config, steps)
    assert sparse == [[], [], [1, 3], [1]]
    assert caught == [
        ("diffsparse: SparseConfig.correction='residual' with correction_refresh=1 measures its statistics (dense) "
         "again at every sparse step, so nothing runs sparse in this 3-step run: set correction_refresh to 0 "
         "(measure once) or more than 1"),
        ("diffsparse: SparseConfig.correction='residual' measures its statistics (dense) at the one step of this "
         "1-step run that dense_steps=0 and dense_last_steps=0 leave sparse (step 0, with no dense step before it "
         "to measure at), so nothing runs sparse: run more steps, or leave the correction out"),
    ]


@torch.no_grad()
def test_a_new_generation_measures_the_correction_again(tiny_pipe):
    # With dense_steps=0 the first sparse-scheduled call of each generation measures: the last generation's
    # statistics are of other latents.
    config = diffsparse.SparseConfig(block_size=16, dense_steps=0, correction="residual")
    with diffsparse.sparse(tiny_pipe, config) as handle:
        generate(tiny_pipe, seed=0, num_inference_steps=2)
        generate(tiny_pipe, seed=1, num_inference_steps=2)
        records = handle.stats().calls["transformer"]
    assert [r.measured for r in records if r.step == 0] == [True] * (len(records) // 2)
    assert not any(r.measured for r in records if r.step == 1)


def _calls(pipe, since_apply=False) -> int:
    return sum(s.dense_calls + s.sparse_calls for s in diffsparse.stats(pipe, since_apply=since_apply).layers)


@torch.no_grad()
def test_stats_count_the_last_run_and_since_apply_every_run(tiny_pipe):
    # A run's stats are its own: a shorter run after a longer one reports its calls alone, not the sum of both.
    blocks = len(tiny_pipe.transformer.blocks)
    handle = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    generate(tiny_pipe, num_inference_steps=3)
    assert _calls(tiny_pipe) == 3 * 2 * blocks  # cond and uncond per step
    generate(tiny_pipe, num_inference_steps=2)
    assert _calls(tiny_pipe) == 2 * 2 * blocks
    assert sorted({r.step for r in handle.stats().calls["transformer"]}) == [0, 1]
    assert _calls(tiny_pipe, since_apply=True) == (3 + 2) * 2 * blocks
    assert handle.stats(since_apply=True).layers == diffsparse.stats(tiny_pipe, since_apply=True).layers


@torch.no_grad()
def test_stats_densities_are_each_over_the_calls_they_name(tiny_pipe):
    # The three densities a user reads off a run: `sparse_density` over the sparse calls (each weighing one),
    # `sparse_steps_density` over the calls outside the schedule's dense steps (a dense layer's at 1.0),
    # `mean_density` over every call; `dense_step_calls` counts those in the dense steps.
    transformer = tiny_pipe.transformer
    handle = diffsparse.apply(transformer, diffsparse.SparseConfig(block_size=16, dense_steps=1, dense_layers=[0]))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 5, 8, 12, generator=g)
    text = torch.randn(1, 4, tiny_wan_config()["transformer"]["text_dim"], generator=g)
    for t in (900.0, 800.0, 700.0):  # steps 0 (dense), 1 and 2: one call each
        transformer(latents, torch.tensor([t]), text, return_dict=False)
    stats = handle.stats()
    assert [(s.layer, s.dense_calls, s.sparse_calls, s.dense_step_calls) for s in stats.layers] == [
        (0, 3, 0, 1), (1, 1, 2, 1)]
    density = stats.layers[1].mean_density
    assert 0 < density < 0.9
    assert stats.sparse_density == pytest.approx(density)
    assert stats.sparse_steps_density == pytest.approx((2 + 2 * density) / 4)  # step 0's two calls left out
    assert stats.mean_density == pytest.approx((4 + 2 * density) / 6)


def test_stats_densities_weigh_each_call_not_each_layer():
    # Layers run different numbers of sparse calls (a layer-skipping guider, per-layer measuring): each call weighs
    # one. Nothing pinned it: a plain mean over the layers (0.4 here) passed the test above.
    stats = diffsparse.SparseStats(layers=[
        diffsparse.LayerStats("transformer", 0, dense_calls=1, sparse_calls=1, mean_density=0.2),
        diffsparse.LayerStats("transformer", 1, dense_calls=0, sparse_calls=3, mean_density=0.6),
    ], calls={})
    assert stats.sparse_density == pytest.approx((0.2 + 3 * 0.6) / 4)
    assert stats.mean_density == pytest.approx((1 + 0.2 + 3 * 0.6) / 5)
    assert stats.sparse_steps_density == pytest.approx((1 + 0.2 + 3 * 0.6) / 5)


@torch.no_grad()
def test_run_step_counts_lists_each_denoising_run(tiny_pipe):
    # The step count each run's dense steps were resolved for (what `eval` reads after its warm-ups), `None` for
    # calls no schedule times: the transformer called before the pipeline first set its scheduler's timesteps.
    transformer = tiny_pipe.transformer
    handle = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    latents = torch.randn(1, 16, 5, 8, 12, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 4, tiny_wan_config()["transformer"]["text_dim"])
    transformer(latents, torch.tensor([900.0]), text, return_dict=False)
    assert handle.run_step_counts == [None]
    generate(tiny_pipe, num_inference_steps=3)
    generate(tiny_pipe, num_inference_steps=4)
    assert handle.run_step_counts == [None, 3, 4]
    # A direct call after a run is timed against that run's timesteps: it starts no run and counts in its stats.
    calls = _calls(tiny_pipe)
    transformer(latents, tiny_pipe.scheduler.timesteps[-1:], text, return_dict=False)
    assert handle.run_step_counts == [None, 3, 4]
    assert _calls(tiny_pipe) == calls + len(transformer.blocks)
    assert handle.stats().calls["transformer"][-1].step == 3


@pytest.mark.parametrize("block", [diffsparse.suspended, diffsparse.sparse])
def test_a_config_applied_inside_a_block_stays_after_it(tiny_pipe, block):
    outer = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    with block(tiny_pipe):
        inner = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(pattern="window3d", block_size=16, dense_steps=0))
    # Not the earlier handle put back on top of it: its processors would wrap the inner handle's.
    assert inner.installed and not outer.installed
    assert tiny_pipe.transformer._diffsparse_handle is inner
    runtime = inner.runtimes["transformer"]
    assert all(block.attn1.processor.runtime is runtime for block in tiny_pipe.transformer.blocks)
    diffsparse.remove(tiny_pipe)
    assert type(tiny_pipe.transformer.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def test_remove_gives_the_originals_what_was_set_on_the_sparse_processors(tiny_pipe, monkeypatch):
    # `set_attention_backend` or `enable_parallelism` while applied set these on the sparse processors; the
    # originals go back with them, as they would have had them without diffsparse.
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also sets diffusers' process-wide active backend: put back after the test (the math
    # backend left active broke later tests' masked attention).
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    transformer = tiny_pipe.transformer
    originals = [block.attn1.processor for block in transformer.blocks]
    diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    transformer.set_attention_backend("_native_math")
    parallel = object()
    for block in transformer.blocks:
        block.attn1.processor._parallel_config = parallel
    diffsparse.remove(tiny_pipe)
    assert [block.attn1.processor for block in transformer.blocks] == originals
    assert all(p._attention_backend == "_native_math" and p._parallel_config is parallel for p in originals)


def test_an_apply_inside_a_block_to_one_expert_says_the_other_is_left_dense():
    # The handle applied to both experts cannot come back whole over the expert applied inside the block. Before,
    # `suspended(pipe)` left transformer_2 dense unsaid, and `suspended(pipe.transformer_2)` stacked the handle on
    # the inner one's processors: a ValueError at the block's end blaming another processor, transformer_2 dense.
    pipe = two_expert_pipeline()
    config = diffsparse.SparseConfig(block_size=16, dense_steps=1)
    for block in (pipe, pipe.transformer_2, pipe.transformer):
        whole = diffsparse.apply(pipe, config)
        with pytest.warns(diffsparse.DiffsparseWarning, match="covered; transformer_2 now runs dense"), \
                diffsparse.suspended(block):
            inner = diffsparse.apply(pipe.transformer, config)
        assert inner.installed and not whole.installed and pipe.transformer._diffsparse_handle is inner
        assert not hasattr(pipe.transformer_2, "_diffsparse_handle")
        assert not any(isinstance(p, SparseProcessor) for p in pipe.transformer_2.attn_processors.values())
        diffsparse.remove(pipe)
    # Raised as an error, the warning does not replace an error the block raises.
    diffsparse.apply(pipe, config)
    with warnings.catch_warnings(), pytest.raises(KeyError, match="the block's own"):
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        with diffsparse.suspended(pipe):
            diffsparse.apply(pipe.transformer, config)
            raise KeyError("the block's own")
    diffsparse.remove(pipe)
    # Inside the caller's own `except`, the warning is still raised as the error asked for.
    diffsparse.apply(pipe, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        try:
            raise RuntimeError("handled by the caller")
        except RuntimeError:
            with pytest.raises(diffsparse.DiffsparseWarning, match="transformer_2 now runs dense"), \
                    diffsparse.suspended(pipe):
                diffsparse.apply(pipe.transformer, config)
    diffsparse.remove(pipe)
    # A handle none of whose transformers got one inside the block comes back, beside what was applied inside.
    alone = diffsparse.apply(pipe.transformer, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        with diffsparse.suspended(pipe):
            inner = diffsparse.apply(pipe.transformer_2, config)
    assert alone.installed and inner.installed and pipe.transformer._diffsparse_handle is alone


def two_expert_pipeline():
    """A tiny Wan 2.2 pipeline: two experts, `transformer_2` with weights of its own."""
    base = tiny_wan_pipeline()
    torch.manual_seed(1)
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                       transformer=base.transformer, boundary_ratio=0.5,
                       transformer_2=WanTransformer3DModel(**tiny_wan_config()["transformer"]).eval())


def test_a_sparse_block_on_one_expert_says_the_other_runs_dense_inside_it():
    # The block takes the handle applied to the whole pipeline off both experts: transformer_2 runs dense inside.
    pipe = two_expert_pipeline()
    whole = diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    config = diffsparse.SparseConfig(block_size=16, dense_steps=1)
    with pytest.warns(UserWarning, match="removed from transformer_2 too for the block"), \
            diffsparse.sparse(pipe.transformer, config):
        assert not hasattr(pipe.transformer_2, "_diffsparse_handle")
    assert whole.installed and pipe.transformer_2._diffsparse_handle is whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="transformer_2 too"), diffsparse.sparse(pipe.transformer, config):
            pass
    # The block's handle came off and the earlier one back, also when its warning was raised as an error.
    assert whole.installed and pipe.transformer._diffsparse_handle is pipe.transformer_2._diffsparse_handle is whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with diffsparse.sparse(pipe, config):  # the whole pipeline: nothing left dense
            pass
        diffsparse.remove(pipe)
        diffsparse.apply(pipe.transformer, config)
        diffsparse.apply(pipe.transformer_2, config)
        with diffsparse.sparse(pipe.transformer, config):  # each expert on its own handle
            pass
        diffsparse.remove(pipe.transformer)  # its own handle only: nothing else comes off
    assert pipe.transformer_2._diffsparse_handle.installed
    # `remove` on one expert of a handle applied to both takes it off both: said, as `apply` and `sparse` say it
    # (before, transformer_2 ran dense without a word).
    diffsparse.apply(pipe, config)
    with pytest.warns(diffsparse.DiffsparseWarning, match="diffsparse.remove: .* from transformer_2 too"):
        diffsparse.remove(pipe.transformer)
    assert not hasattr(pipe.transformer_2, "_diffsparse_handle")
    # Raised as an error, the warning comes after the removal: `remove` as cleanup under `-W error` still cleans up.
    diffsparse.apply(pipe, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(diffsparse.DiffsparseWarning):
            diffsparse.remove(pipe.transformer)
    assert not hasattr(pipe.transformer, "_diffsparse_handle") and not hasattr(pipe.transformer_2, "_diffsparse_handle")


def test_each_warning_of_apply_remove_and_the_blocks_names_the_user_s_line():
    # Before, `apply`'s warning under a `sparse` block named the block's generator in api.py (a fixed stacklevel
    # counted from `apply`, which the block calls inside contextlib's `__enter__`), and so did `suspended`'s at the
    # end of a `sparse` block: `-W error::...:0:mymodule` filters and the printed line pointed into diffsparse.
    pipe = two_expert_pipeline()
    config = diffsparse.SparseConfig(block_size=16, dense_steps=1)
    all_dense = diffsparse.SparseConfig(dense_layers=len(pipe.transformer.blocks), dense_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diffsparse.apply(pipe, all_dense)
        diffsparse.remove(pipe)
        with diffsparse.sparse(pipe, all_dense):
            pass
        diffsparse.apply(pipe, config)
        diffsparse.apply(pipe.transformer, config)  # leaves transformer_2 dense
        diffsparse.apply(pipe, config)
        diffsparse.remove(pipe.transformer)
        diffsparse.apply(pipe, config)
        with diffsparse.sparse(pipe.transformer, config):
            pass
        with diffsparse.suspended(pipe):
            diffsparse.apply(pipe.transformer, config)  # the handle of both cannot come back: said at the end
        diffsparse.apply(pipe, config)
        with diffsparse.sparse(pipe, config):
            diffsparse.apply(pipe.transformer, config)  # and the inner `suspended` says it again at the block's end
    said = [(str(w.message).split(":")[0], w.filename) for w in caught]
    assert said == [(who, __file__) for who in (
        "diffsparse.apply", "diffsparse.apply", "diffsparse.apply", "diffsparse.remove", "diffsparse.sparse",
        "diffsparse", "diffsparse.apply", "diffsparse")]


def test_removing_a_handle_an_apply_replaced_leaves_the_one_that_replaced_it(tiny_pipe):
    # `apply` again replaces the handle; the first one's `remove` (a `SparseHandle` the user kept) must not take the
    # second's context hook with it: its processors would stay, sparse without the step and layout they read.
    config = diffsparse.SparseConfig(block_size=16, dense_steps=1)
    transformer = tiny_pipe.transformer
    first = diffsparse.apply(tiny_pipe, config)
    second = diffsparse.apply(tiny_pipe, config)
    processors = [block.attn1.processor for block in transformer.blocks]
    first.remove()
    assert second.installed and not first.installed and transformer._diffsparse_handle is second
    assert [block.attn1.processor for block in transformer.blocks] == processors
    assert transformer._diffusers_hook.get_hook(HOOK_NAME) is not None
    second.remove()
    assert all(not isinstance(block.attn1.processor, SparseProcessor) for block in transformer.blocks)


def test_apply_refuses_what_is_not_a_config_and_stats_what_is_not_applied(tiny_pipe):
    # A pattern name where the config goes (`apply(pipe, "radial")`) is refused naming what came, with nothing
    # installed; `stats` before `apply` says to apply first rather than report no layers.
    with pytest.raises(ValueError, match="config must be a diffsparse.SparseConfig, got str"):
        diffsparse.apply(tiny_pipe, "radial")
    assert not hasattr(tiny_pipe.transformer, "_diffsparse_handle")
    with pytest.raises(ValueError, match="diffsparse is not applied to this pipeline or transformer"):
        diffsparse.stats(tiny_pipe)


class _Halved(WanAttnProcessor):
    """A user's processor (as attention steering or capture ones are): the family's, its output halved."""

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * 0.5


def test_a_processor_set_after_apply_is_kept_by_remove_and_refused_by_apply_again(tiny_pipe):
    # Before, `remove` put the processor from before `apply` on every module and `apply` again replaced the user's
    # processor with a sparse one: it was dropped without a word either way (FLUX's `load_ip_adapter` after `apply`).
    transformer = tiny_pipe.transformer
    originals = [block.attn1.processor for block in transformer.blocks]
    config = diffsparse.SparseConfig(block_size=16, dense_steps=0)
    handle = diffsparse.apply(tiny_pipe, config)
    mine = _Halved()
    transformer.blocks[0].attn1.set_processor(mine)
    with pytest.raises(ValueError, match="layer 0 of the Wan transformer has processor _Halved"):
        diffsparse.apply(tiny_pipe, config)
    # The handle is back as it was: the user's processor on layer 0, its sparse ones on the others.
    runtime = handle.runtimes["transformer"]

    def as_applied():
        return transformer.blocks[0].attn1.processor is mine and all(
            block.attn1.processor.runtime is runtime for block in transformer.blocks[1:])

    assert handle.installed and transformer._diffsparse_handle is handle and as_applied()
    with diffsparse.suspended(tiny_pipe):  # a handle put back leaves the user's processor too
        assert [block.attn1.processor for block in transformer.blocks] == [mine, *originals[1:]]
    assert as_applied()
    diffsparse.remove(tiny_pipe)
    assert [block.attn1.processor for block in transformer.blocks] == [mine, *originals[1:]]
    with pytest.raises(ValueError, match="layer 0 of the Wan transformer has processor _Halved"):
        diffsparse.apply(tiny_pipe, config)
    assert [block.attn1.processor for block in transformer.blocks] == [mine, *originals[1:]]


class _Slotted:
    """A user's processor that takes no weak reference (`__slots__`, no `__dict__`)."""

    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_a_user_processor_without_weak_references_is_kept_by_remove_and_suspended(tiny_pipe):
    # `remove` kept the user's processor by a weak reference only: one of a class with `__slots__` raised TypeError
    # half-way, leaving the hooks and handle on the model, and every later `remove` raised it again.
    transformer = tiny_pipe.transformer
    originals = [block.attn1.processor for block in transformer.blocks]
    handle = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    mine = _Slotted(originals[0])
    transformer.blocks[0].attn1.set_processor(mine)
    with diffsparse.suspended(tiny_pipe):
        assert [block.attn1.processor for block in transformer.blocks] == [mine, *originals[1:]]
    assert handle.installed and transformer.blocks[0].attn1.processor is mine
    diffsparse.remove(tiny_pipe)
    assert not handle.installed and not hasattr(transformer, "_diffsparse_handle")
    assert [block.attn1.processor for block in transformer.blocks] == [mine, *originals[1:]]


@pytest.mark.parametrize("block", ["sparse", "suspended"])
def test_a_processor_set_inside_a_block_stays_when_the_earlier_handle_comes_back(tiny_pipe, block):
    # Before, the handle put back at the block's end tried to wrap the user's processor: the `with` raised its
    # refusal, and the earlier config was gone once the error was caught.
    transformer = tiny_pipe.transformer
    config = diffsparse.SparseConfig(block_size=16, dense_steps=0)
    handle = diffsparse.apply(tiny_pipe, config)
    mine = _Halved()
    inner = diffsparse.sparse(tiny_pipe, config) if block == "sparse" else diffsparse.suspended(tiny_pipe)
    with inner:
        transformer.blocks[0].attn1.set_processor(mine)
    runtime = handle.runtimes["transformer"]
    assert handle.installed and transformer._diffsparse_handle is handle
    assert transformer.blocks[0].attn1.processor is mine
    assert all(block.attn1.processor.runtime is runtime for block in transformer.blocks[1:])
    # The handle remembers the user's processor without keeping it alive once the user drops it.
    transformer.blocks[0].attn1.set_processor(WanAttnProcessor())
    dropped = weakref.ref(mine)
    del mine
    gc.collect()
    assert dropped() is None


def test_a_layer_the_user_took_their_processor_off_is_sparse_again_when_the_handle_comes_back(tiny_pipe):
    # The handle leaves a layer only while it holds the very processor the user set there: once they set back the
    # processors saved while applied (the handle's own, orphans by then), the next put-back wraps that layer again.
    # Nothing failed when `_install` skipped every module it had left before whose processor the user still
    # kept: layer 0 then stayed dense, unsaid.
    transformer = tiny_pipe.transformer
    handle = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    saved = transformer.attn_processors
    mine = _Halved()  # kept by the user, to set again later: the handle still remembers it
    transformer.blocks[0].attn1.set_processor(mine)
    with diffsparse.suspended(tiny_pipe):
        pass
    assert transformer.blocks[0].attn1.processor is mine
    transformer.set_attn_processor(saved)
    with diffsparse.suspended(tiny_pipe):
        pass
    runtime = handle.runtimes["transformer"]
    assert all(block.attn1.processor.installed and block.attn1.processor.runtime is runtime
               for block in transformer.blocks)


@torch.no_grad()
def test_a_sparse_processor_set_back_inside_suspended_is_wrapped_anew_at_its_end(tiny_pipe):
    # Processors saved while the handle was on (`attn_processors`) and set back inside the block put the handle's
    # own sparse processors there, uninstalled: they are not a user's choice for the handle put back to leave (which
    # would run those layers dense, uncounted in the stats) but a sparse processor over the original, made anew.
    transformer = tiny_pipe.transformer
    handle = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    saved = transformer.attn_processors
    with diffsparse.suspended(tiny_pipe):
        transformer.set_attn_processor(saved)
    processors = [block.attn1.processor for block in transformer.blocks]
    runtime = handle.runtimes["transformer"]
    assert all(p.installed and p.runtime is runtime and not isinstance(p.original, SparseProcessor)
               for p in processors)
    generate(tiny_pipe, num_inference_steps=1)
    assert [(s.layer, s.dense_calls, s.sparse_calls) for s in diffsparse.stats(tiny_pipe).layers] == [
        (layer, 0, 2) for layer in range(len(processors))]


def _aliased_experts_pipe():
    """Wan 2.2's pipeline given one transformer as both experts."""
    base = tiny_wan_pipeline()
    return WanPipeline(**{**base.components, "transformer_2": base.transformer}, boundary_ratio=0.5)


def test_one_transformer_as_both_experts_is_applied_once():
    # Before, it was installed twice: diffusers' "Hook with name diffsparse_context already exists", a half-applied
    # model that `remove` did not undo.
    pipe = _aliased_experts_pipe()
    transformer = pipe.transformer
    originals = [block.attn1.processor for block in transformer.blocks]
    handle = diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    assert list(handle._transformers) == ["transformer"] and transformer._diffsparse_handle is handle
    assert list(transformer._diffusers_hook.hooks) == [HOOK_NAME]
    with torch.no_grad():
        generate(pipe, num_inference_steps=2)
    assert all(s.sparse_calls and not s.dense_calls for s in diffsparse.stats(pipe).layers)
    diffsparse.remove(pipe)
    assert [block.attn1.processor for block in transformer.blocks] == originals
    assert HOOK_NAME not in transformer._diffusers_hook.hooks and not hasattr(transformer, "_diffsparse_handle")


@pytest.mark.parametrize("fails", ["set_processor", "register_context_hook"])
def test_an_install_that_fails_half_way_leaves_the_model_as_it_was(monkeypatch, fails):
    base = tiny_wan_pipeline()
    torch.manual_seed(1)
    second = WanTransformer3DModel(**tiny_wan_config()["transformer"]).eval()
    pipe = WanPipeline(**{**base.components, "transformer_2": second}, boundary_ratio=0.5)
    experts = [pipe.transformer, pipe.transformer_2]
    originals = [[block.attn1.processor for block in t.blocks] for t in experts]

    def failing_at(count: int, real):
        calls = []

        def failing(*args):
            calls.append(args)
            if len(calls) == count:
                raise RuntimeError(f"install step {count} failed")
            return real(*args)

        return failing

    adapter = adapter_for(pipe.transformer)
    set_processor, made = adapter.set_processor, []

    def recording(module, processor):
        if isinstance(processor, SparseProcessor):
            made.append(processor)
        return set_processor(module, processor)

    if fails == "set_processor":  # layer 0 of transformer_2: transformer is sparse and hooked by then
        count = len(pipe.transformer.blocks) + 1
        monkeypatch.setattr(adapter, "set_processor", failing_at(count, recording))
    else:  # transformer_2's hook, every processor of both experts swapped by then
        count = 2
        monkeypatch.setattr(adapter, "set_processor", recording)
        monkeypatch.setattr(diffsparse.api, "register_context_hook", failing_at(count, register_context_hook))
    with pytest.raises(RuntimeError, match=f"install step {count} failed"):
        diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    for transformer, before in zip(experts, originals):
        assert [block.attn1.processor for block in transformer.blocks] == before
        registry = getattr(transformer, "_diffusers_hook", None)
        assert registry is None or HOOK_NAME not in registry.hooks
        assert not hasattr(transformer, "_diffsparse_handle")
    # The sparse processors taken back are orphans, as a removed handle's are: one set on a module again (a saved
    # `attn_processors` set back) gives way to its original at `remove`, not kept as a live handle's would be.
    assert made and not any(processor.installed for processor in made)
    module = pipe.transformer.blocks[0].attn1
    module.set_processor(made[0])
    diffsparse.remove(pipe)
    assert module.processor is originals[0][0]


def _as_applied(pipe, handle) -> bool:
    """Whether `handle` is the one installed on `pipe`'s transformer: its mark and its processors on every block."""
    transformer = pipe.transformer
    runtime = handle.runtimes["transformer"]
    return handle.installed and getattr(transformer, "_diffsparse_handle", None) is handle and all(
        getattr(block.attn1.processor, "runtime", None) is runtime for block in transformer.blocks)


def test_a_warning_raised_as_an_error_leaves_what_was_applied_before(tiny_pipe):
    # The README's `filterwarnings("error", category=DiffsparseWarning)`: `apply` said its warnings after installing
    # the new config, so one raised as an error left that config installed and the earlier handle gone, and a
    # `sparse` block's end kept that stray handle rather than put the earlier one back.
    earlier = diffsparse.apply(tiny_pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    every_block_dense = diffsparse.SparseConfig(dense_layers=len(tiny_pipe.transformer.blocks), dense_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=diffsparse.DiffsparseWarning)
        with pytest.raises(diffsparse.DiffsparseWarning, match="keeps every self-attention block dense"):
            diffsparse.apply(tiny_pipe, every_block_dense)
        assert _as_applied(tiny_pipe, earlier)
        with pytest.raises(diffsparse.DiffsparseWarning, match="keeps every self-attention block dense"), \
                diffsparse.sparse(tiny_pipe, every_block_dense):
            pass
        assert _as_applied(tiny_pipe, earlier)
        diffsparse.remove(tiny_pipe)
        # Nothing applied before: the refused config leaves the originals.
        with pytest.raises(diffsparse.DiffsparseWarning, match="keeps every self-attention block dense"):
            diffsparse.apply(tiny_pipe, every_block_dense)
    assert not hasattr(tiny_pipe.transformer, "_diffsparse_handle")
    assert all(type(block.attn1.processor) is WanAttnProcessor for block in tiny_pipe.transformer.blocks)
    assert HOOK_NAME not in tiny_pipe.transformer._diffusers_hook.hooks


def test_a_handle_put_back_under_context_parallelism_enabled_since_refuses_at_its_first_sparse_call():
    # Latte's sparse path does not shard: `apply` refuses under parallelism already enabled, a handle applied
    # before refuses at its first sparse call. Before, `suspended`'s end (and a refused `apply` putting the earlier
    # handle back) made its processors anew, which that same refusal of `apply` stopped: the handle was lost, the
    # block's end raised, and a refused `apply` raised a second refusal chained to its own.
    import test_latte
    from diffusers import ContextParallelConfig, ParallelConfig

    model, inputs = test_latte.tiny_transformer(), test_latte.inputs()()
    originals = {module: module.processor for module in model.modules() if hasattr(module, "processor")}
    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=0)
    handle = diffsparse.apply(model, config)
    sparse = {module: module.processor for module in model.modules()
              if isinstance(getattr(module, "processor", None), SparseProcessor)}
    assert sparse
    # What `enable_parallelism` sets: the model's config, and every processor's that declares the attribute.
    parallel = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    model._parallel_config = parallel
    for processor in sparse.values():
        processor._parallel_config = parallel

    def refused_at_its_first_sparse_call():
        assert handle.installed and model._diffsparse_handle is handle
        processors = [module.processor for module in sparse]
        assert all(p.runtime is handle.runtimes["transformer"] and p._parallel_config is parallel for p in processors)
        with pytest.raises(NotImplementedError, match="not on"), torch.no_grad():
            model(**inputs)

    refused_at_its_first_sparse_call()
    with diffsparse.suspended(model):
        assert not handle.installed
    refused_at_its_first_sparse_call()
    with pytest.raises(NotImplementedError, match="not on") as refused:
        diffsparse.apply(model, config)
    assert refused.value.__context__ is None  # the refusal alone, not a second one chained to it
    refused_at_its_first_sparse_call()
    with pytest.raises(NotImplementedError, match="not on"), diffsparse.sparse(model, config):
        pass
    refused_at_its_first_sparse_call()
    diffsparse.remove(model)
    assert {module: module.processor for module in originals} == originals


@torch.no_grad()
def test_stats_name_an_expert_by_its_component_and_one_asked_about_alone_by_its_handle_s_name():
    # Through the pipeline, each expert goes by its component name, also where each was applied alone (each lone
    # handle calls its transformer "transformer": both reported as one); asked about alone, an expert applied
    # through the pipeline goes by the name the pipeline's handle gives it, not the "transformer" of a lone model.
    pipe = two_expert_pipeline()
    config = diffsparse.SparseConfig(block_size=16, dense_steps=0)
    latents = torch.randn(1, 16, 5, 8, 12, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 4, tiny_wan_config()["transformer"]["text_dim"])

    def call_each_expert():
        for expert in (pipe.transformer, pipe.transformer_2):
            expert(latents, torch.tensor([900.0]), text, return_dict=False)

    def names(stats):
        return list(stats.calls), sorted({s.transformer for s in stats.layers})

    diffsparse.apply(pipe, config)
    call_each_expert()
    for name in ("transformer", "transformer_2"):
        assert names(diffsparse.stats(getattr(pipe, name))) == ([name], [name])
    diffsparse.remove(pipe)
    diffsparse.apply(pipe.transformer, config)
    diffsparse.apply(pipe.transformer_2, config)
    call_each_expert()
    both = ["transformer", "transformer_2"]
    assert names(diffsparse.stats(pipe)) == (both, both)
    assert names(diffsparse.stats(pipe.transformer_2)) == (["transformer"], ["transformer"])
