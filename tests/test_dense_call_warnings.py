"""A self-attention call that runs the original processor because the sparse path cannot compute it exactly (a
token-level mask, a norm of the input, a sequence the adapter did not describe) is counted dense in `stats()` and
said once per `apply` and reason (`SparseRuntime.log_dense`): a run gone wholly or partly dense shows as more than a
missing speedup. Calls the schedule makes dense (`dense_steps`, `dense_layers`) are the user's choice: not said.
Shown on Latte (per-frame self-attention), EasyAnimate (joint MMDiT and plain blocks) and LTX-2 (IC-LoRA's mask),
tiny models with random weights, called directly over several steps, and in Latte's tiny pipeline; and Wan-Animate-2's
reference pass, dense by design of every run: counted, not said (nothing a caller could change)."""

import contextlib
import warnings

import pytest
import test_easyanimate
import test_latte
import test_ltx2
import test_wan_animate2
import torch
from diffusers import EasyAnimateTransformer3DModel
from diffusers.models.transformers import transformer_wan_animate_2
from torch.nn.attention.flex_attention import create_block_mask

import diffsparse
from diffsparse import DiffsparseWarning
from diffsparse.patterns import Window3D
from diffsparse.pipelines.base import TOKEN_MASK
from diffsparse.runtime import StepScheduleWarning

LOCAL = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0)
SCHEDULE_DENSE = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=100)
TIMESTEPS = (900, 500, 100)  # three calls of a bare transformer: three steps


def said_dense(record) -> list[str]:
    """The messages of `log_dense`'s warnings among `record`'s."""
    return [str(w.message) for w in record
            if issubclass(w.category, DiffsparseWarning) and "self-attention calls with" in str(w.message)]


@contextlib.contextmanager
def masked(modules, mask):
    """Every module in `modules` called with `attention_mask=mask` (a caller's own block or processor passing one)."""
    hooks = [module.register_forward_pre_hook(lambda m, args, kwargs: (args, {**kwargs, "attention_mask": mask}),
                                              with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def run_steps(model, calls, config):
    """`model` called once per `calls` entry (keyword arguments) under `config`: the warnings it raised, and
    `(dense_calls, sparse_calls)` of each layer."""
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        with diffsparse.sparse(model, config) as handle:
            for call in calls:
                model(**call)
            counts = [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers]
    return record, counts


# Per family: the tiny transformer, its calls at `TIMESTEPS`, the self-attention modules a caller's mask reaches (or
# `None` where the model takes the mask as an input of its own, given in `masked_calls`), and such a mask.
def latte():
    model = test_latte.tiny_transformer()
    calls = [{**test_latte.inputs()(), "timestep": torch.tensor([t, t])} for t in TIMESTEPS]
    mask = torch.ones(2 * test_latte.FRAMES, 1, 96, dtype=torch.bool)
    mask[..., -1] = False
    return model, calls, [block.attn1 for block in model.transformer_blocks], mask


def easyanimate():
    torch.manual_seed(0)  # test_easyanimate's: 2 layers, the first an MMDiT block
    model = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=9, out_channels=4, patch_size=2, sample_width=12,
        sample_height=8, num_layers=2, mmdit_layers=1, time_embed_dim=8, text_embed_dim=16, text_embed_dim_t5=12,
    ).eval()
    calls = [{**test_easyanimate.inputs(), "timestep": torch.tensor([t])} for t in TIMESTEPS]
    mask = torch.ones(1, 1, 1, 11 + 96, dtype=torch.bool)
    mask[..., -1] = False
    return model, calls, [block.attn1 for block in model.transformer_blocks], mask


def ltx2():
    model = test_ltx2.tiny_transformer("2.0")
    inputs = test_ltx2.make_inputs(model)
    calls = [{**inputs(), "timestep": torch.full((1,), float(t)), "sigma": torch.full((1,), t / 1000)}
             for t in TIMESTEPS]
    weights = torch.ones(1, 72, 72)  # IC-LoRA's soft mask: the reference tokens' attention halved
    weights[:, :, 36:] = 0.5
    return model, calls, None, weights


FAMILIES = {"Latte": latte, "EasyAnimate": easyanimate, "LTX-2": ltx2}


def run_masked(family, config):
    model, calls, modules, mask = FAMILIES[family]()
    if modules is None:
        return run_steps(model, [{**call, "video_self_attention_mask": mask} for call in calls], config)
    with masked(modules, mask):
        return run_steps(model, calls, config)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_mask_on_every_layer_and_step_is_said_once_and_counted_dense(family):
    record, counts = run_masked(family, LOCAL)
    [said] = said_dense(record)
    assert said.startswith("diffsparse: transformer: self-attention calls with ")
    assert "attention_mask" in said and "run the original processor (dense, counted dense in stats())" in said
    if family != "LTX-2":
        assert TOKEN_MASK in said
    assert counts == [(len(TIMESTEPS), 0)] * 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_without_a_mask_nothing_is_said(family):
    model, calls, _, _ = FAMILIES[family]()
    record, counts = run_steps(model, calls, LOCAL)
    assert said_dense(record) == []
    assert counts == [(0, len(TIMESTEPS))] * 2


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("config", [
    SCHEDULE_DENSE,
    diffsparse.SparseConfig(pattern="dense", dense_steps=0),
    diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0, dense_layers=2),
], ids=["dense steps", "dense pattern", "dense layers"])
def test_a_mask_on_calls_the_settings_make_dense_anyway_is_not_said(family, config):
    # Nothing sparse was lost: the mask changes nothing about these calls (before, Latte's and LTX-2's warned).
    record, counts = run_masked(family, config)
    assert said_dense(record) == []
    assert counts == [(len(TIMESTEPS), 0)] * 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_mask_on_a_layer_the_settings_leave_sparse_is_said(family):
    # One dense layer of two: the other would have run sparse, so the mask lost it something.
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0, dense_layers=1)
    record, counts = run_masked(family, config)
    assert len(said_dense(record)) == 1
    assert counts == [(len(TIMESTEPS), 0)] * 2


