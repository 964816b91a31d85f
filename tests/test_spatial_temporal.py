"""SpatialTemporal (Sparse VideoGen's spatial and temporal heads): masks, block exactness, classification."""

import math
import time

import pytest
import torch

from diffsparse.patterns import (
    PATTERNS,
    FrameCausal,
    FrameSink,
    Radial,
    SpatialTemporal,
    TileOrder,
    VideoLayout,
    get_pattern,
    reduce_token_mask,
    spatial_temporal,
)

from helpers import check_block_masks_reduce_token_masks, reordered_reference

LAYOUTS = [
    VideoLayout(3, 5, 7),
    VideoLayout(4, 6, 8, text_len=5, text_position="start"),
    VideoLayout(5, 4, 6, text_len=3, text_position="end"),
    VideoLayout(9, 2, 3),  # tiny frames: blocks span many frames
    VideoLayout(1, 7, 5),  # one frame
]
ORDERS = [None, TileOrder((2, 3, 4)), TileOrder((1, 2, 2))]
# Single-token blocks (size 1) are slow to reduce; the random cases below draw small sizes.
BLOCK_SIZES = [2, 7, (16, 5), (8, 24)]
PATTERN_CASES = [
    SpatialTemporal(),  # not classified: the union of both kinds
    SpatialTemporal(frames=0, width=0),
    SpatialTemporal(frames=1, width=1, heads=("spatial", "temporal", "temporal", "spatial")),
    SpatialTemporal(frames=2, width=3, heads=("temporal", "spatial")),
    SpatialTemporal(frames=0, width=1, heads=("spatial", "temporal")) | Radial(decay=0.3, min_window=3),
]


# The two kinds at token level ------------------------------------------------------------------------------


def test_spatial_heads_keep_a_band_of_frames():
    layout = VideoLayout(5, 3, 4)
    for frames in (0, 1, 3):
        mask = SpatialTemporal(frames=frames, width=0, heads=("spatial",))._video_token_mask(layout)[0]
        f = layout.video_coordinates()[0]
        assert torch.equal(mask, (f[:, None] - f[None, :]).abs() <= frames)  # clipped, not clamped


def test_temporal_heads_keep_a_clamped_window_in_every_frame():
    layout = VideoLayout(4, 6, 7)
    pattern = SpatialTemporal(width=1, heads=("temporal",))
    mask = pattern._video_token_mask(layout)[0]
    assert torch.all(mask.sum(-1) == 4 * 3 * 3)  # NATTEN: border queries keep as many keys as central ones
    grid = mask.reshape(4, 6, 7, 4, 6, 7)
    corner = grid[2, 0, 0]  # the window is pushed inside: rows 0..2, columns 0..2, in every frame
    assert corner[:, 0:3, 0:3].all() and corner.sum() == 36
    centre = grid[1, 3, 4]
    assert centre[:, 2:5, 3:6].all() and centre.sum() == 36
    edge = grid[0, 5, 6]
    assert edge[:, 3:6, 4:7].all() and edge.sum() == 36
    # A window wider than the frame covers it: the head keeps every key.
    assert SpatialTemporal(width=4, heads=("temporal",))._video_token_mask(layout).all()


def test_heads_select_kinds_and_none_is_the_union():
    layout = VideoLayout(4, 5, 6, text_len=3)
    spatial = SpatialTemporal(frames=1, width=1, heads=("spatial",)).token_mask(layout)
    temporal = SpatialTemporal(frames=1, width=1, heads=("temporal",)).token_mask(layout)
    mixed = SpatialTemporal(frames=1, width=1, heads=("temporal", "spatial", "temporal")).token_mask(layout)
    assert torch.equal(mixed, torch.cat([temporal, spatial, temporal]))
    union = SpatialTemporal(frames=1, width=1).token_mask(layout)
    assert union.shape[0] == 1 and torch.equal(union, spatial | temporal)
    assert not torch.equal(spatial, temporal)
    # Every token keeps itself under both kinds: no empty rows.
    assert mixed.diagonal(dim1=1, dim2=2).all()


