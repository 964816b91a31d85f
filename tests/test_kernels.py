import dataclasses
import math
import os
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffsparse.kernels import BACKENDS, BlockSparsePlan, block_sparse_attention, choose_backend, make_plan

# Backends that run on CPU tensors; the Triton kernel has its own tests (interpreter and CUDA).
CPU_BACKENDS = [name for name in BACKENDS if name != "triton"]
from diffsparse.kernels import cpu as cpu_backend
from diffsparse.kernels import cpu_native

# (atol for out, atol for lse); rtol=0 so every element is held to the absolute bound.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

# (B, H, q_len, kv_len, block_size, mask batch, mask heads, density)
CASES = {
    "per-head, ragged": (2, 3, 200, 200, 64, 2, 3, 0.3),
    "shared, bq != bk": (1, 2, 256, 256, (64, 32), 1, 1, 0.4),
    "batch-1 broadcast, q != kv": (2, 2, 150, 333, (32, 48), 1, 2, 0.3),
    "tiny blocks": (1, 2, 37, 53, (8, 16), 1, 2, 0.2),
}
# Rows keeping more keys than the compiled kernel multiplies at a time (test_long_rows_span_several_key_tiles); run
# only in the compiled kernel's dtypes, to keep them cheap.
LONG_ROWS = {
    "rows past one key tile": (2, 2, 150, 1300, 64, 2, 1, 0.7),
    "key blocks wider than a tile": (2, 2, 150, 1300, (32, 600), 2, 1, 0.7),
}
_REFERENCE = {}


@pytest.fixture(autouse=True, params=["native", "portable"])
def cpu_kernel(request, monkeypatch):
    """Every test runs against both paths of the cpu backend: the compiled kernel and the torch-ops path."""
    if request.param == "native" and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine; the cpu backend runs its torch-ops path")
    monkeypatch.setenv(cpu_native.ENV_VAR, request.param)
    return request.param


def _inputs(batch, heads, q_len, kv_len, head_dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Rounded through bf16 so every dtype sees the same values and one fp32 reference serves all.
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, generator=gen).bfloat16().float()
        for n in (q_len, kv_len, kv_len)
    )
    return q, k, v


def _random_mask(batch, heads, nq, nk, density, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, heads, nq, nk, generator=gen) < density


def _blocks(block_size):
    return (block_size, block_size) if isinstance(block_size, int) else block_size


def _case(name):
    batch, heads, q_len, kv_len, block_size, mb, mh, density = {**CASES, **LONG_ROWS}[name]
    bq, bk = _blocks(block_size)
    mask = _random_mask(mb, mh, -(-q_len // bq), -(-kv_len // bk), density)
    plan = make_plan(mask, q_len, kv_len, block_size)
    q, k, v = _inputs(batch, heads, q_len, kv_len)
    if name not in _REFERENCE:  # the reference runs once, in fp32
        _REFERENCE[name] = block_sparse_attention(q, k, v, plan, return_lse=True, backend="reference")
    return plan, (q, k, v), _REFERENCE[name]


def _masked_scores(q, k, block_mask, block_q, block_k, scale):
    """Token scores with -inf outside the block mask, built from block ids independently of the kernels."""
    rows = torch.arange(q.shape[2]) // block_q
    cols = torch.arange(k.shape[2]) // block_k
    keep = block_mask[:, :, rows[:, None], cols[None, :]]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    return scores.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, dtype) for name in CASES for dtype in TOLERANCES]
    + [(name, dtype) for name in LONG_ROWS for dtype in cpu_native.DTYPES],
    ids=str,
)
def test_cpu_matches_reference(name, dtype):
    plan, (q, k, v), (ref_out, ref_lse) = _case(name)
    out, lse = block_sparse_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), plan, return_lse=True, backend="cpu"
    )
    atol_out, atol_lse = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.float(), ref_out, rtol=0, atol=atol_out)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=atol_lse)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_lse_and_out_match_independent_softmax(name, backend):
    plan, (q, k, v), _ = _case(name)
    scale = 0.3
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend=backend, scale=scale)
    scores = _masked_scores(q, k, plan.block_mask, plan.block_q, plan.block_k, scale)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).float(), rtol=0, atol=2e-5)
    expected = torch.softmax(scores, -1) @ v.double()
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=2e-5)


def test_all_false_mask_keeps_only_the_diagonal_block():
    q_len, kv_len, bq, bk = 100, 70, 16, 32  # more query blocks than key blocks: the clamp is exercised
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    plan = make_plan(torch.zeros(1, 1, nq, nk, dtype=torch.bool), q_len, kv_len, (bq, bk))
    diag = [min(i * bq // bk, nk - 1) for i in range(nq)]
    expected_mask = torch.zeros(1, 1, nq, nk, dtype=torch.bool)
    expected_mask[0, 0, range(nq), diag] = True
    assert torch.equal(plan.block_mask, expected_mask)
    assert plan.kv_counts.eq(1).all()

    q, k, v = _inputs(1, 2, q_len, kv_len)
    for backend in CPU_BACKENDS:
        out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend=backend)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        for i, j in enumerate(diag):
            rows, cols = slice(i * bq, (i + 1) * bq), slice(j * bk, (j + 1) * bk)
            dense = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, cols], v[:, :, cols])
            torch.testing.assert_close(out[:, :, rows], dense, rtol=0, atol=2e-5)


