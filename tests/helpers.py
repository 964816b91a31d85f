"""Shared test helpers."""

import contextlib
import copy
import weakref

import numpy as np
import pytest
import torch


def tiny_call(seed=0, **kwargs):
    """The keyword arguments of a short, small call of the tiny pipeline; `kwargs` override them."""
    call = {
        "prompt": "a red circle moving left",
        "negative_prompt": "low quality",
        "num_frames": 17,
        "height": 64,
        "width": 96,
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "output_type": "pt",
        "max_sequence_length": 16,
        "generator": torch.Generator().manual_seed(seed),
    }
    call.update(kwargs)
    return call


def generate(pipe, seed=0, **kwargs):
    """A short, small video from the tiny pipeline as a float32 tensor (F, C, H, W) or (B, F, C, H, W)."""
    return pipe(**tiny_call(seed, **kwargs)).frames


def reordered_reference(pattern, layout, order):
    """The definition: the frame-major token mask, permuted on both axes by `order` (None: as is)."""
    tokens = pattern.token_mask(layout)
    if order is None:
        return tokens
    perm = order.permutation(layout)
    return tokens[:, perm][:, :, perm]


def two_prompts_keeping_as_many_text_tokens():
    """`(layout, q, k, v, kept)`: `(2, S, 2 heads, 16)` tensors of two videos of `[8 text, 2 x 8 x 8 image]` tokens
    whose prompt masks keep as many text tokens (0-3 and 4-7, `kept[video]` its kept token indices), so their groups
    (`attend_kept_tokens`, `attend_video_queries`) attend on one layout; the second video's queries and keys are
    scaled apart, so a fit or a correction's statistics made on one video is wrong for the other."""
    from diffsparse.patterns import VideoLayout

    layout = VideoLayout(2, 8, 8, text_len=8, text_position="start")
    n = layout.num_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, n, 2, 16, generator=g).unbind(0)
    q[1] *= 6
    k[1] = 3 * torch.randn(n, 2, 16, generator=g)
    image = torch.arange(8, n)
    kept = [torch.cat([torch.arange(4), image]), torch.cat([torch.arange(4, 8), image])]
    return layout, q, k, v, kept