# Block masks against the token reduction ------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERN_CASES, ids=repr)
@pytest.mark.parametrize("order", ORDERS, ids=repr)
def test_block_mask_is_reduced_token_mask(pattern, order):
    check_block_masks_reduce_token_masks(pattern, LAYOUTS, order, BLOCK_SIZES)


def test_single_token_blocks_are_the_token_mask():
    pattern = SpatialTemporal(frames=1, width=2, heads=("temporal", "spatial", "temporal"))
    for layout in LAYOUTS[:2]:
        for order in (None, TileOrder((2, 3, 4))):
            assert torch.equal(pattern.block_mask(layout, 1, order), pattern.token_mask(layout, order))


def test_block_mask_random_cases():
    gen = torch.Generator().manual_seed(3)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    for _ in range(40):
        layout = VideoLayout(
            draw(1, 6), draw(1, 7), draw(1, 8), text_len=draw(0, 3), text_position=("start", "end")[draw(0, 1)]
        )
        heads = None if draw(0, 3) == 0 else tuple(("spatial", "temporal")[draw(0, 1)] for _ in range(draw(1, 4)))
        pattern = SpatialTemporal(frames=draw(0, 3), width=draw(0, 3), heads=heads)
        order = [None, TileOrder((draw(1, 3), draw(1, 4), draw(1, 4)))][draw(0, 1)]
        block_size = (draw(1, 40), draw(1, 40))
        expected = reduce_token_mask(reordered_reference(pattern, layout, order), block_size)
        assert torch.equal(pattern.block_mask(layout, block_size, order), expected), (layout, pattern, order)


def test_box_all_is_sound():
    # _box_all may say False when unsure, never True for a box pair with a dropped token pair. Intersection uses
    # _box_all to stop refining; intersected with itself a pattern gives itself whatever _box_all says, so the
    # other part is another pattern and the reference the token mask.
    layout = VideoLayout(4, 5, 6)
    for pattern in (SpatialTemporal(frames=1, width=1, heads=("spatial", "temporal")), SpatialTemporal()):
        for order in (None, TileOrder((2, 2, 3))):
            inter = pattern & Radial(decay=1.2, min_window=3)
            expected = reduce_token_mask(reordered_reference(inter, layout, order), 8)
            assert torch.equal(inter.block_mask(layout, 8, order), expected), (pattern, order)
    # Cases where a too-generous _box_all keeps a block the token mask drops: a temporal head's key box just wider
    # than its window; a spatial head (frames=1) with queries of frames 2-3 over keys of frames 0-1 keeps only
    # key frame 1 there, the sink only key frame 0, so the intersection keeps nothing.
    for pattern, other, layout, block in (
        (SpatialTemporal(frames=1, width=1, heads="T"), Radial(decay=1.2, min_window=3), VideoLayout(5, 3, 4), (1, 4)),
        (SpatialTemporal(frames=1, width=1, heads="S"), FrameSink(), VideoLayout(6, 2, 3), (4, 12)),
    ):
        inter = pattern & other
        expected = reduce_token_mask(inter.token_mask(layout), block)
        assert torch.equal(inter.block_mask(layout, block), expected), (pattern, other)


def test_temporal_heads_are_block_sparse_in_frame_major_order():
    # No position-major permutation: a query block (a few rows of one frame) keeps the same rows, +-width,
    # in every frame, about (block_q + block_k + 2 * width * W) / (H * W) of the key blocks.
    layout, block = VideoLayout(8, 30, 52), 128
    pattern = SpatialTemporal(frames=1, width=1, heads=("spatial", "temporal"))
    start = time.perf_counter()
    mask = pattern.block_mask(layout, block)
    assert time.perf_counter() - start < 5.0
    spatial, temporal = mask.float().mean(dim=(1, 2)).tolist()
    tpf = layout.tokens_per_frame
    assert math.isclose(temporal, (2 * block + 2 * 1 * layout.width) / tpf, rel_tol=0.05)  # 0.23 of 1560
    assert math.isclose(spatial, (3 * 8 - 2) / 64, rel_tol=0.1)  # a band of 3 frames


