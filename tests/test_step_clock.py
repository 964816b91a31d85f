"""When a denoising run starts: `SparseHandle.new_run` on a bare transformer, and calls made before a pipeline set
its scheduler's timesteps (no run on the scheduler's training grid)."""

import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from test_glm_image import glm_call, glm_pipe, transformer  # noqa: F401  (fixtures)

import diffsparse
from diffsparse.patterns import Searched, Window3D
from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline
from diffsparse.runtime import StepClock

# Radial keeps every block of these small layouts, which warns; these tests want no warning but their own.
SMALL_WINDOW = Window3D(window=(1, 1, 1))


@torch.no_grad()
def test_new_run_makes_the_next_call_of_a_bare_transformer_a_fresh_run():
    # A one-step model (or a loop timing one step) calls a bare transformer at the same timestep again and again:
    # before, nothing but a larger timestep started a new run, so image B reused image A's searched blocks (0.043
    # off a fresh B here) and every call was one more "CFG branch" of step 0, with its own state, without a word.
    model = tiny_wan_pipeline().transformer
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 16, 5, 8, 12, generator=g), 3 * torch.randn(1, 16, 5, 8, 12, generator=g)
    text = torch.randn(1, 4, tiny_wan_config()["transformer"]["text_dim"], generator=g)
    config = diffsparse.SparseConfig(pattern=Searched(keep=0.3, criterion="mass"), block_size=16, dense_steps=0)

    def call(x):
        return model(x, torch.tensor([1000.0]), text, return_dict=False)[0]

    diffsparse.apply(model, config)
    fresh_b = call(b)
    handle = diffsparse.apply(model, config)
    call(a)
    handle.new_run()
    torch.testing.assert_close(call(b), fresh_b, atol=0, rtol=0)
    assert [(r.step, r.branch) for r in handle.stats().calls["transformer"] if r.layer == 0] == [(0, "call 0")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(7):  # 8 calls at one timestep: as many as guidance could explain
            call(a)
    with pytest.warns(UserWarning, match=r"more than 8 calls at timestep 1000 .* call handle\.new_run\(\)"):
        call(a)


def test_new_run_starts_a_run_on_a_scheduler_s_timesteps_too():
    # `handle.new_run()` on a transformer stepped by a scheduler whose timesteps stay set (a loop calling the
    # pipeline's transformer itself): the next call starts a run, as on a bare transformer. Nothing failed when
    # `restart` left the run's timesteps in place (the call was then step 1 of the old run).
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    clock = StepClock(scheduler)
    assert [clock.tick(t[None]) for t in scheduler.timesteps[:2]] == [(0, 4, True), (1, 4, False)]
    clock.restart()
    assert clock.tick(scheduler.timesteps[0][None]) == (0, 4, True)


@pytest.mark.parametrize("scheduler_class", [FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
                                             DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler])
def test_a_scheduler_without_a_run_s_timesteps_times_no_run(scheduler_class):
    # Before `set_timesteps` a scheduler holds its 1000 training timesteps: before, a call then was timed against
    # them (t = 900 as step ~100 of 1000). Now such calls count steps as on a bare transformer, of an unknown count.
    scheduler = scheduler_class()
    clock = StepClock(scheduler)
    assert clock.tick(torch.tensor([900.0])) == (0, None, True)
    assert clock.tick(torch.tensor([700.0])) == (1, None, False)
    scheduler.set_timesteps(4)
    assert clock.tick(scheduler.timesteps[0][None]) == (0, 4, True)
    assert clock.tick(scheduler.timesteps[2][None]) == (2, 4, False)


@torch.no_grad()
def test_calls_before_the_pipeline_sets_its_timesteps_are_not_timed_on_the_training_grid():
    # Calls to a pipeline's transformer made outside it before its first call: before, t = 900 was step 247 of the
    # scheduler's 1000 training timesteps (its shift moves them).
    pipe = tiny_wan_pipeline()
    x, text = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 8, tiny_wan_config()["transformer"]["text_dim"])

    def call(t):
        pipe.transformer(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text)
        return [(r.step, r.sparse) for r in diffsparse.stats(pipe).calls["transformer"] if r.layer == 0]

    diffsparse.apply(pipe, diffsparse.SparseConfig(pattern=SMALL_WINDOW, block_size=16, dense_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(900.0)
        assert call(700.0) == [(0, False), (1, True)]
    # A fraction of an unknown step count cannot be resolved: those calls run dense, said once.
    diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0.2))
    with pytest.warns(UserWarning, match="before its pipeline set its scheduler's timesteps .* run dense"):
        call(900.0)
    assert call(700.0) == [(0, False), (1, False)]


