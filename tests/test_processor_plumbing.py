"""What the shared processor plumbing (`pipelines/base.py`) passes on that the families' end-to-end tests do not
reach: a one-row key mask over a batch in `attend_video_queries`, the dense logging of a masked call, the original's
attention backend on the sparse processors, and `call_argument` on the last positional argument. Tiny random Wan and
SkyReels-V2 transformers, called directly."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

import diffsparse
from diffsparse.patterns import VideoLayout, Window3D
from diffsparse.pipelines import adapter_for
from diffsparse.pipelines.base import SparseProcessor, attend_kept_tokens, valid_key_groups, valid_text_key_groups
from diffsparse.pipelines.tiny import tiny_wan_config

EVERY_BLOCK = diffsparse.SparseConfig(pattern=Window3D(window=(99, 99, 99)), block_size=16, dense_steps=0)


def tiny_wan():
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_wan_config()["transformer"]).eval()


def tiny_skyreels():
    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def inputs():
    """3 latent frames of 8 x 10 -> 3 x 4 x 5 = 60 tokens, a batch of 2."""
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 16, 3, 8, 10, generator=g), "timestep": torch.tensor([500, 300]),
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=g)}


class FakeRuntime:
    """Dense attention of whatever the processor hands over, on the layout it is given."""

    def __init__(self, layout):
        self.layout = layout

    def call_layout(self):
        return self.layout

    def attention(self, layer, query, key, value, layout=None, video_queries=False, outside_pairs=0, parts=None,
                  videos=None):
        assert key.shape[1] == layout.num_tokens and query.shape[1] == layout.num_video_tokens
        assert videos is not None and len(videos) == query.shape[0]  # a group tells the runtime which videos it holds
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value))).transpose(1, 2)

    def log_parts(self, parts):
        pass


def _three_videos_one_padding_mask():
    """`(layout, query, key, value, mask, reference)`: 3 videos of `[4 text, 2 x 3 video]` tokens under one `(1, S)` key mask
    hiding text tokens 2 and 3 (the prompt's padding), and the masked dense attention they should get."""
    layout = VideoLayout(1, 2, 3, text_len=4)
    torch.manual_seed(0)
    query, key, value = (torch.randn(3, layout.num_tokens, 2, 8) for _ in range(3))
    mask = torch.ones(1, layout.num_tokens, dtype=torch.bool)
    mask[0, 2:4] = False
    reference = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value)),
                                               attn_mask=mask[:, None, None]).transpose(1, 2)
    return layout, query, key, value, mask, reference


def test_attend_video_queries_applies_a_one_row_key_mask_to_every_video():
    layout, query, key, value, mask, reference = _three_videos_one_padding_mask()
    out = SparseProcessor(FakeRuntime(layout), 0).attend_video_queries(
        query[:, 4:], key, value, valid_key_groups(mask))
    torch.testing.assert_close(out, reference[:, 4:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("attend", ["attend_video_queries", "attend_kept_tokens"])
def test_key_mask_groups_of_fewer_videos_than_the_batch_are_refused(attend):
    # A mask of 2 rows for 3 videos (attention refuses it): before, the third video kept `empty_like`'s memory
    # (attend_video_queries) or zeros (attend_kept_tokens) as its output, silently.
    layout, query, key, value, mask, _ = _three_videos_one_padding_mask()
    groups = valid_key_groups(mask.expand(2, -1))
    with pytest.raises(ValueError, match=f"{attend} needs groups holding each of the batch's 3 videos once, got "
                                         "groups of 2 videos: the key mask they were read from must have 1 or 3 rows"):
        if attend == "attend_video_queries":
            SparseProcessor(FakeRuntime(layout), 0).attend_video_queries(query[:, 4:], key, value, groups)
        else:
            attend_kept_tokens(KeptRuntime(layout), 0, query, key, value, groups)


class KeptRuntime(FakeRuntime):
    """`FakeRuntime` for a whole call's queries (`attend_kept_tokens`); the model's order is the layout's."""

    def to_layout_order(self, x):
        return x

    def to_model_order(self, x):
        return x

    def attention(self, layer, query, key, value, layout=None, heads=None, parts=None, videos=None):
        assert key.shape[1] == layout.num_tokens == query.shape[1]
        assert videos is not None and len(videos) == query.shape[0]  # a group tells the runtime which videos it holds
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value))).transpose(1, 2)


def test_attend_kept_tokens_applies_a_one_row_key_mask_to_every_video():
    # As `attend_video_queries` above: nothing failed when the one-row broadcast was dropped (videos 1 and 2 then
    # came out all zeros).
    layout, query, key, value, mask, reference = _three_videos_one_padding_mask()
    out = attend_kept_tokens(KeptRuntime(layout), 0, query, key, value, valid_key_groups(mask))
    kept = mask[0]
    torch.testing.assert_close(out[:, kept], reference[:, kept], atol=1e-6, rtol=0)
    assert not out[:, ~kept].any()  # the padding's outputs are zeros


