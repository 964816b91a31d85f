"""`diffsparse bench attention` and `bench pipeline`: what their results say beside the timings."""

import csv
import json
import warnings

import pytest

from diffsparse.cli import main


def test_attention_bench_shows_the_target_density_and_warns_when_it_is_out_of_reach(tmp_path):
    # Radial keeps neighbouring frames whole: on 2 frames every target ran at density 1.0, in rows that named no
    # target and with no warning, a speedup near 1 the only sign.
    args = ["bench", "attention", "--seq", "2048", "--heads", "1", "--dim", "16", "--block-size", "128", "--repeats",
            "1", "--out", str(tmp_path)]
    # window3d reaches 0.172 for 0.25 here (sparser than asked), 0.375 for 0.4 (within the runtime's tolerance); a
    # random mask keeps its diagonal, 1/16 of the blocks.
    for mask, densities, off in (("radial", "0.05,0.2", ["0.05", "0.2"]), ("window3d", "0.25,0.4", ["0.25"]),
                                 ("random", "0.01,0.5", ["0.01"])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*args, "--mask", mask, "--density", densities]) == 0
        with open(tmp_path / "bench_attention.csv") as f:
            reached = {r["target_density"]: float(r["density"]) for r in csv.DictReader(f)}
        assert list(reached) == densities.split(",")
        said = [str(w.message) for w in caught if "out of reach" in str(w.message)]
        assert said == [f"diffsparse: bench attention: --density {target} is out of reach of --mask {mask} on 2048 "
                        f"tokens, block 128: the mask timed has density {reached[target]:.3f}, so this row runs "
                        f"{'denser' if reached[target] > float(target) else 'sparser'} than asked" for target in off]


def test_pipeline_bench_keeps_diffsparses_warnings_in_its_json(tmp_path):
    # Before, they reached stderr only (compare.json kept them).
    args = ["bench", "pipeline", "--steps", "1", "--dense-steps", "1", "--frames", "1", "--height", "16", "--width",
            "16", "--block-size", "16", "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    kept = json.loads((tmp_path / "bench_pipeline.json").read_text())["warnings"]
    assert len(kept) == 1 and "so nothing runs sparse" in kept[0]  # said by each of 2 sparse runs, kept once


def test_pipeline_bench_reports_the_median_of_its_pairs(tmp_path, monkeypatch):
    # Two pairs (as the other pipeline-bench tests time) cannot tell a median from a mean: the mean passed.
    from diffsparse import evaluate

    timed = evaluate.timed_generation
    # Dense and sparse runs alternate, an untimed pair first: attention speedups 2, 4 and 20 (mean 8.67); seconds
    # dense 2, 3 and 10 (mean 5), sparse 1, 1 and 2 (mean 1.33), end-to-end speedups 2, 3 and 5 (mean 3.33).
    readings = iter([(2.0, 1.0), (1.0, 1.0), (2.0, 1.0), (1.0, 0.5), (3.0, 1.0), (1.0, 0.25), (10.0, 1.0), (2.0, 0.05)])

    def fixed(pipe, *args, **kwargs):
        frames, _, _ = timed(pipe, *args, **kwargs)
        return (frames, *next(readings))

    monkeypatch.setattr(evaluate, "timed_generation", fixed)
    args = ["bench", "pipeline", "--steps", "1", "--dense-steps", "1", "--frames", "1", "--height", "16", "--width",
            "16", "--block-size", "16", "--repeats", "3", "--out", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nothing runs sparse" (1 dense step, the fastest run): not the point here
        assert main(args) == 0
    result = json.loads((tmp_path / "bench_pipeline.json").read_text())
    assert [p["attention_speedup"] for p in result["pairs"]] == [2.0, 4.0, 20.0]
    assert (result["speedup"], result["attention_speedup"]) == (3.0, 4.0)
    assert (result["dense_seconds"], result["sparse_seconds"]) == (3.0, 1.0)


def test_pipeline_bench_attention_work_counts_the_dense_steps(tiny_pipe, tmp_path, monkeypatch):
    # The other pipeline benches here keep every step dense, where the work and the sparse steps' density are both
    # 1.0: the sparse steps' density in its place passed.
    from diffsparse import compare

    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: tiny_pipe)
    # 2 latent frames of 4 x 4 tokens: a block per frame, each keeping its own frame's.
    args = ["bench", "pipeline", "--steps", "2", "--dense-steps", "1", "--frames", "5", "--height", "64", "--width",
            "64", "--block-size", "16", "--pattern", "window3d(window=(1,1,1))", "--density", "none", "--repeats", "1",
            "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "bench_pipeline.json").read_text())
    # Step 0 dense, step 1 sparse: the work is the mean of 1.0 and the sparse step's density.
    assert (result["sparse_step_density"], result["attention_work"]) == (0.5, 0.75)
    assert result["efficiency"] == result["attention_speedup"] * 0.75


def test_pipeline_bench_reports_the_size_of_the_video_the_pipeline_made(tiny_pipe, tmp_path, monkeypatch):
    # A Wan pipeline makes 4k + 1 frames: 5 for 6 asked. The JSON said "6 frames", a video no run made.
    from diffsparse import compare

    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: tiny_pipe)
    args = ["bench", "pipeline", "--steps", "1", "--dense-steps", "1", "--frames", "6", "--height", "16", "--width",
            "16", "--block-size", "16", "--repeats", "1", "--out", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nothing runs sparse" (1 dense step, the fastest run): not the point here
        assert main(args) == 0
    assert json.loads((tmp_path / "bench_pipeline.json").read_text())["video"] == "5 frames 16x16, 1 steps"


def test_pipeline_bench_says_a_pattern_parameter_its_density_replaces(tiny_pipe, tmp_path, monkeypatch):
    # `--pattern 'searched(keep=0.5)' --density 0.25` timed keep=0.25 under a config naming keep=0.5, unsaid.
    from diffsparse import compare

    monkeypatch.setattr(compare, "load_pipeline_for", lambda args: tiny_pipe)
    args = ["bench", "pipeline", "--steps", "1", "--dense-steps", "1", "--frames", "5", "--height", "16", "--width",
            "16", "--block-size", "16", "--repeats", "1", "--pattern", "searched(keep=0.5)", "--density", "0.25",
            "--out", str(tmp_path)]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")  # and "nothing runs sparse" (1 dense step, the fastest run) recorded
        assert main(args) == 0
    kept = json.loads((tmp_path / "bench_pipeline.json").read_text())["warnings"]
    assert ("diffsparse: --pattern 'searched(keep=0.5)' gives keep=0.5, and --density 0.25 sets keep too: the density "
            "wins (keep=0.25 runs), so keep=0.5 is replaced; give --density none to run the pattern as written, or "
            "leave keep out of --pattern") in kept


def test_permute_bench_refuses_the_dense_pattern(monkeypatch, capsys):
    # The dense pattern's calls run the model's own attention, neither permuted nor through the kernel: the share it
    # printed (the permutation over the kernel on a full mask) was of a call no run makes.
    import torch

    def no_work(*args, **kwargs):
        raise AssertionError("did the work before refusing the setting")

    monkeypatch.setattr(torch, "randn", no_work)
    for pattern in ("dense", "dense()"):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "permute", "--frames", "2", "--height", "8", "--width", "8", "--block-size", "16",
                  "--tile", "1,4,4", "--dtype", "fp32", "--pattern", pattern])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert (f"diffsparse bench permute: error: --pattern {pattern!r}: must be a sparse pattern, e.g. radial or "
                "window3d (the dense pattern's calls run the model's own attention, neither permuted nor through the "
                "block-sparse kernel") in err


