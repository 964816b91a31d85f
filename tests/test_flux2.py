"""diffsparse on diffusers FLUX.2: a tiny transformer (random weights) called directly, with dual-stream blocks
(`Flux2AttnProcessor`) and single-stream ones (the fused `Flux2ParallelSelfAttnProcessor`), a reference image as a
second frame. And the whole pipelines built offline from tiny components, `Flux2Pipeline` (Mistral 3 text encoder
behind a Pixtral processor, embedded guidance) and `Flux2KleinPipeline` (Qwen3, true CFG), both with the FLUX.2 VAE:
text-to-image and reference-image edits on the pipelines' own calls, whose `t / 1000` timesteps land on the
scheduler's steps. And diffusers' own modular denoise blocks fed prompt embeddings: FLUX.2 [dev]'s and [klein] base's
(CFG), with and without reference images, and [klein]'s with a reference."""

import copy
import functools
import warnings
from collections import Counter

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.flux2 import modular_blocks_flux2, modular_blocks_flux2_klein
from diffusers.modular_pipelines.flux2 import modular_blocks_flux2_klein_base as klein_base
from PIL import Image
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout, Window3D
from diffsparse.pipelines import adapter_for

from helpers import (
    QWEN3_TEMPLATE,
    chat_tokenizer,
    check_against_dense,
    check_modular_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    tiny_flux2_vae,
)

ALL_BLOCKS = Window3D(window=(99, 99, 99))
TEXT_LEN = 6


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    ).eval()


def ids(times, rows, cols):
    """FLUX.2's `(t, h, w, l)` ids of row-major grids, one per time."""
    return torch.cartesian_prod(torch.tensor(times), torch.arange(rows), torch.arange(cols), torch.arange(1))


