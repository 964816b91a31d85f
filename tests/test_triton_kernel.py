"""Triton block-sparse kernel against an independent fp32 dense masked reference.

How the interpreter is run: Triton decides whether ``@triton.jit`` functions are interpreted when
they are *defined*, i.e. when ``diffsparse.kernels.triton_block_sparse`` is first imported, by
reading ``TRITON_INTERPRET``. Setting the variable at the top of this module is not reliable:
another test module (or conftest) may import ``diffsparse.kernels`` first, and a process-wide
``TRITON_INTERPRET=1`` would also push every other Triton user in the session onto the slow
interpreter, and on a GPU machine turn the native CUDA tests into interpreted ones. So the
interpreter cases run in one child process, this file executed as a script with
``TRITON_INTERPRET=1`` in its environment before anything is imported; the parent saves the inputs,
the child runs the kernel and saves its outputs, and the parent compares them with the reference.
On a machine with a GPU the same cases also run natively in-process, in fp32, fp16 and bf16.
"""

import dataclasses
import math
import os
import subprocess
import sys
import traceback

import pytest
import torch

pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()

# Absolute tolerances (rtol=0) of the kernel output and LSE against the fp32 reference, per dtype.
# Inputs are rounded to the dtype before the reference runs, so the error left is the kernel's own:
# p rounded to the input dtype before p @ v, and the output's rounding. The LSE only sees fp32
# accumulation of exact products, so it stays tight in every dtype.
TOLERANCES = {
    torch.float32: {"out": 5e-5, "lse": 5e-5},
    torch.float16: {"out": 3e-3, "lse": 5e-4},
    torch.bfloat16: {"out": 2e-2, "lse": 5e-4},
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    block_q: int
    block_k: int
    mask_bh: tuple  # (Bm, Hm): 1 broadcasts the plan over that dim
    layout: str = "bhnd"  # "bnhd": q, k, v are (B, N, H, D) tensors seen through a transpose
    return_lse: bool = True
    seed: int = 0


# Tiny on purpose: the interpreter runs every block product in numpy, one program at a time.
CASES = [
    Case("odd_len_q64_k64_per_head", 1, 2, 200, 200, 64, 64, 64, (1, 2)),
    Case("odd_len_q64_k128_batch_broadcast", 2, 2, 260, 260, 64, 64, 128, (1, 2), seed=1),
    Case("odd_len_q128_k64_d40_padded", 2, 2, 300, 300, 40, 128, 64, (2, 2), seed=2),
    Case("even_len_q128_k128_head_broadcast", 2, 1, 256, 256, 64, 128, 128, (2, 1), seed=3),
    Case("shared_plan_bnhd_strides", 2, 2, 193, 193, 64, 64, 64, (1, 1), layout="bnhd", seed=4),
    Case("cross_lengths_q190_kv300", 1, 2, 190, 300, 64, 64, 128, (1, 2), seed=5),
    Case("d128_no_lse", 1, 1, 130, 130, 128, 64, 64, (1, 1), return_lse=False, seed=6),
]


def _block_mask(case: Case, generator: torch.Generator) -> torch.Tensor:
    """A random mask with the special rows every case should cover."""
    n_q, n_k = -(-case.q_len // case.block_q), -(-case.kv_len // case.block_k)
    mask = torch.rand(*case.mask_bh, n_q, n_k, generator=generator) < 0.4
    # Row 0 keeps nothing: make_plan's diagonal rule leaves it a single key block (block 0).
    mask[..., 0, :] = False
    # The last row keeps nothing either: its diagonal block is the ragged last key block when the
    # lengths match, so the row is a single, masked tail block.
    mask[..., -1, :] = False
    # Row 1 is a full row (all key blocks, the ragged tail included).
    if n_q > 2:
        mask[..., 1, :] = True
    return mask


# Masks that differ between the videos of a batch: `_block_mask` makes its special rows alike in every video, so the
# CASES alone would not tell a plan row read from the wrong video. Video 0 keeps only its diagonal blocks, video 1
# every block; on the same (B, H) index a row of the wrong video has another count and other indices.
PER_VIDEO_CASE = Case("per_video_masks", 2, 2, 150, 150, 16, 64, 64, (2, 1), seed=8)


def _per_video_inputs():
    q, k, v, _ = _inputs(PER_VIDEO_CASE)
    n_q = -(-PER_VIDEO_CASE.q_len // PER_VIDEO_CASE.block_q)
    mask = torch.zeros(*PER_VIDEO_CASE.mask_bh, n_q, n_q, dtype=torch.bool)
    mask[1] = True
    return q, k, v, mask


def _inputs(case: Case, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(case.seed)
    qkv = []
    for length in (case.q_len, case.kv_len, case.kv_len):
        x = torch.randn(case.batch, length, case.heads, case.head_dim, generator=generator).to(dtype)
        qkv.append(x.transpose(1, 2) if case.layout == "bnhd" else x.transpose(1, 2).contiguous())
    return (*qkv, _block_mask(case, generator))


def _reference(q, k, v, block_mask, block_q, block_k, scale):
    """Dense fp32 attention under the block mask expanded to tokens (on CPU, independent of the kernel)."""
    q, k, v, block_mask = (x.detach().cpu() for x in (q.float(), k.float(), v.float(), block_mask))
    tokens = block_mask.repeat_interleave(block_q, -2).repeat_interleave(block_k, -1)
    tokens = tokens[..., : q.shape[2], : k.shape[2]]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~tokens, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def _run_kernel(q, k, v, block_mask, case: Case):
    """Plan + kernel; returns (out, lse or None, the plan's block mask, with the diagonal rule applied)."""
    from diffsparse.kernels import make_plan
    from diffsparse.kernels.triton_block_sparse import triton_block_sparse_attention

    plan = make_plan(block_mask.to(q.device), case.q_len, case.kv_len, (case.block_q, case.block_k))
    result = triton_block_sparse_attention(q, k, v, plan, return_lse=case.return_lse)
    if case.return_lse:
        out, lse = result
    else:
        assert isinstance(result, torch.Tensor), "return_lse=False must return the output tensor alone"
        out, lse = result, None
    return out, lse, plan.block_mask


def _check(case: Case, q, k, v, out, lse, plan_mask):
    # The case covers what it claims: a single-block first row and, where there is room, a full row.
    counts = plan_mask.sum(-1)
    assert (counts[..., 0] == 1).all() and (counts[..., -1] >= 1).all()
    assert counts.shape[-1] <= 2 or (counts[..., 1] == plan_mask.shape[-1]).all()
    assert out.shape == q.shape and out.dtype == q.dtype
    ref_out, ref_lse = _reference(q, k, v, plan_mask, case.block_q, case.block_k, 1 / math.sqrt(case.head_dim))
    tol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out.float().cpu(), ref_out, rtol=0, atol=tol["out"])
    if case.return_lse:
        assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
        torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=tol["lse"])


# ---------------------------------------------------------------------------------------------
# Interpreter: one child process for all cases.


# Through the public entry point with backend="triton": a non-default scale, queries that are a later part of the keys
# (q_offset) and a head dim below tl.dot's 16 (padded), so the `_triton` wrapper and the scale's way down both run.
PUBLIC_API_CASE = {"q_len": 70, "kv_len": 200, "q_offset": 130, "head_dim": 8, "block": 64, "scale": 0.3}


def _public_api_run():
    """(q, k, v, plan block mask, out, lse) of the public API on the PUBLIC_API_CASE, in this process's Triton."""
    from diffsparse.kernels import block_sparse_attention, make_plan

    c = PUBLIC_API_CASE
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, c["q_len"], c["head_dim"], generator=generator)
    k, v = (torch.randn(1, 2, c["kv_len"], c["head_dim"], generator=generator) for _ in range(2))
    mask = torch.rand(1, 2, -(-c["q_len"] // c["block"]), -(-c["kv_len"] // c["block"]), generator=generator) < 0.3
    plan = make_plan(mask, c["q_len"], c["kv_len"], c["block"], q_offset=c["q_offset"])
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton", scale=c["scale"])
    return q, k, v, plan.block_mask, out, lse


def _plan_on_another_device_error():
    """The `_triton` wrapper's message for a plan whose index tensors are not on the inputs' device."""
    import copy

    from diffsparse.kernels import block_sparse_attention, make_plan

    q = torch.randn(1, 1, 64, 16)
    plan = copy.copy(make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 64, 64, 64))
    # A plan cannot be built on the meta device (it is checked on construction), so one is swapped in here.
    object.__setattr__(plan, "kv_indices", plan.kv_indices.to("meta"))
    try:
        block_sparse_attention(q, q, q, plan, backend="triton")
    except ValueError as error:
        return str(error)
    return "no error"


def _interpreter_worker(in_path: str, out_path: str) -> None:
    """Child-process entry: run every saved case through the interpreted kernel, save the outputs."""
    from diffsparse.kernels import triton_block_sparse

    if not triton_block_sparse._INTERPRETED:
        raise SystemExit("TRITON_INTERPRET=1 did not reach triton: the kernels were compiled, not interpreted")
    results = {"available": triton_block_sparse.triton_available("cpu")}
    for name, (case_fields, q, k, v, block_mask) in torch.load(in_path).items():
        try:
            out, lse, plan_mask = _run_kernel(q, k, v, block_mask, Case(**case_fields))
            results[name] = (out, lse, plan_mask)
        except Exception:  # noqa: BLE001 -- reported by the parent as that case's failure
            results[name] = traceback.format_exc()
    # The interpreter's bfloat16 dots are wrong by 1e8 (Triton's, not the kernel's): refused, not computed.
    from diffsparse.kernels import make_plan

    q = torch.randn(1, 1, 64, 16).to(torch.bfloat16)
    try:
        triton_block_sparse.triton_block_sparse_attention(q, q, q, make_plan(torch.ones(1, 1, 1, 1).bool(), 64, 64, 64))
        results["bfloat16"] = "computed"
    except ValueError as error:
        results["bfloat16"] = str(error)
    for name, run in (("public_api", _public_api_run), ("plan_device", _plan_on_another_device_error)):
        try:
            results[name] = run()
        except Exception:  # noqa: BLE001 -- reported by the parent as that test's failure
            results[name] = traceback.format_exc()
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton_interpreter")
    in_path, out_path = str(tmp / "inputs.pt"), str(tmp / "outputs.pt")
    inputs = {c.name: (dataclasses.asdict(c), *_inputs(c)) for c in CASES}
    inputs[PER_VIDEO_CASE.name] = (dataclasses.asdict(PER_VIDEO_CASE), *_per_video_inputs())
    torch.save(inputs, in_path)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), in_path, out_path],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter child failed ({proc.returncode=}):\n{proc.stdout}\n{proc.stderr}")
    return torch.load(out_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_interpreter_matches_dense_reference(case, interpreter_results):
    result = interpreter_results[case.name]
    if isinstance(result, str):
        pytest.fail(f"kernel raised in the interpreter:\n{result}")
    q, k, v, _ = _inputs(case)
    out, lse, plan_mask = result
    _check(case, q, k, v, out, lse, plan_mask)


def _check_per_video(q, k, v, out, lse, plan_mask):
    plan_mask, n_q = plan_mask.cpu(), plan_mask.shape[-1]
    assert torch.equal(plan_mask[0, 0], torch.eye(n_q, dtype=torch.bool)) and plan_mask[1].all()
    c = PER_VIDEO_CASE
    ref_out, ref_lse = _reference(q, k, v, plan_mask, c.block_q, c.block_k, 1 / math.sqrt(c.head_dim))
    torch.testing.assert_close(out.cpu(), ref_out, rtol=0, atol=TOLERANCES[torch.float32]["out"])
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=0, atol=TOLERANCES[torch.float32]["lse"])