def check_block_masks_reduce_token_masks(pattern, layouts, order, block_sizes):
    """Every block mask of `pattern` equals `reduce_token_mask` of its (reordered) token mask."""
    from diffsparse.patterns import as_pair, reduce_token_mask

    for layout in layouts:
        reference = reordered_reference(pattern, layout, order)
        assert torch.equal(reference, pattern.token_mask(layout, order))
        n = layout.num_tokens
        for block_size in block_sizes:
            bq, bk = as_pair(block_size)
            block = pattern.block_mask(layout, block_size, order)
            assert block.dtype == torch.bool and block.shape == (pattern.num_heads, -(-n // bq), -(-n // bk))
            assert torch.equal(block, reduce_token_mask(reference, block_size)), (layout, block_size)


@contextlib.contextmanager
def recorded_attention_calls():
    """Every sparse-path `SparseRuntime.attention` call made inside, as `(layer, layout, (batch, tokens))`, the
    layout being the one the call ran on (the transformer call's own unless the adapter passed one)."""
    from diffsparse.runtime import SparseRuntime

    calls = []
    attention = SparseRuntime.attention

    def record(self, layer, query, key, value, layout=None, **kwargs):
        calls.append((layer, layout or self.call_layout(), tuple(query.shape[:2])))
        return attention(self, layer, query, key, value, layout=layout, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SparseRuntime, "attention", record)
        yield calls


@contextlib.contextmanager
def masked_attention_calls(attention: torch.nn.Module, name: str, mask: torch.Tensor):
    """Inside, each call of `attention` gets `mask` as its keyword `name`, as a caller's own block may pass one (the
    diffusers blocks pass none); yields the list of each call's `(args, kwargs, output)`."""
    seen = []

    def masked(module, args, kwargs):
        return args, {**kwargs, name: mask}

    hooks = [attention.register_forward_pre_hook(masked, with_kwargs=True),
             attention.register_forward_hook(lambda module, args, kwargs, out: seen.append((args, kwargs, out)),
                                             with_kwargs=True)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _self_attention_layers(transformer) -> list[int]:
    """The layer indices of `transformer`'s self-attentions that diffsparse makes sparse."""
    from diffsparse.pipelines import adapter_for

    return [layer for layer, _ in adapter_for(transformer).self_attention_modules(transformer)]


def run_transformer(model, inputs, config=None, **kwargs) -> torch.Tensor:
    """`model(**inputs(**kwargs)).sample` without gradients; under `config` (applied for the call, then removed)
    when one is given."""
    import diffsparse

    with torch.no_grad():
        if config is None:
            return model(**inputs(**kwargs)).sample
        with diffsparse.sparse(model, config):
            return model(**inputs(**kwargs)).sample


class _SpatialNorm(torch.nn.Module):
    """Stands for `Attention(spatial_norm_dim=...)`'s norm, which the processor calls with the block's `temb`."""

    def forward(self, hidden_states, temb):
        return 0.5 * hidden_states + 1.0


def check_a_normalised_self_attention_runs_the_original(model, inputs, config, norm: str, attentions) -> None:
    """With `norm` ("group_norm": over 2 channel groups, or "spatial_norm") set on each of `attentions` (`model`'s
    self-attention modules), which the sparse paths do not apply, every call runs the original processor: the
    output `model(**inputs())` gives without diffsparse, each layer counted dense, a warning saying why. The models'
    own blocks build none; one set here stands for a model that has one."""
    import diffsparse

    plain = run_transformer(model, inputs)
    for attention in attentions:
        channels = attention.to_q.in_features
        setattr(attention, norm, torch.nn.GroupNorm(2, channels) if norm == "group_norm" else _SpatialNorm())
    reference = run_transformer(model, inputs)
    assert not torch.allclose(reference, plain, atol=1e-3)  # the norm reaches the output: the test sees it
    with torch.no_grad(), diffsparse.sparse(model, config) as handle:
        with pytest.warns(diffsparse.DiffsparseWarning, match="a group or spatial norm of their input"):
            out = model(**inputs()).sample
        layers = handle.stats().layers
    assert layers and not any(s.sparse_calls for s in layers) and all(s.dense_calls for s in layers)
    assert torch.equal(out, reference)


def _block_mask_reference(runtime, record, layout, query, key, value) -> torch.Tensor | None:
    """Dense attention of `query, key, value` (`(B, S, H, D)`, the layout's token order, as an observer gets them)
    under the runtime's static pattern's block mask on `layout` (the pattern as solved for the layout under
    `SparseConfig.density`; the rows of frames in their dense steps whole) expanded to tokens and taken back from the
    kernel's token order: what a sparse call must compute, by the pattern's definition. `None` for a call the mask
    alone does not define (a fitted pattern, a causal frame-group mask, a layout solved more than one way, a
    correction's residual added)."""
    from diffsparse.patterns import DenseQueryFrames

    config, state = runtime.config, runtime._state()
    if runtime._fits or state.frame_causal or config.correction is not None:
        return None
    order = config.layer_order(record.layer)
    bq, bk = config.block_sizes
    n = layout.num_tokens
    start = n - query.shape[1]  # `video_queries`: the rows after the text, in query blocks from there
    pattern = runtime.pattern
    if config.density is not None:  # solved per (layout, order, rows, pairs outside): the one for this call
        solved = {p for (_, lay, solved_order, rows, _), p in runtime._solved.items()
                  if (lay, solved_order, rows) == (layout, order, start)}
        if len(solved) != 1:
            return None
        (pattern,) = solved
    rows = (start, n) if start else None
    blocks = pattern.block_mask(layout, (bq, bk), order, q_tokens=rows)
    if blocks.shape[0] not in (1, query.shape[2]):  # a mask per head of the model, on some of its heads
        return None
    if state.dense_frames:
        blocks = blocks | DenseQueryFrames(state.dense_frames).block_mask(layout, (bq, bk), order, q_tokens=rows)
    tokens = blocks.repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, : n - start, :n]
    inverse = order.inverse(layout)
    tokens = tokens[:, inverse[start:] - start][:, :, inverse]
    q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tokens.unsqueeze(0)).transpose(1, 2)


@contextlib.contextmanager
def checked_block_mask_calls():
    """Inside, every sparse call of a runtime is compared with dense attention under its pattern's block mask on the
    call's layout (`_block_mask_reference`): a runtime that planned on the wrong layout, kernel token order or rows
    computes other attention and fails, where an output-level check of a sparse config only sees that the output
    changed. The tensors are taken as the runtime hands them to its observers, after an adapter's own `token_order`:
    that order is the adapter's tests' to check. Yields the `(layer, layout)` of the calls checked."""
    from diffsparse.runtime import SparseRuntime

    checked, observed = [], weakref.WeakSet()  # by identity of the live runtimes: an id could be reused
    with recorded_attention_calls() as calls, pytest.MonkeyPatch.context() as patch:
        def observer(runtime):
            def observe(record, query, key, value, out, causal_groups=None):
                if not active or causal_groups is not None or not record.sparse:
                    return
                layout = calls[-1][1]  # this call's: the recorder logs it before the call runs
                expected = _block_mask_reference(runtime, record, layout, query, key, value)
                if expected is not None:
                    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=0,
                                               msg=lambda m: f"layer {record.layer} on {layout}: {m}")
                    checked.append((record.layer, layout))

            return observe

        recording = SparseRuntime.attention

        def attention(self, *args, **kwargs):
            if self not in observed:  # the runtimes are made by `apply`: each is observed from its first call
                observed.add(self)
                self.add_observer(observer(self))
            return recording(self, *args, **kwargs)

        active = True
        patch.setattr(SparseRuntime, "attention", attention)
        try:
            yield checked
        finally:
            active = False  # a runtime that outlives the block keeps the observer: it must not check then