def test_queries_of_a_later_part_keep_their_own_diagonal_block():
    # Queries 40..99 of a 100-token sequence attending keys 0..99 (a causal group against the keys up to its end):
    # each query block's diagonal is the key block holding its first token in the whole sequence.
    q_offset, q_len, kv_len, bq, bk = 40, 60, 100, 16, 32
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    plan = make_plan(torch.zeros(1, 1, nq, nk, dtype=torch.bool), q_len, kv_len, (bq, bk), q_offset=q_offset)
    diag = [(q_offset + i * bq) // bk for i in range(nq)]
    assert diag == [1, 1, 2, 2]
    expected_mask = torch.zeros(1, 1, nq, nk, dtype=torch.bool)
    expected_mask[0, 0, range(nq), diag] = True
    assert torch.equal(plan.block_mask, expected_mask)
    q, k, v = _inputs(1, 2, kv_len, kv_len)
    for backend in CPU_BACKENDS:
        out = block_sparse_attention(q[:, :, q_offset:], k, v, plan, backend=backend)
        for i, j in enumerate(diag):
            rows, cols = slice(i * bq, (i + 1) * bq), slice(j * bk, (j + 1) * bk)
            dense = F.scaled_dot_product_attention(q[:, :, q_offset:][:, :, rows], k[:, :, cols], v[:, :, cols])
            torch.testing.assert_close(out[:, :, rows], dense, rtol=0, atol=2e-5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="q_offset must be an int >= 0"):
            make_plan(torch.zeros(1, 1, nq, nk, dtype=torch.bool), q_len, kv_len, (bq, bk), q_offset=bad)


def test_single_key_block_row_and_full_row():
    q_len = kv_len = 96
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1] = True  # row 1 sees every key block; rows 0 and 2 only their diagonal
    plan = make_plan(mask, q_len, kv_len, 32)
    assert plan.kv_counts.tolist() == [[[1, 3, 1]]]
    q, k, v = _inputs(2, 2, q_len, kv_len)
    out = block_sparse_attention(q, k, v, plan, backend="cpu")
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    full_row = F.scaled_dot_product_attention(q[:, :, 32:64], k, v)
    torch.testing.assert_close(out[:, :, 32:64], full_row, rtol=0, atol=2e-5)
    own_block = F.scaled_dot_product_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32])
    torch.testing.assert_close(out[:, :, :32], own_block, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_all_true_mask_equals_dense_sdpa(dtype):
    q_len, kv_len, bq, bk = 130, 210, 32, 64
    plan = make_plan(torch.ones(1, 1, 5, 4, dtype=torch.bool), q_len, kv_len, (bq, bk))
    assert plan.density == 1.0
    q, k, v = (x.to(dtype) for x in _inputs(2, 3, q_len, kv_len))
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True)
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    dense_lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    atol_out, atol_lse = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), dense, rtol=0, atol=atol_out)
    torch.testing.assert_close(lse, dense_lse, rtol=0, atol=atol_lse)


def test_shared_mask_equals_expanded_per_head_mask():
    batch, heads, n, block = 3, 2, 192, 32
    shared = _random_mask(1, 1, 6, 6, 0.3)
    q, k, v = _inputs(batch, heads, n, n)
    out_shared = block_sparse_attention(q, k, v, make_plan(shared, n, n, block))
    out_full = block_sparse_attention(q, k, v, make_plan(shared.expand(batch, heads, 6, 6), n, n, block))
    torch.testing.assert_close(out_shared, out_full, rtol=0, atol=0)


def test_plan_fields():
    mask = torch.tensor(
        [[False, False, True, True], [False, False, False, False], [True, False, False, True]]
    )
    plan = make_plan(mask[None, None], q_len=3 * 16, kv_len=4 * 12, block_size=(16, 12))
    # Diagonal blocks: 0 // 12 = 0, 16 // 12 = 1, 32 // 12 = 2.
    assert plan.block_mask[0, 0].tolist() == [
        [True, False, True, True],
        [False, True, False, False],
        [True, False, True, True],
    ]
    assert plan.kv_indices.dtype == torch.int32 and plan.kv_counts.dtype == torch.int32
    assert plan.kv_indices[0, 0].tolist() == [[0, 2, 3, 3], [1, 1, 1, 1], [0, 2, 3, 3]]
    assert plan.kv_counts[0, 0].tolist() == [3, 1, 3]
    assert plan.density == 7 / 12 and isinstance(plan.density, float)
    assert "density=0.583" in repr(plan)
    # Over every head's blocks: 2 of 4 kept in head 0 (the diagonal), 4 of 4 in head 1.
    per_head = make_plan(torch.stack([torch.zeros(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)])[None],
                         q_len=32, kv_len=32, block_size=16)
    assert per_head.density == 6 / 8


def test_plan_token_density_is_the_kept_share_of_the_score_matrix():
    # `density` counts a partial last block whole: bench attention's bound and efficiency read against it passed the
    # work a plan leaves (a 1024-block diagonal on 2056 tokens: 0.333 of the blocks, 0.496 of the scores).
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 2056, 2056, 1024), (2, 3, 37, 53, (8, 16)), (1, 2, 150, 333, (32, 48)), (2, 1, 5, 7, 64)]
    for _ in range(20):  # and random ones: lengths mostly not multiples of their blocks
        batch, heads, q_len, kv_len, bq, bk = (torch.randint(1, hi, (), generator=gen).item() for hi in (3, 3, 300,
                                                                                                        300, 70, 70))
        shapes.append((batch, heads, q_len, kv_len, (bq, bk)))
    for i, (batch, heads, q_len, kv_len, block_size) in enumerate(shapes):
        bq, bk = _blocks(block_size)
        nq, nk = -(-q_len // bq), -(-kv_len // bk)
        density = torch.rand((), generator=gen).item()
        plan = make_plan(torch.rand(batch, heads, nq, nk, generator=gen) < density, q_len, kv_len, block_size,
                         q_offset=i % 3)
        # Brute force: every block blown up to its tokens, the padding past each length cropped.
        tokens = plan.block_mask.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :q_len, :kv_len]
        want = int(tokens.sum()) / tokens.numel()
        assert plan.token_density == want, (batch, heads, q_len, kv_len, block_size)
        assert isinstance(plan.token_density, float)
    # A diagonal of two 128-blocks on 130 tokens: one whole block and one of 2 x 2 tokens.
    diagonal = make_plan(torch.zeros(1, 1, 2, 2, dtype=torch.bool), 130, 130, 128)
    assert (diagonal.density, diagonal.token_density) == (0.5, (128**2 + 2**2) / 130**2)
    # Whole blocks: the block density to the last bit.
    for block_size, q_len, kv_len in ((16, 64, 128), ((16, 32), 48, 96), (128, 16384, 16384)):
        bq, bk = _blocks(block_size)
        plan = make_plan(_random_mask(2, 3, q_len // bq, kv_len // bk, 0.3), q_len, kv_len, block_size)
        assert plan.token_density == plan.density
    with pytest.raises(AttributeError):
        plan.token_density = 0.5


def test_plan_is_immutable_and_reusable():
    n, block = 128, 32
    mask = _random_mask(1, 2, 4, 4, 0.3)
    plan = make_plan(mask, n, n, block)
    snapshot = plan.block_mask.clone()
    mask.fill_(True)  # the caller's tensor is not aliased
    assert torch.equal(plan.block_mask, snapshot)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.block_q = 64
    q, k, v = _inputs(1, 2, n, n)
    first = block_sparse_attention(q, k, v, plan)
    assert torch.equal(block_sparse_attention(q, k, v, plan), first)
    # The same plan serves another batch size; its mask broadcasts over batch.
    q3, k3, v3 = _inputs(3, 2, n, n, seed=5)
    ref3 = block_sparse_attention(q3, k3, v3, plan, backend="reference")
    torch.testing.assert_close(block_sparse_attention(q3, k3, v3, plan), ref3, rtol=0, atol=2e-5)
    assert torch.equal(block_sparse_attention(q, k, v, plan), first)


def test_a_plan_shared_over_heads_serves_calls_with_other_head_counts():
    # The torch-ops path keeps its chunks on the plan per call shape: the chunks of a 2-head call must not serve a
    # 3-head one (its third head's rows are in none of them).
    plan = make_plan(_random_mask(1, 1, 4, 4, 0.3), 100, 100, 32)
    for heads in (2, 3, 2):
        q, k, v = _inputs(1, heads, 100, 100, head_dim=16, seed=heads)
        out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="cpu")
        ref_out, ref_lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="reference")
        torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-5)