def inputs(references=0, reference_size=(4, 6), seed=0):
    """An image of 4 x 6 packed tokens behind 6 text tokens, with `references` reference images (times 10, 20, ...)
    of `reference_size`, the pipeline's way (`t / 1000` as the timestep)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = [ids([0], 4, 6)] + [ids([10 * (i + 1)], *reference_size) for i in range(references)]
    img_ids = torch.cat(img_ids)[None]
    return {
        "hidden_states": torch.randn(1, img_ids.shape[1], 8, generator=g),
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=g),
        "timestep": torch.tensor([0.9]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(1, TEXT_LEN, 4),
        "guidance": torch.tensor([3.5]),
    }


def run(model, config=None, **kwargs):
    with torch.no_grad():
        if config is None:
            return model(**inputs(**kwargs)).sample
        with diffsparse.sparse(model, config):
            return model(**inputs(**kwargs)).sample


def test_dense_pattern_is_the_unmodified_model_and_both_block_kinds_are_layers(transformer):
    reference = run(transformer)
    with diffsparse.sparse(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)) as handle:
        with torch.no_grad():
            assert torch.equal(transformer(**inputs()).sample, reference)
        assert [s.layer for s in handle.stats().layers] == [0, 1, 2]  # the dual-stream block, then the two single


@pytest.mark.parametrize("references", [0, 1])
@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_every_block_kept_matches_dense(transformer, references, order):
    calls = check_against_dense(
        transformer, functools.partial(inputs, references=references), block_size=8, order=order,
        sparse=diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=8, dense_steps=0),
    )
    frames = 1 + references
    assert {(layer, layout) for layer, layout, _ in calls} == {
        (layer, VideoLayout(frames, 4, 6, text_len=TEXT_LEN, text_position="start")) for layer in range(3)
    }


def test_fused_projections_are_read_through_the_fused_weights(transformer):
    # After `fuse_qkv_projections()` the dual-stream block's original reads one QKV weight per stream, the separate
    # ones left behind (`to_q` zeroed here): the sparse path must read the fused weights too. (The single-stream
    # blocks' projections are always fused.)
    model = copy.deepcopy(transformer)
    model.fuse_qkv_projections()
    fused = [module for module in model.modules() if getattr(module, "fused_projections", False)]
    assert len(fused) == 1
    with torch.no_grad():
        fused[0].to_q.weight.zero_()
    reference = run(model, references=1)
    out = run(model, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0), references=1)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


def test_layout_and_step_of_a_call(transformer):
    adapter = adapter_for(transformer)
    layout, timestep = adapter.read_call(transformer, (), inputs(references=2))
    assert layout == VideoLayout(3, 4, 6, text_len=TEXT_LEN, text_position="start") and float(timestep) == 900.0


def test_an_output_image_with_a_non_zero_layer_coordinate_is_refused(transformer):
    # FLUX.2's fourth id (the layer) is 0 on every image token its pipelines build; an output grid with another layer
    # is not read as a plain grid (its rows and columns alone would hide the layer), but refused by name.
    call = inputs()
    call["img_ids"][..., 3] = 1
    with pytest.raises(ValueError, match="do not start with a row-major grid of the output"):
        adapter_for(transformer).read_call(transformer, (), call)


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_references_of_another_size_are_kept_whole_beside_the_text(transformer, order):
    # Two references of 2 x 3 tokens: 12 tokens that join the text's leading span (attended as [text, references,
    # image], returned in the model's order), so every block kept matches dense and a sparse pattern still drops
    # image blocks.
    kwargs = {"references": 2, "reference_size": (2, 3)}
    layout, _, token_order = adapter_for(transformer).read_call(transformer, (), inputs(**kwargs))
    assert layout == VideoLayout(1, 4, 6, text_len=TEXT_LEN + 12, text_position="start")
    assert sorted(token_order.tolist()) == list(range(TEXT_LEN + 24 + 12))
    check_against_dense(transformer, functools.partial(inputs, **kwargs), block_size=8, order=order,
                        sparse=diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8, dense_steps=0))


@pytest.mark.parametrize("references", [0, 1])
def test_a_mask_of_the_prompts_padding_runs_sparse_and_a_mask_of_another_kind_is_said(transformer, references):
    # Through `joint_attention_kwargs`, which diffusers hands to both kinds of block. Before, any mask ran every
    # call of both kinds dense without a word (FLUX.1 attended its padding sparse and warned of other masks).
    tokens = TEXT_LEN + 24 * (1 + references)

    def call(hidden):
        mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool)
        mask[..., hidden] = False
        return {**inputs(references=references), "joint_attention_kwargs": {"attention_mask": mask}}

    def masked_run(hidden, config=None):
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if config is None:
                return transformer(**call(hidden)).sample, None, caught
            with diffsparse.sparse(transformer, config) as handle:
                return transformer(**call(hidden)).sample, handle.stats(), caught

    padding = slice(4, TEXT_LEN)
    reference = masked_run(padding)[0]
    kept, stats, _ = masked_run(padding, diffsparse.SparseConfig(pattern=ALL_BLOCKS, block_size=8, dense_steps=0))
    torch.testing.assert_close(kept, reference, atol=1e-4, rtol=0)
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(0, 1)] * 3
    sparse, stats, _ = masked_run(padding, diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=8,
                                                                    dense_steps=0))
    assert all(s.mean_density < 1 for s in stats.layers) and not torch.allclose(sparse, reference, atol=1e-4)
    # An image token hidden: not the prompt's padding, so the original processor, counted dense, said once.
    image_token = TEXT_LEN + 5
    out, stats, caught = masked_run(image_token, diffsparse.SparseConfig(pattern="window3d", density=0.3,
                                                                         block_size=8, dense_steps=0))
    assert torch.equal(out, masked_run(image_token)[0])
    assert [(s.dense_calls, s.sparse_calls) for s in stats.layers] == [(1, 0)] * 3
    said = [str(w.message) for w in caught if str(w.message).startswith("diffsparse")]
    assert len(said) == 1 and "FLUX.2 self-attention calls with this attention_mask" in said[0]


@pytest.mark.parametrize("layer", [0, 2])  # a dual-stream and a single-stream processor
def test_other_processors_are_refused(transformer, layer):
    check_other_processors_are_refused(transformer, "FLUX.2", layer=layer)


# The chat markers of both text models, one token each (registered as special tokens, so punctuation does not split
# them), and the prompts' words; the system message's words are not needed (`<unk>`), only its length reaches the
# transformer.
VOCABULARY = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "<think>", "</think>", "<s>",
              "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]", "a", "red", "blue", "circle", "on",
              "grass"]
# Mistral Small 3's template reduced to its shape: the pipeline sends a system turn and a user turn, each content a
# list of typed parts, and asks for no generation prompt.
MISTRAL_TEMPLATE = (
    "<s>{% for message in messages %}"
    "{% set text = message['content'] | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)
# The real encoders stack three of their hidden states as the text features; the tiny ones, of two layers, have three.
ENCODER_LAYERS = (0, 1, 2)
ENCODER_WIDTH = 8


def tiny_pipeline_transformer(guidance_embeds: bool):
    """One dual- and one single-stream block; 2 latent channels packed 2x2 (8 in); text of three stacked hidden
    states of the tiny encoders."""
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=len(ENCODER_LAYERS) * ENCODER_WIDTH, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


def tiny_flux2_pipeline():
    """FLUX.2 [dev]'s way: guidance embedded in the transformer (one call per step), a Mistral 3 text encoder (its
    vision tower built, never reached by text prompts) behind a Pixtral processor."""
    text = {"model_type": "mistral", "vocab_size": len(VOCABULARY), "hidden_size": ENCODER_WIDTH,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "head_dim": 4, "pad_token_id": 0}
    vision = {"model_type": "pixtral", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "head_dim": 4, "image_size": 32, "patch_size": 8}
    mistral = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                              image_token_index=VOCABULARY.index("[IMG]")))
    tokenizer = chat_tokenizer(VOCABULARY, MISTRAL_TEMPLATE, ["<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"])
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, patch_size=8,
                                 chat_template=MISTRAL_TEMPLATE)
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flux2_vae(), text_encoder=mistral.eval(),
                         tokenizer=processor, transformer=tiny_pipeline_transformer(guidance_embeds=True))


def tiny_klein_pipeline():
    """FLUX.2 [klein] base's way: true CFG (the prompt's and the empty prompt's call each step, no guidance
    embedding), a Qwen3 text encoder."""
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(VOCABULARY), hidden_size=ENCODER_WIDTH, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=4, pad_token_id=0,
    ))
    tokenizer = chat_tokenizer(VOCABULARY, QWEN3_TEMPLATE, ["<think>", "</think>"])
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flux2_vae(), text_encoder=qwen.eval(),
                              tokenizer=tokenizer, transformer=tiny_pipeline_transformer(guidance_embeds=False))


def test_the_kv_cache_pipeline_is_refused_at_apply():
    # `Flux2KleinKVPipeline` puts its own KV-cache processors on the transformer in `__init__`: `apply` refuses them
    # by name and leaves them in place.
    torch.manual_seed(0)
    pipe = Flux2KleinKVPipeline(**tiny_klein_pipeline().components)
    processors = dict(pipe.transformer.attn_processors)
    assert {type(p).__name__ for p in processors.values()} == {"Flux2KVAttnProcessor",
                                                                "Flux2KVParallelSelfAttnProcessor"}
    with pytest.raises(ValueError, match="Flux2KVAttnProcessor"):
        diffsparse.apply(pipe, diffsparse.SparseConfig())
    assert all(pipe.transformer.attn_processors[name] is p for name, p in processors.items())


# Per pipeline: its text positions (enough for the template's tokens: the prompts are padded to it, so every call's
# text is this long) and its transformer calls per step (embedded guidance: one; true CFG: the prompt's and the
# empty prompt's).
PIPELINES = {"dev": (tiny_flux2_pipeline, 48, 1), "klein": (tiny_klein_pipeline, 24, 2)}
HEIGHT, WIDTH = 64, 80
# Reference images as PIL sizes (width, height): the output's, and a portrait one of another size; no side under the
# 64 pixels the pipelines require.
OUTPUT_SIZE, OTHER_SIZE = (WIDTH, HEIGHT), (64, 96)


@pytest.fixture(scope="module", params=list(PIPELINES))
def flux2_pipe(request):
    build, max_sequence_length, calls_per_step = PIPELINES[request.param]
    torch.manual_seed(0)
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a red circle on grass", "height": HEIGHT, "width": WIDTH, "num_inference_steps": 3,
            "guidance_scale": 4.0, "max_sequence_length": max_sequence_length,
            "text_encoder_out_layers": ENCODER_LAYERS, "output_type": "latent"}
    return pipe, call, calls_per_step


def patch_grid(pipe, width, height):
    """`(rows, cols)` of packed 2x2 latent patches of an image of `width` x `height` pixels."""
    side = pipe.vae_scale_factor * 2
    return height // side, width // side


def layers(pipe):
    """The sparse layers: the dual-stream blocks, then the single-stream ones."""
    return range(len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks))


def check_steps_and_layouts(pipe, stats, calls, calls_per_step, layout):
    """The timestep arrives as t / 1000: scaled back, each call finds its own step (a wrong scale puts every call on
    one step); the first step dense, the others sparse with blocks left out, every layer on `layout` over all the
    call's tokens."""
    records = stats.calls["transformer"]
    branches = {r.branch for r in records}
    assert len(branches) == calls_per_step
    assert Counter((r.step, r.branch) for r in records) == {
        (step, branch): len(layers(pipe)) for step in range(3) for branch in branches
    }
    assert all(r.sparse == (r.step > 0) for r in records)
    assert all(r.density < 1 for r in records if r.sparse)
    assert {(layer, seen, shape) for layer, seen, shape in calls} == {
        (layer, layout, (1, layout.num_tokens)) for layer in layers(pipe)
    }