def test_a_mask_on_a_correction_s_measuring_step_is_said():
    # Every step is dense, but the last is the correction's measurement: the mask keeps its statistics from being
    # taken, so the next step would measure again instead of running sparse.
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=len(TIMESTEPS),
                                     correction="residual")
    record, counts = run_masked("Latte", config)
    assert len(said_dense(record)) == 1
    assert counts == [(len(TIMESTEPS), 0)] * 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_schedule_s_dense_calls_are_not_said(family):
    model, calls, _, _ = FAMILIES[family]()
    record, counts = run_steps(model, calls, SCHEDULE_DENSE)
    assert said_dense(record) == []
    assert counts == [(len(TIMESTEPS), 0)] * 2
    record, counts = run_steps(model, calls, diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)),
                                                                     block_size=16, dense_steps=0, dense_layers=2))
    assert said_dense(record) == []
    assert counts == [(len(TIMESTEPS), 0)] * 2


def latte_pipeline_run(config, mask=None):
    pipe = test_latte.tiny_pipeline()
    call = {"prompt": "a red circle moving left", "negative_prompt": "low quality", "height": 16, "width": 24,
            "video_length": test_latte.FRAMES, "num_inference_steps": 3, "guidance_scale": 4.0,
            "output_type": "latent", "clean_caption": False, "generator": torch.Generator().manual_seed(0)}
    modules = [block.attn1 for block in pipe.transformer.transformer_blocks]
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        with masked(modules if mask is not None else [], mask), diffsparse.sparse(pipe, config) as handle:
            pipe(**call)
            stats = handle.stats()
    return said_dense(record), [(s.dense_calls, s.sparse_calls) for s in stats.layers]


def test_in_a_pipeline_the_schedule_s_dense_steps_say_nothing_and_a_mask_is_said_once():
    for dense_steps in (3, 0.5):  # every one of the three steps, or the first half of them
        said, counts = latte_pipeline_run(diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16,
                                                                  dense_steps=dense_steps))
        assert said == []
        dense = 3 if dense_steps == 3 else 2
        assert counts == [(dense, 3 - dense)] * 2  # three steps, CFG batched in one call each
    mask = torch.ones(2 * test_latte.FRAMES, 1, 96, dtype=torch.bool)
    mask[..., -1] = False
    said, counts = latte_pipeline_run(LOCAL, mask)
    assert len(said) == 1 and TOKEN_MASK in said[0]
    assert counts == [(3, 0), (3, 0)]