def test_many_small_chunks_and_non_contiguous_inputs(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_CHUNK_BYTES", 1)  # one chunk per thread-count rows
    batch, heads, n, block = 2, 3, 100, 16
    plan = make_plan(_random_mask(batch, heads, 7, 7, 0.4), n, n, block)
    # diffusers hands over (B, S, H, D) transposed to (B, H, S, D): strided, not contiguous.
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(batch, heads, n, n))
    assert not q.is_contiguous()
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    torch.testing.assert_close(block_sparse_attention(q, k, v, plan), ref, rtol=0, atol=2e-5)


def _with_grads(backend, plan, q, k, v, scale=None, needs=(True, True, True)):
    """`(out, lse, [q, k, v gradients])` of one call, differentiated through both outputs (the LSE where it depends
    on an input that `needs` a gradient); the gradient of an input that needs none is None."""
    leaves = [x.clone().requires_grad_(need) for x, need in zip((q, k, v), needs)]
    out, lse = block_sparse_attention(*leaves, plan, return_lse=True, backend=backend, scale=scale)
    assert out.requires_grad and lse.requires_grad == (needs[0] or needs[1])  # the LSE depends on q and k only
    gen = torch.Generator().manual_seed(2)
    out_grad, lse_grad = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    outputs, output_grads = ((out, lse), (out_grad, lse_grad)) if lse.requires_grad else ((out,), (out_grad,))
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = iter(torch.autograd.grad(outputs, wanted, output_grads))
    return out.detach(), lse.detach(), [next(grads) if leaf.requires_grad else None for leaf in leaves]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_portable_path_without_cpu_flash_op(monkeypatch, requires_grad):
    # The branch other devices take, exercised on CPU, at a scale other than the default (SDPA must be given it), in
    # inference and under autograd.
    monkeypatch.setattr(cpu_backend, "_FLASH_CPU", None)
    plan, (q, k, v), _ = _case("batch-1 broadcast, q != kv")
    ref_out, ref_lse, ref_grads = _with_grads("reference", plan, q, k, v, scale=0.3)
    if requires_grad:
        out, lse, grads = _with_grads("cpu", plan, q, k, v, scale=0.3)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    else:
        out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="cpu", scale=0.3)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-5)


def test_choose_backend():
    assert choose_backend("cpu") == "cpu"
    assert choose_backend(torch.device("cpu"), "reference") == "reference"
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend("cpu", "triton-nope")
    # Said by the argument's public name: `requested` is no argument of block_sparse_attention.
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*, got backend='fast'"):
        block_sparse_attention(
            *_inputs(1, 1, 32, 32),
            make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 32, 32, 32),
            backend="fast",
        )


def test_auto_takes_the_torch_ops_path_for_what_the_triton_kernel_does_not_take(monkeypatch):
    # Triton's kernel takes blocks of 64 or 128 and head dims up to 256; "auto" on CUDA picked it for any plan,
    # so block_size=32 on a GPU raised instead of running. Now the torch-ops path runs it, and a warning says so.
    from diffsparse.kernels import attention

    monkeypatch.setattr(attention, "triton_available", lambda device: (True, "Triton on a test GPU"))
    cuda = torch.device("cuda")
    plan_of = {size: make_plan(torch.ones(1, 1, 2, 2, dtype=torch.bool), 2 * size[0], 2 * size[1], size)
               for size in ((64, 64), (128, 64), (64, 128), (128, 128), (32, 32), (64, 48))}
    assert choose_backend(cuda, plan=plan_of[64, 64], head_dim=128) == "triton"
    assert choose_backend(cuda, plan=plan_of[128, 64], head_dim=256) == "triton"
    # float32 tiles fit an H100's shared memory up to head dim 128 with 128-token blocks, and above only at 64 x 64.
    for size, head_dim, dtype in (((64, 64), 256, torch.float32), ((128, 128), 128, torch.float32),
                                  ((128, 128), 256, torch.bfloat16), ((128, 64), 256, torch.float16)):
        assert choose_backend(cuda, plan=plan_of[size], head_dim=head_dim, dtype=dtype) == "triton"
    fp32 = torch.float32
    for size, head_dim, dtype, what in (((32, 32), 64, None, "blocks of 32 x 32 tokens"),
                                        ((64, 48), 64, None, "blocks of 64 x 48"),
                                        ((64, 64), 320, None, "head dim 320"),
                                        ((128, 64), 256, fp32, "float32 with head dim 256 and blocks of 128 x 64"),
                                        ((64, 128), 129, fp32, "float32 with head dim 129 and blocks of 64 x 128")):
        with pytest.warns(UserWarning, match=f"backend='auto' runs {what}.* on the torch-ops path") as said:
            assert choose_backend(cuda, plan=plan_of[size], head_dim=head_dim, dtype=dtype) == "cpu"
        assert [w.filename for w in said] == [__file__]  # the caller's line, not one past it
    # Under TRITON_INTERPRET=1 on a CUDA machine the kernel refuses bfloat16 (the interpreter gets it wrong): auto
    # picked it and the call raised.
    monkeypatch.setattr(attention.triton_block_sparse, "_INTERPRETED", True)
    with pytest.warns(UserWarning, match=r"backend='auto' runs bfloat16 under TRITON_INTERPRET=1 .* on the torch-ops "
                                         r"path \(float16 or float32 run the Triton kernel under the interpreter"):
        assert choose_backend(cuda, plan=plan_of[64, 64], head_dim=64, dtype=torch.bfloat16) == "cpu"
    assert choose_backend(cuda, plan=plan_of[64, 64], head_dim=64, dtype=torch.float16) == "triton"