def noise_image(width, height, seed=0):
    """Random pixels: reference tokens that differ from one another, so leaving any of them out shows."""
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


def test_text_to_image_through_the_pipeline(flux2_pipe):
    pipe, call, calls_per_step = flux2_pipe
    stats, calls = check_pipeline_against_dense(pipe, call, block_size=8)
    layout = VideoLayout(1, *patch_grid(pipe, WIDTH, HEIGHT), text_len=call["max_sequence_length"],
                         text_position="start")
    check_steps_and_layouts(pipe, stats, calls, calls_per_step, layout)


@pytest.mark.parametrize("sizes", [[OUTPUT_SIZE], [OTHER_SIZE], [OUTPUT_SIZE, OTHER_SIZE]],
                         ids=["output's size", "another size", "both"])
def test_reference_image_edits_through_the_pipeline(flux2_pipe, sizes):
    # A reference of the output's size is frame 1 (a time window of two reaches into it); one of another size, or
    # any reference beside one of another size, joins the text's leading span, kept whole.
    pipe, call, calls_per_step = flux2_pipe
    call = {**call, "image": [noise_image(*size, seed=i) for i, size in enumerate(sizes)]}
    rows, cols = patch_grid(pipe, WIDTH, HEIGHT)
    text_len = call["max_sequence_length"]
    if sizes == [OUTPUT_SIZE]:
        layout = VideoLayout(2, rows, cols, text_len=text_len, text_position="start")
    else:
        references = sum(r * c for r, c in (patch_grid(pipe, *size) for size in sizes))
        layout = VideoLayout(1, rows, cols, text_len=text_len + references, text_position="start")
    sparse = diffsparse.SparseConfig(pattern=Window3D(window=(layout.frames, 1, 1)), block_size=8, dense_steps=1)
    stats, calls = check_pipeline_against_dense(pipe, call, block_size=8, sparse=sparse)
    check_steps_and_layouts(pipe, stats, calls, calls_per_step, layout)


