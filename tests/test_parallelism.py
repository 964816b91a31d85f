"""Sparse attention under diffusers' parallelism, two CPU processes (gloo; four for a ring x Ulysses mesh): under
Ulysses or ring context parallelism each holds its share of the tokens of a tiny Wan, ChronoEdit, LTX-Video or Helios
transformer (video only), or of the text and of the image of a tiny FLUX.1, FLUX.2 or Qwen-Image transformer (joint
attention), under tensor parallelism half of the heads of a tiny FLUX.1, FLUX.2, Qwen-Image or Qwen-Image 2.1
transformer; each must get what one process gets alone with the same sparse config. Wan VACE, SkyReels-V2 and
Kandinsky 5, whose diffusers transformers have no context parallel plan, run under a plan of the user's own."""

import faulthandler
import functools
import os
import queue
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffsparse
from diffsparse.patterns import Radial, Window3D

WORLD = 2
FAMILIES = ("wan", "chronoedit", "ltx", "helios")
# diffusers' own Helios processor counts the memory on each rank's slice of the sequence (its length minus the
# chunk's), so under context parallelism its dense calls leave the memory's keys unamplified: off one process on
# the tiny model here. The sparse path counts it on the whole sequence.
EXACT_DENSE_FAMILIES = ("wan", "chronoedit", "ltx")
# Joint [text, image] attention under context parallelism (diffusers splits the text and the image apart): name ->
# (family, call variant of `_image_call`).
JOINT_FAMILIES = {
    "flux": ("flux", ""), "flux references": ("flux", "references"), "flux2": ("flux2", ""),
    "qwenimage": ("qwenimage", ""), "qwenimage padded": ("qwenimage", "padded"),
    "qwenimage left padded": ("qwenimage", "left padded"),
}
# Under Ulysses "anything" (uneven shares): a Wan of 175 video tokens (88 and 87 per rank), a Helios of 63 memory and
# 100 chunk tokens (82 and 81), and these with 5 text tokens (3 and 2 per rank): the text mask gathered whole is then
# cut back from the shares' padded parts, which only a left-padded prompt (its last rank's tokens valid) tells apart.
UNEVEN_JOINT_FAMILIES = ("flux", "flux references", "qwenimage padded", "qwenimage left padded")
# Under ring attention (the ranks' shares as under Ulysses; the dense calls diffusers' ring exchange): video only, with
# the inputs split at the transformer's entry (LTX), and joint attention. Padded prompts' masks are left out: the
# log-sum-exp this test gives diffusers' native op does not apply masks.
RING_FAMILIES = ("wan", "ltx")
RING_JOINT_FAMILIES = ("flux", "flux references", "flux2", "qwenimage")
# MiniMax-H3's packed sequence (text, a conditioning frame, audio and the target video; 107 rows, so uneven shares),
# in the three orders its tests pack it: the runtime's token order puts the gathered rows in the layout's order.
MINIMAX_ORDERS = ("text first", "target first", "shuffled")
MINIMAX_CONFIGS = {
    "window3d": diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0),
    "window3d per head": diffsparse.SparseConfig(pattern=Window3D([(1, 1, 1), (3, 8, 8)]), block_size=8, dense_steps=0),
    "searched, layer budget": diffsparse.SparseConfig(pattern="searched", density=0.5, block_size=8, dense_steps=0),
}
# The families diffusers gives a tensor-parallel plan.
TENSOR_PARALLEL_FAMILIES = ("flux", "flux2", "qwenimage", "qwenimage21")
# Tensor parallelism with two heads per rank (four heads): each rank must attend the heads it holds, not the first.
TENSOR_PARALLEL_FOUR_HEAD_FAMILIES = ("flux",)
CONFIGS = {
    "radial": diffsparse.SparseConfig(pattern=Radial(), density=0.5, block_size=16, dense_steps=0),
    # One window per head: each rank must attend its own head's mask, not the first one.
    "window3d per head": diffsparse.SparseConfig(pattern=Window3D([(1, 2, 2), (3, 8, 8)]), block_size=16, dense_steps=0),
    "searched (fitted per head)": diffsparse.SparseConfig(
        pattern="searched(budget='row')", density=0.5, block_size=16, dense_steps=0
    ),
    # Each head classified on its own rows: the same on a rank holding half of the heads.
    "spatial_temporal (fitted per head)": diffsparse.SparseConfig(
        pattern="spatial_temporal", density=0.5, block_size=16, dense_steps=0
    ),
    "searched, head budget": diffsparse.SparseConfig(
        pattern="searched(budget='head')", density=0.5, block_size=16, dense_steps=0
    ),
    # A budget shared over the layer's heads: each rank holds half of them, and must share it over all.
    "searched, layer budget": diffsparse.SparseConfig(
        pattern="searched(budget='layer')", density=0.5, block_size=16, dense_steps=0
    ),
    "searched by mass, layer budget": diffsparse.SparseConfig(
        pattern="searched(criterion='mass', budget='layer')", density=0.5, block_size=16, dense_steps=0
    ),
}


def _model(family: str):
    from diffusers import (
        ChronoEditTransformer3DModel,
        HeliosTransformer3DModel,
        LTXVideoTransformer3DModel,
        WanTransformer3DModel,
    )

    from diffsparse.pipelines.tiny import tiny_wan_config

    torch.manual_seed(0)
    if family in ("wan", "chronoedit"):  # ChronoEdit: Wan's shapes, its own processor copy and parallel plan
        model_class = WanTransformer3DModel if family == "wan" else ChronoEditTransformer3DModel
        return model_class(**tiny_wan_config()["transformer"]).eval()
    if family == "helios":  # the memory's keys amplified per head; run under `_helios_plan`
        model = HeliosTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=HELIOS_LAYERS, rope_dim=(4, 4, 4), is_amplify_history=True,
        ).eval()
        with torch.no_grad():
            for block in model.blocks:
                block.attn1.history_key_scale.normal_()
        return model
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=16,
    ).eval()