# Classification -------------------------------------------------------------------------------------------


def _planted(layout, kinds, batch=2, dim=64, strength=1.5, seed=0, dtype=torch.float32):
    """q = k per head: spatial heads share a code per frame (attention stays in the frame), temporal heads a
    code per (row, col) (attention stays at the position, across frames), plus noise."""
    gen = torch.Generator().manual_seed(seed)
    frame, row, col = layout.video_coordinates()
    position = row * layout.width + col
    heads = []
    for kind in kinds:
        codes = torch.randn(layout.frames if kind == "spatial" else layout.tokens_per_frame, dim, generator=gen)
        token_code = codes[frame if kind == "spatial" else position]
        heads.append(token_code + 0.3 * torch.randn(batch, *token_code.shape, generator=gen))
    x = strength * torch.stack(heads, dim=1)  # (B, H, V, D)
    return x.to(dtype), x.to(dtype)


KINDS_PLANTED = ("spatial", "temporal", "temporal", "spatial", "temporal", "spatial")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_classify_recovers_planted_kinds(dtype):
    layout = VideoLayout(6, 6, 8)
    q, k = _planted(layout, KINDS_PLANTED, dtype=dtype)
    pattern = SpatialTemporal(frames=1, width=1, num_samples=16)
    kinds = pattern.classify(q, k, layout, generator=torch.Generator().manual_seed(0))
    assert kinds == KINDS_PLANTED
    mass = pattern._sampled_mass(q, k, layout, torch.Generator().manual_seed(0))
    assert mass.shape == (6, 2) and bool(((mass >= 0) & (mass <= 1 + 1e-5)).all())
    margin = (mass[:, 1] - mass[:, 0]).abs()
    assert bool((margin > 0.3).all()), mass  # clear calls, not coin flips
    classified = pattern.with_heads(kinds)
    assert classified.block_mask(layout, 32).shape[0] == 6


def test_a_composition_classifies_its_spatial_temporal_part():
    # The runtime fits only data-dependent patterns: a composition that did not say it is one, or fitted only one
    # part, would keep the unclassified union of both kinds for the whole generation.
    layout = VideoLayout(6, 6, 8)
    q, k = _planted(layout, KINDS_PLANTED)
    part = SpatialTemporal(frames=1, width=1, num_samples=16)
    for composed in (part | FrameSink(), FrameSink() & part):
        assert composed.data_dependent and composed.refit_every == 0
        fitted = composed.fit(q, k, k, layout, 32, generator=torch.Generator().manual_seed(0))
        classified = fitted.left if fitted.left.name == "spatial_temporal" else fitted.right
        assert classified == part.with_heads(KINDS_PLANTED) and fitted.num_heads == 6
        assert fitted.density(layout, 32) < composed.density(layout, 32)
    assert not (Radial() | FrameSink()).data_dependent


def test_classify_ignores_text_tokens():
    layout = VideoLayout(5, 4, 6, text_len=7, text_position="start")
    q, k = _planted(layout, ("temporal", "spatial"), batch=1)
    text = torch.randn(1, 2, 7, q.shape[-1], generator=torch.Generator().manual_seed(5)) * 3
    q_full, k_full = torch.cat([text, q], dim=2), torch.cat([text, k], dim=2)  # text first
    pattern = SpatialTemporal()
    for gen_seed in (0, 1):
        video = pattern._sampled_mass(q, k, layout, torch.Generator().manual_seed(gen_seed))
        full = pattern._sampled_mass(q_full, k_full, layout, torch.Generator().manual_seed(gen_seed))
        torch.testing.assert_close(full, video, rtol=0, atol=0)
    assert pattern.classify(q_full, k_full, layout) == ("temporal", "spatial")


