"""diffsparse on diffusers' Wan-Animate-2 transformer (tiny, random weights, offline, called directly as the segment
loop of its modular pipeline calls it): the reference pass, then denoising calls over the generation and the cached
reference. And diffusers' own modular core denoise steps (`WanAnimate2CoreDenoiseStep`, the distilled one) driving
it segment by segment, fed latents and embeddings (a tiny random Wan VAE for the encode and decode inside the loop;
no text or CLIP encoder)."""

import math

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.models.transformers import transformer_wan_animate_2
from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache, WanAnimate2Transformer3DModel
from torch.nn.attention.flex_attention import create_block_mask

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_read_call_by_position,
    recorded_attention_calls,
)

# The full video: 8 pixel frames -> 3 latent frames of reference, 4 of generation; 64 x 96 pixels -> 4 x 6 tokens.
ORIGIN_LEN, ORIGIN_AREA, GRID = 8, [64, 96], (4, 4, 6)
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)


@pytest.fixture(scope="module")
def uncompiled_block_mask():
    # The model compiles its block mask (`_compile=True`): slow on CPU and needless for a tiny mask.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformer_wan_animate_2, "create_block_mask",
                      lambda *args, _compile=True, **kwargs: create_block_mask(*args, _compile=False, **kwargs))
        yield


def make_transformer(in_dim=8, refer_stride=1):
    torch.manual_seed(0)
    return WanAnimate2Transformer3DModel(
        text_len=8, in_dim=in_dim, dim=16, ffn_dim=32, freq_dim=16, text_dim=8, out_dim=4, num_heads=2, num_layers=2,
        use_img_emb=False, refer_stride=refer_stride,
    ).eval()


@pytest.fixture(scope="module")
def transformer(uncompiled_block_mask):
    return make_transformer()


@pytest.fixture(scope="module")
def strided_transformer(uncompiled_block_mask):
    # `refer_stride=2`: the reference's frames on every other RoPE time position, its keys rotated so in the
    # denoising calls too (at stride 1 the reference's stride and the generation's are the same).
    return make_transformer(refer_stride=2)