@torch.no_grad()
def test_a_pass_before_the_pipeline_sets_its_timesteps_makes_no_run_of_its_own(glm_pipe):  # noqa: F811
    # GLM-Image's edit writes the condition image's keys and values (at timestep 0) before `retrieve_timesteps`:
    # before, that pass started a run on the scheduler's training grid, one step long, and warned that nothing ran
    # sparse, though steps 1 and 2 did.
    handle = diffsparse.apply(glm_pipe, diffsparse.SparseConfig(pattern=SMALL_WINDOW, block_size=16, dense_steps=1))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            glm_pipe(**glm_call(True))
        assert not [w for w in caught if "diffsparse" in str(w.message)]
        records = handle.stats().calls["transformer"]
        assert sorted({(r.step, r.sparse) for r in records if r.layer == 1}) == [(0, False), (1, True), (2, True)]
    finally:
        diffsparse.remove(glm_pipe)


def test_the_condition_pass_before_the_timesteps_says_nothing_under_the_default_fraction(glm_pipe):  # noqa: F811
    # With a fraction in dense_steps (the default 0.2) that pass, which runs the original processor whatever the
    # schedule, asked the schedule first and warned that its steps could not be counted.
    diffsparse.apply(glm_pipe, diffsparse.SparseConfig(pattern=SMALL_WINDOW, block_size=16))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            glm_pipe(**glm_call(True))
        assert not [w for w in caught if "diffsparse" in str(w.message)]
    finally:
        diffsparse.remove(glm_pipe)


def _exponential_dpm():
    return DPMSolverMultistepScheduler(use_exponential_sigmas=True)


def _wan_flow_unipc():
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=17.0)


@pytest.mark.parametrize(("make", "num_steps", "repeated"), [
    (_exponential_dpm, 30, [(28, 29)]),  # ends in two 0s
    (_wan_flow_unipc, 100, [(0, 1), (2, 3), (5, 6)]),  # starts 999, 999, 998, 998, 997, 996, 996
], ids=["DPM-Solver exponential sigmas", "Wan flow UniPC, shift 17"])
def test_a_timestep_listed_twice_is_two_steps(make, num_steps, repeated):
    # Before, a call was at the first position of its timestep: the two steps at one timestep were one, so the last
    # step of the DPM-Solver run was step 28 again and ran sparse under dense_last_steps=1, and Wan's first two
    # steps were both step 0, one more step dense under dense_steps=1. The scheduler's own step count tells them
    # apart; a pipeline's loop: both CFG branches' calls, then `scheduler.step`.
    scheduler = make()
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(0)  # as Wan's pipelines do (without it these schedulers fail at the last step)
    timesteps = scheduler.timesteps
    assert [(i, i + 1) for i in range(num_steps - 1) if timesteps[i] == timesteps[i + 1]][:len(repeated)] == repeated
    clock, sample, ticks = StepClock(scheduler), torch.zeros(1, 4), []
    for t in timesteps:
        ticks += [clock.tick(t[None])[:2] for _branch in ("cond", "uncond")]
        sample = scheduler.step(torch.zeros(1, 4), t, sample).prev_sample
    assert ticks == [(step, num_steps) for step in range(num_steps) for _branch in ("cond", "uncond")]
    # The scheduler's count picks among a run of equal timesteps only where it points into that run: past the loop
    # (its count at num_steps), a call at the first timestep is step 0, not the step the count points at.
    assert clock.tick(timesteps[0][None]) == (0, num_steps, False)
    config = diffsparse.SparseConfig(dense_steps=1, dense_last_steps=1)
    assert [config.is_dense_step(step, n) for step, n in ticks[::2]] == [True] + [False] * (num_steps - 2) + [True]