def _choose_backend_as_on_cuda(device, *args):
    return choose_backend(torch.device("cuda"), *args)


@pytest.mark.parametrize("cpu_kernel", ["portable"], indirect=True)
@torch.no_grad()
def test_auto_s_warning_in_a_pipeline_call_names_the_line_that_made_the_call(cpu_kernel, monkeypatch):
    # On a GPU "auto" warns from deep inside the pipeline call when the Triton kernel does not take the config's
    # blocks: a fixed stacklevel named a line of diffsparse's runtime instead of the user's call.
    import diffsparse
    from diffsparse.kernels import attention
    from diffsparse.pipelines.tiny import tiny_wan_pipeline

    from helpers import tiny_call

    monkeypatch.setattr(attention, "triton_available", lambda device: (True, "Triton on a test GPU"))
    # The CPU tensors are taken for CUDA ones where the backend is chosen, by a stand-in that counts, as the frame
    # it replaces does, as one of diffsparse's (the `__name__` it is defined under).
    as_on_cuda = types.FunctionType(_choose_backend_as_on_cuda.__code__,
                                    {**globals(), "__name__": attention.__name__})
    monkeypatch.setattr(attention, "choose_backend", as_on_cuda)
    pipe = tiny_wan_pipeline()
    diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=0))
    call = tiny_call(num_inference_steps=1, num_frames=5, height=32, width=32, guidance_scale=1.0)
    line = sys._getframe().f_lineno + 2
    with pytest.warns(diffsparse.DiffsparseWarning, match="backend='auto' runs blocks of 16 x 16 tokens") as caught:
        pipe(**call)
    said = {(w.filename, w.lineno) for w in caught if "backend='auto' runs" in str(w.message)}
    assert said == {(__file__, line)}


def test_the_public_entry_point_tells_the_backend_chooser_the_dtype(monkeypatch):
    # Which dtype a call has decides whether the Triton kernel's tiles fit (float32 ones with a 128-token block and
    # head dims above 128 do not): block_sparse_attention must pass it on.
    from diffsparse.kernels import attention

    seen = []
    monkeypatch.setattr(attention, "choose_backend", lambda *args: seen.append(args) or "cpu")
    q, k, v = (x.half() for x in _inputs(1, 1, 64, 64))
    block_sparse_attention(q, k, v, make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 64, 64, 64))
    assert seen[0][4:] == (32, torch.float16)


def test_the_public_entry_point_tells_the_backend_chooser_about_gradients(monkeypatch):
    # On CUDA "auto" keeps inputs that need gradients off the Triton kernel, which has no backward pass, only if
    # block_sparse_attention says so: told False, it would send LoRA training there, to a "no backward pass" error.
    from diffsparse.kernels import attention

    seen = []
    monkeypatch.setattr(attention, "choose_backend", lambda *args: seen.append(args[2]) or "cpu")
    q, k, v = _inputs(1, 1, 64, 64)
    plan = make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 64, 64, 64)
    block_sparse_attention(q, k.requires_grad_(), v, plan)
    with torch.no_grad():
        block_sparse_attention(q, k, v, plan)
    block_sparse_attention(q, k.detach(), v, plan)
    assert seen == [True, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_inputs_whose_rows_are_not_laid_out_apart(dtype, cpu_kernel):
    # A sequence broadcast with `expand` (row stride 0) and one token whose row stride is anything: the compiled
    # kernel handed BLAS a leading dimension below D, which MKL refused ("Parameter 8 was incorrect"), and went on
    # with stale scores (error 2.7 against dense).
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 32, generator=g, dtype=dtype) for _ in range(3))
    cases = {
        "expanded keys and values": (q, k[:, :, :1].expand_as(k), v[:, :, :1].expand_as(v)),
        "one query with row stride 1": (torch.randn(1, 2, 32, 1, generator=g, dtype=dtype).transpose(2, 3), k, v),
        # The compiled op takes only a contiguous head dim: such inputs are copied, not refused.
        "a strided head dim": tuple(torch.randn(1, 2, 128, 64, generator=g, dtype=dtype)[..., ::2] for _ in range(3)),
    }
    for name, (qc, kc, vc) in cases.items():
        plan = make_plan(torch.ones(1, 1, -(-qc.shape[2] // 64), 2, dtype=torch.bool), qc.shape[2], 128, 64)
        out = block_sparse_attention(qc, kc, vc, plan, backend="cpu")
        expected = F.scaled_dot_product_attention(qc.float(), kc.float(), vc.float())
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-5 if dtype == torch.float32 else 2e-2,
                                   msg=name)


@pytest.mark.parametrize("shape", [(0, 2, 100, 32), (2, 0, 100, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_an_empty_batch_gives_an_empty_output(shape, dtype, cpu_kernel):
    q = torch.zeros(shape, dtype=dtype)
    plan = make_plan(torch.ones(1, 1, 2, 2, dtype=torch.bool), 100, 100, 64)
    out, lse = block_sparse_attention(q, q, q, plan, return_lse=True, backend="cpu")
    assert out.shape == shape and lse.shape == shape[:3] and lse.dtype == torch.float32


@pytest.mark.parametrize("block_size", [0, -16, (16,), (16, 16, 16), (16, 0), 1.5, True, "16"])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match=r"block_size must be .* got block_size="):
        make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 16, 16, block_size)


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(1, 1, 3, 3, dtype=torch.bool),  # wrong number of blocks
        torch.ones(4, 4, dtype=torch.bool),  # wrong ndim
        torch.ones(1, 1, 4, 4),  # wrong dtype
    ],
)
def test_bad_mask_names_expected_shape(mask):
    with pytest.raises(ValueError, match=r"\(B or 1, H or 1, 4, 4\)"):
        make_plan(mask, 64, 64, 16)


@pytest.mark.parametrize("shape", [(0, 1, 2, 2), (1, 0, 2, 2)])
def test_a_mask_without_batch_or_heads_is_a_value_error(shape):
    # The density then divides by zero blocks: a ZeroDivisionError that names nothing.
    match = rf"block_mask batch and head dims must be >= 1, got shape={re.escape(str(shape))}"
    with pytest.raises(ValueError, match=match):
        make_plan(torch.ones(shape, dtype=torch.bool), 64, 64, 32)


def test_bad_lengths():
    with pytest.raises(ValueError, match="q_len must be a positive int"):
        make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 0, 16, 16)