def test_interpreter_reads_each_video_s_own_plan_rows(interpreter_results):
    result = interpreter_results[PER_VIDEO_CASE.name]
    if isinstance(result, str):
        pytest.fail(f"kernel raised in the interpreter:\n{result}")
    _check_per_video(*_per_video_inputs()[:3], *result)


def test_interpreter_public_api_with_scale_and_q_offset(interpreter_results):
    result = interpreter_results["public_api"]
    if isinstance(result, str):
        pytest.fail(f"block_sparse_attention(..., backend='triton') raised in the interpreter:\n{result}")
    q, k, v, plan_mask, out, lse = result
    c = PUBLIC_API_CASE
    # The diagonal rule followed q_offset: query block i keeps the key block of token q_offset + i * block.
    for i in range(plan_mask.shape[-2]):
        assert plan_mask[..., i, (c["q_offset"] + i * c["block"]) // c["block"]].all()
    ref_out, ref_lse = _reference(q, k, v, plan_mask, c["block"], c["block"], c["scale"])
    torch.testing.assert_close(out, ref_out, rtol=0, atol=TOLERANCES[torch.float32]["out"])
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=TOLERANCES[torch.float32]["lse"])


def test_interpreter_refuses_a_plan_on_another_device(interpreter_results):
    assert "the plan must live on the inputs' device" in interpreter_results["plan_device"]