def generate(model, config=None, generation=None, reference=None):
    """The reference pass, then one denoising call; its prediction (a list: each sample's, for more than one).
    `generation`, `reference`: each sample's latents' (frames, height, width), by default one sample of the full
    video (`ORIGIN_LEN // 4 + 2` generation frames, one fewer of reference, 8 x 12 latents: 4 x 6 tokens)."""
    g = torch.Generator().manual_seed(1)
    generation = generation or [(ORIGIN_LEN // 4 + 2, 8, 12)]
    reference = reference or [(ORIGIN_LEN // 4 + 1, 8, 12)]
    references, reference_conditions, latents, conditions = (
        [torch.randn(4, *shape, generator=g) for shape in shapes]
        for shapes in (reference, reference, generation, generation))
    text = [torch.randn(5, 8, generator=g) for _ in generation]
    reference_grid = torch.tensor([[frames, height // 2, width // 2] for frames, height, width in reference])

    def run():
        cache = WanAnimate2KVCache(len(model.blocks))
        model(hidden_states=references, timestep=torch.tensor([999.0]), encoder_hidden_states=text,
              condition_latents=reference_conditions, kv_cache=cache, kv_cache_mode="extract",
              seq_len=math.prod(reference[0]) // 4, offset_grid_sizes=reference_grid)
        sample = model(hidden_states=latents, timestep=torch.tensor([700.0]), encoder_hidden_states=text,
                       condition_latents=conditions, kv_cache=cache, kv_cache_mode="cached",
                       seq_len=math.prod(generation[0]) // 4, reference_grid_sizes=reference_grid,
                       origin_len=ORIGIN_LEN, origin_area=ORIGIN_AREA).sample
        return sample if len(sample) > 1 else sample[0]

    with torch.no_grad():
        if config is None:
            return run()
        with diffsparse.sparse(model, config):
            return run()


@pytest.mark.parametrize("refer_stride", [1, 2])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(request, order, refer_stride):
    # (Leaving out the reference frames, giving generation frame f reference frame f, or rotating the cached
    # reference keys at the generation's RoPE stride instead of the model's `refer_stride`, fails every block kept.)
    transformer = request.getfixturevalue("strided_transformer" if refer_stride == 2 else "transformer")
    reference = generate(transformer)
    assert torch.equal(generate(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)), reference)
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=8, dense_steps=0,
                                          order=order)
    torch.testing.assert_close(generate(transformer, every_block), reference, atol=1e-4, rtol=0)
    assert not torch.allclose(generate(transformer, ONE_TOKEN), reference, atol=1e-4)


def test_the_denoising_call_is_sparse_on_the_generation_grid_and_the_reference_pass_dense(transformer):
    with recorded_attention_calls() as calls, torch.no_grad(), diffsparse.sparse(transformer, ONE_TOKEN) as handle:
        generate(transformer)
        records = handle.stats().calls["transformer"]
    assert {layout for _, layout, _ in calls} == {VideoLayout(*GRID)}
    # The reference pass runs the original (dense), the denoising call is sparse, its density counting the
    # reference frames' dense pairs.
    assert [(r.layer, r.sparse) for r in records] == [(0, False), (1, False), (0, True), (1, True)]
    frame, frames = 24, GRID[0]
    dense_reference_pairs = (frames - 1) * frame * frame
    assert all(dense_reference_pairs / (frames * frame) ** 2 < r.density < 1 for r in records[2:])


@pytest.mark.parametrize("call", [{"generation": [(GRID[0] - 1, 8, 12)]}, {"reference": [(GRID[0] - 2, 8, 12)]},
                                  {"generation": [(GRID[0] + 1, 8, 12)]}],
                         ids=["shorter generation", "shorter reference", "longer generation"])
def test_a_segment_of_another_length_than_the_block_mask_s_video_runs_the_original_counted_dense(transformer, call):
    # The block mask is built for the full video; a shorter segment, or a shorter reference, leaves padded (zero)
    # keys in it that the original attends and the sparse path would not. A longer segment (which the original
    # runs) has generation frames past the reference's last frame, which the sparse path has no reference frame for.
    check_runs_the_original_counted_dense(transformer, call)


def check_runs_the_original_counted_dense(transformer, call: dict) -> None:
    """Under a one-token window, `generate(**call)` gives the original's output bit for bit, sample by sample, both
    calls of every layer counted dense."""
    reference = generate(transformer, **call)
    with torch.no_grad(), diffsparse.sparse(transformer, ONE_TOKEN) as handle:
        out = generate(transformer, **call)
        layers = handle.stats().layers
    for sample, expected in zip(*((x,) if torch.is_tensor(x) else x for x in (out, reference)), strict=True):
        assert torch.equal(sample, expected)
    assert [(s.dense_calls, s.sparse_calls) for s in layers] == [(2, 0)] * len(transformer.blocks)


# A reference at another resolution than the video's (a reference image of another size): the original scatters each
# of its frames into a frame of the block mask's grid, padded with zero keys that it attends, which the sparse path
# (a reference frame taken as one generation frame's tokens) would not compute. 8 x 8 latents: 4 x 4 tokens a frame.
def test_a_reference_of_another_area_than_the_video_s_runs_the_original_counted_dense(transformer):
    check_runs_the_original_counted_dense(transformer, {"reference": [(GRID[0] - 1, 8, 8)]})


def test_a_reference_on_another_grid_of_the_video_s_area_is_sparse(transformer):
    # 16 x 6 latents (8 x 3 tokens): as many tokens a frame as the video's, so each fills its frame of the block mask
    # with no padding and the sparse path attends what the original does (each its own RoPE, on its own grid).
    call = {"reference": [(GRID[0] - 1, 16, 6)]}
    every_block = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=8, dense_steps=0)
    with torch.no_grad(), diffsparse.sparse(transformer, every_block) as handle:
        out = generate(transformer, **call)
        layers = handle.stats().layers
    torch.testing.assert_close(out, generate(transformer, **call), atol=1e-4, rtol=0)
    assert [(s.dense_calls, s.sparse_calls) for s in layers] == [(1, 1)] * len(transformer.blocks)


# A batch whose samples are on grids of as many tokens but another shape (4 x 6 and 6 x 4 tokens), which the original
# handles (its block mask only needs each frame's token count): the runtime's layout is read from the first sample's
# latents, so a second generation sample would be attended on the wrong grid. The call runs the original, counted
# dense; so too for the reference's grids, as documented (`whole_video`: every sample alike).
@pytest.mark.parametrize("stream", ["generation", "reference"])
def test_a_batch_of_samples_on_different_grids_runs_the_original_counted_dense(transformer, stream):
    frames = {"generation": GRID[0], "reference": GRID[0] - 1}
    call = {name: [(n, 8, 12), (n, 12, 8) if name == stream else (n, 8, 12)] for name, n in frames.items()}
    check_runs_the_original_counted_dense(transformer, call)


def test_read_call_takes_the_kv_cache_mode_by_position_as_by_keyword(transformer):
    # The segment loop passes keywords; a direct call may pass `kv_cache_mode` by position (forward's sixth, after
    # `kv_cache`): read from the wrong position, the reference pass would get a layout (the cache object is no
    # "extract") and take a CFG branch's place. The reference pass: no layout; the denoising call: the grid.
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(4, GRID[0], 8, 12, generator=g)]
    for mode, layout in (("extract", None), ("cached", VideoLayout(*GRID))):
        call = {"hidden_states": latents, "timestep": torch.tensor([700.0]),
                "encoder_hidden_states": [torch.randn(5, 8, generator=g)], "condition_latents": latents,
                "kv_cache": WanAnimate2KVCache(len(transformer.blocks)), "kv_cache_mode": mode,
                "seq_len": math.prod(GRID)}
        assert adapter_for(transformer).read_call(transformer, (), call)[0] == layout
        check_read_call_by_position(transformer, call)


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "Wan-Animate-2", layer=1)


@pytest.fixture(scope="module")
def animate2_pipes(uncompiled_block_mask):
    """diffusers' modular Wan-Animate-2 core denoise steps (segment loop: VAE-encode the segment, reference pass,
    denoising, decode), the guided one with a CFG guider, the distilled one unguided; a tiny Wan VAE of 4 latent
    channels (the transformer takes latents, then the 4-channel mask and the conditioning latents: 12 channels)."""
    from diffusers.modular_pipelines.wan_animate_2.modular_blocks_wan_animate_2 import WanAnimate2CoreDenoiseStep
    from diffusers.modular_pipelines.wan_animate_2.modular_blocks_wan_animate_2_distilled import (
        WanAnimate2DistilledCoreDenoiseStep,
    )

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    pipes = {}
    for name, blocks, scale in (("guided", WanAnimate2CoreDenoiseStep, 3.0),
                                ("distilled", WanAnimate2DistilledCoreDenoiseStep, 1.0)):
        pipes[name] = blocks().init_pipeline()
        pipes[name].update_components(transformer=make_transformer(in_dim=12), vae=vae,
                                      scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                      guider=ClassifierFreeGuidance(guidance_scale=scale))
        pipes[name].set_progress_bar_config(disable=True)
    return pipes


def animate_call():
    """The call for the decoded video of two 5-frame segments (one frame shared) of 32 x 64 pixels, 3 steps each: 2
    latent frames of 4 x 8 latents (2 x 4 tokens) and the reference image's; its output the segments' frames."""
    g = torch.Generator().manual_seed(1)
    return {
        "driving_video_pixels": torch.rand(1, 3, 9, 32, 64, generator=g) * 2 - 1,
        "reference_image_latents": torch.randn(8, 1, 4, 8, generator=g),
        "condition_clip_context": torch.zeros(1, 1, 8),  # unused: the transformer has no image embedding
        "prompt_ref_embeds": torch.randn(1, 5, 8, generator=g), "prompt_embeds": torch.randn(1, 5, 8, generator=g),
        "negative_prompt_embeds": torch.randn(1, 4, 8, generator=g),
        "segment_frame_length": 5, "effective_segment": 4, "num_segments": 2, "height": 32, "width": 64,
        "num_inference_steps": 3, "output": "segment_frames",
    }


@pytest.mark.parametrize("name", ["guided", "distilled"])
def test_modular_segment_loop_dense_every_block_kept_and_sparse_after_each_segment_s_dense_step(animate2_pipes, name):
    pipe, branches = animate2_pipes[name], ["call 0", "call 1"] if name == "guided" else ["call 0"]
    (whole, last), calls = check_modular_against_dense(
        pipe, animate_call(), output=lambda segments: torch.cat(segments, dim=2),
        stats=lambda handle: (handle.stats(since_apply=True), handle.stats()))
    # Each segment sets the scheduler's timesteps anew: a new run of the step clock, its first step dense (per layer
    # and segment: the reference pass and the first step's calls dense, the two later steps' sparse).
    assert {(s.dense_calls, s.sparse_calls) for s in whole.layers} == {
        (2 * (1 + len(branches)), 2 * 2 * len(branches))}
    # The last segment's calls: the reference pass (at the first step's timestep) dense, then each guider branch
    # on its own scheduler step. The reference pass is no CFG branch: it takes no place among its step's calls
    # (before, it was "call 0", shifting the branches' names in that step, so under `correction` the unconditional
    # branch was corrected with the conditional one's statistics).
    records = [(r.step, r.branch, r.sparse) for r in last.calls["transformer"] if r.layer == 0]
    assert records == [(0, "original", False)] + [(step, b, step > 0) for step in range(3) for b in branches]
    # The sparse calls on the generation's grid: the reference image's latent frame and the segment's 2.
    assert {layout for _, layout, _ in calls} == {VideoLayout(3, 2, 4)}