HELIOS_LAYERS = 2


def _helios_plan() -> dict:
    """diffusers' own Helios plan, its entries for blocks past the tiny model's `HELIOS_LAYERS` left out: it names
    each of the 40 blocks of the released model, and a 40-layer tiny model made this module's job over 3x slower."""
    from diffusers import HeliosTransformer3DModel

    def kept(name: str) -> bool:
        index = name.split(".")[1]
        return not index.isdigit() or int(index) < HELIOS_LAYERS

    return {name: split for name, split in HeliosTransformer3DModel._cp_plan.items() if kept(name)}


def _call(transformer, latents=(4, 8, 12)):
    """96 video tokens (48 per rank): Wan 4 latent frames of 8 x 12 patchified 1x2x2 (or other `latents`), LTX a
    4 x 4 x 6 grid; Helios the same chunk behind 56 memory tokens (76 per rank: rank 0 holds the memory and part of
    the chunk). No LTX text mask: diffusers' own context-parallel cross-attention fails to broadcast it on CPU
    (dense, not ours)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if transformer.__class__.__name__.startswith(("Wan", "ChronoEdit")):
            args = torch.randn(1, 16, *latents, generator=g), torch.tensor([500]), torch.randn(1, 8, 32, generator=g)
            return transformer(*args, return_dict=False)[0]
        if transformer.__class__.__name__.startswith("Helios"):
            memory = {}
            for name, frames, first in (("short", 2, 6), ("mid", 2, 4), ("long", 4, 0)):
                memory[f"latents_history_{name}"] = torch.randn(1, 4, frames, *latents[1:], generator=g)
                memory[f"indices_latents_history_{name}"] = torch.arange(first, first + frames)[None]
            return transformer(
                hidden_states=torch.randn(1, 4, *latents, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
                indices_hidden_states=torch.arange(8, 8 + latents[0])[None], return_dict=False, **memory,
            )[0]
        return transformer(
            hidden_states=torch.randn(1, 96, 8, generator=g), encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
            timestep=torch.tensor([500]), encoder_attention_mask=None, num_frames=4, height=4, width=6,
            return_dict=False,
        )[0]


def _sparse_call(transformer, config, call=_call):
    with diffsparse.sparse(transformer, config) as handle:
        return call(transformer), handle.stats().mean_density


def _against_one_process(transformer, configs: dict, parallel, call=_call, plan=None,
                         dense_call=None) -> tuple[dict, dict, torch.Tensor]:
    """What one rank measures with `parallel` enabled on `transformer` (under `plan`, a user's context parallel
    plan, if given), against the same configs alone: the dense call's max abs difference, and per config (max abs
    difference, this rank's density, density alone, max abs difference of the config alone from dense). Also
    returns the outputs and densities alone, and the dense output under `parallel`. `dense_call`: the dense
    reference of `call` where the original cannot run `call` itself (default: `call`)."""
    dense_call = dense_call or call
    alone = {name: _sparse_call(transformer, config, call) for name, config in configs.items()}
    dense = dense_call(transformer)
    transformer.enable_parallelism(config=parallel, cp_plan=plan)
    dense_parallel = dense_call(transformer)
    result = {"dense": float((dense_parallel - dense).abs().max())}
    for name, config in configs.items():
        (out, density), (out_alone, density_alone) = _sparse_call(transformer, config, call), alone[name]
        result[name] = (float((out - out_alone).abs().max()), density, density_alone, float((out_alone - dense).abs().max()))
    return result, alone, dense_parallel


def _family(model, configs: dict = CONFIGS, call=_call, uneven: bool = False, ring: bool = False, plan=None,
            dense_call=None) -> dict:
    """What one rank measures on one model family (`model()` builds it) under Ulysses context parallelism, or with
    `ring` ring attention (with `uneven`, "anything": the ranks' shares may differ), as max abs differences (and
    densities); `plan` and `dense_call` as `_against_one_process`'s."""
    from diffusers import ContextParallelConfig

    parallel = (ContextParallelConfig(ring_degree=WORLD, ring_anything=uneven) if ring
                else ContextParallelConfig(ulysses_degree=WORLD, ulysses_anything=uneven))
    result, alone, dense_parallel = _against_one_process(model(), configs, parallel, call, plan, dense_call)
    # The other order: applied first, then parallelism enabled (it reaches the sparse processors; where diffusers
    # splits the inputs at the transformer's entry, its hook now runs before diffsparse's), then removed (the
    # originals come back with the parallel config).
    transformer, (first, config) = model(), next(iter(configs.items()))
    diffsparse.apply(transformer, config)
    transformer.enable_parallelism(config=parallel, cp_plan=plan)
    result["applied first"] = float((call(transformer) - alone[first][0]).abs().max())
    diffsparse.remove(transformer)
    result["removed"] = float(((dense_call or call)(transformer) - dense_parallel).abs().max())
    return result