def check_against_dense(model, inputs, block_size: int, order=None, sparse=None, select=None):
    """`read_call` reads `inputs()` by position as by keyword (`check_read_call_by_position`); `pattern="dense"`
    gives `model(**inputs())` bit for bit; every block kept through the sparse kernel (tokens in
    `order`) gives it within 1e-4, and in bfloat16 gives it in the bfloat16 model's dtype and about as closely
    as the bfloat16 model does (its error at most 1.25x the dense model's; each call's at most 2x SDPA's in bfloat16 on
    the same inputs), every self-attention layer through the sparse path; `sparse`, a config (default: a window of
    one frame and one token), changes it (attention reaches the output, so the first checks could fail), each of its
    calls that its pattern's block mask defines computing exactly that masked attention (`checked_block_mask_calls`;
    under the default, some call of every self-attention layer).
    `select`: a function of the output's `sample` giving the tensor the sparse path is compared on (default: the
    `sample` itself; the dense pattern is compared on all of it), for models whose `sample` is a list or holds rows
    the caller never reads. Returns the recorded sparse-path calls of the float32 every-block run
    (`recorded_attention_calls`) for the family's own checks of its layouts."""
    import diffsparse
    from diffsparse.patterns import Window3D

    def run(model, inputs, config=None):
        out = run_transformer(model, inputs, config)
        return out if select is None else select(out)

    def identical(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))

    check_read_call_by_position(model, inputs())
    whole = run_transformer(model, inputs)
    assert identical(run_transformer(model, inputs, diffsparse.SparseConfig(pattern="dense", dense_steps=0)), whole)
    reference = whole if select is None else select(whole)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=block_size, dense_steps=0,
                                          order=order)
    with recorded_attention_calls() as calls:
        kept = run(model, inputs, every_block)
    assert calls, "no call went through the sparse path: the comparisons below would hold whatever it computes"
    # Every self-attention layer through the sparse path: a layer that silently ran the original would pass the rest.
    assert {layer for layer, _, _ in calls} == set(_self_attention_layers(model))
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    # Real checkpoints run in bfloat16: the sparse path keeps the model's dtype and its precision (the compiled CPU
    # kernel's bfloat16 path). Against float32 the dense model's own error in bfloat16 is the yardstick.
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name, module in model_bf16.named_modules():  # as `from_pretrained(torch_dtype=...)` keeps them
        if set(name.split(".")) & set(getattr(model, "_keep_in_fp32_modules", None) or ()):
            module.float()

    def bf16(value):
        if isinstance(value, torch.Tensor):
            return value.to(torch.bfloat16) if value.is_floating_point() else value
        if isinstance(value, (list, tuple)):
            return type(value)(bf16(item) for item in value)
        if isinstance(value, dict):
            return {name: bf16(item) for name, item in value.items()}
        return value

    def inputs_bf16(**kwargs):
        return bf16(inputs(**kwargs))

    reference_bf16 = run(model_bf16, inputs_bf16)
    errors = []

    def bf16_error(record, query, key, value, out, causal_groups=None):
        # Each call against exact attention of its own bfloat16 inputs, beside SDPA's bfloat16 error on them: the
        # model-level bound alone let a bfloat16-only attention error of 10% through.
        if causal_groups is None:
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))
            exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            errors.append(tuple(float((x.double() - exact).norm() / exact.norm()) for x in (out.transpose(1, 2), sdpa)))

    with (torch.no_grad(), diffsparse.sparse(model_bf16, every_block) as handle,
          recorded_attention_calls() as calls_bf16):
        for runtime in handle.runtimes.values():
            runtime.add_observer(bf16_error)
        kept_bf16 = model_bf16(**inputs_bf16()).sample
        kept_bf16 = kept_bf16 if select is None else select(kept_bf16)
    # Else a bfloat16 path that silently ran dense would match the dense bfloat16 error and pass.
    assert len(calls_bf16) == len(calls), (len(calls_bf16), len(calls))
    assert errors and all(kernel <= max(2 * sdpa, 4e-3) for kernel, sdpa in errors), errors
    assert kept_bf16.dtype == reference_bf16.dtype
    dense_error, sparse_error = ((out.float() - reference).norm() for out in (reference_bf16, kept_bf16))
    assert sparse_error <= 1.25 * dense_error, (sparse_error, dense_error)
    default = sparse is None
    if default:
        sparse = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=block_size, dense_steps=0,
                                         order=order)
    with checked_block_mask_calls() as checked:
        out = run(model, inputs, sparse)
    assert not torch.allclose(out, reference, atol=1e-4)
    if default:
        assert {layer for layer, _ in checked} == set(_self_attention_layers(model)), checked
    return calls


def check_steps_of_a_scheduler_trained_on_other_timesteps(pipe, call: dict, steps: int = 4):
    """For a pipeline passing `t / scheduler.config.num_train_timesteps` (Lumina2, PRX): with a scheduler of 500
    training timesteps, every call is on its step, without a `StepScheduleWarning` (a fixed 1000 read 500 as 1000:
    off the grid, the schedule not followed)."""
    import warnings

    import diffsparse
    from diffsparse.runtime import StepScheduleWarning

    scheduler = pipe.scheduler
    pipe.scheduler = type(scheduler).from_config(scheduler.config, num_train_timesteps=500)
    config = diffsparse.SparseConfig(block_size=16, dense_steps=1)
    try:
        with warnings.catch_warnings(), torch.no_grad(), diffsparse.sparse(pipe, config) as handle:
            warnings.simplefilter("error", StepScheduleWarning)
            pipe(**{**call, "num_inference_steps": steps}, generator=torch.Generator().manual_seed(0))
            calls = handle.stats().calls["transformer"]
    finally:
        pipe.scheduler = scheduler
    assert sorted({record.step for record in calls}) == list(range(steps))