def test_interpreter_reports_available(interpreter_results):
    ok, reason = interpreter_results["available"]
    assert ok and "interpreter" in reason
    assert "computes bfloat16 wrongly" in interpreter_results["bfloat16"]


# ---------------------------------------------------------------------------------------------
# Native CUDA (skipped without a GPU).


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the native Triton kernel needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cuda_matches_dense_reference(case, dtype):
    from diffsparse.kernels import triton_block_sparse

    if triton_block_sparse._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process: the CUDA run would be interpreted")
    q, k, v, block_mask = (x.cuda() for x in _inputs(case, dtype))
    out, lse, plan_mask = _run_kernel(q, k, v, block_mask, case)
    _check(case, q, k, v, out, lse, plan_mask)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the native Triton kernel needs a GPU")
def test_cuda_reads_each_video_s_own_plan_rows():
    from diffsparse.kernels import triton_block_sparse

    if triton_block_sparse._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process: the CUDA run would be interpreted")
    q, k, v, block_mask = (x.cuda() for x in _per_video_inputs())
    _check_per_video(q, k, v, *_run_kernel(q, k, v, block_mask, PER_VIDEO_CASE))


# ---------------------------------------------------------------------------------------------
# No GPU needed: compiling for CUDA targets, availability, validation.


# Kernel arguments that are pointers, and those the launcher specialises to 1 for contiguous inputs.
_POINTERS = {"Q": None, "K": None, "V": None, "Out": None, "Lse": "*fp32", "KvIdx": "*i32", "KvCnt": "*i32"}
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_ik", "stride_cq"}


