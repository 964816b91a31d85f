"""diffsparse on diffusers Cosmos 3 (`Cosmos3OmniTransformer`, tiny, random weights): the packed understanding and
generation sequence called directly, as the modular pipeline calls it once per guidance pass: the generation rows
sparse over every key with grouped-query attention, the causal understanding pathway as the original's."""

import functools
import re
import warnings
from collections import Counter

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    Cosmos3OmniPipeline,
    Cosmos3OmniTransformer,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.modular_pipelines import SequentialPipelineBlocks
from diffusers.modular_pipelines.cosmos.before_denoise import (
    Cosmos3PrepareTextSegmentsStep,
    Cosmos3TransferPackSequenceStep,
    Cosmos3TransferPrepareLatentsStep,
    Cosmos3TransferSetTimestepsStep,
)
from diffusers.modular_pipelines.cosmos.denoise import Cosmos3TransferDenoiseStep
from diffusers.modular_pipelines.cosmos.modular_blocks_cosmos3 import (
    Cosmos3VisionActionCoreDenoiseStep,
    Cosmos3VisionCoreDenoiseStep,
    Cosmos3VisionSoundCoreDenoiseStep,
)
from diffusers.modular_pipelines.cosmos.modular_blocks_cosmos3_distilled import Cosmos3DistilledVisionCoreDenoiseStep
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.cosmos3 import NOT_ALL_VISION

from helpers import (
    QWEN3_TEMPLATE,
    chat_tokenizer,
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    recorded_attention_calls,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
LOCAL = Window3D(window=(1, 1, 1))
UND = 10  # prompt tokens
GRID = (3, 4, 6)  # the video's patch grid: 3 latent frames of 8 x 12, patchified 2 x 2


def make_transformer(**kwargs):
    torch.manual_seed(0)
    return Cosmos3OmniTransformer(
        head_dim=16, hidden_size=32, intermediate_size=64, latent_channel=4, latent_patch_size=2, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, patch_latent_dim=16, vocab_size=40, rope_axes_dim=[2, 3, 3],
        **kwargs,
    ).eval()


@pytest.fixture(scope="module")
def transformer():
    return make_transformer()


def inputs(timestep=500.0, items=1):
    """The prompt's 10 tokens, then `items` videos of 3 x 8 x 12 latents (72 patches each), all frames noisy."""
    patches = GRID[0] * GRID[1] * GRID[2]
    length = UND + items * patches
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in GRID), indexing="ij")).reshape(3, -1)
    positions = torch.cat([torch.arange(UND)[None].expand(3, -1)] + [grid + UND] * items, dim=1)
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, 40, (UND,), generator=g), "text_indexes": torch.arange(UND),
        "position_ids": positions, "und_len": UND, "sequence_length": length,
        "vision_tokens": [torch.randn(1, 4, 3, 8, 12, generator=g) for _ in range(items)],
        "vision_token_shapes": [GRID] * items, "vision_sequence_indexes": torch.arange(UND, length),
        "vision_mse_loss_indexes": torch.arange(UND, length), "vision_timesteps": torch.full((length - UND,), timestep),
        "vision_noisy_frame_indexes": [torch.arange(GRID[0])] * items,
    }


def run(model, config=None, **kwargs):
    with torch.no_grad():
        if config is None:
            return model(**inputs(**kwargs)).sample
        with diffsparse.sparse(model, config) as handle:
            return model(**inputs(**kwargs)).sample, handle.stats()


def test_dense_pattern_is_the_unmodified_model(transformer):
    reference = run(transformer)
    dense, stats = run(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0))
    assert all(torch.equal(a, b) for a, b in zip(dense, reference))
    assert [s.layer for s in stats.layers] == [0, 1]