@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_s_timesteps_listed_twice_are_steps_of_their_own(skip_prk_steps):
    # PNDM has no `step_index`; its `counter` of `step` calls is the loop's position. Before, each repeated timestep
    # was the step of its first place: 0, 1, 1, 3, 4, 5 of 6 at 5 steps with `skip_prk_steps` (0, 1, 1, 3, 3, ... of
    # 14 with its Runge-Kutta warm-up), so step 2 never came, `dense_last_steps=2` kept one call dense and a
    # correction planned to measure at a step that never ran (PixArt, DiT and Latte take PNDM).
    scheduler = PNDMScheduler(skip_prk_steps=skip_prk_steps)
    scheduler.set_timesteps(5)
    timesteps = scheduler.timesteps
    assert any(timesteps[i] == timesteps[i + 1] for i in range(len(timesteps) - 1))
    clock, sample, ticks = StepClock(scheduler), torch.zeros(1, 4), []
    for t in timesteps:
        ticks += [clock.tick(t[None])[:2] for _branch in ("cond", "uncond")]
        sample = scheduler.step(torch.zeros(1, 4), t, sample).prev_sample
    assert ticks == [(step, len(timesteps)) for step in range(len(timesteps)) for _branch in ("cond", "uncond")]
    # A loop from a later timestep (its own, or an img2img's `strength`) starts the counter at 0 there.
    scheduler.set_timesteps(5)
    timesteps, clock, ticks = scheduler.timesteps, StepClock(scheduler), []
    for t in timesteps[1:]:
        ticks.append(clock.tick(t[None])[:2])
        sample = scheduler.step(torch.zeros(1, 4), t, sample).prev_sample
    assert ticks == [(step, len(timesteps) - 1) for step in range(len(timesteps) - 1)]


def test_bare_calls_and_a_run_on_the_scheduler_each_start_a_run_of_their_own():
    # Bare calls (no run's timesteps yet), a run on the scheduler's timesteps, bare calls again (a fresh scheduler
    # swapped in), then the first scheduler's timesteps again: each change starts a new run, whatever the timestep.
    class Pipeline:
        scheduler = None

    pipeline, scheduled = Pipeline(), FlowMatchEulerDiscreteScheduler()
    scheduled.set_timesteps(4)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler()
    clock = StepClock(pipeline=pipeline)
    assert [clock.tick(torch.tensor([t])) for t in (500.0, 400.0)] == [(0, None, True), (1, None, False)]
    pipeline.scheduler = scheduled
    assert [clock.tick(t[None]) for t in scheduled.timesteps[:2]] == [(0, 4, True), (1, 4, False)]
    # Not larger than the bare calls' last timestep: only the run on the schedule in between ended their run.
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler()
    assert [clock.tick(torch.tensor([t])) for t in (300.0, 200.0)] == [(0, None, True), (1, None, False)]
    # The same timesteps tensor as the run before the bare calls: still a run of its own.
    pipeline.scheduler = scheduled
    assert clock.tick(scheduled.timesteps[0][None]) == (0, 4, True)