@pytest.mark.parametrize(
    "arch, dtype, block_q, block_k, head_dim",
    [(90, "bf16", 128, 64, 64), (80, "fp16", 64, 128, 40)],
    ids=["sm90_bf16_q128_k64", "sm80_fp16_q64_k128_d40"],
)
def test_compiles_for_cuda_targets(arch, dtype, block_q, block_k, head_dim):
    """The interpreter never runs the compiled path (runtime loop bound, tensor-core dots): compile it.

    Triton compiles to a CUDA target without a GPU; the signature mimics what the launcher sees for
    contiguous inputs with odd lengths (16-byte aligned pointers and strides, unit inner strides).
    """
    import inspect

    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # Triton internals moved: this smoke test cannot run, the kernel still can.
        pytest.skip(f"this triton has no ASTSource/GPUTarget: {e}")
    from diffsparse.kernels import triton_block_sparse

    if triton_block_sparse._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process: the kernels are not JIT functions")
    kernel = triton_block_sparse._block_sparse_attn_fwd
    padded = triton_block_sparse._padded_head_dim(head_dim)
    constexprs = {
        "BLOCK_Q": block_q, "BLOCK_K": block_k, "HEAD_DIM": padded, "D": head_dim, "MAX_BLOCKS": 0,
        "EVEN_Q": False, "EVEN_K": False, "INPUT_PRECISION": None,
    }
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constexprs or name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs.setdefault(name, 1)
        elif name in _POINTERS:
            signature[name] = _POINTERS[name] or f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and name[-1] in "bhn":
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": 4, "num_stages": 3},
        )
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no ptxas to finish the CUDA compile: {e}")
        raise
    ptx = compiled.asm["ptx"]
    # Tensor cores are used (wgmma on Hopper, mma.sync on Ampere) and k/v loads are pipelined.
    assert ("wgmma" in ptx) if arch >= 90 else ("mma.sync" in ptx)
    assert "cp.async" in ptx


def test_autotune_pruning_keeps_a_config():
    from diffsparse.kernels.triton_block_sparse import _CONFIGS, _prune_configs

    for dtype in (torch.float32, torch.bfloat16):
        q = torch.empty(0, dtype=dtype)
        for block_q in (64, 128):
            for head_dim in (16, 32, 64, 128, 256):
                kept = _prune_configs(_CONFIGS, {"Q": q}, BLOCK_Q=block_q, HEAD_DIM=head_dim)
                assert kept and set(kept) <= set(_CONFIGS)
                assert block_q == 128 or all(c.num_warps == 4 for c in kept)
                # fp32 tiles are wide: single-buffered configs must be among the candidates.
                assert dtype != torch.float32 or any(c.num_stages == 1 for c in kept)