@pytest.mark.parametrize("variant", [{}, {"qk_norm_for_text": False, "use_und_k_norm_for_gen": True}],
                         ids=["qk norms", "generation's own norm of the understanding keys"])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense_and_the_generation_rows_are_sparse(variant, order):
    model = make_transformer(**variant)
    check_against_dense(model, inputs, block_size=8, order=order, select=lambda sample: torch.cat(sample))
    reference = run(model)
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0, order=order)
    with recorded_attention_calls() as calls:
        kept, stats = run(model, config)
    for a, b in zip(kept, reference):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert all(r.sparse for r in stats.calls["transformer"])
    # The 72 generation queries over the prompt (the leading span, kept whole) and the video.
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(*GRID, text_len=UND, text_position="start"), (1, 72))
    }
    sparse, stats = run(model, diffsparse.SparseConfig(pattern=LOCAL, block_size=8, dense_steps=0))
    assert not torch.allclose(sparse[0], reference[0], atol=1e-4) and stats.sparse_density < 1


def test_layout_and_step_of_a_call(transformer):
    layout, timestep = adapter_for(transformer).read_call(transformer, (), inputs(timestep=750.0))
    assert layout == VideoLayout(*GRID, text_len=UND, text_position="start") and float(timestep) == 750.0


def test_steps_follow_the_timesteps(transformer):
    # A bare loop counts distinct timesteps: the first step dense, the others sparse.
    with diffsparse.sparse(transformer, diffsparse.SparseConfig(pattern=LOCAL, block_size=8, dense_steps=1)) as handle:
        with torch.no_grad():
            for t in (900.0, 600.0, 300.0):
                transformer(**inputs(timestep=t))
        records = handle.stats().calls["transformer"]
    assert [(r.step, r.sparse) for r in records] == [(s, s > 0) for s in range(3) for _ in range(2)]


def test_vision_items_before_the_target_join_the_prompt_span(transformer):
    # Two videos in one generation sequence, as Cosmos Transfer packs a control before the target: the target is the
    # grid, the control beside the prompt in the leading span (its rows dense, outside the kernel's call).
    reference = run(transformer, items=2)
    layout, _ = adapter_for(transformer).read_call(transformer, (), inputs(items=2))
    assert layout == VideoLayout(*GRID, text_len=UND + 72, text_position="start")
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        kept, stats = run(transformer, config, items=2)
    for a, b in zip(kept, reference):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert {(layout, shape) for _, layout, shape in calls} == {(layout, (1, 72))}
    assert all(r.sparse for r in stats.calls["transformer"])
    sparse, stats = run(transformer, diffsparse.SparseConfig(pattern=LOCAL, block_size=8, dense_steps=0), items=2)
    assert not torch.allclose(sparse[0], reference[0], atol=1e-4)
    # The density is over every generation row: the control's 72 rows count whole, and the target's keep at least
    # the 82 columns of the leading span.
    assert (1 + 82 / 154) / 2 <= stats.sparse_density < 1


def test_the_target_is_the_last_vision_item_whatever_the_shape_of_those_before_it(transformer):
    # A clean one-frame 4 x 6 item (1 x 2 x 3 patches) before the target: the target's grid is the layout's, not
    # the first item's, and the item joins the prompt's span.
    call = inputs(items=2)
    control = (1, 2, 3)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in control), indexing="ij")).reshape(3, -1)
    length = UND + 6 + 72
    g = torch.Generator().manual_seed(2)
    call.update({
        "position_ids": torch.cat([call["position_ids"][:, :UND], grid + UND, call["position_ids"][:, -72:]], dim=1),
        "sequence_length": length, "vision_tokens": [torch.randn(1, 4, 1, 4, 6, generator=g), call["vision_tokens"][1]],
        "vision_token_shapes": [control, GRID], "vision_sequence_indexes": torch.arange(UND, length),
        "vision_mse_loss_indexes": torch.arange(UND + 6, length), "vision_timesteps": torch.full((72,), 500.0),
        "vision_noisy_frame_indexes": [torch.arange(0), torch.arange(GRID[0])],
    })
    layout, _ = adapter_for(transformer).read_call(transformer, (), call)
    assert layout == VideoLayout(*GRID, text_len=UND + 6, text_position="start")
    with torch.no_grad():
        reference = transformer(**call).sample
        config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0)
        with diffsparse.sparse(transformer, config) as handle, recorded_attention_calls() as calls:
            kept = transformer(**call).sample
    assert {(layout, shape) for _, layout, shape in calls} == {(layout, (1, 72))}
    assert all(r.sparse for r in handle.stats().calls["transformer"])
    for a, b in zip(kept, reference):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_its_context_parallel_helper_is_refused(transformer):
    transformer._cp_shard_fn = lambda *args: args
    try:
        with (
            diffsparse.sparse(transformer, diffsparse.SparseConfig(dense_steps=0)),
            torch.no_grad(),
            pytest.raises(NotImplementedError, match="_cp_shard_fn"),
        ):
            transformer(**inputs())
    finally:
        transformer._cp_shard_fn = None