@pytest.mark.parametrize("integer", [np.int64, np.int32, torch.tensor], ids=["np.int64", "np.int32", "0-dim tensor"])
def test_lengths_and_block_sizes_take_any_integer(integer):
    # Lengths read off arrays and shapes come as numpy integers or 0-dim tensors; the plan holds Python ints.
    mask = torch.ones(1, 1, 3, 2, dtype=torch.bool)
    plan = make_plan(mask, integer(40), integer(30), (integer(16), integer(16)), q_offset=integer(0))
    assert [type(x) for x in (plan.q_len, plan.kv_len, plan.block_q, plan.block_k)] == [int] * 4
    assert (plan.q_len, plan.kv_len, plan.block_q, plan.block_k) == (40, 30, 16, 16)
    assert make_plan(torch.ones(1, 1, 3, 3, dtype=torch.bool), 40, 40, integer(16)).block_k == 16
    out = block_sparse_attention(*_inputs(1, 1, 40, 30), plan)
    assert out.shape == (1, 1, 40, 32)


@pytest.mark.parametrize(
    "field, value",
    [("q_len", np.bool_(True)), ("q_len", torch.tensor(True)), ("q_len", torch.tensor([40])), ("q_len", np.float64(40)),
     ("kv_len", torch.tensor(30.0)), ("block_size", torch.tensor(True)), ("block_size", (np.bool_(True), 16)),
     ("q_offset", torch.tensor(True))],
)
def test_integer_arguments_refuse_bools_floats_and_arrays(field, value):
    arguments = {"q_len": 40, "kv_len": 30, "block_size": 16, "q_offset": 0, field: value}
    with pytest.raises(ValueError, match=rf"{field} must be .* got {field}="):
        make_plan(torch.ones(1, 1, 3, 2, dtype=torch.bool), **arguments)


def test_bad_attention_inputs():
    plan = make_plan(torch.ones(1, 2, 2, 2, dtype=torch.bool), 64, 64, 32)
    q, k, v = _inputs(1, 2, 64, 64)
    bad = [
        ("must be a \\(B, H, N, D\\) tensor", (q[0], k, v, plan)),
        ("share batch, heads and head_dim", (q, k[..., :16], v, plan)),
        ("share batch, heads and head_dim", (q, torch.cat([k, k], 1), v, plan)),
        ("k and v must have the same length", (q, k, v[:, :, :32], plan)),
        ("share one dtype", (q, k.half(), v, plan)),
        ("on one device", (q, k.to("meta"), v, plan)),
        ("share one dtype out of", (q.double(), k.double(), v.double(), plan)),
        ("must match the plan's", (q[:, :, :32], k, v, plan)),
        # Fewer keys in as many key blocks: the compiled kernel attended the keys given, the torch-ops path the plan's.
        ("must match the plan's", (q, k[:, :, :48], v[:, :, :48], plan)),
        ("1 or equal to q's", (*_inputs(1, 3, 64, 64), plan)),
    ]
    for message, args in bad:
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(*args)


@pytest.mark.parametrize("scale", ["abc", float("nan"), float("inf"), True, torch.tensor([0.5]), 0.5j], ids=repr)
def test_bad_scale_names_the_field(scale):
    # A NaN scale gave finite numbers in the compiled kernel and NaN elsewhere; "abc" failed in float(); True ran as 1.
    plan = make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 32, 32, 32)
    with pytest.raises(ValueError, match=r"scale must be None \(1 / sqrt\(head_dim\)\) or a finite real number, got "):
        block_sparse_attention(*_inputs(1, 1, 32, 32), plan, scale=scale)


def test_any_finite_scale_is_taken_as_sdpa_takes_it():
    plan = make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 32, 32, 32)
    q, k, v = _inputs(1, 2, 32, 32)
    for scale in (-0.3, 0, torch.tensor(0.25)):
        out = block_sparse_attention(q, k, v, plan, scale=scale, backend="cpu")
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=float(scale)), rtol=0, atol=2e-5)


def test_head_dim_zero_is_a_value_error():
    q = torch.zeros(1, 1, 32, 0)
    with pytest.raises(ValueError, match=r"head_dim \(q.shape\[3\]\) must be >= 1, got .*\(1, 1, 32, 0\)"):
        block_sparse_attention(q, q, q, make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 32, 32, 32))