def test_permute_bench_plans_the_mask_in_the_tile_order_it_permutes_by(monkeypatch, capsys):
    # The mask was the frame-major one (0.1094 here) while the tensors were permuted by the tile order.
    from diffsparse.patterns import TileOrder, VideoLayout, get_pattern

    _fixed_clock(monkeypatch, {})
    assert main(["bench", "permute", "--pattern", "window3d(window=(1,2,2))", "--frames", "4", "--height", "8",
                 "--width", "8", "--block-size", "16", "--heads", "1", "--dim", "8", "--dtype", "fp32", "--repeats",
                 "1", "--tile", "1,4,4"]) == 0
    row = dict(item.split("=", 1) for item in capsys.readouterr().out.strip().splitlines()[-1].split(" | "))
    pattern, layout = get_pattern("window3d(window=(1,2,2))"), VideoLayout(4, 8, 8)
    tiled = pattern.density(layout, 16, TileOrder((1, 4, 4)))
    assert row["density"] == f"{tiled:.4g}" == "0.1406" and tiled != pattern.density(layout, 16)


def _fixed_clock(monkeypatch, readings: dict, timed: list | None = None):
    """`bench._time_ms` reading `readings[name]` for a callable named `name` (each bench names its callables:
    dense, sparse, search, ...), so swapped or misassigned medians show; the callable still runs, its name in
    `timed[0]` meanwhile."""
    from diffsparse import bench

    timed = [None] if timed is None else timed

    def fixed(fn, device):
        timed[0] = fn.__name__
        try:
            fn()
        finally:
            timed[0] = None
        return readings.get(fn.__name__, 1.0)

    monkeypatch.setattr(bench, "_time_ms", fixed)
    return timed


def test_attention_bench_times_the_plans_kernel_in_interleaved_pairs_after_a_warm_up(monkeypatch):
    # Nothing checked that the sparse callable ran the kernel on the timed plan (SDPA there timed dense against
    # dense), nor the untimed warm-up and the interleaving the module promises; nor that plan_ms timed building the
    # plan (`lambda: None` passed) and peak_mb was the sparse call's (the dense call's passed).
    import torch
    import torch.nn.functional as F

    from diffsparse import bench

    calls, plans, inside = [], [], [False]
    sdpa, kernel, make_plan = F.scaled_dot_product_attention, bench.block_sparse_attention, bench.make_plan

    def dense(*args, **kwargs):
        if not inside[0]:  # the CPU path's own SDPA over gathered blocks is the kernel's, not the dense call
            calls.append("dense")
        return sdpa(*args, **kwargs)

    def sparse(q, k, v, plan, **kwargs):
        calls.append("sparse")
        plans.append(plan)
        inside[0] = True
        try:
            return kernel(q, k, v, plan, **kwargs)
        finally:
            inside[0] = False

    def planning(*args, **kwargs):
        calls.append("plan")
        return make_plan(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", dense)
    monkeypatch.setattr(bench, "block_sparse_attention", sparse)
    monkeypatch.setattr(bench, "make_plan", planning)
    monkeypatch.setattr(bench, "_sparse_peak_mb", lambda fn, device: (calls.append(f"peak of {fn.__name__}"), 1.0)[1])
    real_time = bench._time_ms

    def timing(fn, device):
        calls.append(f"timed {fn.__name__}")
        real_time(fn, device)
        return {"dense": 2.0, "sparse": 0.5}.get(fn.__name__, 1.0)

    monkeypatch.setattr(bench, "_time_ms", timing)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=generator) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random mask on 4 blocks may miss its target: not this test's concern
        # 0.3, no multiple of 1/16: at 0.5 the mask's density hit the target, and an efficiency of the target passed.
        row = bench.bench_one(q, k, v, 0.3, 16, "cpu", 2, generator)
    # make_plan timed 3 times, then the plan the row times; one untimed dense and sparse call; then each pair, dense
    # first; then the sparse call's peak.
    pair = ["timed dense", "dense", "timed sparse", "sparse"]
    assert calls == ["timed <lambda>", "plan"] * 3 + ["plan", "dense", "sparse"] + pair * 2 + ["peak of sparse"]
    assert all(plan is plans[0] for plan in plans) and plans[0].density == row["density"]
    assert (row["dense_ms"], row["sparse_ms"], row["speedup"], row["peak_mb"]) == (2.0, 0.5, 4.0, 1.0)
    assert row["target_density"] == 0.3 != row["density"] and row["efficiency"] == 4.0 * row["density"]