def test_other_processors_are_refused(transformer):
    check_other_processors_are_refused(transformer, "Cosmos 3", layer=1)


class TransferChunkDenoise(SequentialPipelineBlocks):
    """Cosmos Transfer's denoising of one chunk (`Cosmos3TransferCoreDenoiseStep` without its Wan VAE encoding and
    decoding): the control latents and the target's clean latents given."""

    model_name = "cosmos3-omni"
    block_classes = (Cosmos3PrepareTextSegmentsStep, Cosmos3TransferPrepareLatentsStep, Cosmos3TransferPackSequenceStep,
                     Cosmos3TransferSetTimestepsStep, Cosmos3TransferDenoiseStep)
    block_names = ("prepare_text_segments", "prepare_latents", "pack_sequence", "set_timesteps", "denoise")


@pytest.fixture(scope="module")
def cosmos3_pipes(transformer):
    """diffusers' modular Cosmos 3 denoise blocks on tiny transformers and a flow UniPC scheduler (the distilled ones
    on a fixed 3-sigma schedule, a flow-matching Euler scheduler): text-to-video (also image-to-video), distilled,
    with sound, with action, and a Cosmos Transfer chunk."""
    def modular(blocks, model, scheduler=None):
        pipe = blocks().init_pipeline()
        pipe.update_components(transformer=model, scheduler=scheduler or UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0))
        return pipe

    distilled = modular(Cosmos3DistilledVisionCoreDenoiseStep, transformer, FlowMatchEulerDiscreteScheduler())
    distilled.register_to_config(distilled_sigmas=[1.0, 0.75, 0.5])
    pipes = {"text2video": modular(Cosmos3VisionCoreDenoiseStep, transformer), "distilled": distilled,
             "sound": modular(Cosmos3VisionSoundCoreDenoiseStep, make_transformer(sound_gen=True, sound_dim=8)),
             "action": modular(Cosmos3VisionActionCoreDenoiseStep, make_transformer(action_gen=True, action_dim=12)),
             "transfer": modular(TransferChunkDenoise, transformer)}
    pipes["image2video"] = pipes["text2video"]
    return pipes


LATENTS = torch.linspace(-1, 1, 4 * 3 * 8 * 12).reshape(1, 4, 3, 8, 12)  # a 3 x 4 x 6 patch grid
CALLS = {  # the inputs beyond the prompts' ids, the video's size (but for Transfer) and the step count
    "image2video": {"x0_tokens_vision": LATENTS, "vision_condition_frames": [0]},  # the first latent frame clean
    "action": {  # 2 action tokens behind the video
        "action": CosmosActionCondition(mode="policy", chunk_size=2, domain_name="av", image=torch.zeros(3, 8, 8)),
        "action_condition_frame_indexes": [],  # its default (None) fails in diffusers' `_prepare_action_segment`
    },
    "transfer": {"x0_tokens_vision": LATENTS, "current_conditional_frames": 1, "control_latents": [LATENTS.flip(-1)],
                 "control_guidance": 2.0},  # 3 passes a step: with the control, without it, unconditional
}