# Images are one frame (radial keeps it whole): 2D windows, and searches.
TENSOR_PARALLEL_CONFIGS = {
    "window3d": diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=4, dense_steps=0),
    "window3d per head": diffsparse.SparseConfig(pattern=Window3D([(1, 1, 1), (1, 8, 8)]), block_size=4, dense_steps=0),
    "searched (layer budget, the default)": diffsparse.SparseConfig(
        pattern="searched", density=0.5, block_size=4, dense_steps=0
    ),
    "searched by mass, layer budget": diffsparse.SparseConfig(
        pattern="searched(criterion='mass', budget='layer')", density=0.5, block_size=4, dense_steps=0
    ),
}
# For four heads (two per rank): one window per head, each different, and a budget shared over the layer's heads.
FOUR_HEAD_CONFIGS = {
    "window3d per head": diffsparse.SparseConfig(
        pattern=Window3D([(1, 1, 1), (1, 8, 8), (1, 3, 3), (1, 5, 5)]), block_size=4, dense_steps=0
    ),
    "searched (layer budget, the default)": TENSOR_PARALLEL_CONFIGS["searched (layer budget, the default)"],
}


def _tensor_parallel_model(family: str, heads: int = 2):
    """`heads` heads (by default two: one per rank), joint [text, image] attention."""
    from diffusers import (
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
        QwenImage21Transformer2DModel,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(0)
    if family == "qwenimage21":
        return QwenImage21Transformer2DModel(
            in_channels=8, out_channels=8, num_layers=1, attention_head_dim=16, num_attention_heads=heads,
            context_in_dim=16, axes_dims_rope=(4, 6, 6),
        ).eval()
    if family == "flux":
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=heads, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
        ).eval()
    if family == "flux2":
        return Flux2Transformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=heads, joint_attention_dim=16, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
        ).eval()
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=heads,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ).eval()


def _image_call(transformer, variant: str = "", text: int = 6):
    """An image of 6 x 8 tokens (Qwen-Image: 4 x 6 packed) behind `text` text tokens (6: 3 per rank under context
    parallelism); Qwen-Image 2.1 an image of 6 x 8 latent tokens after 5 text tokens, its queries alone sparse.
    `variant`: "references" (FLUX.1: a 2 x 4 reference image after the image, in the text's span), "padded"
    (Qwen-Image: two prompts, the second with 2 padded tokens), "left padded" (the same, padded at the start)."""
    padded = [False] * 2 + [True] * (text - 2) if variant == "left padded" else [True] * (text - 2) + [False] * 2
    valid = [[True] * text, padded]
    g = torch.Generator().manual_seed(1)
    name = transformer.__class__.__name__
    with torch.no_grad():
        if name.startswith("QwenImage21"):
            return transformer(
                hidden_states=torch.randn(1, 48, 8, generator=g), encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, 6, 8)]],
                img_mask=torch.tensor([[False] * 5 + [True] * 12]), return_dict=False,
            )[0]
        if name.startswith("Qwen"):
            batch = 2 if variant.endswith("padded") else 1
            mask = torch.tensor(valid) if variant.endswith("padded") else None
            return transformer(
                hidden_states=torch.randn(batch, 24, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 16, generator=g), encoder_hidden_states_mask=mask,
                timestep=torch.tensor([0.5] * batch), img_shapes=[[(1, 4, 6)]] * batch, return_dict=False,
            )[0]
        grid = torch.cartesian_prod(torch.zeros(1), torch.arange(6.0), torch.arange(8.0))
        if name.startswith("Flux2"):
            return transformer(
                hidden_states=torch.randn(1, 48, 8, generator=g), encoder_hidden_states=torch.randn(1, text, 16, generator=g),
                timestep=torch.tensor([0.9]), img_ids=torch.cat([grid, torch.zeros(48, 1)], 1)[None],
                txt_ids=torch.zeros(1, text, 4), guidance=torch.tensor([3.5]), return_dict=False,
            )[0]
        if variant == "references":
            grid = torch.cat([grid, torch.cartesian_prod(torch.ones(1), torch.arange(2.0), torch.arange(4.0))])
        return transformer(
            hidden_states=torch.randn(1, len(grid), 16, generator=g),
            encoder_hidden_states=torch.randn(1, text, 16, generator=g), pooled_projections=torch.randn(1, 8, generator=g),
            timestep=torch.tensor([0.5]), img_ids=grid, txt_ids=torch.zeros(text, 3), return_dict=False,
        )[0]


def _tensor_parallel_family(family: str, heads: int = 2) -> dict:
    """What one rank measures on one family (of `heads` heads) under tensor parallelism, as in `_family`."""
    from diffusers import TensorParallelConfig

    parallel = TensorParallelConfig(tp_degree=WORLD)
    configs = TENSOR_PARALLEL_CONFIGS if heads == 2 else FOUR_HEAD_CONFIGS
    result, _, _ = _against_one_process(_tensor_parallel_model(family, heads), configs, parallel, _image_call)
    return result


def _all_gather_uneven_on_gloo(all_gather):
    """diffusers gathers Ulysses "anything"'s uneven shares with one `all_gather` of unequal sizes, which NCCL
    takes and gloo refuses: padded to the largest here, then cut back."""

    def gather(tensor_list, tensor, group=None, async_op=False):
        sizes = [part.shape for part in tensor_list]
        if all(size == tensor.shape for size in sizes):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        dim = next(d for d in range(tensor.ndim) if len({size[d] for size in sizes}) > 1)
        largest = max(size[dim] for size in sizes)
        sent = tensor.new_zeros(tensor.shape[:dim] + (largest,) + tensor.shape[dim + 1:])
        sent.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
        parts = [torch.empty_like(sent) for _ in sizes]
        all_gather(parts, sent, group=group)
        for out, part in zip(tensor_list, parts):
            out.copy_(part.narrow(dim, 0, out.shape[dim]))

    return gather


