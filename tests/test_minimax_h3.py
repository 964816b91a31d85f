"""diffsparse on diffusers' MiniMax-H3 transformer (tiny, random weights, offline): called directly with one packed
sequence of text, audio, a conditioning frame and the target video, and through diffusers' own modular denoising
blocks, which pack the sequence themselves."""

import warnings

import pytest
import torch
from diffusers import MiniMaxH3Transformer3DModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    recorded_attention_calls,
    run_transformer,
)

TEXT, AUDIO, CHANNELS, TEXT_DIM = 5, 6, 4, 8
FRAMES, HEIGHT, WIDTH = 3, 4, 6  # the target video's grid; the conditioning frame is one more 4 x 6 frame
ONE_TOKEN = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)


def make_transformer():
    torch.manual_seed(0)
    model = MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=16, num_layers=2, num_refiner_layers=1, ffn_dim=32,
        in_channels=CHANNELS, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=TEXT_DIM, freq_dim=16,
        time_embed_hidden_dim=16, time_embed_dim=16, rope_freq_dim=2,
    ).eval()
    # Ones at initialisation, which would make the query and key norms interchangeable.
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                weight.normal_()
    return model


@pytest.fixture(scope="module")
def transformer():
    return make_transformer()


def grid(frames: int, first_frame: int = 0) -> torch.Tensor:
    t, h, w = torch.meshgrid(torch.arange(first_frame, first_frame + frames), torch.arange(HEIGHT), torch.arange(WIDTH),
                             indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


def inputs(order: str = "text first"):
    """The packed sequence `[text, conditioning frame, audio, target]` (MiniMax-H3's timestep is `1 - sigma`: clean
    conditioning at t = 1, target and audio at t = 0.3); `order="target first"` puts the target's rows first,
    `"shuffled"` packs the target's rows in a random order (the same rows, each keeping its position and latent), as
    a caller may pack them."""
    def call():
        g = torch.Generator().manual_seed(1)
        target_len, condition_len = FRAMES * HEIGHT * WIDTH, HEIGHT * WIDTH
        lengths = {"text": TEXT, "condition": condition_len, "audio": AUDIO, "target": target_len}
        sections = ["target", "text", "condition", "audio"] if order == "target first" else list(lengths)
        start, rows = 0, {}
        for name in sections:
            rows[name] = torch.arange(start, start + lengths[name])
            start += lengths[name]
        target_positions = grid(FRAMES, first_frame=1)
        target_rows = rows["target"]
        if order == "shuffled":
            target_rows = target_rows[torch.randperm(len(target_rows), generator=torch.Generator().manual_seed(2))]
        positions = torch.zeros(start, 3, dtype=torch.long)
        positions[rows["text"]] = torch.arange(TEXT)[:, None].expand(-1, 3)
        positions[rows["condition"]] = grid(1)
        positions[rows["audio"]] = torch.arange(AUDIO)[:, None].expand(-1, 3)
        positions[target_rows] = target_positions
        tags = torch.zeros(start, dtype=torch.long)
        tags[rows["text"]], tags[rows["audio"]] = 1, 2
        timestep_indices = torch.ones(start, dtype=torch.long)
        timestep_indices[rows["condition"]] = 0
        video_rows = torch.cat([rows["condition"], target_rows])
        return {
            "hidden_states": torch.randn(1, len(video_rows), CHANNELS * 4, generator=g),
            "audio_hidden_states": torch.randn(1, AUDIO, 4, generator=g),
            "encoder_hidden_states": torch.randn(1, TEXT, TEXT_DIM, generator=g),
            "timestep": torch.tensor([1.0, 0.3]), "timestep_indices": timestep_indices, "token_tags": tags,
            "position_ids": positions, "video_indices": video_rows, "audio_indices": rows["audio"],
            "text_indices": rows["text"],
        }

    return call


ORDERS = ["text first", "target first", "shuffled"]


@pytest.mark.parametrize("tile", [None, TileOrder((1, 2, 2))])
@pytest.mark.parametrize("order", ORDERS)
def test_dense_identical_every_block_kept_and_a_one_token_window_changes_the_output(transformer, order, tile):
    # (Without the RoPE every case fails.)
    check_against_dense(transformer, inputs(order), block_size=8, order=tile, sparse=ONE_TOKEN)


@pytest.mark.parametrize("order", ORDERS)
def test_the_target_is_the_grid_and_everything_else_the_span_whatever_the_packing(transformer, order):
    with recorded_attention_calls() as calls:
        sparse = run_transformer(transformer, inputs(order), ONE_TOKEN)
    layout = VideoLayout(FRAMES, HEIGHT, WIDTH, text_len=TEXT + HEIGHT * WIDTH + AUDIO, text_position="start")
    assert {call_layout for _, call_layout, _ in calls} == {layout}
    # The same rows packed in another order: the same predictions, row for row (rows come back in the caller's
    # order), under a one-token window too.
    torch.testing.assert_close(sparse, run_transformer(transformer, inputs("text first"), ONE_TOKEN), atol=1e-5,
                               rtol=0)


def test_each_target_row_sits_at_its_position_in_the_layout(transformer):
    # The layout is frame-major, then row-major (`VideoLayout`): its cell `(t * H + h) * W + w` is frame t, row h,
    # column w for every pattern. Read with the axes swapped, the rows would still fill each cell once, and a one-token
    # window (each row alone) or every block kept would not see it; their index in the layout must give back their own
    # position (the target's frames start at 1), packed in any order.
    call = inputs("shuffled")()
    layout, _, order = adapter_for(transformer).read_call(transformer, (), call)
    target = call["video_indices"][HEIGHT * WIDTH:]
    cells = order[target] - layout.text_len
    where = torch.stack([cells // (HEIGHT * WIDTH), (cells // WIDTH) % HEIGHT, cells % WIDTH], -1)
    assert torch.equal(where + torch.tensor([1, 0, 0]), call["position_ids"][target])


def test_target_rows_listed_out_of_position_order_sit_at_their_positions(transformer):
    # `video_indices` (with `hidden_states`) may list the target's rows in any order: each row's cell comes from its
    # position, not from where it is listed. Every other test lists them in raster order of their positions, which
    # a layout placing rows by their listing passed (with the same cells, the same predictions).
    call = inputs("text first")()
    condition = HEIGHT * WIDTH
    listed = torch.cat([torch.arange(condition), condition + torch.randperm(
        len(call["video_indices"]) - condition, generator=torch.Generator().manual_seed(3))])
    reordered = {**call, "video_indices": call["video_indices"][listed],
                 "hidden_states": call["hidden_states"][:, listed]}
    layout, _, *order = adapter_for(transformer).read_call(transformer, (), reordered)
    order = order[0] if order else torch.arange(len(reordered["position_ids"]))  # none: the rows in layout order
    target = reordered["video_indices"][condition:]
    cells = order[target] - layout.text_len
    where = torch.stack([cells // (HEIGHT * WIDTH), (cells // WIDTH) % HEIGHT, cells % WIDTH], -1)
    assert torch.equal(where + torch.tensor([1, 0, 0]), reordered["position_ids"][target])
    expected = run_transformer(transformer, lambda: call, ONE_TOKEN)[:, listed]
    torch.testing.assert_close(run_transformer(transformer, lambda: reordered, ONE_TOKEN), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wrong", ["outside the box", "a repeated position"])
def test_a_target_that_is_not_a_whole_grid_is_refused(transformer, wrong):
    call = inputs()()
    if wrong == "outside the box":
        call["position_ids"][-1] = torch.tensor([9, 9, 9])  # one target row far outside the box
    else:
        # The last target row at the first one's position: each axis still takes 3, 4 and 6 values, as many cells
        # as rows, but one cell is taken twice and another left empty (two rows on one index of the layout).
        call["position_ids"][-1] = call["position_ids"][-FRAMES * HEIGHT * WIDTH]
    with pytest.raises(ValueError, match="do not cover one whole"), torch.no_grad(), \
            diffsparse.sparse(transformer, ONE_TOKEN):
        transformer(**call)



def test_a_target_row_listed_twice_is_refused_by_name_and_a_conditioning_row_runs(transformer):
    # `index_copy` keeps one of the repeated row's latents; a target row would take two cells of the layout. Before,
    # the message blamed the positions ("do not cover one whole (t, h, w) box"). A conditioning row listed twice stays
    # one row of the leading span: the original runs it, and so does diffsparse.
    def listed_twice(row):
        call = inputs()()
        call["video_indices"] = torch.cat([call["video_indices"], call["video_indices"][row:][:1]])
        call["hidden_states"] = torch.cat([call["hidden_states"], call["hidden_states"][:, row:][:, :1]], dim=1)
        return call

    call = listed_twice(-1)
    repeated = int(call["video_indices"][-1])
    with torch.no_grad(), diffsparse.sparse(transformer, ONE_TOKEN) as handle:
        with pytest.raises(ValueError, match=rf"`video_indices` lists rows \[{repeated}\] of the target video .* "
                                             "more than once"):
            transformer(**call)
        transformer(**inputs()())  # the handle keeps working
        assert {(s.dense_calls, s.sparse_calls) for s in handle.stats().layers} == {(0, 1)}
    call = listed_twice(0)
    with torch.no_grad():
        original = transformer(**call)[0]
        with diffsparse.sparse(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)):
            assert torch.equal(transformer(**call)[0], original)
    # At a step where the conditioning ties with the target (every video row at one timestep >= 0.999) it is one of
    # the rows at the lowest timestep: the call runs the original, as any tie does (it was refused as a target row).
    call["timestep"] = torch.tensor([0.9995, 0.9995])
    with torch.no_grad():
        original = transformer(**call)[0]
        with diffsparse.sparse(transformer, ONE_TOKEN), pytest.warns(diffsparse.DiffsparseWarning, match="ties"):
            assert torch.equal(transformer(**call)[0], original)


@pytest.mark.parametrize("timesteps", [(0.3, 0.3), (1.0, 0.9995)])
def test_a_target_not_one_box_without_a_tie_is_refused(transformer, timesteps):
    # The tie rule (conditioning held at max(t, 0.999)) runs the original only where two rows share a position.
    # (1.0, 0.9995): a target row out of the box, conditioning at 1.0, was run dense blaming a tie. (0.3, 0.3): every
    # video row at one timestep below the hold (a caller's own packing) is no tie either: its packing error is refused,
    # not warned of and run dense.
    call = inputs()()
    call["timestep"] = torch.tensor(timesteps)
    call["position_ids"][-1] = torch.tensor([9, 9, 9])
    with pytest.raises(ValueError, match="do not cover one whole"), torch.no_grad(), \
            diffsparse.sparse(transformer, ONE_TOKEN):
        transformer(**call)


REFUSED = {
    "a 0-d timestep": lambda call: {**call, "timestep": torch.tensor(0.3),
                                    "timestep_indices": torch.zeros_like(call["timestep_indices"])},
    "a 2-D timestep": lambda call: {**call, "timestep": call["timestep"][None]},
    "a row's index past the timesteps": lambda call: {**call, "timestep": call["timestep"][1:]},
    "a float timestep index": lambda call: {**call, "timestep_indices": call["timestep_indices"].float()},
    "position_ids with a batch axis": lambda call: {**call, "position_ids": call["position_ids"][None]},
    "no timestep_indices": lambda call: {name: x for name, x in call.items() if name != "timestep_indices"},
    "no timestep": lambda call: {name: x for name, x in call.items() if name != "timestep"},
}


@pytest.mark.parametrize("wrong", list(REFUSED))
def test_a_call_the_transformer_refuses_raises_its_own_error(transformer, wrong):
    # MiniMax-H3's time embedding takes only a 1-D `timestep` (one value per noise level, which `timestep_indices`
    # index per row) and its forward checks its shapes: such a call runs the original, which raises as it does
    # without diffsparse. Before, reading the rows' timesteps raised an IndexError of diffsparse's. The handle
    # keeps working after it.
    call = REFUSED[wrong](inputs()())
    with pytest.raises(Exception) as original, torch.no_grad():
        transformer(**call)
    with torch.no_grad(), diffsparse.sparse(transformer, ONE_TOKEN) as handle:
        with pytest.raises(original.type) as error:
            transformer(**call)
        assert str(error.value) == str(original.value)
        transformer(**inputs()())
        assert {(s.dense_calls, s.sparse_calls) for s in handle.stats().layers} == {(0, 1)}


def test_one_video_row_given_as_a_0_d_index_runs_sparse(transformer):
    # `index_copy` takes a 0-d index for a single row, so the transformer does; `len()` of it raised before.
    def call(index):
        return {**no_video_call(), "hidden_states": torch.randn(1, 1, CHANNELS * 4, generator=torch.Generator()),
                "position_ids": torch.arange(TEXT + AUDIO + 1)[:, None].expand(-1, 3).contiguous(),
                "timestep_indices": (torch.arange(TEXT + AUDIO + 1) >= TEXT).long(), "video_indices": index,
                "token_tags": torch.tensor([1] * TEXT + [2] * AUDIO + [0])}

    one_row = torch.tensor(TEXT + AUDIO)
    with recorded_attention_calls() as calls, pytest.warns(diffsparse.DiffsparseWarning, match="keeps every block"):
        sparse = run_transformer(transformer, lambda: call(one_row), ONE_TOKEN)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 1, 1, text_len=TEXT + AUDIO, text_position="start")}
    torch.testing.assert_close(sparse, run_transformer(transformer, lambda: call(one_row[None]), ONE_TOKEN), atol=0,
                               rtol=0)

def test_fused_projections_are_the_ones_the_sparse_path_projects_through():
    # After `fuse_qkv_projections()` MiniMax-H3's own processor (the same class) projects through `to_qkv` alone:
    # with the separate `to_q` zeroed, a sparse path that read it would leave dense's output.
    model = make_transformer()
    model.fuse_qkv_projections()
    with torch.no_grad():
        for _, module in adapter_for(model).self_attention_modules(model):
            assert module.fused_projections
            module.to_q.weight.zero_()
    check_against_dense(model, inputs("shuffled"), block_size=8, sparse=ONE_TOKEN)


def test_a_caller_s_attention_mask_runs_the_original_and_counts_dense(transformer):
    # The model passes its attention no mask, but the processor takes one (a caller's own block or processor may
    # pass it): a token-level mask, which the kernel does not apply, so that call runs the original with it and is
    # logged dense. Here layer 1's attention, in the transformer's call, hides the last row's key.
    from diffusers.models.transformers.transformer_minimax_h3 import MiniMaxH3AttnProcessor

    call = inputs()()
    mask = torch.ones(1, 1, 1, call["position_ids"].shape[0], dtype=torch.bool)
    mask[..., -1] = False
    attention, seen = transformer.transformer_blocks[1].attn, []
    hooks = [attention.register_forward_pre_hook(lambda module, args: (*args[:2], mask)),
             attention.register_forward_hook(lambda module, args, out: seen.append((args, out)))]
    try:
        with torch.no_grad(), diffsparse.sparse(transformer, ONE_TOKEN) as handle:
            transformer(**call)
            assert [(s.layer, s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(0, 0, 1), (1, 1, 0)]
    finally:
        for hook in hooks:
            hook.remove()
    [(args, out)] = seen
    with torch.no_grad():
        assert torch.equal(out, MiniMaxH3AttnProcessor()(attention, *args))
        assert not torch.equal(out, MiniMaxH3AttnProcessor()(attention, *args[:2]))  # the mask reaches the output


def no_video_call(text: int = TEXT, audio: int = AUDIO) -> dict:
    """A packed sequence of `text` and `audio` rows only (a caller's own packing: the original runs it), the audio
    rows clean (timestep 1.0: MiniMax-H3's timestep is `1 - sigma`), the text at the noisy 0.3."""
    g = torch.Generator().manual_seed(3)
    length = text + audio
    tags = torch.full((length,), 2, dtype=torch.long)
    tags[:text] = 1
    return {
        "hidden_states": torch.zeros(1, 0, CHANNELS * 4), "audio_hidden_states": torch.randn(1, audio, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, text, TEXT_DIM, generator=g), "timestep": torch.tensor([0.3, 1.0]),
        "timestep_indices": (torch.arange(length) >= text).long(), "token_tags": tags,
        "position_ids": torch.arange(length)[:, None].expand(-1, 3).contiguous(), "video_indices": torch.arange(0),
        "audio_indices": torch.arange(text, length), "text_indices": torch.arange(text),
    }


def test_an_empty_sequence_runs_the_original(transformer):
    # No rows at all: no timestep of a row to read the step from (`min()` of nothing raised), the call's own.
    call = no_video_call(text=0, audio=0)
    with torch.no_grad():
        expected = transformer(**call, return_dict=False)
        with diffsparse.sparse(transformer, ONE_TOKEN):
            out = transformer(**call, return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))


def test_an_empty_sequence_without_a_timestep_is_refused_by_name(transformer):
    # No rows and an empty `timestep` (the distinct timesteps of no rows), which the transformer runs: no step to
    # count the call at, and none neutral (0 would start a new run of a bare loop). Before, `min()` of nothing raised.
    call = {**no_video_call(text=0, audio=0), "timestep": torch.zeros(0)}
    with torch.no_grad():
        transformer(**call)
        with diffsparse.sparse(transformer, ONE_TOKEN), pytest.raises(ValueError, match=r"packs no rows and passes "
                                                                      r"an empty `timestep` \(shape \(0,\)\)"):
            transformer(**call)


@pytest.mark.parametrize("config", [diffsparse.SparseConfig(pattern="dense", dense_steps=0), ONE_TOKEN],
                         ids=["dense", "one-token window"])
def test_a_call_without_video_rows_runs_the_original_counted_dense(transformer, config):
    # Text and audio rows only: nothing to make sparse. The call has no layout, so it runs the original throughout
    # (exactly its output), each layer counted dense without a warning, named "original" outside a cache context;
    # it takes no place among its step's calls, so the video call after it at the same step is still "call 0": its
    # step is its noisiest rows' (0.3, the video call's), not its clean audio's (1.0 would start a new run there).
    # (Before, any config raised "this call packs no video rows".)
    call, video_call = no_video_call(), inputs()()
    with torch.no_grad():
        expected = transformer(**call, return_dict=False)
        with warnings.catch_warnings(record=True) as caught, diffsparse.sparse(transformer, config) as handle:
            warnings.simplefilter("always")
            out = transformer(**call, return_dict=False)
            transformer(**{**video_call, "timestep": torch.tensor([1.0, 0.3])})
            stats = handle.stats()
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
    assert [r for r in caught if issubclass(r.category, diffsparse.DiffsparseWarning)] == []
    records = stats.calls["transformer"]
    assert [(r.layer, r.branch, r.sparse, r.density, r.dense_step) for r in records[:2]] == [
        (0, "original", False, 1.0, False), (1, "original", False, 1.0, False)]
    assert {(r.step, r.branch, r.sparse) for r in records[2:]} == {(0, "call 0", config is ONE_TOKEN)}


def test_other_processors_are_refused_and_the_model_left_untouched(transformer):
    check_other_processors_are_refused(transformer, "MiniMax-H3", layer=1)


def video_and_audio(out):
    """The modular blocks' video and audio latents (`output=["latents", "audio_latents"]`) as one tensor."""
    return torch.cat([out["latents"].flatten(), out["audio_latents"].flatten()])


def test_the_modular_pipeline_s_denoising_runs_sparse_on_the_target_video():
    # diffusers' own MiniMax-H3 blocks (modular only): the text-to-video-and-audio denoising, which packs the
    # sequence itself, its video rows' rotary positions floats (times spaced unevenly, rows and columns centred and
    # scaled). Before, those positions made every call a `ValueError` (the target read as an integer box).
    from diffusers import MiniMaxH3Scheduler
    from diffusers.modular_pipelines.minimax_h3.modular_blocks_minimax_h3 import MiniMaxH3CoreDenoiseStep

    torch.manual_seed(0)
    transformer = MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=16, num_layers=2, num_refiner_layers=1, ffn_dim=32,
        in_channels=24, audio_in_channels=32, patch_size=(1, 2, 2), text_dim=TEXT_DIM, freq_dim=16,
        time_embed_hidden_dim=16, time_embed_dim=16, rope_freq_dim=2,
    ).eval()
    pipe = MiniMaxH3CoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=MiniMaxH3Scheduler(shift=12.0),
                           audio_scheduler=MiniMaxH3Scheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    # 124 frames (5 s, the shortest) of 64 x 64 pixels: 37 latent frames of 4 x 4 latents, 2 x 2 patches each.
    call = {"prompt_embeds": torch.randn(1, TEXT, TEXT_DIM, generator=torch.Generator().manual_seed(1)),
            "text_token_tags": torch.ones(TEXT, dtype=torch.long), "height": 64, "width": 64, "num_frames": 124,
            "num_inference_steps": 5, "output": ["latents", "audio_latents"]}

    sparse = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=2)
    stats, calls = check_modular_against_dense(pipe, call, block_size=16, sparse=sparse, output=video_and_audio)
    # Each call on its own step of the scheduler's (`1 - sigma`: the loop runs four of five), the first two dense
    # (read as `t * 1000` before, every call after the first landed on the last step); the target the whole
    # 37 x 2 x 2 grid, the text and the audio rows its span.
    assert sorted((r.step, r.sparse) for r in stats.calls["transformer"] if r.layer == 0) == [
        (0, False), (1, False), (2, True), (3, True)]
    assert {(layout.frames, layout.height, layout.width) for _, layout, _ in calls} == {(37, 2, 2)}


# The keyframe (`fl2va`: a first and a last keyframe) and reference (`ref2va`: an image encoded at its own 4 x 6
# latents, a two-frame video with its soundtrack, an audio clip) workflows: the core denoise step, the transformer it
# runs, the shapes of the encoded video conditioning and of the reference audio rows, and the rows they all take.
CONDITIONED = {
    "fl2va": ("MiniMaxH3FL2VACoreDenoiseStep", "transformer", [(1, 24, 1, 4, 4)] * 2, [], 2 * 4),
    "ref2va": ("MiniMaxH3Ref2VACoreDenoiseStep", "transformer_ref", [(1, 24, 1, 4, 6), (1, 24, 2, 4, 4)],
               [(2 * 3, 32), (2 * 4, 32)], 2 * 3 + 2 * 4 + 2 * 3 + 2 * 4),
}


def conditioned_pipeline(workflow: str, shift: float = 12.0):
    """The core denoise step of `workflow` (`CONDITIONED`) on a tiny transformer, its video scheduler at `shift`, and
    the call of 4 steps (3 transformer calls) that feeds it embeddings and encoded conditioning."""
    from diffusers import MiniMaxH3Scheduler
    from diffusers.modular_pipelines import minimax_h3

    block, component, video_conditions, audio_conditions, _ = CONDITIONED[workflow]
    torch.manual_seed(0)
    pipe = getattr(minimax_h3.modular_blocks_minimax_h3, block)().init_pipeline()
    pipe.update_components(**{component: MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=16, num_layers=2, num_refiner_layers=1, ffn_dim=32,
        in_channels=24, audio_in_channels=32, patch_size=(1, 2, 2), text_dim=TEXT_DIM, freq_dim=16,
        time_embed_hidden_dim=16, time_embed_dim=16, rope_freq_dim=2).eval()},
        scheduler=MiniMaxH3Scheduler(shift=shift), audio_scheduler=MiniMaxH3Scheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    call = {"prompt_embeds": torch.randn(1, TEXT, TEXT_DIM, generator=g), "height": 64, "width": 64,
            "text_token_tags": torch.ones(TEXT, dtype=torch.long), "num_frames": 124, "num_inference_steps": 4,
            "condition_latents": [torch.randn(shape, generator=g) for shape in video_conditions],
            "output": ["latents", "audio_latents"]}
    if workflow == "fl2va":
        call["keyframe_anchors"] = ("first", "last")
    else:  # only a reference's kind (and whether a video carries a soundtrack) reaches these blocks, not its media
        call["audio_condition_latents"] = [torch.randn(shape, generator=g) for shape in audio_conditions]
        call["normalized_references"] = [minimax_h3.MiniMaxH3ImageReference(image=None),
                                         minimax_h3.MiniMaxH3VideoReference(frames=None, audio=torch.zeros(2, 1)),
                                         minimax_h3.MiniMaxH3AudioReference(audio=None)]
    return pipe, call


@pytest.mark.parametrize("workflow", list(CONDITIONED))
def test_the_modular_keyframe_and_reference_denoising_run_sparse_on_the_target_video(workflow):
    # diffusers' blocks of the workflows that pack conditioning rows ahead of the target (the target's timestep rises
    # from 0, the conditioning's stays at 0.999): each runs its own transformer (`transformer_ref` for references)
    # sparse, dense identical, every block kept within 1e-4, each call on its step, the first dense; the target alone
    # is the grid, the keyframes and references in the leading span (had the cleaner rows been read as the target,
    # the two keyframes would be a 2 x 2 x 2 grid).
    _, component, _, _, condition_rows = CONDITIONED[workflow]
    pipe, call = conditioned_pipeline(workflow)
    stats, calls = check_modular_against_dense(pipe, call, block_size=16, output=video_and_audio)
    assert list(stats.calls) == [component]
    assert sorted((r.step, r.sparse) for r in stats.calls[component] if r.layer == 0) == [
        (0, False), (1, True), (2, True)]
    # The 37 x 2 x 2 target; the text, the conditioning and the 2 x 207 generated audio rows its span.
    layout = VideoLayout(37, 2, 2, text_len=TEXT + condition_rows + 2 * 207, text_position="start")
    assert {call_layout for _, call_layout, _ in calls} == {layout}


@pytest.mark.parametrize("workflow", list(CONDITIONED))
def test_a_step_where_the_conditioning_ties_with_the_target_runs_the_original(workflow):
    # The pipeline holds the conditioning video at `max(t, 0.999)`. Shift 0.001 puts the last of the 3 steps at
    # t = 0.9995, where the conditioning is at the target's timestep: the rows at the lowest timestep are both, not
    # one box (the first keyframe on the target's first frame). That call runs the original, counted dense; before,
    # it raised "do not cover one whole (t, h, w) box" at the generation's last step.
    _, component, _, _, condition_rows = CONDITIONED[workflow]
    pipe, call = conditioned_pipeline(workflow, shift=0.001)
    tie = r"conditioning video ties with the target at timestep 0\.9995"
    with pytest.warns(diffsparse.DiffsparseWarning, match=tie):
        stats, calls = check_modular_against_dense(pipe, call, block_size=16, output=video_and_audio)
    assert sorted((r.step, r.branch, r.sparse) for r in stats.calls[component] if r.layer == 0) == [
        (0, "call 0", False), (1, "call 0", True), (2, "original", False)]
    assert pipe.scheduler.timesteps[2] >= 0.999
    layout = VideoLayout(37, 2, 2, text_len=TEXT + condition_rows + 2 * 207, text_position="start")
    assert {call_layout for _, call_layout, _ in calls} == {layout}


def test_every_transformer_component_of_a_modular_pipeline_is_found():
    # MiniMax-H3's pipeline holds `transformer` (text / keyframes to video) and `transformer_ref` (references to
    # video): both run sparse, as any component of a class diffsparse adapts would.
    from diffusers import MiniMaxH3Blocks

    from diffsparse.pipelines import find_transformers

    pipe = MiniMaxH3Blocks().init_pipeline()
    first, second = (MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=16, num_layers=1, num_refiner_layers=1, ffn_dim=32,
        in_channels=CHANNELS, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=TEXT_DIM, freq_dim=16,
        time_embed_hidden_dim=16, time_embed_dim=16, rope_freq_dim=2) for _ in range(2))
    pipe.update_components(transformer=first, transformer_ref=second)
    assert find_transformers(pipe)[0] == {"transformer": first, "transformer_ref": second}


def test_a_bare_loop_counts_rising_timesteps_as_steps(transformer):
    # MiniMax-H3's timestep rises as denoising goes (`1 - sigma`): without a scheduler, each higher timestep is the
    # next step and a lower one starts a new run (for other families, the other way round).
    call = inputs()()
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=1)
    with torch.no_grad(), diffsparse.sparse(transformer, config) as handle:
        for t in (0.1, 0.4, 0.7):
            transformer(**{**call, "timestep": torch.tensor([1.0, t])})
        assert sorted({(r.step, r.sparse) for r in handle.stats().calls["transformer"]}) == [
            (0, False), (1, True), (2, True)]
        transformer(**{**call, "timestep": torch.tensor([1.0, 0.1])})
        assert {(r.step, r.sparse) for r in handle.stats().calls["transformer"]} == {(0, False)}