@torch.no_grad()
def test_the_second_expert_names_its_calls_afresh_in_each_run():
    # Wan 2.2's experts share one clock but each has its own hook, and only the run's first call (the first
    # expert's) is told a run started. Called outside a `cache_context` (a loop of one's own, a guider), the second
    # expert's first step of run 2 is step 3, as its last step of run 1 was: before, its hook went on counting that
    # step's calls ("call 2", "call 3"), so those measured under new names and the next step measured again (dense).
    base = tiny_wan_pipeline()
    config = tiny_wan_config()["transformer"]
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, transformer=base.transformer,
                       transformer_2=WanTransformer3DModel(**config).eval(), vae=base.vae, scheduler=base.scheduler,
                       boundary_ratio=0.5)
    handle = diffsparse.apply(pipe, diffsparse.SparseConfig(pattern=SMALL_WINDOW, block_size=16, dense_steps=1,
                                                            correction="residual"))
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 4, config["text_dim"], generator=g)

    def run(num_steps, switch):
        pipe.scheduler.set_timesteps(num_steps)
        for i, t in enumerate(pipe.scheduler.timesteps):
            model = pipe.transformer if i < switch else pipe.transformer_2
            for _branch in ("cond", "uncond"):  # unnamed calls, one after the other
                model(x, t[None], text, return_dict=False)

    run(4, 2)
    run(6, 3)
    modes = [(r.step, r.branch, "sparse" if r.sparse else "measure" if r.measured else "dense")
             for r in handle.stats().calls["transformer_2"] if r.layer == 0]
    assert modes == [(3, "call 0", "measure"), (3, "call 1", "measure")] + [
        (step, f"call {branch}", "sparse") for step in (4, 5) for branch in (0, 1)]


def _bfloat16_shift_7_run(num_steps=50):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(0)
    return scheduler, scheduler.timesteps


def test_a_bfloat16_timestep_without_the_pipeline_s_is_on_the_step_the_scheduler_counts():
    # Cast to bfloat16 (spacing 4 near 1000), shift 7's first timesteps (2.9 apart) round onto each other; with no
    # pipeline `_current_timestep` to read, the scheduler's step count picks among the timesteps within the rounding.
    # Before, the nearest was taken: step 2 read as step 1.
    scheduler, timesteps = _bfloat16_shift_7_run()
    clock, sample, steps = StepClock(scheduler), torch.zeros(1, 4), []
    for t in timesteps:
        steps.append(clock.tick(t[None].to(torch.bfloat16))[0])
        sample = scheduler.step(torch.zeros(1, 4), t, sample).prev_sample
    assert steps == list(range(len(timesteps)))


def test_a_begin_index_is_no_step_count_for_a_rounded_timestep():
    # A loop stepping a copy of the scheduler leaves its `begin_index` at 0 and its `step_index` unset: taking the
    # begin index among the timesteps within the rounding put the first 6 steps of this run all on step 0. Without a
    # count, the nearest timestep is the step.
    scheduler, timesteps = _bfloat16_shift_7_run()
    clock = StepClock(scheduler)
    steps = [clock.tick(t[None].to(torch.bfloat16))[0] for t in timesteps]
    nearest = [int((timesteps - t.to(torch.bfloat16).float()).abs().argmin()) for t in timesteps]
    assert steps == nearest


@pytest.mark.parametrize("steps, strength", [(28, 0.9), (50, 0.8), (50, 0.6)])
def test_a_bfloat16_image_to_image_run_starts_at_the_scheduler_s_begin_index(steps, strength):
    # FLUX's image-to-image, inpaint and control pipelines keep no `_current_timestep` and pass `t.to(bfloat16) /
    # 1000`. At 2048 px (mu 3.23) the first timestep of a run at `strength` < 1 rounds nearer the step before it,
    # and `step_index` is unset until the first `scheduler.step`: the run's first call is at the `begin_index` the
    # pipeline set. Before, the run counted one or two steps more and its second step as step 2 (dense_steps=2 ran
    # one dense step).
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=3.23)
    start = steps - int(steps * strength)
    scheduler.set_begin_index(start)
    clock, sample, got = StepClock(scheduler), torch.zeros(1, 4), []
    for t in scheduler.timesteps[start:]:
        step, num_steps, _ = clock.tick(t[None].to(torch.bfloat16) / 1000 * 1000)
        got.append((step, num_steps))
        sample = scheduler.step(torch.zeros(1, 4), t, sample).prev_sample
    assert got == [(step, steps - start) for step in range(steps - start)]


@pytest.mark.parametrize("scheduler_config, steps, stage", [
    ({"use_dynamic_shifting": True}, 30, 0), ({"stages": 1, "stage_range": [0, 1], "shift": 5.0}, 20, None)])
