"""The small helpers of `pipelines/base.py` that every adapter builds on, checked on tensors alone (no model): the
joint outputs' split, the processors' output, patch counts, forward arguments by keyword or position, prefix masks,
and the refusals `make_processor` gives before anything is replaced."""

import types

import pytest
import torch
from diffusers.hooks._helpers import AttentionProcessorRegistry
from diffusers.models.attention_processor import AttnProcessor2_0

from diffsparse.pipelines.base import (
    FrameSelfAttention,
    ModelAdapter,
    _padded_heads,
    _shares,
    attention_processor_output,
    call_argument,
    forward_input,
    patch_count,
    patched_grid,
    prefix_lengths,
    project_joint_output,
    valid_text_key_groups,
)


def test_project_joint_output_splits_at_the_video_and_projects_each_stream_where_the_module_can():
    out = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    attn = types.SimpleNamespace(to_out=[lambda x: x + 100, lambda x: x * 2], to_add_out=lambda x: -x)
    video, text = project_joint_output(attn, out, video_len=3)  # [video, text]
    assert torch.equal(video, (out[:, :3] + 100) * 2) and torch.equal(text, -out[:, 3:])
    video, text = project_joint_output(attn, out, video_len=3, text_first=True)  # [text, video]
    assert torch.equal(video, (out[:, 2:] + 100) * 2) and torch.equal(text, -out[:, :2])
    # A last block without them (single-stream blocks, some models' last block) passes its outputs as they are.
    video, text = project_joint_output(types.SimpleNamespace(to_out=None), out, video_len=3)
    assert torch.equal(video, out[:, :3]) and torch.equal(text, out[:, 3:])


def test_attention_processor_output_adds_the_residual_and_rescales_as_diffusers_does():
    out = torch.ones(1, 2, 2, 3)  # (B, S, heads, head_dim)
    hidden = torch.full((1, 2, 6), 3.0)
    attn = types.SimpleNamespace(to_out=[lambda x: x * 2, lambda x: x + 1], residual_connection=True,
                                 rescale_output_factor=2.0)
    assert torch.equal(attention_processor_output(attn, out, hidden, torch.float32), torch.full((1, 2, 6), 3.0))
    attn.residual_connection = False
    result = attention_processor_output(attn, out.double(), hidden, torch.float16)
    assert result.dtype == torch.float16 and torch.equal(result, torch.full((1, 2, 6), 1.5, dtype=torch.float16))


def test_patch_counts_drop_a_partial_patch_unless_padded():
    assert patched_grid((5, 9, 11), (2, 2, 2)) == (2, 4, 5)
    assert patch_count((5, 9, 11), (2, 2, 2), padded=False) == 2 * 4 * 5
    assert patch_count((5, 9, 11), (2, 2, 2), padded=True) == 3 * 5 * 6


def test_forward_arguments_are_read_by_keyword_or_by_position():
    class Model(torch.nn.Module):
        def forward(self, hidden_states, timestep=None, *rest, encoder_hidden_states=None):
            pass

    model = Model()
    assert forward_input(model, (1, 2), {}, "timestep") == 2
    assert forward_input(model, (1,), {"timestep": 3}, "timestep") == 3
    assert forward_input(model, (1,), {}, "timestep") is None
    assert forward_input(model, (1, 2, 9), {}, "encoder_hidden_states") is None  # keyword-only: never by position
    assert call_argument((1, 2), {}, "timestep", 1) == 2
    with pytest.raises(ValueError, match="without `timestep` \\(keyword or positional argument 1\\)"):
        call_argument((1,), {}, "timestep", 1)


def test_prefix_lengths_counts_each_row_and_names_the_first_row_that_is_not_a_prefix():
    assert prefix_lengths(torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])) == [2, 3, 0]
    with pytest.raises(ValueError, match="each row of encoder_attention_mask to be a prefix.*row 1 has"):
        prefix_lengths(torch.tensor([[1, 0, 0], [0, 1, 1]]), name="encoder_attention_mask")


def test_heads_that_do_not_divide_over_the_ranks_are_padded_per_rank_with_zero_heads():
    assert _shares(7, 3) == [3, 2, 2] and _shares(6, 3) == [2, 2, 2]
    x = torch.arange(1, 6, dtype=torch.float32).view(1, 1, 5, 1)  # heads 1..5 over 2 ranks: 3 and 2
    assert _padded_heads(x, [3, 2]).flatten().tolist() == [1, 2, 3, 4, 5, 0]
    assert _padded_heads(x, [5]) is x


class _Adapter(ModelAdapter):
    family = "Tiny"
    original_processor = AttnProcessor2_0
    sparse_processor = FrameSelfAttention

    def read_call(self, transformer, args, kwargs):
        raise NotImplementedError


def test_make_processor_refuses_other_processors_and_context_parallelism_it_cannot_shard():
    adapter = _Adapter()

    class LoraProcessor(AttnProcessor2_0):
        pass

    with pytest.raises(ValueError, match="layer 3 of the Tiny transformer has processor LoraProcessor; diffsparse "
                                         "replaces only AttnProcessor2_0"):
        adapter.make_processor(LoraProcessor(), runtime=None, layer=3)
    original = AttnProcessor2_0()
    sparse = adapter.make_processor(original, runtime=None, layer=3)
    assert type(sparse) is FrameSelfAttention and sparse.layer == 3 and sparse.original is original
    # An orphan of a removed handle (diffusers' unfuse_qkv_projections() puts it back) stands for its original; an
    # installed one is another handle's, refused.
    assert adapter.make_processor(sparse, runtime=None, layer=3).original is original
    sparse.installed = True
    with pytest.raises(ValueError, match="has processor FrameSelfAttention"):
        adapter.make_processor(sparse, runtime=None, layer=3)
    sparse.installed = False
    # Layer-skip guiders find how to skip a module by its processor's exact class: the sparse one gets the original's.
    assert AttentionProcessorRegistry.get(FrameSelfAttention) is AttentionProcessorRegistry.get(AttnProcessor2_0)
    # Parallelism enabled on the model only (diffusers sets it on processors only where the attribute exists).
    parallel = types.SimpleNamespace(_parallel_config=types.SimpleNamespace(context_parallel_config=object()))
    with pytest.raises(NotImplementedError, match="not on FrameSelfAttention"):
        adapter.make_processor(AttnProcessor2_0(), runtime=None, layer=0, transformer=parallel)
    # ... and enabled after `apply`: the first sparse call refuses it.
    sparse._parallel_config = parallel._parallel_config
    with pytest.raises(NotImplementedError, match="not on FrameSelfAttention"):
        sparse.check_not_parallel()


def test_remove_puts_back_the_backend_and_parallel_config_set_on_the_sparse_processor():
    original = types.SimpleNamespace(_attention_backend=None, _parallel_config=None)
    sparse = FrameSelfAttention(runtime=None, layer=0, original=original)
    sparse._attention_backend, sparse._parallel_config = "flash", "config"  # set_attention_backend after apply
    assert sparse.restored_original() is original
    assert (original._attention_backend, original._parallel_config) == ("flash", "config")


def test_a_boolean_mask_of_the_text_alone_is_not_read_as_the_prompts_padding():
    text = torch.tensor([True, True, False])[None, None, None]  # (1, 1, 1, 3): no image key past the text
    assert valid_text_key_groups(text, text_len=3) is None
    whole = torch.cat([text, torch.ones(1, 1, 1, 2, dtype=torch.bool)], dim=-1)
    [(videos, kept)] = valid_text_key_groups(whole, text_len=3)
    assert videos.tolist() == [0] and kept.tolist() == [0, 1, 3, 4]