def test_autotune_pruning_multi_buffers_narrow_tiles_only():
    # Wide tiles (fp32, or head dims above 128) overflow shared memory with three k/v stages, and take one or two;
    # narrow ones gain from pipelining, and take two or three.
    from diffsparse.kernels.triton_block_sparse import _CONFIGS, _prune_configs

    for block_q in (64, 128):
        for dtype, head_dim, stages in ((torch.float32, 64, {1, 2}), (torch.float16, 256, {1, 2}),
                                        (torch.float16, 64, {2, 3}), (torch.bfloat16, 128, {2, 3})):
            kept = _prune_configs(_CONFIGS, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_Q=block_q, HEAD_DIM=head_dim)
            assert {c.num_stages for c in kept} == stages, (block_q, dtype, head_dim)


def test_triton_available_on_cpu_says_why():
    from diffsparse.kernels.triton_block_sparse import _INTERPRETED, triton_available

    ok, reason = triton_available("cpu")
    assert ok == _INTERPRETED
    if not ok:
        assert "TRITON_INTERPRET" in reason


def _tiny(dtype=torch.float32, n=130, d=64):
    q = torch.randn(1, 2, n, d, dtype=dtype)
    return q, q.clone(), q.clone()


def _plan(q_len=130, kv_len=130, block_size=64):
    from diffsparse.kernels import make_plan

    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    mask = torch.ones(1, 1, -(-q_len // bq), -(-kv_len // bk), dtype=torch.bool)
    return make_plan(mask, q_len, kv_len, block_size)


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda: (*_tiny()[:2], _tiny()[2][0], _plan()), "4D"),
        (lambda: (*_tiny(torch.float64), _plan()), "float64"),
        (lambda: (_tiny()[0], *_tiny(torch.float16)[1:], _plan()), "one dtype"),
        (lambda: (*_tiny()[:2], torch.randn(1, 2, 129, 64), _plan()), "k and v"),
        (lambda: (*_tiny(), _plan(block_size=32)), r"plan.block_q must be one of \(64, 128\).*=32"),
        (lambda: (*_tiny(), _plan(block_size=(64, 256))), r"plan.block_k must be one of \(64, 128\).*=256"),
        (lambda: (*_tiny(), _plan(q_len=200, kv_len=200)), "sequence lengths"),
        (lambda: (*_tiny(d=300), _plan()), r"head dims from 1 to 256 .*head_dim=300"),
        # float32 tiles with a 128-token block and head dims padded to 256 overflow an H100's shared memory: a
        # clear error up front, not the autotuner's OutOfResources at launch.
        (lambda: (*_tiny(d=256), _plan(block_size=(128, 64))), r"float32 .*head_dim=256.*block_q=128.*block_k=64"),
        (lambda: (*_tiny(d=160), _plan(block_size=(64, 128))), r"float32 .*head_dim=160.*block_q=64.*block_k=128"),
        # The public entry point checks this first; the kernel's own check guards its direct callers.
        (lambda: (*(x.to("meta") for x in _tiny()), _plan()),
         r"the plan must live on the inputs' device \(build it there once\).*device\(type='cpu'\).*meta"),
    ],
    ids=["not_4d", "float64", "mixed_dtypes", "kv_shape", "block_q_32", "block_k_256", "length_mismatch",
         "head_dim_300", "fp32_d256_q128", "fp32_d160_k128", "plan_on_another_device"],
)
def test_rejects_bad_inputs(make_args, match):
    from diffsparse.kernels.triton_block_sparse import triton_block_sparse_attention

    with pytest.raises(ValueError, match=match):
        triton_block_sparse_attention(*make_args())


@pytest.mark.parametrize(
    "dtype, head_dim, block_size",
    [(torch.float32, 256, 64), (torch.float32, 128, 128), (torch.float16, 256, 128), (torch.bfloat16, 200, 128)],
    ids=["fp32_d256_b64", "fp32_d128_b128", "fp16_d256_b128", "bf16_d200_b128"],
)
def test_takes_what_fits_in_shared_memory(dtype, head_dim, block_size):
    from diffsparse.kernels.triton_block_sparse import _check_inputs

    _check_inputs(*_tiny(dtype, d=head_dim), _plan(block_size=block_size))


def test_cpu_without_interpreter_is_refused():
    from diffsparse.kernels.triton_block_sparse import _INTERPRETED, triton_block_sparse_attention

    if _INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process: CPU tensors are allowed")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_block_sparse_attention(*_tiny(), _plan())


if __name__ == "__main__":
    # The interpreter child: `python tests/test_triton_kernel.py INPUTS OUTPUTS`, started by
    # interpreter_results with TRITON_INTERPRET=1 in its environment.
    _interpreter_worker(sys.argv[1], sys.argv[2])
