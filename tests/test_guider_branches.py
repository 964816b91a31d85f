"""Guiders whose set of branches changes across steps, in a modular pipeline that names no branch (`cache_context`)."""

import torch
from diffusers.guiders import SkipLayerGuidance
from diffusers.hooks import HookRegistry, LayerSkipConfig
from diffusers.modular_pipelines.wan.modular_blocks_wan import WanBlocks

import diffsparse

from helpers import tiny_call


def test_changing_branch_sets_keep_each_place_one_computation(tiny_pipe):
    # Modular Wan runs the guider's branches as unnamed calls, named by their place in the step ("call 0", ...), and
    # a correction keeps statistics per name. SkipLayerGuidance with a CFG window gives [cond, uncond] at step 0,
    # [cond, uncond, cond_skip] at step 1 and [cond, cond_skip] after: "call 1" is labelled uncond, then cond_skip.
    # diffusers runs that two-branch cond_skip on the negative prompt without the skip hooks (its `is_conditional`
    # is false at the second call): the uncond computation, so the statistics "call 1" measured stay its own. Should
    # diffusers make it a real cond_skip (the prompt, layers skipped), places would stop naming one computation
    # each, and "call 1" would be corrected with the uncond branch's statistics: this test says so.
    transformer = tiny_pipe.transformer
    guider = SkipLayerGuidance(guidance_scale=5.0, skip_layer_guidance_scale=2.0, start=0.0, stop=0.4,
                               skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
                               skip_layer_config=LayerSkipConfig(indices=[0], fqn="blocks", skip_attention=True))
    pipe = WanBlocks().init_pipeline()
    pipe.update_components(transformer=transformer, vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder,
                           tokenizer=tiny_pipe.tokenizer, scheduler=tiny_pipe.scheduler, guider=guider)
    labels, calls = [], []
    prepare = guider.prepare_inputs_from_block_state

    def prepare_and_record(*args, **kwargs):
        batches = prepare(*args, **kwargs)
        labels.append([getattr(batch, guider._identifier_key) for batch in batches])
        return batches

    def record_call(module, args, kwargs):
        hooks = HookRegistry.check_if_exists_or_initialize(module.blocks[0]).hooks
        calls.append((kwargs["encoder_hidden_states"].data_ptr(), any(name.startswith("SkipLayer") for name in hooks)))

    guider.prepare_inputs_from_block_state = prepare_and_record
    handle_hook = transformer.register_forward_pre_hook(record_call, with_kwargs=True)
    call = tiny_call(output="videos", num_inference_steps=5)
    del call["max_sequence_length"], call["guidance_scale"]  # the modular pipeline's: its text step's, the guider's
    config = diffsparse.SparseConfig(block_size=16, dense_steps=1, correction="residual")
    try:
        with torch.no_grad(), diffsparse.sparse(pipe, config) as handle:
            pipe(**call)
            records = handle.stats().calls["transformer"]
    finally:
        handle_hook.remove()
    assert labels == [["pred_cond", "pred_uncond"], ["pred_cond", "pred_uncond", "pred_cond_skip"]] + [
        ["pred_cond", "pred_cond_skip"]] * 3
    places = [place for step in labels for place in range(len(step))]
    computations = {}
    for place, computation in zip(places, calls, strict=True):
        assert computations.setdefault(place, computation) == computation, f"call {place} changed computation"
    assert computations[0][0] != computations[1][0] and computations[2] == (computations[0][0], True)
    # Each place measured once, at its first step (cond_skip's layer 0 skipped), and runs sparse after.
    assert {(r.step, r.branch, r.layer) for r in records if r.measured} == {
        (0, "call 0", 0), (0, "call 0", 1), (0, "call 1", 0), (0, "call 1", 1), (1, "call 2", 1)}
    assert all(r.sparse for r in records if not r.measured)