@pytest.fixture(scope="module")
def flux2_modular_pipes():
    """diffusers' modular FLUX.2 denoise blocks, text-to-image and with reference images, on two tiny transformers:
    [dev] (embedded guidance, one call a step), [klein] (distilled: no guidance, one call) and [klein] base (a CFG
    guider: the prompt's and the negative prompt's calls, one after another)."""
    torch.manual_seed(0)
    dev, klein = tiny_pipeline_transformer(guidance_embeds=True), tiny_pipeline_transformer(guidance_embeds=False)
    pipes = {}
    for name, blocks, transformer, guider in (
        ("dev", modular_blocks_flux2.Flux2CoreDenoiseStep, dev, None),
        ("dev references", modular_blocks_flux2.Flux2ImageConditionedCoreDenoiseStep, dev, None),
        ("klein references", modular_blocks_flux2_klein.Flux2KleinImageConditionedCoreDenoiseStep, klein, None),
        ("klein base", klein_base.Flux2KleinBaseCoreDenoiseStep, klein, ClassifierFreeGuidance(guidance_scale=4.0)),
        ("klein base references", klein_base.Flux2KleinBaseImageConditionedCoreDenoiseStep, klein,
         ClassifierFreeGuidance(guidance_scale=4.0)),
    ):
        pipe = blocks().init_pipeline()
        components = {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
        pipe.update_components(**components, **({"guider": guider} if guider else {}))
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


@pytest.mark.parametrize("name, reference_sizes", [
    ("dev", ()), ("dev references", [(4, 6)]), ("klein references", [(2, 3)]), ("klein base", ()),
    ("klein base references", [(4, 6), (2, 3)]),
], ids=["dev", "dev, a reference of the output's size", "klein, one of another size", "klein base",
        "klein base, one of each size"])
def test_modular_denoise_blocks_dense_every_block_kept_and_sparse_after_the_dense_step(flux2_modular_pipes, name,
                                                                                       reference_sizes):
    # The blocks pass `t / 1000` and append the reference latents' tokens (ids at times 10, 20, ...): references of
    # the output's size are frames 1, 2, ...; beside one of another size all join the text's span. A 64 x 96 image
    # is 4 x 6 packed tokens (no VAE: the blocks' scale factor 8).
    pipe, guided = flux2_modular_pipes[name], name.startswith("klein base")
    g = torch.Generator().manual_seed(1)
    text_dim = len(ENCODER_LAYERS) * ENCODER_WIDTH
    call = {"prompt_embeds": torch.randn(1, TEXT_LEN, text_dim, generator=g), "height": 64, "width": 96,
            "num_inference_steps": 3, "output": "latents"}
    if guided:
        call["negative_prompt_embeds"] = torch.randn(1, 4, text_dim, generator=g)
    if reference_sizes:
        call["image_latents"] = [torch.randn(1, 8, *size, generator=g) for size in reference_sizes]
    stats, calls = check_modular_against_dense(pipe, call)
    # Each call on its own scheduler step (a wrong scale puts them all on one), the first dense; the guider's two
    # calls a step are two branches, each on its own prompt's layout.
    prompts = (TEXT_LEN, 4) if guided else (TEXT_LEN,)
    records = stats.calls["transformer"]
    assert Counter((r.step, r.branch) for r in records) == {
        (step, f"call {i}"): len(layers(pipe)) for step in range(3) for i in range(len(prompts))
    }
    assert all(r.sparse == (r.step > 0) and (r.density < 1) == r.sparse for r in records)
    if all(size == (4, 6) for size in reference_sizes):
        frames, spanned = 1 + len(reference_sizes), 0
    else:
        frames, spanned = 1, sum(rows * cols for rows, cols in reference_sizes)
    assert {layout for _, layout, _ in calls} == {
        VideoLayout(frames, 4, 6, text_len=n + spanned, text_position="start") for n in prompts
    }
