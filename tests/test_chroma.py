"""diffsparse on diffusers' Chroma pipelines (tiny, random weights, offline): FLUX.1's layout, and Chroma's float
prompt mask (its masked padding keys keep weight 1 / e) computed exactly on the sparse path."""

import copy
import warnings

import pytest
import torch
from diffusers import (
    ChromaImg2ImgPipeline,
    ChromaInpaintPipeline,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from transformers import T5Config, T5EncoderModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines.chroma import marked_prefixes
from diffsparse.pipelines.text import word_tokenizer
from diffsparse.runtime import SparseRuntime

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    run_pipeline,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]
ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN = 12
# 32 x 24 pixels -> 16 x 12 latents (x2 VAE) -> 8 x 6 packed 2x2 patches.
GRID = (1, 8, 6)


@pytest.fixture(scope="module")
def chroma_components():
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    )
    vae = tiny_image_vae(shift_factor=0.0609, scaling_factor=1.5035)
    t5 = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae.eval(), "text_encoder": t5.eval(),
            "tokenizer": word_tokenizer(VOCABULARY), "transformer": transformer.eval()}


@pytest.fixture(scope="module")
def chroma_pipe(chroma_components):
    pipe = ChromaPipeline(**chroma_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma_call(**overrides):
    # "a red circle on grass" is 5 words and </s>: marked with the first padding token, 7 of the 12 text tokens;
    # the negative prompt "blue" 3.
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "num_inference_steps": 4, "height": 32,
            "width": 24, "max_sequence_length": TEXT_LEN, "guidance_scale": 3.5, "output_type": "latent"}
    return {**call, **overrides}