def test_plan_mb_counts_the_bytes_of_the_plan_and_of_its_backend_cache():
    # It counted the plan's top-level tensors only: the torch-ops path's per-shape row and index lists in
    # `plan._cache` (which grow with batch x heads) were left out, the column about 2x low here, 4x at 8 heads.
    import torch

    from diffsparse import bench
    from diffsparse.kernels import block_sparse_attention, make_plan

    plan = make_plan(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, 64, 16)
    # block_mask 16 bools, kv_indices 16 int32, kv_counts 4 int32: bytes, not elements.
    assert plan.kv_indices.element_size() == plan.kv_counts.element_size() == 4
    assert bench._plan_mb(plan) * 2**20 == 16 + 16 * 4 + 4 * 4
    q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float16) for _ in range(3))  # fp16: the torch-ops path
    block_sparse_attention(q, k, v, plan, backend="cpu")
    cached = [x for chunks in plan._cache.values() for chunk in chunks for x in chunk if isinstance(x, torch.Tensor)]
    assert cached  # the cached lists are slices of their own tensors, each counted once
    assert bench._plan_mb(plan) * 2**20 == 96 + sum(x.numel() * x.element_size() for x in cached)


def test_random_block_masks_keep_their_diagonal():
    # Nothing checked the diagonal the README promises: without it a low --density could draw an empty mask, and
    # the row divided by its density 0.
    import torch

    from diffsparse.bench import random_block_mask

    mask = random_block_mask(8, 1e-9, torch.Generator().manual_seed(0))
    assert mask.shape == (1, 1, 8, 8) and torch.equal(mask[0, 0], torch.eye(8, dtype=torch.bool))


def test_peak_memory_is_the_sparse_calls_own_reset_right_before_it(monkeypatch):
    # CUDA's allocator faked: without the reset, the peak was the dense call's whenever that was higher; nothing
    # checked the order.
    import torch

    from diffsparse import bench

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: (events.append("read"), 3 * 2**20)[1])
    assert bench._sparse_peak_mb(lambda: events.append("sparse"), torch.device("cuda")) == 3.0
    assert events == ["reset", "sparse", "read"]