def modular_call(name):
    """The pipeline's call for 9 frames of 128 x 192 (a 3 x 4 x 6 patch grid) in 3 steps, a 10-token prompt and a
    6-token negative one, its output the latents."""
    call = {"cond_input_ids": list(range(1, 1 + UND)), "uncond_input_ids": list(range(20, 26)),
            "num_inference_steps": 3, "output": "latents", **CALLS.get(name, {})}
    if name != "transfer":
        call.update(num_frames=9, height=128, width=192)
    return call


def denoise(pipe, name, config=None):
    """The pipeline's latents for `modular_call(name)` from seed 0; with `config` applied for the call,
    `(latents, stats)`."""
    call = modular_call(name)
    with torch.no_grad():
        if config is None:
            return pipe(**call, generator=torch.Generator().manual_seed(0))
        with diffsparse.sparse(pipe, config) as handle:
            return pipe(**call, generator=torch.Generator().manual_seed(0)), handle.stats()


@pytest.mark.parametrize("name", ["text2video", "image2video", "distilled"])
def test_modular_pipeline_dense_every_block_kept_and_sparse_after_the_dense_step(cosmos3_pipes, name):
    stats, calls = check_modular_against_dense(cosmos3_pipes[name], modular_call(name))
    records = stats.calls["transformer"]
    # The scheduler's timestep on every noisy patch (0 to 1000) lands on its step; the pipeline names its guidance
    # passes (`cache_context`); the distilled blocks run one.
    prompts = {"cond": UND} if name == "distilled" else {"cond": UND, "uncond": 6}
    assert Counter((r.step, r.branch) for r in records) == {(step, b): 2 for step in range(3) for b in prompts}
    assert all(r.sparse == (r.step > 0) for r in records)
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(*GRID, text_len=n, text_position="start"), (1, 72)) for n in prompts.values()
    }


def test_modular_transfer_runs_every_guidance_pass_sparse_on_the_target(cosmos3_pipes):
    # Cosmos Transfer's three passes a step (with the control, without it, unconditional): the target's grid behind
    # the prompt and, in the passes with it, the control; all sparse after the dense step, so the guidance combines
    # predictions of one kind (before, the passes with the control ran dense and the other sparse).
    stats, calls = check_modular_against_dense(cosmos3_pipes["transfer"], modular_call("transfer"))
    records = stats.calls["transformer"]
    branches = ("cond", "cond_no_control", "uncond")
    assert Counter((r.step, r.branch) for r in records) == {(step, b): 2 for step in range(3) for b in branches}
    assert all(r.sparse == (r.step > 0) for r in records)
    assert {layout.text_len for _, layout, _ in calls} == {UND + 72, UND, 6 + 72}
    assert {(layout.frames, layout.height, layout.width, shape) for _, layout, shape in calls} == {(*GRID, (1, 72))}


@pytest.mark.parametrize("name", ["sound", "action"])
def test_modular_calls_whose_generation_tokens_are_not_all_video_run_the_original_counted_dense(cosmos3_pipes, name):
    # The omni blocks pack sound or action tokens behind the video: those calls run the original processor, a
    # warning saying why, counted dense on their own steps.
    run = functools.partial(denoise, cosmos3_pipes[name], name)
    reference = run()
    # "diffsparse: " first, as every diffsparse warning: results (compare.json, eval.csv) kept only such texts.
    said = f"^diffsparse: transformer: self-attention calls with {re.escape(NOT_ALL_VISION)}"
    with pytest.warns(UserWarning, match=said):
        out, stats = run(diffsparse.SparseConfig(pattern=LOCAL, block_size=8, dense_steps=1))
    records = stats.calls["transformer"]
    branches = ("cond", "uncond")
    assert Counter((r.step, r.branch) for r in records) == {(step, b): 2 for step in range(3) for b in branches}
    assert not any(r.sparse for r in records)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("name", ["sound", "action"])
