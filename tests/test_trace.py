"""`diffsparse trace`: per-call error of sparse attention against dense attention on the same inputs."""

import contextlib
import csv
import dataclasses

import pytest
import torch

import diffsparse
from diffsparse import trace
from diffsparse.cli import main
from diffsparse.compare import EMBEDDED_MODEL
from diffsparse.patterns import Radial, Window3D
from diffsparse.trace import per_layer, per_step, trace_attention_errors

from helpers import tiny_call


def test_every_block_kept_traces_zero_error_and_only_the_calls_diffsparse_computes(tiny_pipe):
    config = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=1)
    traced = trace_attention_errors(tiny_pipe, config, **tiny_call(num_inference_steps=3))
    assert {c.step for c in traced} == {1, 2}  # step 0 stays with the original processors
    assert len(traced) == 2 * 2 * 2  # steps x branches x layers
    assert all(c.sparse and c.error < 1e-5 for c in traced)


def test_sparse_calls_have_an_error_and_a_measuring_call_has_none(tiny_pipe, monkeypatch, tmp_path):
    config = diffsparse.SparseConfig(
        pattern=Radial(decay=0.25, min_window=8), block_size=16, dense_steps=1, correction="residual"
    )
    handles, applied = [], trace.sparse

    @contextlib.contextmanager
    def kept(pipe, config):
        with applied(pipe, config) as handle:
            handles.append(handle)
            yield handle

    monkeypatch.setattr(trace, "sparse", kept)
    traced = trace_attention_errors(tiny_pipe, config, **tiny_call(num_inference_steps=3))
    # Each traced call is the runtime's record of it, density included (nothing checked that before): every call
    # that went through the sparse path, sparse or measuring, none of the original processor's.
    computed = [r for r in handles[0].stats().calls["transformer"] if r.sparse or r.measured]
    assert [(c.step, c.layer, c.branch, c.sparse, c.density) for c in traced] == [
        (r.step, r.layer, r.branch, r.sparse, r.density) for r in computed]
    measured = [c for c in traced if not c.sparse]
    assert {c.step for c in measured} == {0} and all(c.error < 1e-5 for c in measured)
    rows = per_step(traced)
    assert [(r["step"], r["sparse"]) for r in rows] == [(0, False), (1, True), (2, True)]
    assert all(r["error"] > 1e-3 and r["density"] < 1 for r in rows if r["sparse"])
    layers = per_layer(traced)  # sparse calls only: the measuring step is not a layer's error
    assert [(r["layer"], r["calls"], r["first_step"]) for r in layers] == [(0, 4, 1), (1, 4, 1)]
    for r in layers:
        own = [c for c in traced if c.sparse and c.layer == r["layer"]]
        assert r["error"] == pytest.approx(sum(c.error for c in own) / len(own))
        assert r["first_step_error"] == pytest.approx(sum(c.error for c in own if c.step == 1) / 2)
    assert diffsparse.api._handles(tiny_pipe) == []  # the trace removed what it installed
    # The plot's curves are the sparse calls' errors, per layer: the measuring step's (exact, dense through the
    # kernel) is no point of them. Nothing checked what was plotted.
    import matplotlib.axes

    plotted, draw = [], matplotlib.axes.Axes.plot

    def recording(self, x, y, **kwargs):
        plotted.append((kwargs.get("label"), list(x), list(y)))
        return draw(self, x, y, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    trace.plot(traced, tmp_path / "trace.png", repr(config))
    assert plotted == [
        (f"layer {layer}", [1, 2], [pytest.approx(r["error"]) for r in per_step(
            [c for c in traced if c.sparse and c.layer == layer])])
        for layer in (0, 1)]
    assert (tmp_path / "trace.png").stat().st_size > 0


def test_an_exception_during_the_traced_generation_takes_the_sparse_attention_off(tiny_pipe):
    # The trace applies diffsparse around the caller's pipeline: a generation that fails (here, its step callback)
    # must leave the pipeline as it was, not sparse and observed.
    def processors():
        return [type(block.attn1.processor) for block in tiny_pipe.transformer.blocks]

    before = processors()

    def fail(pipe, step, timestep, callback_kwargs):
        if step == 1:
            raise RuntimeError("the callback failed")
        return callback_kwargs

    config = diffsparse.SparseConfig(pattern="window3d", density=0.5, block_size=16, dense_steps=1)
    with pytest.raises(RuntimeError, match="the callback failed"):
        trace_attention_errors(tiny_pipe, config, **tiny_call(num_inference_steps=3, callback_on_step_end=fail))
    assert diffsparse.api._handles(tiny_pipe) == [] and processors() == before


def test_trace_command_writes_the_table_and_the_plot(tmp_path, capsys):
    args = ["trace", "--steps", "3", "--frames", "5", "--height", "32", "--width", "48", "--block-size", "16",
            "--pattern", "window3d", "--density", "0.3", "--dense-steps", "1", "--tile", "1,2,2", "--out", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["step"]) for r in rows} == {1, 2} and all(float(r["error"]) >= 0 for r in rows)
    assert (tmp_path / "trace.png").stat().st_size > 0
    assert {r["transformer"] for r in rows} == {"transformer"}
    printed = capsys.readouterr().out
    assert "| step | call | density | error |" in printed and "order=tiles(1,2,2)" in printed
    # Every row names the model and config of its run (before, two runs' files could be told apart only by their
    # numbers), after the call's own columns, which keep their places.
    assert list(rows[0]) == [*(f.name for f in dataclasses.fields(trace.TracedCall)), "model", "config"]
    ((model, config),) = {(r["model"], r["config"]) for r in rows}
    assert model == EMBEDDED_MODEL and "window3d" in config and "density=0.3" in config
    assert printed.startswith(f"{model}; {config}\n")  # the title the plot has too
    # One transformer: no transformer column.
    assert "\n| layer | sparse calls | density | error | error at its first sparse step |" in printed
    assert "| 1 | 4 |" in printed  # layer 1: 2 sparse steps x 2 CFG branches
    # A configuration with no sparse call has nothing to trace: said so, not an empty table and a blank plot.
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-2], "--dense-steps", "3", "--out", str(tmp_path / "none")])
    assert exit_info.value.code == 2 and "nothing to trace" in capsys.readouterr().err
    # Nor with a correction measuring at every sparse step: those calls run dense (before, an empty per-layer table
    # and a blank plot, exit 0).
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-2], "--correction", "residual", "--correction-refresh", "1", "--out", str(tmp_path / "measured")])
    assert exit_info.value.code == 2 and "correction_refresh of 1" in capsys.readouterr().err
    assert not (tmp_path / "measured" / "trace.csv").exists()


