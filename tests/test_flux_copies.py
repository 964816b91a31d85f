"""diffsparse on the families with their own copy of FLUX.1's transformer (tiny, random weights, offline), each called
with the position ids its pipelines make: LongCat-Image (`prepare_pos_ids`: modality first, images after the prompt;
text-to-image and edits), Ovis-Image (FLUX.1's ids) and Bria FIBO (FLUX.1's ids; prompts of different lengths in one
call padded and masked as its pipeline pads them; FIBO Edit's reference image on the next id plane). Bria 3.2 runs through its pipeline (tests/test_bria.py).

Their pipelines are not run here: their prompt paths need Qwen2.5-VL / Ovis / SmolLM3 text models, and LongCat's,
given `prompt_embeds`, fails in diffusers itself (`check_inputs` refuses a prompt with them, `encode_prompt` needs one).
"""

import functools

import pytest
import torch
from diffusers import (
    BriaFiboTransformer2DModel,
    LongCatImageTransformer2DModel,
    OvisImagePipeline,
    OvisImageTransformer2DModel,
)
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_read_call_by_position,
    recorded_attention_calls,
    run_transformer,
)

TEXT_LEN = 10
ROWS, COLS = 8, 6  # the generated image's packed 2 x 2 latents


def longcat_ids(reference):
    """The generated image (modality 1) after the prompt's positions, then an edited image (modality 2)."""
    ids = prepare_pos_ids(modality_id=1, type="image", start=(TEXT_LEN, TEXT_LEN), height=ROWS, width=COLS)
    if reference is not None:
        ids = torch.cat([ids, prepare_pos_ids(modality_id=2, type="image", start=(TEXT_LEN, TEXT_LEN),
                                              height=reference[0], width=reference[1])])
    return ids, prepare_pos_ids(modality_id=0, type="text", start=(0, 0), num_token=TEXT_LEN)


def ovis_ids(reference):
    assert reference is None  # text-to-image only: Ovis-Image has no editing pipeline
    ids = OvisImagePipeline._prepare_latent_image_ids(1, ROWS, COLS, "cpu", torch.float32)
    return ids, torch.zeros(TEXT_LEN, 3)


def fibo_ids(reference):
    """FLUX.1's ids, with FIBO Edit's reference image (when given) on the next plane, as its pipeline places it."""
    ids = OvisImagePipeline._prepare_latent_image_ids(1, ROWS, COLS, "cpu", torch.float32)
    if reference is not None:
        reference_ids = OvisImagePipeline._prepare_latent_image_ids(1, *reference, "cpu", torch.float32)
        reference_ids[:, 0] = 1
        ids = torch.cat([ids, reference_ids])
    return ids, torch.zeros(TEXT_LEN, 3)


def fibo_inputs(batch: int) -> dict:
    """FIBO's per-block text-encoder layers (one per block), beside the prompt."""
    generator = torch.Generator().manual_seed(1)
    return {"text_encoder_layers": [torch.randn(batch, TEXT_LEN, 8, generator=generator) for _ in range(2)]}


FAMILIES = {
    "LongCat-Image": (LongCatImageTransformer2DModel, {"pooled_projection_dim": 16}, longcat_ids, None),
    "Ovis-Image": (OvisImageTransformer2DModel, {"out_channels": 16}, ovis_ids, None),
    "Bria FIBO": (BriaFiboTransformer2DModel, {"text_encoder_dim": 8}, fibo_ids, fibo_inputs),
}


@functools.cache
def tiny_transformer(name: str):
    model_class, extra, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    return model_class(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), **extra).eval()


def inputs(name, reference=None, valid=None, left_padded=False):
    """A call of `name`'s transformer; `valid`: one prompt per entry, its valid text length, the rest of its
    `TEXT_LEN` tokens padding masked as keys (FIBO's pipeline's mask, through `joint_attention_kwargs`), after the
    prompt or, `left_padded`, before it."""
    _, _, ids, extra = FAMILIES[name]
    batch = 1 if valid is None else len(valid)
    generator = torch.Generator().manual_seed(0)
    img_ids, txt_ids = ids(reference)
    call = {"hidden_states": torch.randn(batch, img_ids.shape[0], 16, generator=generator),
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 16, generator=generator),
            "timestep": torch.full((batch,), 0.5), "img_ids": img_ids, "txt_ids": txt_ids}
    if valid is not None:
        position = torch.arange(TEXT_LEN - 1, -1, -1) if left_padded else torch.arange(TEXT_LEN)
        text = position[None, :] < torch.tensor(valid)[:, None]
        mask = torch.cat([text, torch.ones(batch, img_ids.shape[0], dtype=torch.bool)], dim=1)
        call["joint_attention_kwargs"] = {"attention_mask": mask[:, None, None, :]}
    return call | (extra(batch) if extra else {})


TEXT_TO_IMAGE = VideoLayout(1, ROWS, COLS, text_len=TEXT_LEN, text_position="start")