def check_read_call_by_position(transformer, call: dict):
    """The adapter's `read_call` gives the same layout, timestep and token order when `call`'s arguments come by
    position, in `forward`'s order (omitted ones as their defaults), as by keyword: pipelines pass them by keyword,
    so a wrong position index would only show on a user's direct call."""
    import inspect

    from diffsparse.pipelines import adapter_for

    parameters = list(inspect.signature(transformer.forward).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    last = max(i for i, p in enumerate(positional) if p.name in call)
    args = tuple(call.get(p.name, p.default) for p in positional[: last + 1])
    rest = {name: value for name, value in call.items() if name not in {p.name for p in positional}}
    adapter = adapter_for(transformer)
    by_keyword, by_position = adapter.read_call(transformer, (), call), adapter.read_call(transformer, args, rest)
    assert len(by_position) == len(by_keyword) and by_position[0] == by_keyword[0]
    for got, want in zip(by_position[1:], by_keyword[1:]):  # the timestep, and a token order where there is one
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want


def check_video_token_positions(model, inputs, grid, patch, block_size: int = 8, axes: str = "CTHW") -> None:
    """Adding to one latent pixel `(f, y, x)` of the batch-1 `inputs()["hidden_states"]` `(1, C, T, H, W)` changes
    layer 0's query (in the layout's order, the adapter's token order applied) of exactly one token: the video token
    `video_start + ((f // p_t) * H + y // p_h) * W + x // p_w`, of a layout whose grid is `grid` `(F, H, W)`, the
    patch `(p_t, p_h, p_w)`. With F, H and W all different, a layout of swapped axes, or tokens in another order,
    fails it (a shape check cannot: the token count is the same). Layer 0's queries come before its attention, so
    the pattern (a small window) does not matter. `axes`: the latents' axes after the batch, for models whose
    latents are not `(B, C, T, H, W)` (CogVideoX and AnyFlow: `"TCHW"`, Kandinsky: `"THWC"`)."""
    import diffsparse
    from diffsparse.patterns import Window3D
    from diffsparse.runtime import SparseRuntime

    assert sorted(axes) == sorted("CTHW"), axes
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=block_size, dense_steps=0)
    attention = SparseRuntime.attention

    def layer0_query(call):
        seen = []

        def record(self, layer, query, key, value, layout=None, **kwargs):
            if layer == 0:
                given = layout is not None
                seen.append((layout if given else self.call_layout(), query if given else self.to_layout_order(query)))
            return attention(self, layer, query, key, value, layout=layout, **kwargs)

        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(SparseRuntime, "attention", record)
            run_transformer(model, lambda: call, config)
        assert len(seen) == 1
        return seen[0]

    layout, reference = layer0_query(inputs())
    assert (layout.frames, layout.height, layout.width) == tuple(grid), layout
    (f_max, y_max, x_max) = (n * p - 1 for n, p in zip(grid, patch))
    for f, y, x in [(0, 0, 1), (f_max // 2, y_max // 2, x_max), (f_max, y_max, x_max), (f_max, y_max - 1, 0)]:
        call = inputs()
        pixel = {"C": slice(None), "T": f, "H": y, "W": x}
        call["hidden_states"][(slice(None), *(pixel[axis] for axis in axes))] += 1.0
        _, query = layer0_query(call)
        changed = ((query - reference).abs().amax(dim=(2, 3)) > 1e-6).nonzero().tolist()
        (p_t, p_h, p_w), (_, height, width) = patch, grid
        token = layout.video_start + ((f // p_t) * height + y // p_h) * width + x // p_w
        assert changed == [[0, token]], ((f, y, x), changed, token)


def first_transformer_call(pipe, call: dict, transformer=None):
    """The keyword arguments of the first call `pipe(**call)` makes to its transformer (`transformer`, default
    `pipe.transformer`; seed 0, as `run_pipeline`), without `return_dict`: the inputs of a direct call the pipeline's
    way, for `check_against_dense` (`lambda: kwargs`)."""
    import inspect

    transformer = pipe.transformer if transformer is None else transformer
    captured = []

    def capture(module, args, kwargs):
        if not captured:
            signature = inspect.signature(module.forward)
            arguments = dict(signature.bind(*args, **kwargs).arguments)
            for name, parameter in signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(arguments.pop(name, {}))
            captured.append({name: value for name, value in arguments.items() if name != "return_dict"})
        raise _FirstCall

    handle = transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run_pipeline(pipe, call)
    except _FirstCall:
        pass
    finally:
        handle.remove()
    assert captured, "the pipeline made no transformer call"
    return captured[0]


class _FirstCall(Exception):
    """Stops a pipeline at its first transformer call (`first_transformer_call`)."""


def run_pipeline(pipe, call: dict, config=None):
    """`pipe(**call)` from seed 0 without gradients, its `frames` (videos) or images; with `config` applied for the
    call, `(that output, the call's stats)`. The global generator is seeded too: some pipelines draw from it (JoyImage
    Edit samples its reference image's latents without the call's `generator`)."""
    import diffsparse
    from diffsparse.compare import pipeline_outputs

    def output():
        torch.manual_seed(0)
        batch = pipeline_outputs(pipe(**call, generator=torch.Generator().manual_seed(0)))[0]
        # Qwen-Image-Layered returns a list of each sample's images: one tensor. (Framepack's latent sections, of
        # different lengths, stay a list.)
        if isinstance(batch, list) and len({tuple(x.shape) for x in batch}) == 1:
            return torch.stack(batch)
        return batch

    with torch.no_grad():
        if config is None:
            return output()
        with diffsparse.sparse(pipe, config) as handle:
            return output(), handle.stats()


def check_pipeline_against_dense(pipe, call: dict, block_size: int = 16, sparse=None, order=None, atol=1e-4):
    """Through real pipeline calls (`run_pipeline`): `pattern="dense"` gives `pipe(**call)` bit for bit; every block
    kept through the sparse kernel (every call sparse) gives it within `atol`; `sparse` (default: a window of one
    frame and one token, the first step dense) makes some calls sparse with blocks left out and changes the output,
    each of its calls that its pattern's block mask defines computing exactly that masked attention
    (`checked_block_mask_calls`; under the default, some call of every self-attention layer).
    `order`: the token order of the default configs (`SparseConfig.order`).
    Returns `(stats, recorded calls)` of the `sparse` run for the family's own checks of its steps and layouts."""
    import diffsparse
    from diffsparse.patterns import Window3D

    reference = run_pipeline(pipe, call)
    assert torch.equal(run_pipeline(pipe, call, diffsparse.SparseConfig(pattern="dense"))[0], reference)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=block_size, dense_steps=0,
                                          order=order)
    with recorded_attention_calls() as kernel_calls:
        kept, stats = run_pipeline(pipe, call, every_block)
    assert kernel_calls and all(r.sparse for log in stats.calls.values() for r in log)
    assert {layer for layer, _, _ in kernel_calls} >= set(_self_attention_layers(pipe.transformer))
    torch.testing.assert_close(kept, reference, atol=atol, rtol=0)
    default = sparse is None
    if default:
        sparse = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=block_size, dense_steps=1,
                                         order=order)
    with recorded_attention_calls() as calls, checked_block_mask_calls() as checked:
        out, stats = run_pipeline(pipe, call, sparse)
    assert any(r.sparse and r.density < 1 for log in stats.calls.values() for r in log)
    assert not torch.allclose(out, reference, atol=1e-4)
    if default:
        assert {layer for layer, _ in checked} >= set(_self_attention_layers(pipe.transformer)), checked
    return stats, calls


def check_fused_projections(pipe, call: dict, fused_class: str, block_size: int = 16):
    """After `pipe.transformer.fuse_qkv_projections()` (diffusers' fused processor, `fused_class`, one QKV weight
    per stream): `check_pipeline_against_dense` with each self-attention's separate `to_q` zeroed, so a sparse path
    that read the separate weights instead of the fused ones would fail it; `remove` gives the fused processors
    back. Unfused again afterwards (the separate weights restored) for the pipeline's other tests."""
    from diffsparse.pipelines import adapter_for

    transformer = pipe.transformer
    modules = dict(adapter_for(transformer).self_attention_modules(transformer))
    separate = {layer: module.to_q.weight.detach().clone() for layer, module in modules.items()}
    transformer.fuse_qkv_projections()
    try:
        fused = {layer: module.processor for layer, module in modules.items()}
        assert {type(p).__name__ for p in fused.values()} == {fused_class}
        with torch.no_grad():
            for module in modules.values():
                module.to_q.weight.zero_()
        stats, _ = check_pipeline_against_dense(pipe, call, block_size=block_size)
        assert all(module.processor is fused[layer] for layer, module in modules.items())
        return stats
    finally:
        with torch.no_grad():
            for layer, module in modules.items():
                module.to_q.weight.copy_(separate[layer])
        transformer.unfuse_qkv_projections()


def check_modular_against_dense(pipe, call: dict, block_size: int = 8, sparse=None, output=None, stats=None,
                                atol=1e-4):
    """`check_pipeline_against_dense` for diffusers' modular blocks (`XxxCoreDenoiseStep().init_pipeline()` fed
    embeddings): `pipe(**call)` from seed 0, made one tensor by `output` (default: as returned). `pattern="dense"`
    gives it bit for bit; every block kept within `atol`; `sparse` (default: a window of one frame and one token,
    the first step dense) changes it. Returns `(stats, recorded calls)` of the `sparse` run, the stats as `stats`
    reads them from its handle (default: `handle.stats()`, the last denoising run)."""
    import diffsparse
    from diffsparse.patterns import Window3D

    def run(config=None):
        with torch.no_grad(), contextlib.ExitStack() as stack:
            handle = stack.enter_context(diffsparse.sparse(pipe, config)) if config else None
            out = pipe(**call, generator=torch.Generator().manual_seed(0))
            return (output or (lambda x: x))(out), handle and (stats or (lambda h: h.stats()))(handle)

    reference, _ = run()
    assert torch.equal(run(diffsparse.SparseConfig(pattern="dense", dense_steps=0))[0], reference)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=block_size, dense_steps=0)
    with recorded_attention_calls() as kernel_calls:
        kept, _ = run(every_block)
    # Else "every block kept equals dense" would hold of a path that ran the original processors.
    assert kernel_calls, "no call went through the sparse path"
    torch.testing.assert_close(kept, reference, atol=atol, rtol=0)
    if sparse is None:
        sparse = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=block_size, dense_steps=1)
    with recorded_attention_calls() as calls:
        out, sparse_stats = run(sparse)
    assert not torch.allclose(out, reference, atol=1e-4)
    return sparse_stats, calls


