"""The runtime's warnings about configs that run but give no speedup: a pattern that keeps every block of a layout,
a density out of reach; and the line each warning names."""

import sys
import warnings

import pytest
import torch
from diffusers import FluxTransformer2DModel

import diffsparse
from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline
from diffsparse.runtime import StepScheduleWarning, out_of_reach

from helpers import tiny_call

ROWS = COLS = 16
TEXT = 8


def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_inputs():
    generator = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(ROWS), torch.arange(COLS), indexing="ij"), -1).reshape(-1, 2)
    return {"hidden_states": torch.randn(1, ROWS * COLS, 16, generator=generator),
            "encoder_hidden_states": torch.randn(1, TEXT, 16, generator=generator),
            "pooled_projections": torch.randn(1, 8, generator=generator), "timestep": torch.tensor([0.5]),
            "img_ids": torch.cat([torch.zeros(ROWS * COLS, 1), grid.float()], 1), "txt_ids": torch.zeros(TEXT, 3)}


def every_block_warnings(config: diffsparse.SparseConfig) -> list[str]:
    """The "keeps every block" warnings of two calls of the tiny FLUX transformer under `config`."""
    model = tiny_flux()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), diffsparse.sparse(model, config) as handle:
        warnings.simplefilter("always")
        for _ in range(2):
            model(**flux_inputs())
            handle.new_run()
    sparse = 0 if config.resolved_pattern.name == "dense" else 2
    assert [s.sparse_calls for s in handle.stats(since_apply=True).layers] == [sparse, sparse]
    said = [w for w in caught if "keeps every block" in str(w.message)]
    assert all(w.filename == __file__ for w in said)  # the model's call above, not a line of diffsparse's
    return [str(w.message) for w in said]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_pattern_that_keeps_every_block_of_an_image_says_so_once():
    # The default pattern (radial) keeps frame distance 0 whole, so on an image it keeps every block: before, every
    # layer of FLUX ran at density 1.0 through the sparse kernel (slower than SDPA) without a word.
    said = every_block_warnings(diffsparse.SparseConfig(dense_steps=0))
    assert len(said) == 1  # once per (pattern, layout), whatever the layers and calls
    assert said[0].startswith("diffsparse: transformer: radial(")
    assert "keeps every block on VideoLayout(frames=1, height=16, width=16, text_len=8" in said[0]
    assert 'so this layout runs dense, at the sparse kernel\'s cost' in said[0]
    assert 'pattern="window3d"' in said[0] and '"searched"' in said[0] and "density" in said[0]
    # A window shrinks within the frame (0.84 of the blocks here); "dense" is dense on purpose.
    assert every_block_warnings(diffsparse.SparseConfig(pattern="window3d", dense_steps=0)) == []
    assert every_block_warnings(diffsparse.SparseConfig(pattern="dense", dense_steps=0)) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_fitted_pattern_that_keeps_every_block_of_an_image_says_so_once():
    # spatial_temporal's spatial kind holds every key of one frame, so on an image every head is classified spatial
    # and each layer's fit keeps every block: before, fits were never checked and this ran dense without a word.
    said = every_block_warnings(diffsparse.SparseConfig(pattern="spatial_temporal", dense_steps=0))
    assert len(said) == 1 and said[0].startswith("diffsparse: transformer: spatial_temporal(")
    assert every_block_warnings(diffsparse.SparseConfig(pattern="searched", dense_steps=0)) == []


@pytest.mark.parametrize("target, reached, flagged", [
    (0.25, 0.220, False), (0.5, 0.483, False), (0.1, 0.141, False),  # ordinary steps of a solved density
    (0.25, 1.0, True), (0.25, 0.78, True), (0.25, 0.53, True), (0.1, 0.203, True),
    (0.8, 0.61, False), (0.8, 0.59, True),  # a quarter of a large target is the margin there
])
def test_the_out_of_reach_tolerance_shared_by_the_runtime_and_bench(target, reached, flagged):
    assert out_of_reach(target, reached) is flagged


def _here(below: int = 1) -> tuple[str, int]:
    """The caller's file and the line `below` its line."""
    frame = sys._getframe(1)
    return frame.f_code.co_filename, frame.f_lineno + below


@torch.no_grad()
def test_warnings_raised_in_a_call_name_the_line_that_made_it():
    # Raised deep in the transformer's hook, past diffusers' hook registry and torch's module and compiler wrappers:
    # a fixed stacklevel named a line of diffsparse's own (the off-schedule one `StepClock.tick`'s caller, the
    # "nothing runs sparse" one the hook's), and a filter by module, or the "default" once-per-line display, then
    # followed diffsparse's lines instead of the user's.
    pipe = tiny_wan_pipeline()
    diffsparse.apply(pipe, diffsparse.SparseConfig(block_size=16, dense_steps=1))
    pipe.scheduler.set_timesteps(4)
    between = (pipe.scheduler.timesteps[:-1] + pipe.scheduler.timesteps[1:]) / 2  # none of the scheduler's
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 5, 8, 12, generator=g)
    text = torch.randn(1, 4, tiny_wan_config()["transformer"]["text_dim"], generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in between[:2]:
            where = _here()
            pipe.transformer(latents, t[None], text)
    off = [(w.filename, w.lineno) for w in caught if issubclass(w.category, StepScheduleWarning)]
    assert off == [where]
    call = tiny_call(num_inference_steps=1, num_frames=5, height=32, width=32)  # step 0 of 1: dense
    where = _here(2)
    with pytest.warns(diffsparse.DiffsparseWarning, match="nothing runs sparse") as caught:
        pipe(**call)
    assert [(w.filename, w.lineno) for w in caught if "nothing runs sparse" in str(w.message)] == [where]