def _sdpa_calls(monkeypatch, timed: list, shape: tuple) -> list:
    """SDPA calls on `shape` (the bench's own dense calls, not the sparse path's over gathered blocks), each as
    `(what _fixed_clock was timing, None when untimed; its attn_mask)`."""
    import torch.nn.functional as F

    calls, sdpa = [], F.scaled_dot_product_attention

    def recording(q, *args, attn_mask=None, **kwargs):
        if tuple(q.shape) == shape:
            calls.append((timed[0], attn_mask))
        return sdpa(q, *args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def test_search_bench_runs_the_dense_call_once_untimed_first(tmp_path, monkeypatch):
    # Without its untimed run, the first timed dense call paid the one-time costs: nothing checked it.
    timed = _fixed_clock(monkeypatch, {"search": 3.0, "dense": 1.0})
    calls = _sdpa_calls(monkeypatch, timed, (1, 2, 96, 8))
    assert main(["bench", "search", "--frames", "3", "--height", "4", "--width", "8", "--block-size", "16", "--heads",
                 "2", "--dim", "8", "--density", "0.5", "--repeats", "2", "--out", str(tmp_path)]) == 0
    assert [name for name, _ in calls] == [None, "dense", "dense"]


def test_search_bench_records_its_target_and_warns_when_it_is_out_of_reach(tmp_path, monkeypatch, capsys):
    # On 3 frames spatial_temporal keeps a frame or a neighbourhood whole: asked 0.01, it found 0.333, and the JSON
    # said 0.333 with no target and no warning.
    _fixed_clock(monkeypatch, {"search": 3.0, "dense": 1.0})
    args = ["bench", "search", "--frames", "3", "--height", "4", "--width", "8", "--block-size", "16", "--heads", "2",
            "--dim", "8", "--repeats", "2", "--pattern", "spatial_temporal", "--out", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--density", "0.01"]) == 0
    result = json.loads((tmp_path / "bench_search.json").read_text())
    assert result["target_density"] == 0.01 and result["density"] > 0.25  # the density the search found
    said = [str(w.message) for w in caught if "out of reach" in str(w.message)]
    assert said == [(f"diffsparse: bench search: --density 0.01 is out of reach of --pattern spatial_temporal on 96 "
                     f"tokens (3x4x8), block 16: the pattern the search found has density {result['density']:.3f}, "
                     "so the search timed ends up denser than asked")]
    assert (result["search_ms"], result["dense_ms"], result["dense_calls_per_search"]) == (3.0, 1.0, 3.0)
    capsys.readouterr()
    for density in ("2", "0"):  # before: taken as given, refused by the pattern under its own field's name
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--density", density])
        err = capsys.readouterr().err
        message = f"argument --density: expected a block density in (0, 1] or none, got '{density}'"
        assert exit_info.value.code == 2 and message in err, err


def test_causal_bench_settings_are_refused_before_the_work(capsys, monkeypatch):
    # --pattern dense timed the kernel on the mask's blocks (0.75 here) under a row saying density 1.0; a density or
    # backend past the first row's was refused only after that row had been timed, with nothing written.
    import torch

    def no_work(*args, **kwargs):
        raise AssertionError("did the work before refusing the setting")

    monkeypatch.setattr(torch, "randn", no_work)
    args = ["bench", "causal", "--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8",
            "--repeats", "1", "--causal-frames", "2", "--block-size", "16"]
    for extra, message in (
        (["--pattern", "dense", "--density", "1"], "--pattern 'dense': must be a sparse pattern"),
        (["--density", "0.25,1.5"],
         "argument --density: expected comma-separated block densities in (0, 1] or none, got"),
        (["--backend", "nosuch"], "--backend 'nosuch' make no sparse configuration: SparseConfig.backend must be"),
        # The config checks the name only: triton on CPU was refused by the first row's warm-up.
        (["--backend", "triton", "--device", "cpu"], "--backend 'triton': backend='triton' was requested but cannot"),
        (["--pattern", "nosuch"], "--pattern 'nosuch': pattern must be one of"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, (extra, err)


def test_causal_bench_times_sdpa_under_the_mask_and_without_it_for_scale(tmp_path, monkeypatch):
    # Nothing checked which SDPA each time was of (the dense baseline without its mask, or the unmasked time taken
    # of the masked call, passed), nor that each ran once untimed first.
    import torch

    from diffsparse.patterns import FrameCausal, VideoLayout

    timed = _fixed_clock(monkeypatch, {"unmasked": 5.0, "dense": 2.0, "sparse": 0.5})
    masks = _sdpa_calls(monkeypatch, timed, (1, 2, 96, 8))
    args = ["bench", "causal", "--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8",
            "--repeats", "2", "--causal-frames", "2", "--block-size", "16", "--pattern", "window3d", "--density",
            "0.3,0.6", "--out", str(tmp_path)]
    assert main(args) == 0
    expected = FrameCausal(2).token_mask(VideoLayout(4, 4, 6))[None]
    # The unmasked call untimed (None); per density, the masked one likewise, then each run masked first, unmasked.
    assert [name for name, _ in masks] == [None] + [None, "dense", "unmasked", "dense", "unmasked"] * 2
    assert [mask is not None for _, mask in masks] == [False] + [True, True, False, True, False] * 2
    assert all(mask is None or torch.equal(mask, expected) for _, mask in masks)
    result = json.loads((tmp_path / "bench_causal.json").read_text())
    assert result["unmasked_sdpa_ms"] == 5.0
    for r in result["rows"]:
        assert (r["dense_ms"], r["unmasked_ms"], r["sparse_ms"], r["speedup"]) == (2.0, 5.0, 0.5, 4.0)
        # The masked call the faster here: the efficiency over it.
        assert r["efficiency_baseline"] == "masked" and r["efficiency"] == 4.0 * r["density"] and r["density"] < 1


def test_causal_bench_efficiency_is_against_the_faster_sdpa(tmp_path, monkeypatch, capsys):
    # The masked SDPA (on CPU about 1.3-1.5x the unmasked one) was the efficiency's only baseline: here it read
    # 4 x density, past 1, the 1/density bound the module says 1.0 means; against the unmasked call 2 x density.
    _fixed_clock(monkeypatch, {"dense": 4.0, "unmasked": 2.0, "sparse": 1.0})
    args = ["bench", "causal", "--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8",
            "--repeats", "1", "--causal-frames", "2", "--block-size", "16", "--pattern", "window3d", "--density",
            "0.3", "--out", str(tmp_path)]
    assert main(args) == 0
    (row,) = json.loads((tmp_path / "bench_causal.json").read_text())["rows"]
    assert (row["dense_ms"], row["sparse_ms"], row["speedup"]) == (4.0, 1.0, 4.0)  # the speedup: over the masked
    assert 0.25 < row["density"] <= 0.5  # against the masked call above 1, against the unmasked one not
    assert row["efficiency_baseline"] == "unmasked" and row["efficiency"] == 2.0 * row["density"]
    out = capsys.readouterr().out
    assert "efficiency (speedup x density, 1.0 the 1/density bound) over the faster SDPA" in out
    assert f"| 4.0 | 2.0 | 1.0 | 4.00 | {row['efficiency']:.2f} |" in out


def test_bench_densities_are_each_given_once(capsys, monkeypatch):
    # A density given twice timed the same row again; eval's lists already refused their repeats.
    import torch

    monkeypatch.setattr(torch, "randn", lambda *a, **kw: pytest.fail("made tensors before refusing the density"))
    for command, densities in (("attention", "0.3,0.5,0.3"), ("causal", "0.3,0.3"), ("causal", "none,0.3,none")):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", command, "--density", densities])
        repeated = "none" if densities.startswith("none") else "0.3"
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert f"argument --density: {repeated} is given twice in '{densities}': give each value once" in err


def test_causal_bench_refuses_a_call_the_runtime_logged_dense(tmp_path, monkeypatch):
    # Its density would be 1.0 whatever the kernel ran: nothing reached the guard (the bench's config runs every call
    # sparse), so only a patched runtime can.
    from diffsparse.runtime import SparseRuntime

    monkeypatch.setattr(SparseRuntime, "_mode", lambda self, *args, **kwargs: "dense")
    args = ["bench", "causal", "--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8",
            "--repeats", "1", "--causal-frames", "2", "--block-size", "16", "--pattern", "window3d", "--density",
            "0.3", "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="logged the call under .* as dense: nothing sparse to time"):
        main(args)
    assert not (tmp_path / "bench_causal.json").exists()


def test_benches_refuse_repeats_below_one_when_called_directly(monkeypatch):
    # The CLI's parser refuses 0 itself; called directly, nothing checked the causal bench's own refusal, and the
    # attention and permutation benches ended in statistics' "no median for empty data" after the tensors were made.
    import argparse

    import torch

    from diffsparse.bench import run_attention_bench, run_causal_bench, run_permute_bench

    monkeypatch.setattr(torch, "randn", lambda *a, **kw: pytest.fail("tensors made before the repeats were checked"))
    common = {"repeats": 0, "backend": "auto", "device": "cpu", "dtype": "fp32", "seed": 0, "heads": 2, "dim": 8}
    grid = {"frames": 4, "height": 4, "width": 6, "block_size": 16}
    calls = [
        (run_causal_bench, {**grid, "causal_frames": 2, "pattern": "window3d", "density": [0.3], "out": "unused"},
         "timed dense/sparse pairs"),
        (run_attention_bench, {"seq": 64, "batch": 1, "density": [0.5], "block_size": 16, "mask": "random"},
         "timed dense/sparse pairs"),
        (run_permute_bench, {**grid, "order": None, "pattern": "window3d"}, "timed permutation and attention calls"),
    ]
    for run, fields, what in calls:
        with pytest.raises(ValueError, match=rf"repeats must be an int >= 1 \({what}\), got repeats=0"):
            run(argparse.Namespace(**common, **fields))


def test_permute_bench_share_is_the_permutations_time_over_the_attentions(monkeypatch, capsys):
    # Checked only as > 0: its inverse passed.
    _fixed_clock(monkeypatch, {"permute_in_and_out": 1.0, "attend": 4.0})
    assert main(["bench", "permute", "--frames", "2", "--height", "4", "--width", "8", "--block-size", "16", "--heads",
                 "2", "--dim", "8", "--dtype", "fp32", "--repeats", "1", "--tile", "1,2,4"]) == 0
    row = dict(item.split("=", 1) for item in capsys.readouterr().out.strip().splitlines()[-1].split(" | "))
    assert (row["permute_ms"], row["attention_ms"], row["share"]) == ("1", "4", "0.25")


def test_causal_groups_that_blocks_straddle_say_when_they_do_more_work_than_dense(tmp_path, monkeypatch):
    # Two groups of 32 tokens at block 64: each group computes its one partial block whole, twice dense's one block.
    # The block density says so (2.0, the kernel's blocks) and a warning names the cause; before, nothing did.
    import argparse

    from diffsparse import DiffsparseWarning
    from diffsparse.bench import run_causal_bench

    _fixed_clock(monkeypatch, {"dense": 4.0, "unmasked": 2.0, "sparse": 1.0})
    args = argparse.Namespace(frames=4, height=4, width=4, causal_frames=2, block_size=64, pattern="window3d",
                              density=[1.0], repeats=1, backend="auto", device="cpu", dtype="fp32", seed=0, heads=1,
                              dim=8, out=str(tmp_path))
    with pytest.warns(DiffsparseWarning, match=r"\(\[32\] tokens\) .* whole: 2x the blocks of dense attention"):
        [row] = run_causal_bench(args)
    # The density and the efficiency are of the score matrix the call keeps, as `bench attention`'s: every pair the
    # mask allows, 3/4 of them. Read off the block density (2.0), the efficiency was 2.7x this (4.0 for 1.5).
    assert (row["path"], row["block_density"], row["density"]) == ("per group", 2.0, 0.75)
    assert row["efficiency"] == 2.0 * 0.75
    # Groups of 96 tokens, longer than a block of 64 but not a multiple of it: 1.11x, and the advice is a block
    # dividing them (before, it said a block below the groups' length, which 64 already was).
    args.height, args.width = 6, 8
    with pytest.warns(DiffsparseWarning, match=r"\(\[96\] tokens\) .* 1.11x .* A block size dividing the groups'"):
        [row] = run_causal_bench(args)
    assert row["path"] == "per group" and row["block_density"] == pytest.approx(10 / 9) and row["density"] == 0.75
    # Groups of one frame of 5 x 5 tokens at block 64 on a sparse mask: 0.69 of the blocks, 0.2825 of the pairs kept
    # (each group's block mask laid over its tokens: 11,300 of 200 x 200).
    args.frames, args.height, args.width, args.causal_frames, args.density = 8, 5, 5, 1, [0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.5 out of reach (0.69 of the blocks): not the point here
        [row] = run_causal_bench(args)
    assert row["block_density"] == pytest.approx(0.6875) and row["density"] == pytest.approx(0.2825)
    assert row["efficiency"] == 2.0 * row["density"]


def test_the_causal_per_group_work_warning_is_said_once_per_layout():
    # Diffusion forcing changes the dense frames every step, each a new plan of the same layout: said once.
    import warnings

    import torch
    from diffusers.hooks.hooks import CacheContext

    from diffsparse import DiffsparseWarning, SparseConfig
    from diffsparse.patterns import VideoLayout
    from diffsparse.runtime import SparseRuntime

    runtime = SparseRuntime(SparseConfig(pattern="window3d", block_size=64, dense_steps=0), "bench")
    runtime.state_manager.set_context(CacheContext("bench"))
    layout = VideoLayout(4, 4, 4)
    runtime.begin_call(layout, step=0, num_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for dense_frames in [(), (0,), (0, 1), (0, 1, 2)]:
            runtime.plan(layout, 1, torch.device("cpu"), frame_causal=2, dense_frames=dense_frames)
    said = [w for w in record if issubclass(w.category, DiffsparseWarning) and "causal groups" in str(w.message)]
    assert len(said) == 1


def _timing_log(monkeypatch, readings: dict | None = None) -> tuple[list, list]:
    """`_fixed_clock`'s `timed`, and the names of the callables timed, in the order they were timed."""
    from diffsparse import bench

    timed = _fixed_clock(monkeypatch, readings or {})
    fixed, log = bench._time_ms, []

    def logging(fn, device):
        log.append(fn.__name__)
        return fixed(fn, device)

    monkeypatch.setattr(bench, "_time_ms", logging)
    return timed, log


def test_search_and_causal_benches_time_interleaved_pairs_and_record_the_cpu_threads(tmp_path, monkeypatch):
    # Each timed all of one callable and then all of the other (machine noise then hits one side only) and wrote the
    # device without its thread count, which nothing checked.
    import torch

    _, log = _timing_log(monkeypatch, {"search": 3.0, "dense": 1.0})
    grid = ["--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8", "--block-size", "16",
            "--repeats", "2", "--out", str(tmp_path)]
    assert main(["bench", "search", *grid, "--density", "0.5"]) == 0
    assert log == ["search", "dense"] * 2
    threads = f"cpu ({torch.get_num_threads()} threads)"
    assert json.loads((tmp_path / "bench_search.json").read_text())["device"] == threads
    log.clear()
    causal = ["bench", "causal", *grid, "--causal-frames", "2", "--pattern", "window3d", "--density", "0.3,0.6"]
    assert main(causal) == 0
    assert log == ["dense", "unmasked", "sparse"] * 4  # per density, two runs of each
    assert json.loads((tmp_path / "bench_causal.json").read_text())["device"] == threads


def test_permute_bench_times_interleaved_pairs_after_one_untimed_run_of_each(monkeypatch, capsys):
    # It timed every permutation and then every attention call; nothing checked the untimed runs before them either.
    import torch

    from diffsparse import bench

    timed, log = _timing_log(monkeypatch, {"permute_in_and_out": 1.0, "attend": 4.0})
    runs, kernel, select = [], bench.block_sparse_attention, torch.Tensor.index_select

    def attention(*args, **kwargs):
        runs.append((timed[0], "attention"))
        return kernel(*args, **kwargs)

    def selecting(tensor, dim, index):
        if tuple(tensor.shape) == (1, 64, 2, 8):  # the bench's q, k, v and the permuted q: (B, S, H, D)
            runs.append((timed[0], "permutation"))
        return select(tensor, dim, index)

    monkeypatch.setattr(bench, "block_sparse_attention", attention)
    monkeypatch.setattr(torch.Tensor, "index_select", selecting)
    assert main(["bench", "permute", "--frames", "2", "--height", "4", "--width", "8", "--block-size", "16", "--heads",
                 "2", "--dim", "8", "--dtype", "fp32", "--repeats", "2", "--tile", "1,2,4"]) == 0
    assert log == ["permute_in_and_out", "attend"] * 2
    each_run = [run for i, run in enumerate(runs) if i == 0 or run != runs[i - 1]]  # a permutation selects 4 times
    assert each_run == [(None, "permutation"), (None, "attention")] + [
        ("permute_in_and_out", "permutation"), ("attend", "attention")] * 2
    assert runs.count((None, "permutation")) == 4  # q, k and v in, the output back
    row = dict(item.split("=", 1) for item in capsys.readouterr().out.strip().splitlines()[-1].split(" | "))
    assert (row["permute_ms"], row["attention_ms"], row["share"]) == ("1", "4", "0.25")


def test_permute_and_density_benches_name_the_pattern_option_and_refuse_data_dependent_ones(capsys, monkeypatch):
    # `--pattern foo` said "pattern must be one of [...]" naming no option; searched's error named none either, and
    # spatial_temporal ran unfitted, the union of its kinds' masks (density 1.0 here), a mask no call runs: refused,
    # as `bench attention --mask` refuses it.
    import torch

    from diffsparse.patterns import plots

    def no_work(*args, **kwargs):
        raise AssertionError("did the work before refusing the setting")

    monkeypatch.setattr(torch, "randn", no_work)
    monkeypatch.setattr(plots, "density_vs_frames", no_work)
    grid = ["--frames", "2", "--height", "8", "--width", "16", "--block-size", "32"]
    permute = ["bench", "permute", *grid, "--tile", "1,4,8", "--heads", "2", "--dim", "32", "--dtype", "fp32"]
    static = ("must be a static pattern (e.g. radial, window3d), whose mask needs no search of a model's attention, "
              "or spatial_temporal with each head's kind given (e.g. \"spatial_temporal(heads='ST')\"); a "
              "data-dependent one's masks come from searching a model's attention during a run (`bench search` and "
              "`bench pipeline` time them)")
    for command in (permute, ["bench", "density", *grid]):
        for pattern, listed, message in (
            ("searched", "searched", static), ("spatial_temporal", "spatial_temporal", static),
            ("searched_windows(keep=0.3)", "searched_windows(keep=0.3)", static),
            ("foo", "foo", "pattern must be one of ['dense', 'radial',"),
            # bench density's list: the item named
            ("radial,searched", "searched", static),
        ):
            if command is permute and "," in pattern:
                continue
            with pytest.raises(SystemExit) as exit_info:
                main([*command, "--pattern", pattern])
            err = capsys.readouterr().err
            said = f"diffsparse bench {command[1]}: error: --pattern {listed!r}: {message}"
            assert exit_info.value.code == 2 and said in err and "Traceback" not in err, (command, pattern, err)
    # The searches' benches say the same for a name that is none.
    for command in (["bench", "search"], ["bench", "causal"]):
        with pytest.raises(SystemExit):
            main([*command, "--pattern", "foo"])
        said = f"diffsparse {' '.join(command)}: error: --pattern 'foo': pattern must be one of"
        assert said in capsys.readouterr().err


def test_permute_and_density_benches_take_spatial_temporal_with_its_heads_kinds_given(tmp_path, capsys):
    # Each head's mask is then the one a head of that kind runs: a mask to time and measure, as `masks` draws it.
    grid = ["--frames", "4", "--height", "8", "--width", "8", "--block-size", "16"]
    pattern = ["--pattern", "spatial_temporal(heads='ST')"]
    assert main(["bench", "density", *grid, *pattern, "--out", str(tmp_path)]) == 0
    assert "| spatial_temporal(frames=1, width=1, heads='ST') | 4 | 256 | 0.6250 |" in capsys.readouterr().out
    assert main(["bench", "permute", *grid, *pattern, "--tile", "1,4,4", "--heads", "2", "--dim", "16", "--dtype",
                 "fp32", "--repeats", "1"]) == 0
    assert "pattern=spatial_temporal(frames=1, width=1, heads='ST')" in capsys.readouterr().out


def test_search_and_causal_benches_take_density_none_for_the_pattern_as_written(tmp_path, monkeypatch, capsys):
    # --density always set the main parameter: a keep typed into --pattern was replaced by 0.25 with no way to keep
    # it, where compare and bench pipeline take `--density none`. A density given still sets it, as compare's does.
    from diffsparse import DiffsparseWarning, SparseConfig

    _fixed_clock(monkeypatch, {"search": 3.0, "dense": 1.0})
    args = ["bench", "search", "--frames", "2", "--height", "8", "--width", "8", "--block-size", "16", "--heads", "2",
            "--dim", "8", "--repeats", "1", "--pattern", "searched(keep=0.3)", "--out", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--density", "none"]) == 0
    result = json.loads((tmp_path / "bench_search.json").read_text())
    assert result["pattern"].startswith("searched(keep=0.3,") and result["target_density"] is None
    assert not [w for w in caught if "out of reach" in str(w.message)]
    with pytest.warns(DiffsparseWarning, match="gives keep=0.3, and --density 0.5 sets keep too"):
        assert main([*args, "--density", "0.5"]) == 0
    assert json.loads((tmp_path / "bench_search.json").read_text())["pattern"].startswith("searched(keep=0.5,")
    assert SparseConfig(pattern="searched(keep=0.3)", density=0.5).resolved_pattern.keep == 0.5  # as compare runs it
    capsys.readouterr()
    # Causal: a row per density, none among them; window3d as written keeps more than solved for 0.3.
    assert main(["bench", "causal", "--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8",
                 "--block-size", "16", "--repeats", "1", "--causal-frames", "2", "--pattern",
                 "window3d(window=(3,8,8))", "--density", "none,0.3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_causal.json").read_text())["rows"]
    assert [r["target_density"] for r in rows] == [None, 0.3] and rows[0]["density"] > rows[1]["density"]
    assert "\n| none | " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "causal", "--density", "0.3,nan"])
    assert "argument --density: expected comma-separated block densities in (0, 1] or none, got '0.3,nan'" in (
        capsys.readouterr().err)


def test_search_and_causal_benches_warn_when_the_density_replaces_a_given_parameter(tmp_path, monkeypatch):
    # compare, eval, the demo and bench pipeline say it; these two timed keep=0.5 for 'searched(keep=0.3)' silently.
    _fixed_clock(monkeypatch, {"search": 3.0, "dense": 1.0})
    runs = {
        "keep": ["bench", "search", "--frames", "2", "--height", "8", "--width", "8", "--block-size", "16", "--heads",
                 "2", "--dim", "8", "--repeats", "1", "--pattern", "searched(keep=0.3)", "--density", "0.5"],
        "decay": ["bench", "causal", "--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8",
                  "--block-size", "16", "--repeats", "1", "--causal-frames", "2", "--pattern", "radial(decay=0.5)",
                  "--density", "0.3,none,0.6"],
    }
    for name, args in runs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*args, "--out", str(tmp_path)]) == 0
        value = args[args.index("--pattern") + 1].split("=")[1].rstrip(")")
        said = [str(w.message) for w in caught if f"gives {name}={value}" in str(w.message)]
        # One for each density given, none for `none` (the pattern as written).
        assert [text[text.index("--density"):].split(" sets")[0] for text in said] == [
            f"--density {density}" for density in args[-1].split(",") if density != "none"], said
    # A run refused (a backend that cannot run here) says only why, not what it would have replaced.
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main([*runs["decay"], "--backend", "triton", "--out", str(tmp_path)])
    assert not [w for w in caught if "gives decay" in str(w.message)]


def test_time_ms_waits_for_cuda_before_and_after_the_timed_call(monkeypatch):
    # CUDA's calls return before the work is done: without the syncs the clock timed a launch, or the queue before
    # it. Nothing checked either sync, nor that both sit inside the clock's readings.
    import torch

    from diffsparse import bench

    events, ticks = [], iter([10.0, 10.25])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: (events.append("clock"), next(ticks))[1])
    cuda = torch.device("cuda")
    assert bench._time_ms(lambda: events.append("call"), cuda) == 250.0
    assert events == [("sync", cuda), "clock", "call", ("sync", cuda), "clock"]
    # No CUDA, no sync (torch.cuda.synchronize raises without a CUDA build).
    events.clear()
    ticks = iter([1.0, 1.5])
    assert bench._time_ms(lambda: events.append("call"), torch.device("cpu")) == 500.0
    assert events == ["clock", "call", "clock"]


def _uneven_clock(monkeypatch, readings: dict) -> None:
    """`bench._time_ms` reading, for a callable named `name`, the next of `readings[name]` (1.0 for others): uneven
    times whose median, mean, minimum and last reading all differ, so a bench that reports any but the median shows.
    The callable still runs."""
    from diffsparse import bench

    readings = {name: iter(times) for name, times in readings.items()}

    def reading(fn, device):
        fn()
        return next(readings[fn.__name__]) if fn.__name__ in readings else 1.0

    monkeypatch.setattr(bench, "_time_ms", reading)


def test_benches_report_the_median_of_uneven_timings(tmp_path, monkeypatch):
    # Nothing told the median from the mean, the minimum or the last run: every test's clock read one fixed time per
    # callable. Per callable [5, 9, 4]: median 5, mean 6, min 4, last 4; [2, 1, 6]: median 2, mean 3, min 1, last 6.
    import itertools

    import torch

    from diffsparse import bench

    _uneven_clock(monkeypatch, {"dense": [5.0, 9.0, 4.0], "sparse": [2.0, 1.0, 6.0]})
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=generator) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random mask on 4 blocks may miss its target: not this test's concern
        row = bench.bench_one(q, k, v, 0.5, 16, "cpu", 3, generator)
    assert (row["dense_ms"], row["sparse_ms"], row["speedup"]) == (5.0, 2.0, 2.5)

    grid = ["--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8", "--block-size", "16",
            "--repeats", "3", "--out", str(tmp_path)]
    _uneven_clock(monkeypatch, {"search": [5.0, 9.0, 4.0], "dense": [2.0, 1.0, 6.0]})
    assert main(["bench", "search", *grid, "--density", "0.5"]) == 0
    result = json.loads((tmp_path / "bench_search.json").read_text())
    assert (result["search_ms"], result["dense_ms"], result["dense_calls_per_search"]) == (5.0, 2.0, 2.5)

    # Causal, two rows: the unmasked SDPA's overall median is over both rows' runs ([3, 6, 7, 8, 10, 20]: 7.5), not
    # the last row's alone (10) nor the median of the rows' medians.
    _uneven_clock(monkeypatch, {"dense": itertools.cycle([5.0, 9.0, 4.0]), "sparse": itertools.cycle([2.0, 1.0, 6.0]),
                                "unmasked": [7.0, 3.0, 8.0, 10.0, 6.0, 20.0]})
    assert main(["bench", "causal", *grid, "--causal-frames", "2", "--pattern", "window3d", "--density",
                 "0.3,0.6"]) == 0
    result = json.loads((tmp_path / "bench_causal.json").read_text())
    assert [(r["dense_ms"], r["unmasked_ms"], r["sparse_ms"], r["speedup"]) for r in result["rows"]] == [
        (5.0, 7.0, 2.0, 2.5), (5.0, 10.0, 2.0, 2.5)]
    assert result["unmasked_sdpa_ms"] == 7.5


def test_attention_bench_reads_a_partial_last_block_at_its_size(tmp_path, monkeypatch):
    # On 130 tokens a diagonal of two 128-blocks is half the blocks but a 128^2 + 2^2 share of the 130^2 scores: the
    # row said density 0.5 and bound 2.0, where the sparse call does 0.97 of the dense work.
    import torch

    from diffsparse import bench

    _fixed_clock(monkeypatch, {"dense": 2.0, "sparse": 1.0})
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 130, 8, generator=generator) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = bench.bench_one(q, k, v, 1e-9, 128, "cpu", 1, generator)  # nothing kept but the diagonal
    work = (128**2 + 2**2) / 130**2
    assert (row["density"], row["bound"], row["efficiency"]) == (work, 1 / work, 2.0 * work)
    assert row["bound"] == pytest.approx(130**2 / (128**2 + 2**2), rel=1e-15)
    # The warning's density is the row's.
    said = [str(w.message) for w in caught if "out of reach" in str(w.message)]
    assert said == [("diffsparse: bench attention: --density 1e-09 is out of reach of --mask random on 130 tokens, "
                     "block 128: the mask timed has density 0.970, so this row runs denser than asked")]
    # Through the command: the CSV's and the table's density are the one bound and efficiency are read against.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["bench", "attention", "--seq", "130", "--heads", "1", "--dim", "8", "--block-size", "128",
                     "--density", "0.001", "--repeats", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "bench_attention.csv") as f:
        (written,) = csv.DictReader(f)
    assert float(written["density"]) == work and float(written["bound"]) == 1 / work