def assert_two_calls_per_step_first_dense(stats, steps: int = 3) -> None:
    """The transformer's calls of a pipeline whose guidance runs the prompt and the negative prompt one call after
    another outside any `cache_context` ("call 0", "call 1"): both calls on each of `steps` steps (the pipeline's
    timestep found on the scheduler's), the first step dense and the others sparse (`dense_steps=1`)."""
    assert sorted({(r.step, r.branch, r.sparse) for r in stats.calls["transformer"]}) == [
        (step, branch, step > 0) for step in range(steps) for branch in ("call 0", "call 1")
    ]


def open_zero_initialised(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Fills every all-zero parameter of `module` with noise: ControlNets start their residual projections at zero
    (`zero_module`), so a random tiny one would add nothing and a test of it could not fail."""
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.normal_(std=std)
    return module


def check_controlnet_pipeline(pipe, call: dict, unconditioned: dict, order=None):
    """A ControlNet pipeline: the transformer runs sparse (`check_pipeline_against_dense`, every call of it
    counted), the ControlNet's own blocks keep their processors (only `pipe.transformer` is in the stats; blocks it
    shares with the transformer run the original when it calls them, so `pattern="dense"` is still identical) and
    its residuals reach the output (`unconditioned`, the call with the ControlNet's weight at 0, differs), so the
    every-block-kept check covers the transformer with the ControlNet's residuals added."""
    import diffsparse

    shared = {id(m) for m in pipe.transformer.modules()}  # Z-Image's ControlNet runs the transformer's refiners

    def controlnet_processors():
        return {name: type(m.processor) for name, m in pipe.controlnet.named_modules()
                if hasattr(m, "processor") and id(m) not in shared}

    processors = controlnet_processors()
    assert processors
    assert not torch.allclose(run_pipeline(pipe, unconditioned), run_pipeline(pipe, call), atol=1e-4)
    stats, calls = check_pipeline_against_dense(pipe, call, order=order)
    assert set(stats.calls) == {"transformer"}
    with diffsparse.sparse(pipe, diffsparse.SparseConfig(pattern="radial")):
        assert controlnet_processors() == processors
    return stats, calls


def check_pag_pipeline(pag, call: dict, sparse_layers: set[int]) -> None:
    """A perturbed-attention guidance pipeline `pag` puts its own processors on the perturbed layers for each call,
    then the ones it found back: under diffsparse those layers run PAG's processors (absent from the stats), the
    others (`sparse_layers`) run sparse; every block kept gives PAG's own output within 1e-4, two calls in a row, and
    the original processors come back after; `pattern="dense"` gives PAG's output bit for bit and a window of one
    frame and one token changes it (blocks left out on the sparse layers)."""
    import diffsparse
    from diffsparse.compare import pipeline_outputs
    from diffsparse.patterns import Window3D
    from diffsparse.pipelines import adapter_for

    pag.set_progress_bar_config(disable=True)
    adapter = adapter_for(pag.transformer)
    before = {i: type(m.processor) for i, m in adapter.self_attention_modules(pag.transformer)}
    reference = run_pipeline(pag, call)
    assert torch.equal(run_pipeline(pag, call, diffsparse.SparseConfig(pattern="dense"))[0], reference)
    window = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    out, stats = run_pipeline(pag, call, window)
    assert {r.layer for r in stats.calls["transformer"] if r.sparse and r.density < 1} == sparse_layers
    assert not torch.allclose(out, reference, atol=1e-4)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)
    with diffsparse.sparse(pag, every_block) as handle, torch.no_grad():
        for _ in range(2):
            out = pipeline_outputs(pag(**call, generator=torch.Generator().manual_seed(0)))[0]
            torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
            calls = handle.stats().calls["transformer"]
            assert {r.layer for r in calls} == sparse_layers and all(r.sparse for r in calls)
    assert {i: type(m.processor) for i, m in adapter.self_attention_modules(pag.transformer)} == before