def test_valid_text_key_groups_reads_only_boolean_key_masks():
    # Nothing failed without `boolean_key_rows`' dtype check (an additive float mask, 0 = keep and -inf = drop, would
    # be read inverted as a boolean one) or its shape check (a per-query mask read from its first row).
    text_len, length = 4, 10
    boolean = torch.ones(1, 1, 1, length, dtype=torch.bool)
    boolean[..., 2:4] = False
    groups = valid_text_key_groups(boolean, text_len)
    assert [g[1].tolist() for g in groups] == [[0, 1, 4, 5, 6, 7, 8, 9]]
    additive = torch.zeros(1, 1, 1, length).masked_fill(~boolean, float("-inf"))
    assert valid_text_key_groups(additive, text_len) is None
    bias = torch.full((1, 1, 1, length), 0.5)  # a float bias on every key: nothing a prompt-padding mask means
    assert valid_text_key_groups(bias, text_len) is None
    per_query = boolean.expand(1, 1, length, length).clone()
    per_query[0, 0, 5:, 0] = False  # later queries mask another key: not a key mask
    assert valid_text_key_groups(per_query, text_len) is None
    assert valid_text_key_groups(torch.ones(1, 1, 1, length, dtype=torch.bool), text_len) == []


def test_valid_key_groups_of_a_mask_without_masked_keys_is_none():
    # Nothing failed without `if bool(mask.all()): return None` (results equal, but every prompt-padding family
    # would then take the gathered-copy path of `attend_kept_tokens` on every unmasked call).
    assert valid_key_groups(torch.ones(2, 5, dtype=torch.bool)) is None
    assert valid_key_groups(torch.ones(2, 1, 1, 5, dtype=torch.bool)) is None


@pytest.mark.parametrize("make", [tiny_wan, tiny_skyreels], ids=["Wan", "SkyReels-V2"])
def test_a_call_with_a_token_level_mask_runs_the_original_and_is_counted_dense(make):
    transformer = make()
    n = 3 * 4 * 5
    # Not SkyReels' causal frame-block mask: the kernel could not apply it.
    mask = (torch.rand(n, n, generator=torch.Generator().manual_seed(2)) > 0.3) | torch.eye(n, dtype=torch.bool)
    for block in transformer.blocks:
        block.attn1.register_forward_pre_hook(lambda module, args: (*args[:2], mask[None, None], *args[3:]))
    with torch.no_grad():
        reference = transformer(**inputs()).sample
        with diffsparse.sparse(transformer, EVERY_BLOCK) as handle:
            out = transformer(**inputs()).sample
            layers = handle.stats().layers
    assert torch.equal(out, reference)
    assert [(s.dense_calls, s.sparse_calls) for s in layers] == [(1, 0)] * len(transformer.blocks)


def test_the_sparse_processors_keep_the_attention_backend_set_before_apply(monkeypatch):
    # set_attention_backend also sets diffusers' process-wide active backend: put back after the test.
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    math = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]
    counted = []

    def counting(**kwargs):
        counted.append(kwargs["query"].shape)
        return math(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, counting)
    transformer = tiny_wan()
    transformer.set_attention_backend("_native_math")
    with torch.no_grad():
        reference = transformer(**inputs()).sample
        dense_calls, counted[:] = list(counted), []
        # Every call dense: run by the originals' `__call__` on the sparse processors, with their backend.
        with diffsparse.sparse(transformer, diffsparse.SparseConfig(pattern="dense", dense_steps=0)):
            assert all(block.attn1.processor._attention_backend == "_native_math" for block in transformer.blocks)
            out = transformer(**inputs()).sample
    assert counted == dense_calls and len(dense_calls) == 2 * len(transformer.blocks)  # self and cross attention
    assert torch.equal(out, reference)



@pytest.mark.parametrize("make", [tiny_wan, tiny_skyreels], ids=["Wan", "SkyReels-V2"])
def test_a_subclass_of_a_supported_transformer_runs_as_its_parent(make):
    # A user's subclass is its family's model: the family's adapter, and the sparse call its parent class gives.
    parent = make()
    subclass = type("UserTransformer", (type(parent),), {})
    child = subclass.from_config(parent.config).eval()
    child.load_state_dict(parent.state_dict())
    assert adapter_for(child) is adapter_for(parent)
    config = diffsparse.SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0)
    outputs = []
    with torch.no_grad():
        reference = parent(**inputs()).sample
        for model in (parent, child):
            with diffsparse.sparse(model, config) as handle:
                outputs.append(model(**inputs()).sample)
                assert [(s.dense_calls, s.sparse_calls) for s in handle.stats().layers] == [(0, 1)] * 2
    assert torch.equal(outputs[1], outputs[0]) and not torch.allclose(outputs[0], reference, atol=1e-4)

def test_read_call_takes_the_last_argument_given_by_position():
    transformer = tiny_wan()
    call = inputs()
    args, kwargs = (call["hidden_states"], call["timestep"]), {"encoder_hidden_states": call["encoder_hidden_states"]}
    layout, timestep = adapter_for(transformer).read_call(transformer, args, kwargs)
    assert layout == VideoLayout(3, 4, 5) and timestep is call["timestep"]