@pytest.mark.parametrize("name, reference, valid, layout, order", [
    *((name, None, None, TEXT_TO_IMAGE, order) for name in FAMILIES for order in (None, TileOrder((1, 2, 2)))),
    # LongCat-Image's edits: a reference of the output's size is a second frame, one of another size joins the text.
    ("LongCat-Image", (ROWS, COLS), None, VideoLayout(2, ROWS, COLS, text_len=TEXT_LEN, text_position="start"), None),
    ("LongCat-Image", (2, 5), None, VideoLayout(1, ROWS, COLS, text_len=TEXT_LEN + 10, text_position="start"), None),
    # Bria FIBO's CFG call: two prompts of 7 and 4 valid tokens, each attended without its padding; with FIBO Edit's
    # reference image of the output's size (a second frame) or of another size (after the prompt's valid tokens).
    ("Bria FIBO", None, (7, 4), {VideoLayout(1, ROWS, COLS, text_len=n, text_position="start") for n in (7, 4)}, None),
    ("Bria FIBO", (ROWS, COLS), (7, 4),
     {VideoLayout(2, ROWS, COLS, text_len=n, text_position="start") for n in (7, 4)}, TileOrder((1, 2, 2))),
    ("Bria FIBO", (2, 5), (7, 4),
     {VideoLayout(1, ROWS, COLS, text_len=n + 10, text_position="start") for n in (7, 4)}, None),
])
def test_dense_identical_every_block_kept_and_the_layout(name, reference, valid, layout, order):
    # (Attending FIBO's padding fails it.)
    one_token = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        check_against_dense(tiny_transformer(name), lambda: inputs(name, reference, valid), block_size=8, order=order,
                            sparse=one_token)
    assert {called for _, called, _ in calls} == (layout if isinstance(layout, set) else {layout})


def test_left_padded_prompts_are_attended_without_their_padding():
    # FIBO's pipeline pads with its tokenizer's padding side: on the left the valid text is no prefix. (Running
    # such calls dense, or attending the padding, fails it.)
    one_token = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    with recorded_attention_calls() as calls:
        check_against_dense(tiny_transformer("Bria FIBO"), lambda: inputs("Bria FIBO", valid=(7, 4), left_padded=True),
                            block_size=8, sparse=one_token)
    assert {called for _, called, _ in calls} == {
        VideoLayout(1, ROWS, COLS, text_len=n, text_position="start") for n in (7, 4)}


def test_a_mask_of_one_row_stands_for_every_video():
    # Attention broadcasts a (1, 1, 1, S) key mask over the batch: the sparse path must too, not leave the other
    # videos' outputs zero (0.07 off dense before).
    def call():
        batch = inputs("Bria FIBO", valid=(4, 4))
        batch["joint_attention_kwargs"]["attention_mask"] = batch["joint_attention_kwargs"]["attention_mask"][:1]
        return batch

    one_token = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    check_against_dense(tiny_transformer("Bria FIBO"), call, block_size=8, sparse=one_token)


def test_a_mask_of_another_kind_runs_the_original_and_counts_dense():
    transformer = tiny_transformer("Bria FIBO")
    call = inputs("Bria FIBO", valid=(7, 4))
    call["joint_attention_kwargs"]["attention_mask"][1, ..., -1] = False  # an image key masked
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0)
    expected = run_transformer(transformer, lambda: call)
    with torch.no_grad(), diffsparse.sparse(transformer, config) as handle:
        out = transformer(**call).sample
        stats = handle.stats()
    assert torch.equal(out, expected) and all(s.sparse_calls == 0 and s.dense_calls == 1 for s in stats.layers)


@pytest.mark.parametrize("rows, keys", [(2, TEXT_LEN + ROWS * COLS), (1, TEXT_LEN), (1, TEXT_LEN + ROWS * COLS - 3)],
                         ids=["2 rows for 4 prompts", "the text's keys alone", "3 keys short"])
def test_a_mask_that_does_not_fit_the_call_is_refused_as_the_original_refuses_it(rows, keys):
    # FIBO's mask of the prompts' padding for 4 prompts with rows neither 1 nor 4, or keys other than the call's:
    # attention cannot apply it, so the original raises, and the sparse path must raise as it does. Before, 2 rows
    # left prompts 3 and 4 without output, a mask 3 keys short left the image's last tokens out, and one of the
    # text's keys alone (no image key) gave "text_len=-41".
    transformer = tiny_transformer("Bria FIBO")
    call = inputs("Bria FIBO", valid=(7, 4, 5, 3))
    mask = call["joint_attention_kwargs"]["attention_mask"]
    call["joint_attention_kwargs"]["attention_mask"] = mask[:rows, ..., :keys]

    def error(config=None) -> Exception:
        with pytest.raises(Exception) as raised:
            run_transformer(transformer, lambda: call, config)
        return raised.value

    expected = error()
    raised = error(diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0))
    assert (type(raised), str(raised)) == (type(expected), str(expected))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_read_call_takes_every_argument_by_position(name):
    check_read_call_by_position(tiny_transformer(name), inputs(name))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_other_processors_are_refused_and_the_model_left_untouched(name):
    check_other_processors_are_refused(tiny_transformer(name), name, layer=1)