def _hand_built(**fields):
    """make_plan's 2-query-block, 3-key-block plan with some fields replaced, built through the constructor."""
    plan = make_plan(torch.tensor([[[[True, False, True], [False, False, False]]]]), 64, 96, 32)
    kwargs = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.init}
    return BlockSparsePlan(**{**kwargs, **fields})


def test_a_plan_built_by_hand_is_checked():
    # Out-of-range key blocks made oneMKL print an error and the output NaN, an empty row gave NaN and an LSE of -inf,
    # with no exception: a plan not from make_plan is held to its block_mask.
    good = _hand_built()
    assert good.kv_indices.tolist() == [[[[0, 2, 2], [1, 1, 1]]]]
    q, k, v = _inputs(1, 1, 64, 96)
    reference = block_sparse_attention(q, k, v, good, backend="reference")
    torch.testing.assert_close(block_sparse_attention(q, k, v, good), reference, rtol=0, atol=2e-5)
    bad = [
        ({"kv_indices": torch.tensor([[[[0, 3, 3], [1, 1, 1]]]], dtype=torch.int32)},
         r"kv_indices\[0, 0, 0\] must be \[0, 2, 2\].* got \[0, 3, 3\]"),
        ({"kv_indices": torch.tensor([[[[2, 0, 2], [1, 1, 1]]]], dtype=torch.int32)},
         r"kv_indices\[0, 0, 0\].*ascending"),
        ({"kv_counts": torch.tensor([[[2, 0]]], dtype=torch.int32)}, r"kv_counts\[0, 0, 1\] must be 1.* got 0"),
        ({"block_mask": torch.tensor([[[[True, False, True], [False] * 3]]])},
         r"none in BlockSparsePlan.block_mask\[0, 0, 1\]"),
        ({"kv_counts": torch.tensor([[[2, 1]]])}, r"kv_counts must be an int32 tensor of shape \(1, 1, 2\).*int64"),
        ({"kv_indices": torch.zeros(1, 1, 2, 2, dtype=torch.int32)},
         r"kv_indices must be an int32 tensor of shape \(1, 1, 2, 3\)"),
        ({"block_mask": torch.ones(1, 1, 2, 2, dtype=torch.bool)},
         r"block_mask must be a bool tensor of shape \(B or 1, H or 1, 2, 3\)"),
        ({"block_k": True}, r"block_k must be a positive int, got block_k=True"),
        # The block counts divide by these (a ZeroDivisionError), and a float passed the shape check (2.0 == 2).
        ({"block_q": 0}, r"block_q must be a positive int, got block_q=0"),
        ({"q_len": 64.0}, r"q_len must be a positive int, got q_len=64.0"),
        ({"density": float("nan")}, r"density must be a real number in \[0, 1\], got density=nan"),
        ({"density": 1.5}, r"density must be a real number in \[0, 1\], got density=1.5"),
        ({"density": -0.1}, r"density must be a real number in \[0, 1\], got density=-0.1"),
        # Every later check holds vacuously on an empty plan: this is the only one that refuses it.
        ({"block_mask": torch.ones(1, 0, 2, 3, dtype=torch.bool), "kv_indices": torch.zeros(1, 0, 2, 3).int(),
          "kv_counts": torch.zeros(1, 0, 2).int()},
         r"block_mask batch and head dims must be >= 1, got shape=\(1, 0, 2, 3\)"),
        # The kernels read the index tensors next to the mask; compared across devices they raise a RuntimeError.
        ({"kv_counts": torch.tensor([[[2, 1]]], dtype=torch.int32, device="meta")},
         r"kv_counts must be on block_mask's device cpu, got meta"),
        ({"kv_indices": torch.tensor([[[[0, 2, 2], [1, 1, 1]]]], dtype=torch.int32, device="meta")},
         r"kv_indices must be on block_mask's device cpu, got meta"),
    ]
    for fields, match in bad:
        with pytest.raises(ValueError, match=match):
            _hand_built(**fields)
    with pytest.raises(ValueError, match=r"kv_counts\[0, 0, 1\] must be 1"):
        dataclasses.replace(good, kv_counts=torch.tensor([[[2, 0]]], dtype=torch.int32))
    # The density is reported as the plan's work (bench's efficiency, stats): a hand-set one passed before.
    kept_share = r"density must be 0.5, the share of blocks block_mask keeps, got density="
    with pytest.raises(ValueError, match=kept_share + "0.01"):
        dataclasses.replace(good, density=0.01)
    with pytest.raises(ValueError, match=r"density must be 0.5, .* got density=0.501"):
        dataclasses.replace(good, density=0.501)
    # Counted in float32, as a hand-built plan may: 1e-8 off, accepted.
    mask = torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(0)) < 0.5
    plan = make_plan(mask, 7 * 32, 9 * 32, 32)
    assert dataclasses.replace(plan, density=plan.block_mask.float().mean().item()).block_mask is plan.block_mask


def test_the_reference_backend_takes_a_block_longer_than_the_sequence():
    # Its token mask was the block mask repeated, then cropped: blocks-squared memory, a terabyte for this block.
    q, k, v = _inputs(1, 2, 256, 256)
    plan = make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 256, 256, 2**20)
    reference = block_sparse_attention(q, k, v, plan, backend="reference")
    torch.testing.assert_close(reference, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_grouped_query_inputs_are_refused_with_the_repeat_to_make():
    # The entry point reads like scaled_dot_product_attention, whose enable_gqa this kernel does not have.
    q, k, v = _inputs(1, 4, 32, 32)
    plan = make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 32, 32, 32)
    with pytest.raises(ValueError, match=r"q, k, v must share batch, heads and head_dim.*repeat_interleave"):
        block_sparse_attention(q, k[:, :2], v[:, :2], plan)


def test_wrong_python_types_raise_type_error():
    with pytest.raises(TypeError, match="plan must be a BlockSparsePlan"):
        block_sparse_attention(*_inputs(1, 1, 32, 32), "plan")
    with pytest.raises(
        TypeError, match=r"block_mask must be a bool torch.Tensor of shape \(B or 1, H or 1, 2, 2\)"
    ):
        make_plan([[True]], 32, 32, 16)