def _native_forward_op_with_lse(forward_op):
    """diffusers' ring attention merges the parts each rank's keys give through their log-sum-exps, which its native
    backend's forward op (the one a CPU runs) does not return: this one also returns them, so that the dense calls
    here run diffusers' own ring attention."""

    def op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
           return_lse=False, _save_ctx=True, _parallel_config=None):
        out = forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                         _save_ctx, _parallel_config)
        if not return_lse:
            return out
        assert attn_mask is None and not is_causal and not enable_gqa, "not needed by these tests"
        scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) * (scale or query.shape[-1] ** -0.5)
        return out, scores.logsumexp(-1).transpose(1, 2)  # (B, S, H), as the flash backends give it

    return op


def _two_process_job() -> dict:
    """Everything one of the two ranks measures."""
    result = {family: _family(functools.partial(_model, family), plan=_helios_plan() if family == "helios" else None)
              for family in FAMILIES}
    result |= {
        f"cp {name}": _family(functools.partial(_tensor_parallel_model, family), TENSOR_PARALLEL_CONFIGS,
                              functools.partial(_image_call, variant=variant))
        for name, (family, variant) in JOINT_FAMILIES.items()
    }
    result |= {
        "uneven wan": _family(functools.partial(_model, "wan"), call=functools.partial(_call, latents=(5, 10, 14)),
                              uneven=True),
        "uneven helios": _family(functools.partial(_model, "helios"),
                                 call=functools.partial(_call, latents=(4, 10, 10)), uneven=True, plan=_helios_plan()),
        # One chunk frame of 24 tokens behind the 56 memory tokens: 40 per rank, so rank 1 holds memory too (16 of
        # its tokens), whose keys it must amplify from its own first token on.
        "helios memory on both ranks": _family(functools.partial(_model, "helios"),
                                               call=functools.partial(_call, latents=(1, 8, 12)), plan=_helios_plan()),
    }
    result |= {
        f"uneven {name}": _family(functools.partial(_tensor_parallel_model, family), TENSOR_PARALLEL_CONFIGS,
                                  functools.partial(_image_call, variant=variant, text=5), uneven=True)
        for name, (family, variant) in JOINT_FAMILIES.items() if name in UNEVEN_JOINT_FAMILIES
    }
    result |= {f"ring {family}": _family(functools.partial(_model, family), ring=True) for family in RING_FAMILIES}
    result |= {
        f"ring {name}": _family(functools.partial(_tensor_parallel_model, family), TENSOR_PARALLEL_CONFIGS,
                                functools.partial(_image_call, variant=variant), ring=True)
        for name, (family, variant) in JOINT_FAMILIES.items() if name in RING_JOINT_FAMILIES
    }
    result["uneven ring wan"] = _family(functools.partial(_model, "wan"),
                                        call=functools.partial(_call, latents=(5, 10, 14)), uneven=True, ring=True)
    # Three heads over two ranks: two on rank 0, one on rank 1.
    result["ring wan 3 heads"] = _family(functools.partial(_wan_with_heads, 3), _configs_for_heads(3), ring=True)
    result |= {
        f"minimax {order}{' ring' if ring else ''}": _family(
            _minimax_model, MINIMAX_CONFIGS, functools.partial(_minimax_call, order=order), uneven=True, ring=ring)
        for order in MINIMAX_ORDERS for ring in (False, True)
    }
    result |= {f"tp {family}": _tensor_parallel_family(family) for family in TENSOR_PARALLEL_FAMILIES}
    result |= {f"tp {family} 4 heads": _tensor_parallel_family(family, heads=4)
               for family in TENSOR_PARALLEL_FOUR_HEAD_FAMILIES}
    result |= {f"user plan {name}": _user_plan_family(name) for name in USER_PLAN_FAMILIES}
    result["refusals"] = _refusals()
    return result


def _raised(model, config) -> str | None:
    """The message of the `ValueError` the sparse call under `config` raises, `None` if it runs."""
    try:
        _sparse_call(model, config)
    except ValueError as error:
        return str(error)
    return None


# A pattern the same for every head, and patterns fitted per head and over the layer's heads, which a rank with no
# head failed in while the other rank waited in the exchange.
ONE_HEAD_CONFIGS = ("radial", "searched, layer budget", "spatial_temporal (fitted per head)")


def _refusals() -> dict:
    """What one rank gets where the sparse path refuses a call: every rank must raise together, none left waiting in
    a collective."""
    return _one_head_refusals() | _wrong_split_refusal()


def _one_head_refusals() -> dict:
    """A Wan of one head under ring attention over 2 ranks: rank 1 would hold no head."""
    from diffusers import ContextParallelConfig

    model = _wan_with_heads(1)
    dense = _call(model)
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD))
    result = {f"one head {name}": _raised(model, CONFIGS[name]) for name in ONE_HEAD_CONFIGS}
    # What the message offers instead: the dense pattern runs the original, diffusers' ring attention.
    dense_config = diffsparse.SparseConfig(pattern="dense", dense_steps=0)
    result["one head dense"] = float((_sparse_call(model, dense_config)[0] - dense).abs().max())
    return result