def check_other_processors_are_refused(pipe_or_transformer, family: str, layer: int) -> None:
    """A subclass of the family's processor on `layer` (as LoRA, IP-Adapter or caching processors are) makes
    `apply` refuse, naming the layer and the class, and leaves every layer's processor as it was."""
    import diffsparse
    from diffsparse.pipelines import adapter_for

    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    adapter = adapter_for(transformer)
    modules = dict(adapter.self_attention_modules(transformer))
    before = {index: module.processor for index, module in modules.items()}
    wrapped = type("Wrapped", (adapter.original_processor,), {})()
    adapter.set_processor(modules[layer], wrapped)
    try:
        with pytest.raises(ValueError, match=f"layer {layer} of the {family} transformer has processor Wrapped"):
            diffsparse.apply(pipe_or_transformer, diffsparse.SparseConfig(dense_steps=0))
        assert all(m.processor is (wrapped if i == layer else before[i]) for i, m in modules.items())
    finally:
        adapter.set_processor(modules[layer], before[layer])


def check_prompts_attend_their_valid_tokens(
    transformer, inputs, grid: tuple[int, int, int], text_len: int, config=None, more_valid: int = 0
) -> None:
    """`inputs()`: a bare transformer call on two videos whose prompts hold 7 and `text_len` valid tokens (the text
    after the video, padding masked; `more_valid` valid tokens of another text each, as HunyuanImage's glyphs). Each
    prompt length is one sparse call on a layout whose text span is cut to it; the sparse result (`config`, default
    radial at 0.3) differs from dense; and the first video gets what it gets alone, whatever the other prompt's
    padding."""
    import diffsparse
    from diffsparse.patterns import VideoLayout

    config = config or diffsparse.SparseConfig(pattern="radial", block_size=8, density=0.3, dense_steps=0)
    video_len = grid[0] * grid[1] * grid[2]
    with torch.no_grad():
        reference = transformer(**inputs()).sample
        with recorded_attention_calls() as calls, diffsparse.sparse(transformer, config):
            out = transformer(**inputs()).sample
            alone = transformer(**{name: x[:1] for name, x in inputs().items()}).sample
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(*grid, text_len=n + more_valid, text_position="end"), (1, video_len + n + more_valid))
        for n in (7, text_len)
    }
    assert not torch.allclose(out, reference, atol=1e-4)
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=0)



