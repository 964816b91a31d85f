"""Families whose sparse path does not shard (`context_parallel = False`) refuse context parallelism enabled after
`apply` at their first sparse call, rather than attend one rank's share of the tokens as if it were the whole."""

import pytest
import test_allegro
import test_cosmos
import test_easyanimate
import test_latte
import test_mochi
import torch
from diffusers import (
    AllegroTransformer3DModel,
    ContextParallelConfig,
    EasyAnimateTransformer3DModel,
    MochiTransformer3DModel,
    ParallelConfig,
)

import diffsparse
from diffsparse.pipelines.base import SparseProcessor

# diffusers' Mochi RoPE asks for a float32 autocast region, which CPU autocast declines with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


def allegro():
    # As tests/test_allegro.py's fixture (pytest does not let a fixture be called as a function).
    torch.manual_seed(0)
    model = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=24, sample_height=8, sample_width=12, sample_frames=4, caption_channels=16,
    ).eval()
    return model, test_allegro.inputs(model)()


def cosmos():
    return test_cosmos.tiny_transformer(), test_cosmos.inputs()()


def latte():
    return test_latte.tiny_transformer(), test_latte.inputs()()


def easyanimate():
    # As tests/test_easyanimate.py's fixture.
    torch.manual_seed(0)
    model = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=9, out_channels=4, patch_size=2, sample_width=12,
        sample_height=8, num_layers=2, mmdit_layers=1, time_embed_dim=8, text_embed_dim=16, text_embed_dim_t5=12,
    ).eval()
    return model, test_easyanimate.inputs()


def mochi():
    # As tests/test_mochi.py's fixture.
    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=test_mochi.TEXT_LEN,
    )
    return model.eval(), test_mochi.inputs()


# family -> builder of (tiny transformer, its call's inputs); each a different sparse processor's check: Latte's is
# the shared frame self-attention's, Mochi's the shared joint video-text attention's.
FAMILIES = {"Allegro": allegro, "Cosmos": cosmos, "Latte": latte, "EasyAnimate": easyanimate, "Mochi": mochi}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallelism_enabled_after_apply_is_refused_at_the_first_sparse_call(family):
    model, inputs = FAMILIES[family]()
    config = diffsparse.SparseConfig(pattern="radial", density=0.5, block_size=16, dense_steps=0)
    with torch.no_grad():
        dense = model(**inputs)[0]
    with diffsparse.sparse(model, config) as handle:
        sparse = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), SparseProcessor)]
        assert sparse and not any(p.context_parallel for p in sparse)
        with torch.no_grad():
            assert model(**inputs)[0].shape == dense.shape  # runs sparse before parallelism is enabled
        assert sum(layer.sparse_calls for layer in handle.stats().layers) > 0
        # What `enable_parallelism` sets on every processor that declares the attribute.
        for processor in sparse:
            processor._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
        with pytest.raises(NotImplementedError, match=f"not on {type(sparse[0]).__name__}"), torch.no_grad():
            model(**inputs)