def _wrong_split_refusal() -> dict:
    """A Wan whose rank 1 reads a split of the layout other than the one diffusers made (its `_shares` moved by one
    token)."""
    from diffusers import ContextParallelConfig

    from diffsparse.pipelines import base

    result, model, config = {}, _model("wan"), CONFIGS["radial"]
    alone = _sparse_call(model, config)[0]
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    shares = base._shares
    # One token more on rank 0 and one less on the last rank (rank 1 reads a share shorter than it holds), then the
    # other way (a share longer: checked by `!=`, not only `>`; before a test, `>` let it through to an IndexError).
    for name, moved_by in (("wrong split", 1), ("short split", -1)):
        if dist.get_rank() == 1:
            def moved(length, degree, moved_by=moved_by):
                return [n + moved_by * ((r == 0) - (r == degree - 1)) for r, n in enumerate(shares(length, degree))]

            base._shares = moved
        try:
            result[name] = _raised(model, config)
        finally:
            base._shares = shares
    # Nothing left half-done in a collective: the ranks go on together.
    with diffsparse.sparse(model, config):
        result["split after"] = float((_call(model) - alone).abs().max())
        # A split checked once is not gathered again (no collective per call): a rank whose length changed since
        # can only raise alone. Rank 0 would wait forever here if rank 1 joined a gather alone.
        processor = model.blocks[0].attn1.processor
        group, _, rank = base._context_parallel(processor)
        with model.cache_context("call 0"):  # the last call's state, which the message reads its layout from
            try:
                processor._held([[48, 48]], group, rank, 48 - rank)
            except ValueError as error:
                result["changed split"] = str(error)
    return result


def _minimax_model():
    from test_minimax_h3 import make_transformer

    return make_transformer()


def _minimax_call(transformer, order: str):
    from test_minimax_h3 import inputs

    with torch.no_grad():
        return transformer(**inputs(order)(), return_dict=False)[0]


# Families whose diffusers transformer has no `_cp_plan` but whose sparse path gathers a video-only sequence as
# Wan's (`context_parallel = True`): they run under a plan the user passes to `enable_parallelism`, written here as
# a user would. SkyReels-V2 with one timestep, and under asynchronous diffusion forcing (one timestep per frame, the
# causal mask over groups of 2 frames); Kandinsky 5 in frame-major and in tiled ("fractal") token order.
USER_PLAN_FAMILIES = ("wan vace", "skyreels", "skyreels causal", "kandinsky5", "kandinsky5 fractal")
USER_PLAN_CONFIGS = {name: CONFIGS[name] for name in ("radial", "window3d per head", "searched, layer budget")}
# Kandinsky 5's tiny grid has two frames, on which radial keeps every block: nothing it could get wrong.
KANDINSKY5_CONFIGS = {name: CONFIGS[name] for name in ("window3d per head", "searched, layer budget")}


def _user_plan_configs(name: str) -> dict:
    return KANDINSKY5_CONFIGS if name.startswith("kandinsky5") else USER_PLAN_CONFIGS


def _vace_model():
    from diffusers import WanVACETransformer3DModel

    from diffsparse.pipelines.tiny import tiny_wan_config

    torch.manual_seed(0)
    return WanVACETransformer3DModel(**tiny_wan_config()["transformer"], vace_layers=[0, 1],
                                     vace_in_channels=96).eval()


def _vace_call(transformer):
    """Wan's 96 video tokens, and a control video on the same grid."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return transformer(
            torch.randn(1, 16, 4, 8, 12, generator=g), torch.tensor([500]), torch.randn(1, 8, 32, generator=g),
            control_hidden_states=torch.randn(1, 96, 4, 8, 12, generator=g), return_dict=False,
        )[0]


def _skyreels_call(transformer, per_frame: bool):
    from test_skyreels_v2 import inputs

    with torch.no_grad():
        return transformer(**inputs(per_frame)).sample


def _kandinsky5_model():
    from test_kandinsky5 import tiny_transformer

    torch.manual_seed(0)
    return tiny_transformer()


def _kandinsky5_call(transformer, fractal: bool):
    from test_kandinsky5 import inputs

    with torch.no_grad():
        return transformer(**inputs(fractal)(), return_dict=False)[0]


def _user_plan_family(name: str) -> dict:
    """What one rank measures on a `USER_PLAN_FAMILIES` case under its user's plan, as `_family` measures."""
    from diffusers.models._modeling_parallel import ContextParallelInput as Split
    from diffusers.models._modeling_parallel import ContextParallelOutput as Gather
    from test_skyreels_v2 import tiny_transformer as skyreels_model

    rope = {0: Split(1, 4, split_output=True), 1: Split(1, 4, split_output=True)}  # Wan's, per token
    if name == "wan vace":
        # Wan's plan, and the control tokens split where the first control block adds the video to them: each
        # control block's hint is then added to the main blocks' split video.
        plan = {"rope": rope, "vace_blocks.0": {"hidden_states": Split(1, 3), "control_hidden_states": Split(1, 3)},
                "blocks.0": {"hidden_states": Split(1, 3)}, "proj_out": Gather(1, 3)}
        return _family(_vace_model, _user_plan_configs(name), _vace_call, plan=plan)
    if name.startswith("skyreels"):
        # Under diffusion forcing the time embedding is per token, (B, 6, N, D), split with the video (with one
        # timestep it has 3 dims, left whole); its output norm reads it per token, hence gathered after the last
        # block. The causal mask, built whole before the blocks, stays whole: both diffusers' Ulysses attention and
        # the sparse path attend the whole sequence.
        plan = {"rope": rope, "blocks.0": {"hidden_states": Split(1, 3)}, "blocks.*": {"temb": Split(2, 4)},
                "blocks.1": Gather(1, 3)}
        causal = name.endswith("causal")
        return _family(functools.partial(skyreels_model, frames_per_block=2 if causal else 1),
                       _user_plan_configs(name), functools.partial(_skyreels_call, per_frame=causal), plan=plan)
    # The tokens (in tiled order too) split after the model flattens them; each self-attention's RoPE split with
    # them (the blocks get it whole); gathered after the last visual block, before the model unflattens them.
    plan = {"visual_transformer_blocks.0": {"visual_embed": Split(1, 3)},
            "visual_transformer_blocks.*.self_attention": {"rotary_emb": Split(1, 6)},
            "visual_transformer_blocks.1": Gather(1, 3)}
    # The original runs the tiled order only with NABLA's mask (flex attention): the dense reference is the
    # frame-major call, whose output the tiled one's equals (test_kandinsky5).
    return _family(_kandinsky5_model, _user_plan_configs(name),
                   functools.partial(_kandinsky5_call, fractal=name.endswith("fractal")), plan=plan,
                   dense_call=functools.partial(_kandinsky5_call, fractal=False))


