"""diffsparse on diffusers' HiDream-I1 pipeline (tiny, random weights, offline): dual- and single-stream blocks over
`[image, T5 + Llama text]`, and a non-square image's pad patches (zeroed keys) in the text's span."""

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5EncoderModel,
)

from diffsparse.patterns import TileOrder, VideoLayout
from diffsparse.pipelines.text import word_tokenizer

from helpers import (
    check_against_dense,
    check_other_processors_are_refused,
    check_pipeline_against_dense,
    tiny_image_vae,
)

VOCABULARY = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "grass"]
TEXT_LEN = 8  # per encoder: the T5 prompt and two Llama layers, 24 text tokens in every block


def tiny_transformer(head_dim: int):
    """One dual- and one single-stream block, 8 rotary dims per head (all of `head_dim` 8, half of 16), two
    experts, 64 patches at most (16 x 16 latents), text from the T5 prompt and Llama layers 0 and 1."""
    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1),
    ).eval()


@pytest.fixture(scope="module")
def hidream_pipe():
    transformer = tiny_transformer(head_dim=8)
    vae = tiny_image_vae(shift_factor=0.0609, scaling_factor=1.5035)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(VOCABULARY), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            projection_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        )).eval()

    t5 = T5EncoderModel(T5Config(vocab_size=len(VOCABULARY), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1)).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCABULARY), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=1)).eval()
    tokenizer = word_tokenizer(VOCABULARY, max_length=TEXT_LEN)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip(), tokenizer=tokenizer,
        text_encoder_2=clip(), tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=tokenizer,
        text_encoder_4=llama, tokenizer_4=tokenizer, transformer=transformer.eval(),
    )
    # The pipeline rescales every request to the area of its default size (128 latents a side): 16 keeps 32 x 32.
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hidream_call(**overrides):
    call = {"prompt": "a red circle on grass", "negative_prompt": "blue", "height": 32, "width": 32,
            "num_inference_steps": 3, "guidance_scale": 4.0, "max_sequence_length": TEXT_LEN, "output_type": "latent"}
    return {**call, **overrides}


@pytest.mark.parametrize("size, grid, order", [
    ((32, 32), (8, 8), None), ((32, 32), (8, 8), TileOrder((1, 2, 2))),
    ((24, 32), (6, 9), None),  # rescaled to the default area: 24 x 36 pixels
])
def test_dense_identical_every_block_kept_and_the_layout(hidream_pipe, size, grid, order):
    # 32 x 32 pixels -> 16 x 16 latents (x2 VAE) -> 8 x 8 patches; 6 x 9 patches are padded to the model's 64
    # (max_resolution 16 x 16 latents), the 10 pad patches behind the grid, before the text. (Without the pad
    # patches' zeroed keys on the sparse path, the non-square case fails.)
    stats, calls = check_pipeline_against_dense(hidream_pipe, hidream_call(height=size[0], width=size[1]), order=order)
    pad = 64 - grid[0] * grid[1]
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, *grid, text_len=pad + 3 * TEXT_LEN)}
    assert {r.step for r in stats.calls["transformer"]} == {0, 1, 2}


def bare_inputs(latent_size: int = 16, t5_len: int = TEXT_LEN, llama_len: int = TEXT_LEN):
    """A bare transformer call's inputs: square latents of `latent_size`, the T5 prompt of `t5_len` tokens and two
    Llama layers of `llama_len` tokens each."""
    def inputs():
        generator = torch.Generator().manual_seed(0)
        return {"hidden_states": torch.randn(1, 4, latent_size, latent_size, generator=generator),
                "timesteps": torch.tensor([500.0]),
                "encoder_hidden_states_t5": torch.randn(1, t5_len, 16, generator=generator),
                "encoder_hidden_states_llama3": torch.randn(2, 1, llama_len, 16, generator=generator),
                "pooled_embeds": torch.randn(1, 16, generator=generator)}

    return inputs


def test_rope_on_half_the_head_dim_matches_dense():
    # Head dims twice the rotary dims (RoPE on the first half, the rest as is): a bare transformer call.
    check_against_dense(tiny_transformer(head_dim=16), bare_inputs(), block_size=16)


def test_a_square_image_below_the_models_size_has_no_pad_patches():
    # The model pads only a non-square image to `max_seq` (64 patches here): 12 x 12 latents are 6 x 6 patches and
    # the text alone, no pad patch in the layout's trailing span (the pipeline's square size is the model's 8 x 8).
    calls = check_against_dense(tiny_transformer(head_dim=8), bare_inputs(latent_size=12), block_size=16)
    assert {layout for _, layout, _ in calls} == {VideoLayout(1, 6, 6, text_len=3 * TEXT_LEN)}


def test_a_t5_prompt_and_llama_layers_of_different_lengths_are_all_the_text(hidream_pipe):
    # The pipeline cuts the T5 prompt at its tokenizer's maximum and the Llama prompt at `max_sequence_length`, so
    # their lengths may differ: the text span is the T5 prompt's 5 tokens and two Llama layers of 7 (three times the
    # T5 prompt's length is a layout of the wrong length, on which every sparse call fails). Read without a run: a
    # bare call of the tiny model takes seconds here.
    from diffsparse.pipelines import adapter_for

    transformer = hidream_pipe.transformer
    layout, _ = adapter_for(transformer).read_call(transformer, (), bare_inputs(12, t5_len=5, llama_len=7)())
    assert layout == VideoLayout(1, 6, 6, text_len=5 + 2 * 7)


def test_patchified_latents_are_refused(hidream_pipe):
    from diffsparse.pipelines import adapter_for

    transformer = hidream_pipe.transformer
    with pytest.raises(ValueError, match="patchified by the caller"):
        adapter_for(transformer).read_call(transformer, (torch.zeros(1, 64, 16),), {
            "timesteps": torch.tensor([1.0]), "encoder_hidden_states_t5": torch.zeros(1, 8, 16),
            "encoder_hidden_states_llama3": torch.zeros(2, 1, 8, 16)})


def test_other_processors_are_refused_and_the_model_left_untouched(hidream_pipe):
    check_other_processors_are_refused(hidream_pipe, "HiDream", layer=1)