def test_attention_bench_says_why_dense_is_no_mask_to_time(capsys, monkeypatch):
    # `--mask dense` was told a data-dependent pattern's masks come from searching: dense has no search; it keeps
    # every block, whatever --density asks.
    import torch

    monkeypatch.setattr(torch, "randn", lambda *a, **kw: pytest.fail("made tensors before refusing the mask"))
    for mask in ("dense", "dense()"):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "attention", "--seq", "2048", "--mask", mask])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert (f"diffsparse bench attention: error: --mask {mask!r}: must be random or a static pattern solved for "
                "each --density (radial, window3d); dense keeps every block, density 1.0 whatever --density "
                "asks") in err
        assert "data-dependent" not in err and "search" not in err
    # Nor was a static pattern with no parameter to solve data-dependent (none registered today: one faked).
    from diffsparse.patterns import Radial

    monkeypatch.setattr(Radial, "solves_density", property(lambda self: False))
    with pytest.raises(SystemExit):
        main(["bench", "attention", "--seq", "2048", "--mask", "radial"])
    err = capsys.readouterr().err
    assert "--mask 'radial': must be random or a static pattern solved for each --density (radial, window3d); " in err
    assert "has no parameter to solve for a density" in err and "data-dependent" not in err


def test_benches_refuse_an_unknown_dtype_when_called_directly(monkeypatch):
    # The CLI's parser takes fp32/fp16/bf16 only; called directly, "float32" ended in a bare KeyError: 'float32'.
    import argparse

    import torch

    from diffsparse.bench import run_attention_bench, run_causal_bench, run_permute_bench, run_search_bench

    monkeypatch.setattr(torch, "randn", lambda *a, **kw: pytest.fail("tensors made before the dtype was checked"))
    common = {"repeats": 1, "backend": "auto", "device": "cpu", "seed": 0, "heads": 2, "dim": 8, "out": "unused"}
    grid = {"frames": 4, "height": 4, "width": 6, "block_size": 16}
    calls = [
        (run_attention_bench, {"seq": 64, "batch": 1, "density": [0.5], "block_size": 16, "mask": "random"}),
        (run_permute_bench, {**grid, "order": None, "pattern": "window3d"}),
        (run_search_bench, {**grid, "pattern": "searched", "density": 0.5}),
        (run_causal_bench, {**grid, "causal_frames": 2, "pattern": "window3d", "density": [0.3]}),
    ]
    for run, fields in calls:
        for dtype in ("float32", torch.float32, ["fp32"]):
            with pytest.raises(ValueError) as error:
                run(argparse.Namespace(**common, **fields, dtype=dtype))
            assert str(error.value) == f"dtype must be one of ['fp32', 'fp16', 'bf16'], got dtype={dtype!r}", run