def check_padded_text_queries(transformer, run, config, padded_queries, processor_class, monkeypatch) -> None:
    """The padded text queries of the first video (7 valid text tokens) get from the sparse path what the original
    gives them, `padded_queries=None` (the adapter's own rule); a control rule (`"dense"` or `"zero"`, set on
    `processor_class`) must differ. They never reach a video token (masked as keys), so only the first block's own
    text output shows them. `run(transformer, config=None)`: one call of the test's inputs."""
    if padded_queries is not None:
        monkeypatch.setattr(processor_class, "padded_queries", padded_queries)
    outputs = []
    hook = transformer.transformer_blocks[0].attn.register_forward_hook(lambda m, i, out: outputs.append(out[1]))
    try:
        run(transformer)
        run(transformer, config)
    finally:
        hook.remove()
    original, sparse = outputs
    if padded_queries is None:
        torch.testing.assert_close(sparse, original, atol=1e-5, rtol=0)
    else:
        assert not torch.allclose(sparse[0, 7:], original[0, 7:], atol=1e-3)


def tiny_clip_image_encoder():
    """A CLIP vision tower and processor with tiny dimensions and the current seed's weights: Wan 2.1 I2V's (and
    ChronoEdit's) image path, whose penultimate hidden states reach every block's cross-attention through extra
    key/value projections (`added_kv_proj_dim`)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config).eval(), processor


# Qwen3's chat template: one user turn, the assistant's reply opened with an empty thinking block when the pipeline
# passes `enable_thinking=False` (FLUX.2 klein; Z-Image passes True: no block).
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def chat_tokenizer(vocabulary: list[str], template: str, markers: list[str]):
    """`qwen_tokenizer(vocabulary)` with `template` as its chat template and `markers` kept whole."""
    tokenizer = qwen_tokenizer(vocabulary)
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.chat_template = template
    return tokenizer


def qwen_tokenizer(vocabulary: list[str]):
    """A word-level tokenizer built in memory that splits a chat prompt template where Qwen2's does (words,
    punctuation, newlines and the chat tokens one token each; `vocabulary` must hold `<pad>`, `<unk>`,
    `<|im_start|>`, `<|im_end|>`): Qwen2.5-VL pipelines (Qwen-Image, Kandinsky 5) drop a fixed number of the
    template's first tokens, which must be the system prompt's, not the user's."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Punctuation(),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


# Qwen's vision-language placeholders, by the config field that holds each one's id.
QWEN_VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                      "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def qwen_vl_processor(processor_class, video_processor_class, vision_config, vocabulary: list[str], **kwargs):
    """A Qwen vision-language processor built in memory: the word tokenizer of `qwen_tokenizer` with the vision
    placeholders as whole tokens (the processor repeats `<|image_pad|>` with no spaces between: each must be matched
    whole, not split at `|`), image patches as the tower of `vision_config` takes them, and the video processor the
    class requires, which image prompts never use; `kwargs` (a chat template) go to the processor."""
    from transformers import Qwen2VLImageProcessor

    tokenizer = qwen_tokenizer(vocabulary)
    tokenizer.add_tokens(list(QWEN_VISION_TOKENS.values()), special_tokens=True)
    patches = {"patch_size": vision_config.patch_size, "temporal_patch_size": vision_config.temporal_patch_size,
               "merge_size": vision_config.spatial_merge_size}
    return processor_class(image_processor=Qwen2VLImageProcessor(**patches), tokenizer=tokenizer,
                           video_processor=video_processor_class(**patches), **kwargs)