def test_classify_gives_a_tie_to_spatial():
    # On one frame of 3 x 3 both kinds keep every key (a width-1 window clamps its centre, so it spans the axis):
    # equal mass, and the docstring gives ties to the spatial kind.
    layout = VideoLayout(1, 3, 3)
    q = torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(0))
    assert SpatialTemporal(frames=0, width=1).classify(q, q, layout) == ("spatial", "spatial")


def test_classify_is_deterministic_and_leaves_the_global_rng_alone():
    layout = VideoLayout(4, 6, 8)
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 3, 192, 16, generator=gen), torch.randn(2, 3, 192, 16, generator=gen)
    pattern = SpatialTemporal(num_samples=8)
    state = torch.get_rng_state()
    a = pattern._sampled_mass(q, k, layout, torch.Generator().manual_seed(11))
    b = pattern._sampled_mass(q, k, layout, torch.Generator().manual_seed(11))
    c = pattern._sampled_mass(q, k, layout, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(pattern._sampled_mass(q, k, layout), pattern._sampled_mass(q, k, layout))
    assert pattern.classify(q, k, layout) == pattern.classify(q, k, layout)
    assert torch.equal(torch.get_rng_state(), state)
    # With as many samples as tokens every row is used: the generator no longer matters.
    everything = SpatialTemporal(num_samples=192)
    assert torch.equal(
        everything._sampled_mass(q, k, layout, torch.Generator().manual_seed(1)),
        everything._sampled_mass(q, k, layout, torch.Generator().manual_seed(2)),
    )


def test_classify_mass_matches_a_dense_reference():
    layout = VideoLayout(3, 4, 5, text_len=2)
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 60, 8, generator=gen), torch.randn(2, 2, 60, 8, generator=gen)
    pattern = SpatialTemporal(frames=0, width=1, num_samples=60)  # every row
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (B, H, V, V)
    spatial, temporal = pattern._kind_masks(layout, torch.arange(60))
    expected = torch.stack([(probs * spatial).sum(-1), (probs * temporal).sum(-1)], dim=-1).mean(dim=(0, 2))
    torch.testing.assert_close(pattern._sampled_mass(q, k, layout), expected, rtol=1e-5, atol=1e-6)


def test_classify_under_a_causal_mask_measures_the_masked_attention():
    # SkyReels-V2's causal frame groups: each row's softmax is over the keys of its group and the earlier ones.
    layout = VideoLayout(4, 3, 4)
    gen = torch.Generator().manual_seed(5)
    q, k = 3 * torch.randn(1, 2, 48, 8, generator=gen), 3 * torch.randn(1, 2, 48, 8, generator=gen)
    pattern = SpatialTemporal(frames=0, width=1, num_samples=48)
    groups = FrameCausal(2).video_groups(layout)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(groups[None, :] > groups[:, None], -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    spatial, temporal = pattern._kind_masks(layout, torch.arange(48))
    expected = torch.stack([(probs * spatial).sum(-1), (probs * temporal).sum(-1)], dim=-1).mean(dim=(0, 2))
    masked = pattern._sampled_mass(q, k, layout, within=FrameCausal(2))
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked, pattern._sampled_mass(q, k, layout), atol=1e-3)
    with pytest.raises(ValueError, match="FrameCausal"):
        pattern.classify(q, k, layout, within=pattern)


def test_classify_head_chunks_agree(monkeypatch):
    layout = VideoLayout(4, 5, 6)
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 5, 120, 8, generator=gen), torch.randn(1, 5, 120, 8, generator=gen)
    pattern = SpatialTemporal(num_samples=10)
    whole = pattern._sampled_mass(q, k, layout)
    monkeypatch.setattr(spatial_temporal, "_CLASSIFY_CHUNK", 2 * 120 * 10)  # two heads per chunk
    torch.testing.assert_close(pattern._sampled_mass(q, k, layout), whole, rtol=1e-6, atol=0)