def _wan_with_heads(heads: int):
    from diffusers import WanTransformer3DModel

    from diffsparse.pipelines.tiny import tiny_wan_config

    torch.manual_seed(0)
    return WanTransformer3DModel(**(tiny_wan_config()["transformer"] | {"num_attention_heads": heads})).eval()


WINDOWS = [(1, 2, 2), (3, 8, 8), (1, 4, 4), (2, 2, 8), (1, 8, 2), (2, 4, 4)]


def _configs_for_heads(heads: int) -> dict:
    """`CONFIGS` with one window per head of a model of `heads` heads."""
    return {name: config for name, config in CONFIGS.items() if name != "window3d per head"} | {
        "window3d per head": diffsparse.SparseConfig(pattern=Window3D(WINDOWS[:heads]), block_size=16, dense_steps=0),
    }


# Heads per model on four ranks: one each; or 2, 2, 1 and 1 (ring attention needs no divisible heads, so neither
# does the sparse path's exchange).
MESH_HEADS = (4, 6)


def _four_process_job() -> dict:
    """What one of four ranks measures on a ring x Ulysses mesh (2 x 2): diffusers splits the sequence over the
    flattened mesh, ring-major."""
    from diffusers import ContextParallelConfig

    parallel = ContextParallelConfig(ring_degree=2, ulysses_degree=2)
    return {heads: _against_one_process(_wan_with_heads(heads), _configs_for_heads(heads), parallel)[0]
            for heads in MESH_HEADS}