def test_the_dense_pattern_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    # It traces nothing (every call runs the original processors): said only after the whole generation before.
    from diffsparse import compare

    def no_loading(args):
        raise AssertionError("loaded the model before refusing the dense pattern")

    monkeypatch.setattr(compare, "load_pipeline_for", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        main(["trace", "--pattern", "dense", "--steps", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "nothing to trace: every self-attention call ran the original" in err, err
    assert not (tmp_path / "trace.csv").exists()


def test_a_causal_frame_group_mask_is_in_the_reference_not_in_the_error():
    # SkyReels-V2's diffusion forcing with 2 frames per causal group: the runtime computes the masked attention
    # exactly; before, the trace compared it with unmasked attention and reported the mask as error (0.36, 0.24).
    from test_skyreels_v2 import ALL_BLOCKS, inputs, tiny_transformer

    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=16, dense_steps=0)
    for frames_per_block in (1, 2):
        traced = trace_attention_errors(tiny_transformer(frames_per_block), config, **inputs(per_frame=True))
        assert len(traced) == 2 and all(c.sparse and c.error < 1e-5 for c in traced), traced


def test_the_experts_of_a_pipeline_are_traced_apart(capsys, tmp_path, monkeypatch):
    # Wan 2.2: two transformers with the same layer indices; before, per_layer merged their layers into one row and
    # trace.csv did not say which expert a call ran on.
    from test_wan_pipeline import _wan22_pipeline

    from diffsparse import compare

    pipe = _wan22_pipeline()
    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: pipe)
    args = ["trace", "--steps", "4", "--frames", "5", "--height", "32", "--width", "48", "--block-size", "16",
            "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["transformer"] for r in rows} == {"transformer", "transformer_2"}
    printed = capsys.readouterr().out
    assert "| transformer | layer | sparse calls | density | error | error at its first sparse step |" in printed
    assert "| transformer_2 | 1 |" in printed
    config = diffsparse.SparseConfig(pattern="window3d", density=0.5, block_size=16, dense_steps=0)
    traced = trace_attention_errors(pipe, config, **tiny_call(num_inference_steps=4, output_type="latent"))
    layers = per_layer(traced)
    assert [(r["transformer"], r["layer"]) for r in layers] == [
        ("transformer", 0), ("transformer", 1), ("transformer_2", 0), ("transformer_2", 1)]
    for r in layers:
        own = [c for c in traced if c.sparse and (c.transformer, c.layer) == (r["transformer"], r["layer"])]
        assert r["calls"] == len(own) and r["first_step"] == min(c.step for c in own)


def test_the_error_is_the_relative_l2_norm_against_dense_attention_on_the_same_inputs():
    # An output 10% off dense attention is an error of 0.1: not its square, not relative to the output's own norm.
    # Before, nothing pinned the metric.
    import torch.nn.functional as F

    from diffsparse.trace import _relative_error

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 3, 8, generator=generator) for _ in range(3))  # (B, S, H, D), as processors hold

    def attention(mask=None):
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask).transpose(1, 2)

    assert _relative_error(q, k, v, 1.1 * attention()) == pytest.approx(0.1, abs=1e-6)
    # Under a causal frame-group mask the reference is the masked attention: each group's queries see the keys up
    # to its end.
    groups = ((0, 16), (16, 40))
    ends = torch.tensor([b for a, b in groups for _ in range(a, b)])
    masked = attention(torch.arange(40)[None, :] < ends[:, None])
    assert _relative_error(q, k, v, 1.1 * masked, groups) == pytest.approx(0.1, abs=1e-6)
    assert _relative_error(q, k, v, masked, groups) == pytest.approx(0.0, abs=1e-6)
    # Scale-free: a norm clamped at 1.0 (not 1e-12) made it an absolute error for small outputs.
    assert _relative_error(q, k, 1e-4 * v, 1.1e-4 * attention()) == pytest.approx(0.1, abs=1e-6)
    # The reference in float32: taken in the inputs' bfloat16, the exact output read as off by bf16's rounding.
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    exact = F.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (qb, kb, vb))).transpose(1, 2)
    assert _relative_error(qb, kb, vb, exact) < 1e-6


