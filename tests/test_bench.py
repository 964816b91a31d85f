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
    # dense), nor the untimed warm-up and the interleaving the module promises.
    import torch
    import torch.nn.functional as F

    from diffsparse import bench

    calls, plans, inside = [], [], [False]
    sdpa, kernel = F.scaled_dot_product_attention, bench.block_sparse_attention

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

    monkeypatch.setattr(F, "scaled_dot_product_attention", dense)
    monkeypatch.setattr(bench, "block_sparse_attention", sparse)
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
        row = bench.bench_one(q, k, v, 0.5, 16, "cpu", 2, generator)
    # make_plan timed 3 times; one untimed dense and sparse call; then each pair, dense first.
    pair = ["timed dense", "dense", "timed sparse", "sparse"]
    assert calls == ["timed <lambda>"] * 3 + ["dense", "sparse"] + pair * 2
    assert all(plan is plans[0] for plan in plans) and plans[0].density == row["density"]
    assert (row["dense_ms"], row["sparse_ms"], row["speedup"]) == (2.0, 0.5, 4.0)
    assert row["efficiency"] == 4.0 * row["density"]


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
        message = f"argument --density: expected a block density in (0, 1], got '{density}'"
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
        (["--pattern", "dense", "--density", "1"], "--pattern dense: must be a sparse pattern"),
        (["--density", "0.25,1.5"], "argument --density: expected comma-separated block densities in (0, 1], got"),
        (["--backend", "nosuch"], "--backend 'nosuch' make no sparse configuration: SparseConfig.backend must be"),
        (["--pattern", "nosuch"], "--pattern 'nosuch': pattern must be one of"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, (extra, err)


def test_causal_bench_times_sdpa_under_the_mask_and_without_it_for_scale(tmp_path, monkeypatch):
    # Nothing checked which SDPA each time was of: the dense baseline without its mask, or the unmasked time taken
    # of the masked call, passed.
    import torch
    import torch.nn.functional as F

    from diffsparse.patterns import FrameCausal, VideoLayout

    timed = _fixed_clock(monkeypatch, {"unmasked": 5.0, "dense": 2.0, "sparse": 0.5})
    masks, sdpa = [], F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        if timed[0] in ("dense", "unmasked"):
            masks.append((timed[0], attn_mask))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    args = ["bench", "causal", "--frames", "4", "--height", "4", "--width", "6", "--heads", "2", "--dim", "8",
            "--repeats", "2", "--causal-frames", "2", "--block-size", "16", "--pattern", "window3d", "--density",
            "0.3,0.6", "--out", str(tmp_path)]
    assert main(args) == 0
    expected = FrameCausal(2).token_mask(VideoLayout(4, 4, 6))[None]
    assert [name for name, _ in masks] == ["unmasked"] * 2 + ["dense"] * 4
    assert all(mask is None if name == "unmasked" else torch.equal(mask, expected) for name, mask in masks)
    result = json.loads((tmp_path / "bench_causal.json").read_text())
    assert result["unmasked_sdpa_ms"] == 5.0
    for r in result["rows"]:
        assert (r["dense_ms"], r["sparse_ms"], r["speedup"]) == (2.0, 0.5, 4.0) and r["density"] < 1
        assert r["efficiency"] == 4.0 * r["density"]


def test_permute_bench_share_is_the_permutations_time_over_the_attentions(monkeypatch, capsys):
    # Checked only as > 0: its inverse passed.
    _fixed_clock(monkeypatch, {"permute_in_and_out": 1.0, "attend": 4.0})
    assert main(["bench", "permute", "--frames", "2", "--height", "4", "--width", "8", "--block-size", "16", "--heads",
                 "2", "--dim", "8", "--dtype", "fp32", "--repeats", "1", "--tile", "1,2,4"]) == 0
    row = dict(item.split("=", 1) for item in capsys.readouterr().out.strip().splitlines()[-1].split(" | "))
    assert (row["permute_ms"], row["attention_ms"], row["share"]) == ("1", "4", "0.25")