def test_public_names():
    assert set(BACKENDS) >= {"cpu", "reference"}
    assert dataclasses.is_dataclass(BlockSparsePlan)


def test_long_rows_span_several_key_tiles():
    # The compiled kernel multiplies at most max(512, block_k) keys at a time (kKeyTile in csrc/block_sparse_cpu.cpp)
    # and rescales its running softmax between these tiles; a kernel that skipped the rescale was off by up to 0.2
    # on these cases and passed every other one.
    for name in LONG_ROWS:
        plan, (_, k, _), _ = _case(name)
        starts = torch.arange(0, k.shape[2], plan.block_k)
        keys = plan.block_mask.long() @ (starts + plan.block_k).clamp(max=k.shape[2]).sub(starts)
        assert keys.max() > max(512, plan.block_k) + plan.block_k, name


def test_each_build_of_the_kernel_has_a_folder_of_its_own(tmp_path, monkeypatch):
    # Under one fixed name every install shared one build folder: two at different paths rebuilt it in turn (25-40 s
    # each), and hosts sharing a home directory loaded each other's -march=native builds.
    name = cpu_native._extension_name
    source, moved = tmp_path / "a.cpp", tmp_path / "b" / "a.cpp"
    moved.parent.mkdir()
    for path in (source, moved):
        shutil.copyfile(cpu_native.SOURCE, path)
    cflags, ldflags = ["-O3", "-fopenmp"], ["-fopenmp"]
    first = name(source, cflags, ldflags)
    assert re.fullmatch(r"diffsparse_cpu_[0-9a-f]{12}", first)
    assert name(source, list(cflags), tuple(ldflags)) == first
    others = {
        "another path": name(moved, cflags, ldflags),
        "other flags": name(source, [*cflags, "-march=native"], ldflags),
        "other link flags": name(source, cflags, []),
    }
    with monkeypatch.context() as patch:
        patch.setattr(cpu_native, "_cpu_model", lambda: "another CPU")
        others["another CPU"] = name(source, cflags, ldflags)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "0.0.0")
        others["another torch"] = name(source, cflags, ldflags)
    with monkeypatch.context() as patch:
        patch.setenv("CXX", "clang++")
        others["another compiler"] = name(source, cflags, ldflags)
    source.write_bytes(source.read_bytes() + b"\n")
    others["an edited source"] = name(source, cflags, ldflags)
    assert len({first, *others.values()}) == 1 + len(others), others


def test_runs_of_identical_rows_are_merged_correctly():
    # "Frames" of two query blocks share their key blocks, so the cpu backend merges them into one segment.
    nq, block, n = 8, 16, 8 * 16 - 5
    frame = torch.arange(nq) // 2
    mask = (frame[:, None] == frame[None, :]) | (frame[None, :] == 0)
    plan = make_plan(mask[None, None], n, n, block)
    q, k, v = _inputs(2, 2, n, n)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="cpu")
    ref_out, ref_lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-5)


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)], ids=["qkv", "q", "k", "v"])
def test_gradients_match_reference(needs):
    # Through the output and the LSE (the cpu backend's LSE was detached: no gradient at all), with all of q, k, v
    # needing gradients or one alone: the LSE is differentiable where k alone needs a gradient too (asked of q alone,
    # it was the flash op's LSE there, which carries no gradient).
    plan, (q, k, v), _ = _case("batch-1 broadcast, q != kv")
    grads = {backend: _with_grads(backend, plan, q, k, v, needs=needs)[2] for backend in CPU_BACKENDS}
    for got, want, need in zip(grads["cpu"], grads["reference"], needs):
        assert (got is not None) == need
        if need:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("flash_op", [True, False])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_merged_over_disjoint_keys_differentiates_as_dense(backend, flash_op, monkeypatch):
    # pipelines.base.merge_attention weights two calls' outputs by their LSEs (Chroma's masked prompt padding,
    # Wan-Animate-2): training through it needs the LSE's gradient. The cpu backend's LSE was detached, and the
    # merge's gradients came out 0.3 off with nothing said.
    from diffsparse.pipelines.base import merge_attention

    if not flash_op:  # the branch other devices take
        monkeypatch.setattr(cpu_backend, "_FLASH_CPU", None)
    q, k, v = (x.requires_grad_() for x in _inputs(2, 2, 70, 157, head_dim=16))
    split, block, scale = 100, 32, 0.3
    parts = []
    for keys in (slice(0, split), slice(split, None)):
        kv_len = k[:, :, keys].shape[2]
        blocks = (math.ceil(70 / block), math.ceil(kv_len / block))
        plan = make_plan(torch.ones(1, 1, *blocks, dtype=torch.bool), 70, kv_len, block)
        out, lse = block_sparse_attention(q, k[:, :, keys], v[:, :, keys], plan, return_lse=True, backend=backend,
                                          scale=scale)
        parts += [out, lse.unsqueeze(-1)]
    merged = merge_attention(*parts)
    dense = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(merged, dense, rtol=0, atol=1e-5)
    out_grad = torch.randn(dense.shape, generator=torch.Generator().manual_seed(3))
    grads = (torch.autograd.grad(x, (q, k, v), out_grad) for x in (merged, dense))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_inputs_that_need_gradients_never_take_the_triton_kernel(monkeypatch):
    # The Triton kernel has no backward pass: its output would carry no gradient, so training through it (a LoRA)
    # would silently skip the attention. On CUDA, auto takes the differentiable torch-ops path for such inputs, and
    # the kernel refuses them.
    import sys

    from diffsparse.kernels.triton_block_sparse import triton_block_sparse_attention

    monkeypatch.setattr(sys.modules[choose_backend.__module__], "triton_available", lambda device: (True, ""))
    assert choose_backend("cuda", "auto") == "triton"
    assert choose_backend("cuda", "auto", needs_grad=True) == "cpu"
    q, k, v = torch.randn(3, 1, 2, 128, 32).unbind(0)
    plan = make_plan(torch.ones(1, 1, 2, 2, dtype=torch.bool), 128, 128, block_size=64)
    with pytest.raises(ValueError, match="no backward pass"):
        triton_block_sparse_attention(q.requires_grad_(), k, v, plan)