def _worker(rank: int, world: int, job, init_file: str, results):
    # A rank once aborted in native code (glibc: "malloc(): unaligned tcache chunk detected"; our CPU kernel came out
    # clean under AddressSanitizer): the next abort prints each thread's Python stack on stderr.
    faulthandler.enable()
    # "cpu:gloo": diffusers exchanges the uneven shares' sizes on the device its backend string names.
    dist.init_process_group("cpu:gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # diffusers places each rank on `rank % torch.accelerator.device_count()`, which is 0 on a CPU-only machine.
    torch.accelerator.device_count = lambda: 1
    # diffusers refuses tensor parallelism on a CPU mesh (it lists accelerators only); the sharding and the
    # collectives are the same on gloo, which is what lets this machine check the sparse path under it.
    import diffusers.hooks.tensor_parallel

    diffusers.hooks.tensor_parallel._SUPPORTED_TP_DEVICES += ("cpu",)
    dist.all_gather = _all_gather_uneven_on_gloo(dist.all_gather)
    import diffusers.models.attention_dispatch as dispatch

    dispatch._native_attention_forward_op = _native_forward_op_with_lse(dispatch._native_attention_forward_op)
    try:
        results.put((rank, job()))
    except Exception:  # noqa: BLE001  (any failure: the parent reports it with its traceback)
        results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _run_ranks(world: int, job) -> dict:
    """`job()`'s result on each of `world` CPU processes (gloo), by rank."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        workers = [context.Process(target=_worker, args=(rank, world, job, init_file, results))
                   for rank in range(world)]
        for worker in workers:
            worker.start()
        # A hang's limit, not a speed bound: the whole module's job took over 300 s on a loaded 2-core machine.
        out = _collect_results(results, workers, timeout=900)
        for worker in workers:
            worker.join(timeout=60)
    for rank, result in out.items():
        assert isinstance(result, dict), f"rank {rank}: {result}"
    return out


def _collect_results(results, workers, timeout: float) -> dict:
    """Each rank's `(rank, result)` from `results`; a rank that dies without one (a native crash: a rank once
    aborted with glibc's "malloc(): unaligned tcache chunk detected") fails at once, naming its exit code, instead
    of the wait running out `timeout` s later with an empty queue."""
    out, deadline = {}, time.monotonic() + timeout
    while len(out) < len(workers):
        try:
            rank, result = results.get(timeout=1)
            out[rank] = result
            continue
        except queue.Empty:
            pass
        crashed = {rank: worker.exitcode for rank, worker in enumerate(workers)
                   if rank not in out and worker.exitcode not in (None, 0)}
        if crashed or time.monotonic() > deadline:
            for worker in workers:
                worker.kill()
            raise AssertionError(f"ranks died without a result (exit codes; negative: the signal): {crashed}"
                                 if crashed else f"no result from ranks {sorted(set(range(len(workers))) - set(out))} "
                                 f"in {timeout} s")
    return out


def _assert_equals_one_process(per_rank: dict, key: str, config: str) -> None:
    """Each rank's sparse output under `config` (result `key`) within 1e-5 of one process's, the config dropping
    blocks that matter, and the ranks' densities (each its own heads' or tokens' blocks) averaging to the whole."""
    for result in per_rank.values():
        error, _, density_alone, sparse_vs_dense = result[key][config]
        assert error < 1e-5 and density_alone < 1
        assert sparse_vs_dense > 1e-3  # the config does drop blocks that matter
    densities = [result[key][config][1] for result in per_rank.values()]
    assert sum(densities) / WORLD == pytest.approx(density_alone)


@pytest.fixture(scope="module")
def per_rank():
    return _run_ranks(WORLD, _two_process_job)


@pytest.mark.parametrize("family", EXACT_DENSE_FAMILIES)
def test_dense_calls_are_diffusers_own_context_parallel_attention(per_rank, family):
    assert all(result[family]["dense"] < 1e-5 for result in per_rank.values())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_sparse_attention_equals_one_process(per_rank, family, name):
    # Each rank's stats are its own heads' blocks: with one window per head they differ, and average to the whole.
    _assert_equals_one_process(per_rank, family, name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_memory_held_by_both_ranks_is_amplified_on_each(per_rank, name):
    # One chunk frame keeps every block (density 1.0), but the calls still run the sparse processor, which amplifies
    # the memory's keys: rank 1 must amplify the 16 it holds, from its own first token on.
    for result in per_rank.values():
        error, density, density_alone, _ = result["helios memory on both ranks"][name]
        assert error < 1e-5 and density == density_alone == 1.0


@pytest.mark.parametrize("family", TENSOR_PARALLEL_FAMILIES)
def test_dense_calls_under_tensor_parallelism_are_diffusers_own(per_rank, family):
    assert all(result[f"tp {family}"]["dense"] < 1e-5 for result in per_rank.values())


@pytest.mark.parametrize("name", list(TENSOR_PARALLEL_CONFIGS))
@pytest.mark.parametrize("family", TENSOR_PARALLEL_FAMILIES)
def test_sparse_attention_under_tensor_parallelism_equals_one_process(per_rank, family, name):
    # Each rank attends its own heads: per-head masks and a budget shared over the layer's heads as one process.
    _assert_equals_one_process(per_rank, f"tp {family}", name)


@pytest.mark.parametrize("name", list(FOUR_HEAD_CONFIGS))
@pytest.mark.parametrize("family", TENSOR_PARALLEL_FOUR_HEAD_FAMILIES)
def test_sparse_attention_under_tensor_parallelism_with_two_heads_per_rank_equals_one_process(per_rank, family, name):
    # Rank 1 holds heads 2 and 3: their own windows, and their share of the layer's budget, as in one process.
    assert all(result[f"tp {family} 4 heads"]["dense"] < 1e-5 for result in per_rank.values())
    _assert_equals_one_process(per_rank, f"tp {family} 4 heads", name)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallelism_enabled_after_apply_and_kept_by_remove(per_rank, family):
    for result in per_rank.values():
        assert result[family]["applied first"] < 1e-5 and result[family]["removed"] < 1e-5


@pytest.mark.parametrize("name", [*RING_FAMILIES, *RING_JOINT_FAMILIES, "uneven ring wan", "wan 3 heads"])
def test_ring_attention_equals_one_process(per_rank, name):
    # diffusers splits the sequence over the ring's ranks as over Ulysses's: the sparse path exchanges it for the
    # whole sequence of half of the heads all the same (of three heads, two and one), so each rank gets what one
    # process gets.
    measured_name = name if name.startswith("uneven") else f"ring {name}"
    configs = TENSOR_PARALLEL_CONFIGS if name in RING_JOINT_FAMILIES else CONFIGS
    if name == "wan 3 heads":
        configs = _configs_for_heads(3)
    for result in per_rank.values():
        measured = result[measured_name]
        assert measured["dense"] < 1e-5  # diffusers' own ring attention (its partial results merged) as one process
        assert measured["applied first"] < 1e-5 and measured["removed"] < 1e-5
        for config in configs:
            error, _, density_alone, sparse_vs_dense = measured[config]
            assert error < 1e-5 and density_alone < 1 and sparse_vs_dense > 1e-3, config


@pytest.mark.parametrize("name", USER_PLAN_FAMILIES)
def test_dense_calls_under_a_user_plan_are_diffusers_own_context_parallel_attention(per_rank, name):
    for result in per_rank.values():
        measured = result[f"user plan {name}"]
        assert measured["dense"] < 1e-5
        assert measured["applied first"] < 1e-5 and measured["removed"] < 1e-5


@pytest.mark.parametrize(("name", "config"), [(name, config) for name in USER_PLAN_FAMILIES
                                              for config in _user_plan_configs(name)])
def test_sharded_sparse_attention_under_a_user_plan_equals_one_process(per_rank, name, config):
    # No diffusers plan: each rank holds the share of the video (of the control video, of the per-token time
    # embedding) that the user's plan splits, which the sparse path gathers as on Wan, the whole call's causal mask
    # and tiled token order applied to the whole sequence.
    _assert_equals_one_process(per_rank, f"user plan {name}", config)


@pytest.fixture(scope="module")
def per_rank_of_mesh():
    return _run_ranks(4, _four_process_job)


@pytest.mark.parametrize("heads", MESH_HEADS)
def test_ring_and_ulysses_mesh_equals_one_process(per_rank_of_mesh, heads):
    # Four processes, ring_degree=2 x ulysses_degree=2: each rank's share of the sequence is its place in the
    # flattened mesh, and it attends its share of the heads over the whole sequence.
    for result in per_rank_of_mesh.values():
        assert result[heads]["dense"] < 1e-5
        for config in _configs_for_heads(heads):
            error, _, density_alone, sparse_vs_dense = result[heads][config]
            assert error < 1e-5 and density_alone < 1 and sparse_vs_dense > 1e-3, config
    # One window per head: each rank's stats are its own heads' blocks, which make up the whole.
    shares = [heads // 4 + (rank < heads % 4) for rank in range(4)]
    densities = [per_rank_of_mesh[rank][heads]["window3d per head"][1] for rank in range(4)]
    assert len(set(densities)) > 1
    assert sum(d * n for d, n in zip(densities, shares)) / heads == pytest.approx(
        per_rank_of_mesh[0][heads]["window3d per head"][2])


@pytest.mark.parametrize("ring", [False, True], ids=["ulysses", "ring"])
@pytest.mark.parametrize("order", MINIMAX_ORDERS)
def test_minimax_h3_packed_sequence_equals_one_process(per_rank, order, ring):
    # diffusers' plan splits MiniMax-H3's packed rows (in the caller's order) at the first block: gathered back in
    # that order, the adapter's token order puts the target's rows on its grid, as in one process.
    for result in per_rank.values():
        measured = result[f"minimax {order}{' ring' if ring else ''}"]
        assert measured["dense"] < 1e-5
        assert measured["applied first"] < 1e-5 and measured["removed"] < 1e-5
        for config in MINIMAX_CONFIGS:
            error, _, density_alone, sparse_vs_dense = measured[config]
            assert error < 1e-5 and density_alone < 1 and sparse_vs_dense > 1e-3, config


@pytest.mark.parametrize("name", list(JOINT_FAMILIES))
def test_joint_attention_dense_calls_are_diffusers_own_context_parallel_attention(per_rank, name):
    assert all(result[f"cp {name}"]["dense"] < 1e-5 for result in per_rank.values())


@pytest.mark.parametrize("config", list(TENSOR_PARALLEL_CONFIGS))
@pytest.mark.parametrize("name", list(JOINT_FAMILIES))
def test_sharded_joint_attention_equals_one_process(per_rank, name, config):
    # Each rank holds a third of the text and a slice of the image: gathered back in the model's order, the whole
    # call's layout, token order (references in the text's span) and padded prompts as one process.
    _assert_equals_one_process(per_rank, f"cp {name}", config)


@pytest.mark.parametrize("name", list(JOINT_FAMILIES))
def test_joint_attention_parallelism_enabled_after_apply_and_kept_by_remove(per_rank, name):
    for result in per_rank.values():
        assert result[f"cp {name}"]["applied first"] < 1e-5 and result[f"cp {name}"]["removed"] < 1e-5


@pytest.mark.parametrize("name", ["wan", "helios", *UNEVEN_JOINT_FAMILIES])
def test_uneven_shares_equal_one_process(per_rank, name):
    # Ulysses "anything": each rank holds its `tensor_split` share of every stream, one token more on rank 0.
    configs = CONFIGS if name in ("wan", "helios") else TENSOR_PARALLEL_CONFIGS
    for result in per_rank.values():
        measured = result[f"uneven {name}"]
        assert measured["dense"] < 1e-5 or name == "helios"  # diffusers' own dense Helios: EXACT_DENSE_FAMILIES
        assert measured["applied first"] < 1e-5 and measured["removed"] < 1e-5
        for config in configs:
            error, _, density_alone, sparse_vs_dense = measured[config]
            assert error < 1e-5 and density_alone < 1 and sparse_vs_dense > 1e-3, config


@pytest.mark.parametrize("config", ONE_HEAD_CONFIGS)
def test_fewer_heads_than_ranks_is_refused_on_every_rank(per_rank, config):
    # Ring attention takes a Wan of one head on 2 ranks; the sparse path would leave rank 1 with no head. Every rank
    # refuses at the same call (before, a fitted pattern failed on rank 1 alone and rank 0 hung in the exchange).
    for result in per_rank.values():
        message = result["refusals"][f"one head {config}"]
        assert message is not None and "ring_degree=2 x ulysses_degree=1 = 2 ranks" in message, message
        assert "needs at least 2 heads" in message and "pattern='dense'" in message
        assert result["refusals"]["one head dense"] < 1e-5


def test_a_split_other_than_the_layouts_is_refused_on_every_rank(per_rank):
    # Only rank 1 reads a wrong share (47 of 96 tokens for the 48 it holds): rank 0, whose share matches, must raise
    # too rather than wait in the all-to-all, and both must name rank 1's lengths.
    for result in per_rank.values():
        message = result["refusals"]["wrong split"]
        assert message is not None and "rank 1 holds 48 tokens, its share 47" in message, message
        assert "rank 1 holds 48 tokens, its share 49" in (result["refusals"]["short split"] or "")
        assert "rank 0" not in message and "diffsparse cannot place them" in message
        assert result["refusals"]["split after"] < 1e-5
    # Once checked, a split is not gathered again: only the rank whose length changed since can tell.
    assert "rank 1 holds 47 tokens, its share 48" in per_rank[1]["refusals"]["changed split"]
    assert "changed split" not in per_rank[0]["refusals"]


def test_families_that_refuse_context_parallelism_say_so_before_a_call():
    # A processor that refuses at its call (`check_not_parallel`, parallelism enabled after `apply`) must also be
    # refused by `apply` when parallelism is already enabled (`context_parallel = False`), and only those.
    import inspect

    from diffsparse.pipelines.registry import _ADAPTERS

    classes = {cls for adapter in _ADAPTERS
               for cls in (dict(adapter.processor_pairs) or {None: adapter.sparse_processor}).values()}
    refusing = {cls for cls in classes if "check_not_parallel" in inspect.getsource(cls.__call__)}
    assert refusing and {cls for cls in classes if not cls.context_parallel} == refusing
