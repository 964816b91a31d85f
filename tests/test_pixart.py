"""diffsparse on diffusers' PixArt-Σ and PixArt-α pipelines (tiny, random weights, offline): each block's image
self-attention on a one-frame layout, the cross-attention to the prompt untouched."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPAGPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import T5Config, T5EncoderModel

import diffsparse
from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_fused_projections,
    check_other_processors_are_refused,
    check_pag_pipeline,
    check_pipeline_against_dense,
    first_transformer_call,
    run_pipeline,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]


@pytest.fixture(scope="module", params=[PixArtSigmaPipeline, PixArtAlphaPipeline])
def pixart_pipe(request):
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    vae = tiny_image_vae()
    t5 = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    pipe = request.param(tokenizer=word_tokenizer(VOCABULARY), text_encoder=t5.eval(), vae=vae,
                         transformer=transformer.eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_call(**overrides):
    # 32 x 48 pixels -> 16 x 24 latents (x2 VAE) -> 8 x 12 patches of 2 x 2.
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 48,
            "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent", "use_resolution_binning": False,
            "max_sequence_length": 8}
    return {**call, **overrides}


@pytest.mark.parametrize("order", [None, TileOrder((1, 2, 2))])
def test_dense_identical_every_block_kept_and_the_layout_is_the_patch_grid(pixart_pipe, order):
    stats, calls = check_pipeline_against_dense(pixart_pipe, pixart_call(), order=order)
    # One batched call per step (CFG's two prompts together): the self-attention of each block.
    assert {(layout, shape) for _, layout, shape in calls} == {(VideoLayout(1, 8, 12), (2, 96))}
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def test_a_direct_transformer_call_the_pipelines_way(pixart_pipe):
    # The first transformer call of a generation, made directly: also in bfloat16, as real checkpoints run.
    inputs = first_transformer_call(pixart_pipe, pixart_call())
    check_against_dense(pixart_pipe.transformer, lambda: inputs, block_size=16)


def test_latents_of_odd_size_are_read_without_their_partial_patches(pixart_pipe):
    # The patch embedding is a strided convolution: 17 x 25 latents are 8 x 12 patches, the last latent row and
    # column dropped (the model's output is 16 x 24). Rounding up read 9 x 13, a layout of the wrong length.
    transformer = pixart_pipe.transformer
    call = {"hidden_states": torch.zeros(1, 4, 17, 25), "timestep": torch.tensor([500])}
    assert adapter_for(transformer).read_call(transformer, (), call)[0] == VideoLayout(1, 8, 12)


def test_other_processors_are_refused_and_the_model_left_untouched(pixart_pipe):
    check_other_processors_are_refused(pixart_pipe, "PixArt", layer=1)


def test_remove_gives_the_original_processors_back_with_no_attribute_they_lacked(pixart_pipe):
    # diffusers' `AttnProcessor2_0` has no parallel config; the sparse processor's class-level one must not be copied
    # onto it by `remove` (a later `enable_parallelism` would then set one on a processor that cannot use it).
    originals = {name: (p, dict(vars(p))) for name, p in pixart_pipe.transformer.attn_processors.items()}
    assert not any(hasattr(p, "_parallel_config") for p, _ in originals.values())
    diffsparse.apply(pixart_pipe, diffsparse.SparseConfig(block_size=8))
    diffsparse.remove(pixart_pipe)
    for name, processor in pixart_pipe.transformer.attn_processors.items():
        assert processor is originals[name][0] and vars(processor) == originals[name][1], name


def test_fused_qkv_projections(pixart_pipe):
    check_fused_projections(pixart_pipe, pixart_call(), "FusedAttnProcessor2_0")


def test_the_pag_pipeline_perturbs_its_layer_with_its_own_processor_and_the_others_stay_sparse(pixart_pipe):
    pag = PixArtSigmaPAGPipeline(**pixart_pipe.components, pag_applied_layers=["transformer_blocks.1"])
    check_pag_pipeline(pag, pixart_call(pag_scale=3.0), sparse_layers={0})


def test_sparse_processors_that_unfusing_puts_back_after_remove_give_way_to_their_originals(pixart_pipe):
    # `fuse_qkv_projections()` after `apply` keeps the sparse processors it replaces and `unfuse_qkv_projections()`
    # after `remove` puts them back, their handle gone. Before, they ran dense, every later `apply` refused them
    # ("has processor FrameSelfAttention") and `remove` could not take them off.
    transformer = pixart_pipe.transformer
    modules = dict(adapter_for(transformer).self_attention_modules(transformer))
    stock = {layer: module.processor for layer, module in modules.items()}
    reference = run_pipeline(pixart_pipe, pixart_call())
    config = diffsparse.SparseConfig(pattern="window3d", density=0.3, block_size=16, dense_steps=1)

    def orphans_put_back():
        diffsparse.apply(pixart_pipe, config)
        transformer.fuse_qkv_projections()
        diffsparse.remove(pixart_pipe)  # leaves the fused processors, set after `apply`
        transformer.unfuse_qkv_projections()
        assert {type(module.processor).__name__ for module in modules.values()} == {"FrameSelfAttention"}

    def stock_back():
        return all(module.processor is stock[layer] for layer, module in modules.items())

    orphans_put_back()
    diffsparse.remove(pixart_pipe)
    assert stock_back()
    orphans_put_back()
    out, stats = run_pipeline(pixart_pipe, pixart_call(), config)  # applied over them, and removed
    assert all(s.sparse_calls for s in stats.layers) and not torch.allclose(out, reference, atol=1e-4)
    assert stock_back()
    torch.testing.assert_close(run_pipeline(pixart_pipe, pixart_call()), reference, atol=0, rtol=0)