def marked_prompt_call(rows: int, cols: int, text: int, marked: int) -> dict:
    """A direct transformer call's inputs: one image of `rows x cols` packed patches behind `text` prompt tokens, the
    first `marked` of them marked in the attention mask (the rest its padding), random with seed 0."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return {"hidden_states": torch.randn(1, rows * cols, 16, generator=generator),
            "encoder_hidden_states": torch.randn(1, text, 16, generator=generator),
            "timestep": torch.tensor([0.5]), "img_ids": torch.cat([torch.zeros(rows * cols, 1), grid.float()], 1),
            "txt_ids": torch.zeros(text, 3),
            "attention_mask": torch.cat([(torch.arange(text) < marked).float(), torch.ones(rows * cols)])[None]}


@pytest.mark.parametrize("case", ["prompt and negative prompt", "two prompts", "tile order", "unpadded prompt"])
def test_dense_identical_and_every_block_kept_with_the_masked_padding(chroma_pipe, case):
    # Each CFG branch is one transformer call with its own marks; two prompts of different lengths are attended in
    # two groups. With every block kept the sparse path is Chroma's attention: the masked padding keys enter each
    # marked query at a score 1 lower (without that, 0.08 off), the masked queries attend every key.
    call, order, marked = chroma_call(), None, {7, 3}
    if case == "two prompts":  # and the negative prompt "" for both, marked 2 each
        call, marked = chroma_call(prompt=["a red circle on grass", "a blue square"], negative_prompt=None), {7, 5, 2}
    elif case == "tile order":
        order = TileOrder((1, 2, 2))
    elif case == "unpadded prompt":  # 11 words and </s> fill the 12 tokens: nothing masked
        call, marked = chroma_call(prompt=" ".join(["red"] * 11), negative_prompt=None, guidance_scale=1.0), {TEXT_LEN}
    stats, calls = check_pipeline_against_dense(chroma_pipe, call, block_size=8, order=order)
    assert {layout for _, layout, _ in calls} == {VideoLayout(*GRID, text_len=n, text_position="start") for n in marked}
    # The first of 4 steps dense; then steps x CFG branches, each prompt length of a branch a runtime call (two
    # prompts: two on the cond branch), logged as one call of the layer.
    branches = 2 if call["guidance_scale"] > 1 else 1
    sparse_calls = 3 * branches
    assert all((s.dense_calls, s.sparse_calls) == (branches, sparse_calls) for s in stats.layers)


def test_sparse_calls_count_the_dense_padding_pairs(chroma_pipe):
    # The marked tokens attend sparsely on their layout (7 text + 48 image tokens); the 5 masked padding tokens
    # attend and are attended densely, and each call's density counts those pairs over the whole 60 x 60.
    config = diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=1)
    reference = run_pipeline(chroma_pipe, chroma_call(negative_prompt=None, guidance_scale=1.0))
    # 575 of the 3600 pairs dense leave the 8 x 6 image too few blocks to reach 0.3: said, once.
    with pytest.warns(UserWarning, match=r"density=0\.3 is out of reach .* with the 575 query-key pairs the call "
                                         r"computes densely outside it: the nearest density it reaches there is"):
        out, stats = run_pipeline(chroma_pipe, chroma_call(negative_prompt=None, guidance_scale=1.0), config)
    assert not torch.allclose(out, reference, atol=1e-4)
    layout = VideoLayout(*GRID, text_len=7, text_position="start")
    whole, masked = 60, 5
    outside = (whole - masked) * masked + masked * whole
    kept = SparseRuntime(config, "transformer").plan(layout, 2, torch.device("cpu"), outside_pairs=outside).density
    expected = (kept * (whole - masked) ** 2 + outside) / whole**2
    assert kept < 0.9
    for layer in stats.layers:
        assert (layer.dense_calls, layer.sparse_calls) == (1, 3)
        assert layer.mean_density == pytest.approx(expected)


@torch.no_grad()
@pytest.mark.parametrize("pattern", ["window3d", "searched"])
def test_the_density_asked_is_the_whole_call_s_with_the_masked_padding(chroma_pipe, pattern):
    # A prompt padded far past its marks (12 of 128 tokens, as 40 of T5's 512): the padding's rows and columns run
    # dense, so the marked layout is solved for what the call's density leaves it. Before, it was solved for the
    # target alone and the call measured 0.40 for 0.25 (FLUX on the same shapes: 0.26), without a word.
    rows = cols = 32
    text, marked = 128, 12
    inputs = marked_prompt_call(rows, cols, text, marked)
    # A searched pattern's search keeps what the padding leaves too (its `keep` is the density).
    config = diffsparse.SparseConfig(pattern=pattern, density=0.25, block_size=32, dense_steps=0)
    with warnings.catch_warnings(record=True) as caught, diffsparse.sparse(chroma_pipe.transformer, config) as handle:
        warnings.simplefilter("always")
        chroma_pipe.transformer(**inputs)
    assert not [w for w in caught if "out of reach" in str(w.message)]
    densities = [layer.mean_density for layer in handle.stats().layers]
    assert len(densities) == 2 and all(d == pytest.approx(0.25, abs=max(0.05, 0.25 / 4)) for d in densities)


@pytest.mark.parametrize("marked", [7, TEXT_LEN])
def test_a_direct_call_with_a_reference_span_keeps_the_token_order(chroma_pipe, marked):
    # Image ids with a reference image of another size (first id 1, as FLUX.1 Kontext makes them): the reference
    # joins the text's span through the runtime's token order, which the masked and the unmasked paths both keep.
    transformer = chroma_pipe.transformer
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(-1, 2).float()
    reference_grid = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(5), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.cat([torch.zeros(12, 1), grid], 1),
                         torch.cat([torch.ones(10, 1), reference_grid.float()], 1)])
    generator = torch.Generator().manual_seed(0)
    marks = torch.cat([(torch.arange(TEXT_LEN) < marked).float(), torch.ones(22)])[None]
    inputs = {"hidden_states": torch.randn(1, 22, 16, generator=generator),
              "encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=generator),
              "timestep": torch.tensor([0.5]), "img_ids": img_ids, "txt_ids": torch.zeros(TEXT_LEN, 3),
              "attention_mask": marks}
    calls = check_against_dense(transformer, lambda: inputs, block_size=4)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 3, 4, text_len=marked + 10, text_position="start")}


def test_an_unmasked_call_attends_in_the_layouts_order_once():
    # With a token order (a reference of another size in the text's span), the marked path hands the runtime its
    # tensors in the layout's order: a sparse unmasked call must equal the runtime's own model-order call.
    from diffusers.hooks.hooks import CacheContext

    from diffsparse.pipelines.base import references_with_text
    from diffsparse.pipelines.chroma import ChromaSparseAttnProcessor

    layout = VideoLayout(2, 4, 4, text_len=6 + 10, text_position="start")
    runtime = SparseRuntime(diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0),
                            "transformer")
    runtime.state_manager.set_context(CacheContext("cond"))
    runtime.begin_call(layout, 0, 1, references_with_text(6, 32, 10))
    q, k, v = torch.randn(3, 1, layout.num_tokens, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    processor = ChromaSparseAttnProcessor(runtime, 0)
    expected = runtime.attention(0, q, k, v)
    torch.testing.assert_close(processor.attend_marked(q, k, v, [6], 6), expected, atol=1e-6, rtol=0)
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert (expected - dense).abs().max() > 1e-2


@pytest.mark.parametrize("unmasked", [False, True], ids=["masked", "unmasked"])
def test_a_group_of_prompts_reuses_no_search_made_on_another_prompt(unmasked):
    # Chroma's pipelines call the transformer once per CFG branch, each attending its samples in groups of equal
    # marked prompts (`attend_marked`). Video 1's cond prompt is as long as video 0's negative one: on the same
    # layout, the uncond group of video 0 took the search made on video 1's cond group (and video 1's uncond group
    # video 0's cond search), so a batch of two prompts gave neither the image it gets alone. Unmasked: both prompts
    # fill the text (`marked == text_len`), the path that attends without a mask, whose groups must name their
    # videos as well (without them video 0's uncond output came out 2.7 off).
    from diffusers.hooks.hooks import CacheContext

    from diffsparse.patterns import Searched
    from diffsparse.pipelines.chroma import ChromaSparseAttnProcessor

    text_len = 16
    size = 16 if unmasked else 8
    layout = VideoLayout(1, size, size, text_len=text_len, text_position="start")  # [text, image]
    g = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(3, 2, layout.num_tokens, 2, 16, generator=g).unbind(0) for _ in range(2))
    if unmasked:
        uncond[0][0][:] = 3 * uncond[1][0]  # queries = keys: local attention
        cond[1][0][:] = 3 * torch.roll(cond[1][1], 37, dims=0)
    else:
        uncond[0][0] *= 5  # video 0's uncond queries unlike video 1's cond ones
    config = diffsparse.SparseConfig(pattern=Searched(keep=0.3, budget="row"), block_size=8, dense_steps=0)

    def run(videos, marked):
        runtime, outs = SparseRuntime(config, "transformer"), []
        processor = ChromaSparseAttnProcessor(runtime, 0)
        for branch, inputs in (("cond", cond), ("uncond", uncond)):
            runtime.state_manager.set_context(CacheContext(branch))
            runtime.begin_call(layout, 0, 4)
            lengths = [marked[branch][video] for video in videos]
            outs.append(processor.attend_marked(*(x[videos] for x in inputs), lengths, text_len))
        return outs

    marked = {"cond": [12, 8], "uncond": [8, 12]}  # video 0's negative prompt marked as video 1's prompt
    if unmasked:  # unmasked prompts: video 1's cond, video 0's uncond
        marked = {"cond": [12, text_len], "uncond": [text_len, 12]}
    batched = run([0, 1], marked)
    for video in (0, 1):
        for batched_out, alone in zip(batched, run([video], marked)):
            torch.testing.assert_close(batched_out[video : video + 1], alone, atol=1e-5, rtol=0)


def test_masks_of_another_kind_are_left_to_the_original():
    marks = torch.tensor([[1.0, 1, 1, 0, 0, 1, 1, 1]])
    chroma = (marks[:, None, None, :] * marks[:, None, :, None])
    assert marked_prefixes(chroma, text_len=5) == [3]
    assert marked_prefixes(chroma.bool(), text_len=5) is None  # a boolean mask cuts the padding off instead
    assert marked_prefixes(chroma * 0.5, text_len=5) is None  # not 0/1 marks
    assert marked_prefixes(chroma, text_len=3) is None  # masked tokens outside the text
    holes = torch.tensor([[1.0, 0, 1, 0, 0, 1, 1, 1]])
    assert marked_prefixes(holes[:, None, None, :] * holes[:, None, :, None], text_len=5) is None  # not a prefix
    one_sided = chroma.clone()
    one_sided[..., 0, 3] = 1.0  # not an outer product
    assert marked_prefixes(one_sided, text_len=5) is None
    assert marked_prefixes(chroma[:, 0], text_len=5) is None


def test_a_boolean_prompt_mask_runs_the_original_and_counts_dense(chroma_pipe):
    # Given embeddings with a boolean mask, the blocks cut the padding off (not Chroma's own float mask): the
    # original processor runs every call and `stats()` counts it dense.
    embeds, mask = chroma_pipe._get_t5_prompt_embeds("a red circle on grass", max_sequence_length=TEXT_LEN)
    call = chroma_call(prompt=None, negative_prompt=None, guidance_scale=1.0, prompt_embeds=embeds,
                       prompt_attention_mask=mask.bool())
    reference = run_pipeline(chroma_pipe, call)
    out, stats = run_pipeline(chroma_pipe, call, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8))
    torch.testing.assert_close(out, reference, atol=0, rtol=0, equal_nan=True)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(4, 0), (4, 0)]


def test_a_left_padded_prompt_mask_runs_the_original_and_says_so_once(chroma_pipe):
    # Given embeddings with the padding in front of the prompt (a left-padding tokenizer's mask): Chroma's marks with
    # masked tokens before marked ones, which the sparse path does not compute. Every call runs the original, counted
    # dense, and a warning says so once (before, without a word: a run gone dense shows only as a missing speedup).
    embeds, mask = chroma_pipe._get_t5_prompt_embeds("a red circle on grass", max_sequence_length=TEXT_LEN)
    marked = int(mask.sum())
    call = chroma_call(prompt=None, negative_prompt=None, guidance_scale=1.0, prompt_embeds=embeds.roll(1, 1),
                       prompt_attention_mask=mask.roll(TEXT_LEN - marked, 1))
    reference = run_pipeline(chroma_pipe, call)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = run_pipeline(chroma_pipe, call, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8))
    assert torch.equal(out, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(4, 0), (4, 0)]
    said = [str(w.message) for w in caught if "attention_mask" in str(w.message)]
    assert said == [(
        f"diffsparse: transformer: Chroma self-attention calls with this attention_mask (shape (1, 1, {TEXT_LEN + 48}, "
        f"{TEXT_LEN + 48}), torch.float32) run the original processor (dense, counted dense in stats()) as it is not "
        "Chroma's prompt mask: the outer product of 0/1 marks whose zeros are the padding after the prompt (a "
        "left-padded prompt_attention_mask?)"
    )]


def test_image_to_image_keeps_every_block_within_dense(chroma_components):
    pipe = ChromaImg2ImgPipeline(**chroma_components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(0))
    check_pipeline_against_dense(pipe, chroma_call(image=image, strength=0.75), block_size=8)


def test_inpainting_keeps_every_block_within_dense(chroma_components):
    # diffusers' inpaint pipeline reads `transformer.config.guidance_embeds`, which a ChromaTransformer2DModel built in
    # code lacks (AttributeError inside diffusers); Chroma1-HD's config.json carries it (False), and `from_pretrained`
    # keeps such extra keys in the config: registered here as the checkpoint's is.
    transformer = copy.deepcopy(chroma_components["transformer"])
    transformer.register_to_config(guidance_embeds=False)
    pipe = ChromaInpaintPipeline(**{**chroma_components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 24, generator=generator)
    mask_image = (torch.rand(1, 1, 32, 24, generator=generator) > 0.5).float()
    _, calls = check_pipeline_against_dense(pipe, chroma_call(image=image, mask_image=mask_image, strength=0.75),
                                            block_size=8)
    assert {layout for _, layout, _ in calls} == {VideoLayout(*GRID, text_len=n, text_position="start") for n in (7, 3)}


def test_other_processors_are_refused_and_the_model_left_untouched(chroma_pipe):
    check_other_processors_are_refused(chroma_pipe, "Chroma", layer=1)


def test_training_through_the_masked_padding_gets_the_dense_model_s_gradients(chroma_components):
    # The masked padding keys are merged into the marked queries through the log-sum-exp
    # (`pipelines.base.merge_attention`): training through it needs the LSE's gradient. The cpu backend's LSE was
    # detached, and every block kept gave to_q's weight a gradient 0.3 off (of 12) with nothing said.
    transformer = copy.deepcopy(chroma_components["transformer"]).train()
    with torch.no_grad():  # open the zero-initialised output layers, else no gradient reaches the attention
        for parameter in transformer.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    rows, cols, marked = 4, 4, 7
    inputs = marked_prompt_call(rows, cols, TEXT_LEN, marked)

    def gradients():
        transformer.zero_grad()
        transformer(**inputs).sample.square().sum().backward()
        return {name: p.grad.clone() for name, p in transformer.named_parameters() if p.grad is not None}

    dense = gradients()
    config = diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=4, dense_steps=0)
    with warnings.catch_warnings(), diffsparse.sparse(transformer, config) as handle:
        warnings.simplefilter("ignore", diffsparse.DiffsparseWarning)  # every block kept: "runs dense" said
        sparse = gradients()
    assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(0, 1), (0, 1)]
    assert sparse.keys() == dense.keys() and "transformer_blocks.0.attn.to_q.weight" in dense
    for name, want in dense.items():
        torch.testing.assert_close(sparse[name], want, rtol=0, atol=1e-5 * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