def test_choose_backend_explains_triton():
    assert choose_backend("cpu", "auto") == "cpu"
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(ValueError, match="triton.*CUDA"):
            choose_backend("cpu", "triton")
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend("cpu", "flash")


def test_compiled_cpu_kernel_builds_and_runs(cpu_kernel):
    """The fast path must not vanish silently: where a compiler is present it builds, and it is what runs."""
    if cpu_kernel == "portable":
        assert cpu_native.forward_op() is None
        return
    op = cpu_native.forward_op()  # raises with the build error in "native" mode
    assert op is not None
    name = cpu_native._extension_name(cpu_native.SOURCE, cpu_native._build_flags(), cpu_native.LDFLAGS)
    assert f"{name}.so" in {Path(path).name for path in torch.ops.loaded_libraries}
    plan, (q, k, v), (ref_out, ref_lse) = _case("per-head, ragged")
    out, lse = op(q, k, v, plan.kv_indices, plan.kv_counts, plan.block_q, plan.block_k, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-5)


@pytest.mark.parametrize("cpu_kernel", ["native"], indirect=True)
def test_the_compiled_op_refuses_a_call_it_would_index_out_of_bounds(cpu_kernel):
    # torch.ops.diffsparse_cpu.forward is callable without block_sparse_attention's checks; before, each call
    # below read or wrote outside its tensors (or returned garbage) instead of failing.
    op = cpu_native.forward_op()
    q, k, v = _inputs(1, 2, 40, 40, head_dim=8)
    plan = make_plan(torch.ones(1, 1, 3, 3, dtype=torch.bool), 40, 40, 16)
    indices, counts = plan.kv_indices, plan.kv_counts
    torch.testing.assert_close(op(q, k, v, indices, counts, 16, 16, 0.5)[0], F.scaled_dot_product_attention(
        q, k, v, scale=0.5), rtol=0, atol=2e-5)
    bad_calls = {
        "kv_indices must be in": (q, k, v, indices + 3, counts, 16, 16),
        "kv_counts must be in [1, 3], got 4": (q, k, v, indices, counts + 1, 16, 16),
        "kv_counts must be in [1, 3], got 0": (q, k, v, indices, counts * 0, 16, 16),  # before: NaN rows, lse -inf
        "does not cover 40 queries x 40 keys in blocks of 8 x 8": (q, k, v, indices, counts, 8, 8),
        "k and v must have one length": (q, k, v[:, :, :30], indices, counts, 16, 16),
        "must agree in B, H and D": (q, k[:, :1], v[:, :1], indices, counts, 16, 16),
        "must share a dtype": (q, k.bfloat16(), v, indices, counts, 16, 16),
        "plan batch and heads must be 1 or the inputs'": (q, k, v, indices.expand(1, 3, 3, 3).contiguous(),
                                                         counts.expand(1, 3, 3).contiguous(), 16, 16),
        "kv_counts its first three": (q, k, v, indices, counts[..., :2].contiguous(), 16, 16),
        "block sizes must be >= 1": (q, k, v, indices, counts, 0, 16),
        "token stride must be >= head dim": (q, k[:, :, :1].expand(-1, -1, 40, -1), v, indices, counts, 16, 16),
    }
    for message, args in bad_calls.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            op(*args, 0.5)


@pytest.mark.parametrize("block_size", [(10**6, 10**6), (10**6, 64), (64, 10**6)])
def test_a_block_longer_than_the_sequence_is_the_sequence(block_size, cpu_kernel, monkeypatch):
    # One block over the whole sequence is dense attention; the compiled kernel sized its scratch by the block
    # (`--block-size 100000` on 320 tokens: std::bad_alloc asking for 40 GB), and the torch-ops path padded the
    # sequence to the block (1.5 GB for the first case).
    q, k, v = _inputs(1, 2, 320, 320)
    nq, nk = (-(-320 // size) for size in block_size)
    plan = make_plan(torch.ones(1, 1, nq, nk, dtype=torch.bool), 320, 320, block_size)
    # Checked on the sizes themselves: the outputs below agree either way where memory allows the huge scratch.
    assert cpu_backend._block_sizes(plan) == tuple(320 if size == 10**6 else size for size in block_size)
    padded_to = []
    as_blocks = cpu_backend._as_blocks
    monkeypatch.setattr(cpu_backend, "_as_blocks", lambda x, n, b: padded_to.append(n * b) or as_blocks(x, n, b))
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="cpu")
    # q, k and v blocked by the torch-ops path (not at all by the compiled kernel), none past the sequence.
    assert padded_to == ([] if cpu_kernel == "native" else [320] * 3)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=0, atol=2e-5)


def test_bad_cpu_kernel_mode(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"DIFFSPARSE_CPU_KERNEL must be one of .*'fast'"):
        block_sparse_attention(*_inputs(1, 1, 32, 32), make_plan(torch.ones(1, 1, 1, 1, dtype=torch.bool), 32, 32, 32))


def test_unbuildable_kernel_falls_back_with_a_warning_or_raises(monkeypatch, caplog):
    monkeypatch.setattr(cpu_native, "_load", lambda: (None, "OSError: no compiler"))
    monkeypatch.setenv(cpu_native.ENV_VAR, "auto")
    cpu_native._warn_once.cache_clear()
    plan, (q, k, v), (ref_out, _) = _case("per-head, ragged")
    with caplog.at_level("WARNING", logger=cpu_native.__name__):
        out = block_sparse_attention(q, k, v, plan, backend="cpu")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)
    assert "compiled CPU kernel is unavailable (OSError: no compiler)" in caplog.text
    monkeypatch.setenv(cpu_native.ENV_VAR, "native")
    with pytest.raises(RuntimeError, match="could not be built: OSError: no compiler"):
        block_sparse_attention(q, k, v, plan, backend="cpu")


def test_pip_installed_ninja_is_put_on_path(monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(cpu_native.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    cpu_native._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