def test_classify_never_builds_n_by_n():
    resource = pytest.importorskip("resource")  # ru_maxrss: POSIX only
    layout = VideoLayout(20, 25, 40)  # 20,000 tokens: an N x N float32 matrix is 1.6 GB
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 20000, 16, generator=gen), torch.randn(1, 2, 20000, 16, generator=gen)
    pattern = SpatialTemporal()
    pattern.classify(q[:, :, :300], k[:, :, :300], VideoLayout(3, 10, 10))  # first-call overheads out
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    kinds = pattern.classify(q, k, layout, generator=torch.Generator().manual_seed(0))
    assert time.perf_counter() - start < 2.0
    assert len(kinds) == 2 and set(kinds) <= {"spatial", "temporal"}
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 256  # MiB


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(1, 2, 24, 4), torch.zeros(1, 2, 24, 4), VideoLayout(2, 3, 5)), "N=30"),
        ((torch.zeros(1, 2, 30, 4), torch.zeros(1, 3, 30, 4), VideoLayout(2, 3, 5)), "same shape"),
        ((torch.zeros(2, 30, 4), torch.zeros(2, 30, 4), VideoLayout(2, 3, 5)), "query must be a"),
        ((torch.zeros(1, 2, 30, 4), "k", VideoLayout(2, 3, 5)), "key must be a"),
        ((torch.zeros(1, 2, 30, 4), torch.zeros(1, 2, 30, 4), (2, 3, 5)), "layout must be a VideoLayout"),
    ],
)
def test_classify_validation(args, match):
    with pytest.raises(ValueError, match=match):
        SpatialTemporal().classify(*args)