def test_attention_bench_table_and_plot_are_the_rows_columns_and_the_plot_runs_by_density(tmp_path, monkeypatch,
                                                                                            capsys):
    # Nothing read the printed table (a column swapped or misformatted passed) nor the plot: given --density out of
    # order, both curves doubled back on themselves (points joined in the rows' order), and the bound drawn as the
    # speedup passed too.
    import matplotlib.axes

    plotted, draw = [], matplotlib.axes.Axes.plot

    def recording(self, x, y, *args, **kwargs):
        plotted.append((kwargs["label"], list(x), list(y)))
        return draw(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    _fixed_clock(monkeypatch, {"dense": 2.0, "sparse": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random mask on 16 blocks may miss its target: not this test's concern
        assert main(["bench", "attention", "--seq", "256", "--heads", "1", "--dim", "8", "--block-size", "16",
                     "--density", "0.5,0.125,0.25", "--repeats", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "bench_attention.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["target_density"] for r in rows] == ["0.5", "0.125", "0.25"]  # the table and CSV keep the given order
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("| " + " | ".join(rows[0]) + " |")
    assert list(rows[0]) == ["mask", "backend", "target_density", "density", "dense_ms", "sparse_ms", "speedup",
                             "bound", "efficiency", "plan_ms", "plan_mb", "peak_mb"]
    for line, r in zip(lines[header + 2:header + 5], rows):
        density = float(r["density"])
        assert line == (f"| random | {r['backend']} | {r['target_density']} | {density:.3f} | 2.0 | 0.5 | 4.000 | "
                        f"{1 / density:.1f} | {4 * density:.3f} | {float(r['plan_ms']):.1f} | "
                        f"{float(r['plan_mb']):.3f} | - |")
        assert (float(r["speedup"]), float(r["bound"]), float(r["efficiency"])) == (4.0, 1 / density, 4 * density)
    densities = sorted(float(r["density"]) for r in rows)
    assert plotted == [("1/density bound", densities, [1 / d for d in densities]),
                       ("block-sparse", densities, [4.0] * 3)]