def tiny_qwen3_vl(vocabulary: list[str], chat_template: str | None, layers: int = 1):
    """`(Qwen3VLForConditionalGeneration, Qwen3VLProcessor)` built in memory: a language model of `layers` layers 16
    wide with a one-block vision tower, the processor of `qwen_vl_processor` with `chat_template` (Qwen-Image 2.1,
    NucleusMoE-Image; `None` for Bria FIBO 2 and JoyImage, whose pipelines format their prompts themselves)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    text = {"vocab_size": len(vocabulary), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
              "deepstack_visual_indexes": [], "num_position_embeddings": 16}
    ids = {name: vocabulary.index(token) for name, token in QWEN_VISION_TOKENS.items()}
    text_encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids)).eval()
    processor = qwen_vl_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, text_encoder.config.vision_config,
                                  vocabulary, chat_template=chat_template)
    return text_encoder, processor


def tiny_qwen25_vl(vocabulary: list[str], layers: int = 1):
    """`Qwen2_5_VLForConditionalGeneration` with a language model of `layers` layers 16 wide (the pipelines read its
    last hidden states, HunyuanImage the third from last) and a one-block vision tower, which the class builds
    although text prompts never reach it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"vocab_size": len(vocabulary), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 2, "pad_token_id": 0,
            "bos_token_id": vocabulary.index("<|im_start|>"), "eos_token_id": vocabulary.index("<|im_end|>"),
            # M-RoPE splits a head's 4 rotary frequencies between time, height and width positions.
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
              "fullatt_block_indexes": [0]}
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def tiny_hunyuan_video_vae():
    """An `AutoencoderKLHunyuanVideo` of 4 latent channels, 8x in space and 4x in time (HunyuanVideo, Framepack,
    Kandinsky 5 and 6)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
    ).eval()


def tiny_image_vae(latent_channels: int = 4, blocks: int = 2, **config):
    """An `AutoencoderKL` 4 wide of `blocks` blocks (x2 downsampling per block after the first) for image pipelines;
    `config`: e.g. the `shift_factor` and `scaling_factor` a pipeline reads."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(4,) * blocks, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=2, **config,
    ).eval()


def tiny_flux2_vae():
    """A three-block `AutoencoderKLFlux2` (x4 downsampling, then the 2 x 2 patchify of its latents: 8 channels) 4
    wide, so the 64-pixel sides FLUX.2 requires of reference images stay few tokens."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(4, 4, 4), layers_per_block=1, latent_channels=2, norm_num_groups=2,
    ).eval()


def tiny_clip_text_model(vocab_size: int):
    """A one-layer `CLIPTextModel` 8 wide (its pooled output is the pipelines' pooled text embedding), for a word
    tokenizer whose ids 0 and 1 are `<pad>` and `</s>`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()


def tiny_llama(vocab_size: int):
    """A two-layer `LlamaModel` 16 wide: HunyuanVideo's pipelines read its third-to-last hidden states."""
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()


def tiny_image_to_video_pipeline(variant: str = "wan22"):
    """A tiny `WanImageToVideoPipeline`: `"wan21_clip"` (CLIP image embedding in cross-attention, image latent on
    channels), `"wan22"` (channels only) or `"wan22_ti2v"` (the image latent replaces the first frame)."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline

    config = tiny_wan_config()
    base = tiny_wan_pipeline()
    transformer_config = {**config["transformer"], "in_channels": 16 if variant == "wan22_ti2v" else 36}
    image_components = {}
    if variant == "wan21_clip":
        inner_dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
        transformer_config.update(image_dim=16, added_kv_proj_dim=inner_dim)
        torch.manual_seed(3)
        image_components["image_encoder"], image_components["image_processor"] = tiny_clip_image_encoder()
    torch.manual_seed(2)
    transformer = WanTransformer3DModel(**transformer_config).eval()
    pipe = WanImageToVideoPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        scheduler=base.scheduler,
        transformer=transformer,
        expand_timesteps=variant == "wan22_ti2v",
        **image_components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def grey_timed_runs(monkeypatch, greys=(0.2, 0.8)) -> list[int]:
    """`compare`'s timed dense and sparse runs (after its two one-step warm-ups) made plain grey, `greys[0]` and
    `greys[1]`, in every compare of the test: which file or score holds which run can then be told. Returns the list
    the step count of every run is appended to."""
    from diffsparse import compare

    runs = []
    generate = compare._generate

    def generated(pipe, args, progress, first_frame=None):
        frames, seconds, denoise = generate(pipe, args, progress, first_frame)
        runs.append(args.steps)
        place = (len(runs) - 1) % 4  # warm-up, warm-up, dense, sparse
        if place >= 2:
            frames = np.full_like(frames, greys[place - 2])
        return frames, seconds, denoise

    monkeypatch.setattr(compare, "_generate", generated)
    return runs