def test_the_tables_density_is_the_mean_of_the_calls_densities():
    # Nothing pinned the tables' density column: taken of the errors, it passed.
    from diffsparse.trace import TracedCall

    calls = [TracedCall("transformer", 1, layer, "cond", True, density, error)
             for layer, density, error in ((0, 0.25, 0.5), (0, 0.75, 0.1), (1, 0.5, 0.2))]
    assert [(r["density"], r["error"]) for r in per_step(calls)] == [(0.5, pytest.approx(0.8 / 3))]
    assert [(r["density"], r["error"]) for r in per_layer(calls)] == [(0.5, pytest.approx(0.3)), (0.5, 0.2)]


def test_the_plot_title_holds_the_whole_config(tmp_path, monkeypatch):
    # The title is the config's repr, ~180 characters: on one line it ran past both edges of the figure.
    import matplotlib.pyplot as plt

    from diffsparse.trace import TracedCall, plot

    titles = []
    monkeypatch.setattr(plt, "close", lambda fig: titles.append(fig))
    config = diffsparse.SparseConfig(pattern="window3d", density=0.3, correction="residual", correction_refresh=2)
    plot([TracedCall("transformer", 1, 0, "cond", True, 0.3, 0.1)], tmp_path / "trace.png", repr(config))
    fig = titles[0]
    title = fig.axes[0].title
    extent = title.get_window_extent(fig.canvas.get_renderer())
    assert 0 <= extent.x0 and extent.x1 <= fig.bbox.width
    assert title.get_text().replace("\n", " ") == repr(config)