# Parameters, repr, registry, density ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"frames": -1}, "frames must be an int >= 0.*frames=-1"),
        ({"frames": 1.5}, "frames"),
        ({"frames": True}, "frames"),
        ({"frames": 2**31}, r"frames must be .*below 2\*\*31"),  # an OverflowError in the mask before
        ({"width": -2}, "width must be an int >= 0.*width=-2"),
        ({"width": "1"}, "width"),
        ({"num_samples": 0}, "num_samples must be an int >= 1.*num_samples=0"),
        ({"heads": ()}, r"heads must be None, a non-empty tuple"),
        ({"heads": "spatial"}, r"heads as a string must be one letter per head, S \(spatial\) or T.*'spatial'"),
        ({"heads": ""}, r"heads as a string must be one letter per head"),
        ({"heads": ("spatial", "diagonal")}, r"heads\[1\] must be one of \('spatial', 'temporal'\).*'diagonal'"),
        ({"heads": 2}, r"heads must be None"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpatialTemporal(**kwargs)


def test_with_heads():
    base = SpatialTemporal(frames=2, width=3, num_samples=8)
    classified = base.with_heads(["temporal", "spatial"])
    assert classified.heads == ("temporal", "spatial") and classified.num_heads == 2
    assert (classified.frames, classified.width, classified.num_samples) == (2, 3, 8)
    assert base.heads is None and base.num_heads == 1  # a copy; the original is unchanged
    assert classified.with_heads(None) == base
    with pytest.raises(ValueError, match=r"heads\[0\]"):
        base.with_heads(["S"])


def test_repr_registry_and_hashing():
    assert repr(SpatialTemporal()) == "spatial_temporal(frames=1, width=1)"
    assert (
        repr(SpatialTemporal(frames=2, heads=("spatial", "spatial", "temporal", "temporal")))
        == "spatial_temporal(frames=2, width=1, heads='SSTT')"
    )
    # The repr is a pattern string again (an eval table's pattern column works as --pattern).
    classified = SpatialTemporal(frames=2, num_samples=8, heads=("temporal", "spatial"))
    assert get_pattern(repr(classified)) == classified == SpatialTemporal(frames=2, num_samples=8, heads="TS")
    assert repr(SpatialTemporal(num_samples=8)) == "spatial_temporal(frames=1, width=1, num_samples=8)"
    assert PATTERNS["spatial_temporal"] is SpatialTemporal
    assert get_pattern("spatial_temporal") == SpatialTemporal()
    assert get_pattern("spatial_temporal", width=2) == SpatialTemporal(width=2)
    assert SpatialTemporal(heads=["spatial"]) == SpatialTemporal(heads=("spatial",))
    assert len({SpatialTemporal(), SpatialTemporal(), SpatialTemporal().with_heads(("spatial",))}) == 2


@pytest.mark.parametrize(
    "pattern, order",
    [
        (SpatialTemporal(), None),
        (SpatialTemporal(frames=0, width=2, heads=("spatial", "temporal")), None),
        (SpatialTemporal(heads=("temporal", "temporal")), TileOrder((1, 4, 4))),
    ],
    ids=repr,
)
def test_at_density(pattern, order):
    layout, block_size = VideoLayout(8, 12, 16), 64
    make = pattern._density_knob(layout)[0]
    grid = [make(i / 8) for i in range(8 * 24)]
    densities = [p.density(layout, block_size, order) for p in grid]
    assert densities == sorted(densities)  # density grows with the knob
    for target in (0.2, 0.5, 0.8):
        solved = pattern.at_density(layout, target, block_size, order)
        assert type(solved) is SpatialTemporal and solved.heads == pattern.heads
        error = abs(solved.density(layout, block_size, order) - target)
        assert error <= min(abs(d - target) for d in densities) + 1e-12


def test_at_density_reaches_the_whole_canvas_on_the_longer_axis():
    # The temporal window must grow to cover the longer spatial axis (9 columns here), not stop at the shorter
    # (2 rows): capped by the shorter one, a temporal head stopped at width=1, 3 of 9 columns, density 0.333.
    layout = VideoLayout(2, 2, 9)
    solved = SpatialTemporal(heads="T").at_density(layout, 1.0, 1)
    assert solved.density(layout, 1) == 1.0
    # And the whole video on both axes, frames included, for either kind and their union (capped at the extents
    # themselves rather than at 2 x extent - 1, they stopped at density 0.94, and 0.76 with spatial heads).
    layout = VideoLayout(5, 4, 4)
    for pattern in (SpatialTemporal(), SpatialTemporal(heads="ST")):
        assert pattern.at_density(layout, 1.0, 4).density(layout, 4) == 1.0




def test_fit_classifies_on_the_masked_attention_with_the_runtime_s_generator():
    # These heads read temporal over all keys and spatial under a causal mask over groups of 2 frames; `fit` must
    # pass both the model's mask and the runtime's generator (one per layer) on to `classify`: a fit that dropped
    # either still gave a valid pattern, classified on the wrong attention or on the same rows in every layer.
    layout = VideoLayout(5, 5, 2)
    generator = torch.Generator().manual_seed(0)
    q, k = (3 * torch.randn(1, 8, layout.num_tokens, 8, generator=generator) for _ in range(2))
    every_row = SpatialTemporal(frames=1, width=1, num_samples=1000)
    assert set(every_row.classify(q, k, layout)) == {"temporal"}
    assert every_row.fit(q, k, k, layout, 16, within=FrameCausal(2)).heads == ("spatial",) * 8
    sampled = SpatialTemporal(frames=1, width=1, num_samples=3)
    for seed in (0, 1):
        fitted = sampled.fit(q, k, k, layout, 16, generator=torch.Generator().manual_seed(seed))
        assert fitted.heads == sampled.classify(q, k, layout, generator=torch.Generator().manual_seed(seed))
    assert sampled.classify(q, k, layout, generator=torch.Generator().manual_seed(0)) != sampled.classify(
        q, k, layout, generator=torch.Generator().manual_seed(1))