def test_an_integer_timestep_truncated_from_the_scheduler_s_is_on_its_step(scheduler_config, steps, stage):
    # Helios' pyramid pipeline and modular loops pass `t.to(torch.int64)`: up to 1 below `t`, nearer the next step
    # where the shifted schedule's steps are under 2 apart. Before, those calls went to the next step (dense_steps
    # shifted by one) with a warning of timesteps off the schedule; the scheduler's count now tells them apart.
    from diffusers import HeliosScheduler
    from diffusers.pipelines.helios.pipeline_helios_pyramid import calculate_shift

    scheduler = HeliosScheduler(**scheduler_config)
    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15) if scheduler_config.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(steps, stage, device="cpu", mu=mu)
    clock, got = StepClock(scheduler), []
    for index, t in enumerate(scheduler.timesteps):
        scheduler._step_index = index  # as the pipeline's `scheduler.step` leaves it
        got.append(clock.tick(t[None].to(torch.int64))[0])
    assert got == list(range(len(scheduler.timesteps)))


def test_an_integer_timestep_is_the_step_of_the_timestep_it_truncates_without_a_step_count():
    # A loop stepping a copy of the scheduler leaves no count: the grid's one timestep truncating to the call's is
    # its step. Taking the nearest (the truncation lowers `t`) put 5 of these 50 calls on the next step, unwarned.
    from diffusers import HeliosScheduler

    scheduler = HeliosScheduler(stages=1, stage_range=[0, 1], shift=3.0)
    scheduler.set_timesteps(50, None, device="cpu")
    clock = StepClock(scheduler)
    steps = [clock.tick(t[None].to(torch.int64))[0] for t in scheduler.timesteps]
    assert steps == list(range(len(scheduler.timesteps)))


def test_the_pipeline_s_full_precision_timestep_wins_over_the_scheduler_s_count():
    # Both tell a rounded timestep's step; where they disagree (a count left behind by a loop that stepped another
    # scheduler), the pipeline's own `_current_timestep`, the timestep itself, decides.
    scheduler, timesteps = _bfloat16_shift_7_run()

    class Pipeline:
        _current_timestep = None

        def __call__(self, t):  # its timestep is read while it runs, as a pipeline's is
            self._current_timestep = t
            return clock.tick(t[None].to(torch.bfloat16))[0]

    pipeline = Pipeline()
    clock = StepClock(scheduler, pipeline=pipeline)
    for step in range(4):
        scheduler._step_index = max(step - 1, 0)  # the count one behind
        assert pipeline(timesteps[step]) == step


@pytest.mark.skipif(sys.gettrace() is not None, reason="a tracer (debugger, coverage) keeps the frames' locals")
def test_reading_the_pipeline_s_timestep_keeps_none_of_its_step_s_tensors_alive():
    # The clock finds the running pipeline by its `__call__`'s `self` on the stack. Before, reading that frame's locals
    # (Python < 3.13 copies them into a dict the frame keeps) held the step's latents until the next transformer call,
    # and the last step's through the pipeline's VAE decode.
    import gc
    import weakref

    scheduler, timesteps = _bfloat16_shift_7_run(4)

    class Pipeline:
        _current_timestep = None

        def __call__(self):
            steps, freed = [], []
            for t in timesteps:
                latents = torch.zeros(8)
                previous = weakref.ref(latents)
                self._current_timestep = t
                steps.append(clock.tick(t[None].to(torch.bfloat16))[0])
                latents.add_(1)  # still bound
                del latents
                gc.collect()
                freed.append(previous() is None)
            return steps, freed

    pipeline = Pipeline()
    clock = StepClock(scheduler, pipeline=pipeline)
    assert pipeline() == ([0, 1, 2, 3], [True] * 4)


def test_reading_the_pipeline_s_timestep_leaves_a_locals_dict_someone_holds_whole():
    # `env = locals()` in a `__call__` on the stack is the dict the walk reads: emptying it (to free the step's
    # tensors) took the caller's keys away.
    from diffsparse.runtime import _in_call

    class Job:
        def __call__(self, latents):
            env = locals()
            found = _in_call(object())  # walks past this frame
            return found, set(env)

    found, kept = Job()(torch.zeros(2))
    assert not found and {"latents", "self"} <= kept