def test_the_traced_generation_draws_the_same_global_noise_for_its_seed(tiny_pipe, tmp_path, monkeypatch):
    # A pipeline that also draws from torch's global generator (JoyImage Edit, its reference image's latents; here a
    # hook on the transformer) traces the same run for the same seed, as compare's runs do, and the caller's
    # generator is left as it was. Before, running the trace outside `seeded_global_generator` went unnoticed.
    from diffsparse import compare

    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: tiny_pipe)
    draws = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(lambda module, args: draws.append(torch.rand(()).item()))

    def traced_draws(seed):
        draws.clear()
        assert main(["trace", "--steps", "2", "--frames", "5", "--height", "32", "--width", "32", "--block-size",
                     "16", "--pattern", "window3d", "--density", "0.5", "--dense-steps", "1", "--seed", str(seed),
                     "--out", str(tmp_path)]) == 0
        return list(draws)

    state = torch.get_rng_state()
    try:
        first, again, other = traced_draws(0), traced_draws(0), traced_draws(1)
    finally:
        hook.remove()
    assert first and first == again and first != other
    assert torch.equal(torch.get_rng_state(), state)


def test_a_density_replacing_the_patterns_keep_is_warned_of(tmp_path, monkeypatch):
    # compare and bench pipeline warned; trace ran keep=0.25 for 'searched(keep=0.5)' without a word.
    from diffsparse import compare

    class Loaded(Exception):
        pass

    def stop(args):
        raise Loaded

    monkeypatch.setattr(compare, "load_pipeline_for", stop)
    replaced = r"gives keep=0.5, and --density 0.25 sets keep too"
    with pytest.warns(diffsparse.DiffsparseWarning, match=replaced), pytest.raises(Loaded):
        main(["trace", "--pattern", "searched(keep=0.5)", "--density", "0.25", "--steps", "2", "--out", str(tmp_path)])


def test_the_command_prints_and_writes_each_calls_numbers_in_their_columns(tiny_pipe, tmp_path, monkeypatch, capsys):
    # The tables were checked for their headers and one cell: a measuring step printed as "sparse", or a layer's
    # mean error and its first sparse step's swapped, passed; trace.csv's rows were checked for their steps only.
    from diffsparse import compare
    from diffsparse.trace import TracedCall

    calls = [TracedCall("transformer", step, layer, "cond", sparse, density, error)
             for step, layer, sparse, density, error in ((0, 0, False, 1.0, 0.0), (0, 1, False, 1.0, 0.0),
                                                         (1, 0, True, 0.25, 0.1), (1, 1, True, 0.5, 0.3),
                                                         (2, 0, True, 0.25, 0.05), (2, 1, True, 0.75, 0.2))]
    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: tiny_pipe)
    monkeypatch.setattr(trace, "trace_attention_errors", lambda pipe, config, **kwargs: calls)
    assert main(["trace", "--steps", "3", "--frames", "5", "--height", "32", "--width", "32", "--block-size", "16",
                 "--pattern", "window3d", "--density", "0.5", "--dense-steps", "0", "--correction", "residual",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert ("| step | call | density | error |\n|---:|---|---:|---:|\n"
            "| 0 | measured (dense) | 1.000 | 0.0000 |\n| 1 | sparse | 0.375 | 0.2000 |\n"
            "| 2 | sparse | 0.500 | 0.1250 |\n") in printed
    # Per layer, its sparse calls only: the mean error over steps, then the error at its first sparse step (1).
    assert ("| layer | sparse calls | density | error | error at its first sparse step |\n|---:|---:|---:|---:|---|\n"
            "| 0 | 2 | 0.250 | 0.0750 | 0.1000 (step 1) |\n| 1 | 2 | 0.625 | 0.2500 | 0.3000 (step 1) |\n") in printed
    with open(tmp_path / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), int(r["layer"]), r["sparse"], float(r["density"]), float(r["error"])) for r in rows] == [
        (c.step, c.layer, str(c.sparse), c.density, c.error) for c in calls]