@pytest.mark.parametrize(("config", "said"), [
    (diffsparse.SparseConfig(pattern="dense"), 0),
    (diffsparse.SparseConfig(pattern=LOCAL, block_size=8, dense_steps=1), 1),
], ids=["dense pattern", "first step dense"])
def test_calls_with_sound_or_action_tokens_are_said_once_where_the_settings_would_run_them_sparse(
    cosmos3_pipes, name, config, said
):
    # Through the runtime's `log_dense`, as every family's calls the sparse path cannot compute: said once per
    # `apply` where the settings would have run them sparse, and counted, not said, where the settings make them dense
    # anyway (the dense pattern, the dense step). Before, each of the 6 calls a run (3 steps, 2 guidance passes) warned.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, stats = denoise(cosmos3_pipes[name], name, config)
    said_here = [str(w.message) for w in record if issubclass(w.category, diffsparse.DiffsparseWarning)]
    assert len(said_here) == said and all(NOT_ALL_VISION in message for message in said_here)
    # Every call counted once, dense, each layer's 2 calls of the first step in the schedule's dense steps.
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(6, 0), (6, 0)]
    assert len(stats.calls["transformer"]) == 12 and not any(r.sparse for r in stats.calls["transformer"])
    assert stats.mean_density == 1.0


@pytest.fixture(scope="module")
def omni_pipe(transformer):
    """`Cosmos3OmniPipeline` on the tiny transformer: a word-level chat tokenizer (its ids within the transformer's
    40), a Wan VAE of 4 latent channels (8x in space, 4x in time; it encodes the conditioning video, zeros without
    one), no safety checker."""
    vocabulary = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "a", "red", "circle",
                  "low", "quality", "."]
    tokenizer = chat_tokenizer(vocabulary, QWEN3_TEMPLATE, ["<|vision_start|>"])
    tokenizer.eos_token = "<|im_end|>"
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = Cosmos3OmniPipeline(
        transformer=transformer, text_tokenizer=tokenizer, vae=vae.eval(), enable_safety_checker=False,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 9 frames of 64 x 96 -> 3 x 8 x 12 latents, a 3 x 4 x 6 patch grid; 2 steps; the prompts without templates.
OMNI_CALL = {"prompt": "a red circle", "negative_prompt": "low quality", "num_frames": 9, "height": 64, "width": 96,
             "num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "latent", "use_system_prompt": False,
             "add_resolution_template": False, "add_duration_template": False}


@pytest.mark.parametrize("condition", [{}, {"image": torch.rand(3, 64, 96)}], ids=["text-to-video", "image-to-video"])
def test_omni_pipeline_dense_every_block_kept_and_sparse_after_the_dense_step(omni_pipe, condition):
    # The non-modular pipeline: each guidance pass in its cache context ("cond", "uncond"), the scheduler's timestep
    # on every noisy patch (image-to-video: the first latent frame clean, its patches given none).
    stats, calls = check_pipeline_against_dense(omni_pipe, {**OMNI_CALL, **condition}, block_size=8)
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {(s, b): 2 for s in range(2) for b in ("cond", "uncond")}
    assert all(r.sparse == (r.step > 0) for r in records)
    prompts = omni_pipe.tokenize_prompt("a red circle", "low quality", use_system_prompt=False,
                                        add_resolution_template=False, add_duration_template=False)
    assert {(layout, shape) for _, layout, shape in calls} == {
        (VideoLayout(*GRID, text_len=len(ids), text_position="start"), (1, 72)) for ids in prompts
    }


def test_the_commands_read_the_omni_pipeline_s_video_as_one_clip_of_frames(omni_pipe):
    # Its output holds `video`, one sample's (not a batch of `frames`): the commands score it as a clip of 9 frames
    # (read as a batch, its first frame was taken for a clip of 64 rows).
    from diffsparse.compare import first_output

    output = omni_pipe(**{**OMNI_CALL, "output_type": "np", "num_inference_steps": 1})
    assert first_output(output).shape == (9, 64, 96, 3)