def test_a_mask_on_a_call_before_the_pipeline_set_its_timesteps_is_said():
    # The transformer of a pipeline called on its own: a fraction of dense steps cannot be resolved (the run's step
    # count is unknown, which its StepScheduleWarning says), and the mask would make the call dense with a count too:
    # both are said, as a caller has to mend both.
    pipe = test_latte.tiny_pipeline()
    mask = torch.ones(2 * test_latte.FRAMES, 1, 96, dtype=torch.bool)
    mask[..., -1] = False
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 3, 3)), block_size=16, dense_steps=0.5)
    modules = [block.attn1 for block in pipe.transformer.transformer_blocks]
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        with masked(modules, mask), diffsparse.sparse(pipe, config) as handle:
            call = test_latte.inputs()()
            width = pipe.text_encoder.config.d_model
            pipe.transformer(**{**call, "encoder_hidden_states": torch.randn(2, 5, width)})
            counts = [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers]
    assert len(said_dense(record)) == 1
    assert len([w for w in record if issubclass(w.category, StepScheduleWarning)]) == 1
    assert counts == [(1, 0)] * 2


def test_a_self_attention_normalising_its_input_is_said_once():
    model, calls, modules, _ = latte()
    for module in modules:
        module.group_norm = torch.nn.GroupNorm(3, 24)
    record, counts = run_steps(model, calls, LOCAL)
    [said] = said_dense(record)
    assert "a group or spatial norm of their input" in said
    assert counts == [(len(TIMESTEPS), 0)] * 2


def test_log_dense_says_each_reason_once_and_only_for_calls_it_counts():
    model, calls, modules, _ = latte()
    seen = []

    def log(module, args, kwargs):
        runtime = module.processor.runtime
        for why in ("reason one", "reason two", "reason one"):
            runtime.log_dense(0, why=why)
        seen.append(runtime)

    hook = modules[0].register_forward_pre_hook(log, with_kwargs=True)
    try:
        record, counts = run_steps(model, calls, LOCAL)
    finally:
        hook.remove()
    assert said_dense(record) == [
        f"diffsparse: transformer: self-attention calls with {why} run the original processor (dense, counted dense "
        "in stats())" for why in ("reason one", "reason two")
    ]
    assert counts == [(3 * len(TIMESTEPS), len(TIMESTEPS)), (0, len(TIMESTEPS))]
    # Outside the transformer's call (another model sharing the module): neither logged nor said.
    runtime = seen[0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        runtime.log_dense(0, why="reason three")
    assert said_dense(record) == []


def test_the_reason_is_a_required_keyword():
    model, _, modules, _ = latte()
    with diffsparse.sparse(model, LOCAL):
        runtime = modules[0].processor.runtime
        with pytest.raises(TypeError):
            runtime.log_dense(0)
        with pytest.raises(TypeError):
            runtime.log_dense(0, "positional")


def test_wan_animate_2_s_reference_pass_dense_by_design_is_not_said(monkeypatch):
    # Every segment's reference pass runs the original (so the cache holds what it stores): the design of every run,
    # nothing a caller could change, so a warning would only be noise in every result (tests/test_wan_animate2.py
    # checks it is counted dense); the denoising call after it runs sparse.
    monkeypatch.setattr(transformer_wan_animate_2, "create_block_mask",  # uncompiled: slow on CPU, needless here
                        lambda *args, _compile=True, **kwargs: create_block_mask(*args, _compile=False, **kwargs))
    model = test_wan_animate2.make_transformer()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        test_wan_animate2.generate(model, test_wan_animate2.ONE_TOKEN)
    assert said_dense(record) == []
    # A call on a part of the video, which the block mask was not built for, is the caller's: said.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        partial = test_wan_animate2.ORIGIN_LEN // 4  # one generation frame fewer than the block mask's video
        test_wan_animate2.generate(model, test_wan_animate2.ONE_TOKEN, generation=[(partial, 8, 12)])
    [said] = said_dense(record)
    assert "a part of the video" in said
