"""SparseConfig validation and the step/layer schedule."""

import collections
import copy
import dataclasses
import pickle
import warnings

import pytest
import torch

import diffsparse
from diffsparse import SparseConfig
from diffsparse.patterns import FrameSink, Radial, Searched, SearchedWindows, SpatialTemporal, TileOrder, Window3D
from diffsparse.pipelines.tiny import tiny_wan_config, tiny_wan_pipeline


@pytest.mark.parametrize(
    "field, value",
    [
        ("pattern", "nope"),
        ("pattern", 3),
        ("block_size", 0),
        ("block_size", (64,)),
        ("block_size", (64, -1)),
        ("block_size", 64.0),
        ("block_size", True),
        ("dense_steps", -1),
        ("dense_steps", 1.0),
        ("dense_steps", -0.1),
        ("dense_steps", "2"),
        ("dense_steps", True),
        ("dense_last_steps", 1.5),
        ("dense_layers", -2),
        ("dense_layers", [0, -1]),
        ("dense_layers", [0.5]),
        ("dense_layers", "0"),
        ("dense_layers", True),  # an int to Python, but not a block count
        ("dense_layers", [True]),
        ("backend", "cuda-magic"),
        ("density", 0),
        ("density", 1.5),
        ("density", "0.2"),
        ("density", True),  # 1 to Python, not a density
        ("correction", "lse"),
        ("correction", True),
        ("correction_refresh", -1),
        ("correction_refresh", 1.5),
        ("correction_refresh", True),
        ("order", "frame"),
        ("order", []),
        ("order", ()),  # named as given (the message said order=[] for any empty sequence)
        ("order", [None, "tiles"]),
    ],
)
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field) as error:
        SparseConfig(**{field: value})
    assert repr(value) in str(error.value) or str(value) in str(error.value)
    assert " must " in str(error.value)  # and what is allowed


@pytest.mark.parametrize(
    "field, value",
    [
        ("density", 1),  # every block: (0, 1] holds its upper end
        ("density", 1.0),
        ("block_size", 1),
        ("block_size", (1, 2)),
        ("dense_steps", 0),
        ("dense_steps", 0.0),
        ("dense_steps", 0.99),
        ("dense_last_steps", 0),
        ("dense_layers", 0),
        ("dense_layers", []),
        ("correction_refresh", 0),
        # Each allowed name of the fields that take names: only refusals were tested here.
        *[("backend", name) for name in ("auto", *diffsparse.kernels.BACKENDS)],
        ("correction", "residual"),
    ],
)
def test_the_ends_of_each_fields_range_are_taken(field, value):
    # Only values outside were tested: an upper end refused (density=1.0, every block kept) passed.
    assert getattr(SparseConfig(**{field: value}), field) == value


def test_defaults_and_pattern_objects():
    config = SparseConfig()
    assert config.resolved_pattern == Radial()
    assert config.block_sizes == (64, 64)
    pattern = Radial(decay=0.5)
    assert SparseConfig(pattern=pattern, block_size=(128, 64)).resolved_pattern is pattern
    assert SparseConfig(block_size=(128, 64)).block_sizes == (128, 64)


def test_defaults_are_the_documented_ones():
    # The README's field table and the docstring promise these; a changed default changes every user's runs.
    config = SparseConfig()
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init} == {
        "pattern": "radial",
        "density": None,
        "block_size": 64,
        "dense_steps": 0.2,
        "dense_last_steps": 0,
        "dense_layers": 0,
        "order": None,
        "backend": "auto",
        "correction": None,
        "correction_refresh": 0,
    }
    assert type(config.dense_steps) is float and type(config.dense_last_steps) is int


def test_config_keeps_its_own_copies_of_the_lists_it_is_given():
    # Before, a frozen config shared the caller's lists: changing one afterwards changed the validated config
    # (shown in its repr, refused only when a generation read it), and a list field made the config unhashable.
    layers, block_size, orders = [0], [64, 64], [None, TileOrder((1, 2, 2))]
    config = SparseConfig(dense_layers=layers, block_size=block_size, order=orders)
    layers.append(-1)
    block_size[0] = 0
    orders[1] = "tiles"
    assert config.dense_layers == [0] and "dense_layers=[0]," in repr(config)
    assert not config.is_dense_layer(3) and config.block_sizes == (64, 64)
    assert config.layer_order(1) == TileOrder((1, 2, 2))
    assert hash(config) == hash(SparseConfig(dense_layers=[0], block_size=[64, 64], order=[None, TileOrder((1, 2, 2))]))
    assert len({SparseConfig(dense_layers=[0, 3]), SparseConfig(dense_layers=[0, 3]), SparseConfig()}) == 2
    assert hash(SparseConfig(dense_layers=[0])) != hash(SparseConfig(dense_layers=[1]))


def test_config_is_frozen_and_its_copies_are_validated_anew():
    # The pattern is resolved and the values checked at construction: an assigned field would show in the repr
    # but not run (pattern), or run unchecked (dense_steps=-3).
    config = SparseConfig(pattern="searched", density=0.3, dense_layers=[1])
    for field, value in (("pattern", "dense"), ("dense_steps", -3), ("density", 0.9)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, field, value)
    assert config.pattern == "searched" and config.resolved_pattern.keep == 0.3
    changed = dataclasses.replace(config, pattern="dense")
    assert changed.resolved_pattern.name == "dense" and changed.dense_layers == [1]
    assert dataclasses.replace(config, density=0.5).resolved_pattern.keep == 0.5
    with pytest.raises(ValueError, match="dense_steps=-3"):
        dataclasses.replace(config, dense_steps=-3)
    for copied in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config), copy.copy(config)):
        assert copied == config and copied.resolved_pattern == config.resolved_pattern


def test_config_is_not_rewritten():
    config = SparseConfig(pattern="radial", dense_steps=0.2, dense_layers=[3, 1])
    config.is_dense_step(0, 50)
    assert (config.pattern, config.dense_steps, config.dense_layers) == ("radial", 0.2, [3, 1])


@pytest.mark.parametrize(
    "dense_steps, dense_last_steps, num_steps, expected",
    [
        (0, 0, 5, []),
        (2, 0, 5, [0, 1]),
        (0.2, 0, 50, list(range(10))),
        (0.25, 0, 10, [0, 1, 2]),  # 2.5 rounds half up
        (0.29, 0, 50, list(range(15))),  # 14.5 too, though 0.29 * 50 is just below it in binary floating point
        (0, 0.7, 45, list(range(13, 45))),  # 31.5
        (1, 1, 5, [0, 4]),
        (0, 0.2, 10, [8, 9]),
        (10, 0, 5, [0, 1, 2, 3, 4]),
    ],
)
def test_dense_steps_schedule(dense_steps, dense_last_steps, num_steps, expected):
    config = SparseConfig(dense_steps=dense_steps, dense_last_steps=dense_last_steps)
    assert [s for s in range(num_steps) if config.is_dense_step(s, num_steps)] == expected


def test_dense_layers_int_and_list():
    assert [i for i in range(5) if SparseConfig(dense_layers=2).is_dense_layer(i)] == [0, 1]
    assert [i for i in range(5) if SparseConfig(dense_layers=[0, 3]).is_dense_layer(i)] == [0, 3]


def test_unknown_step_count_refuses_fractions_and_last_steps():
    with pytest.raises(ValueError, match="dense_steps"):
        SparseConfig(dense_steps=0.2).is_dense_step(0, None)
    # Without the step count the last steps are unknown: running them sparse would ignore the setting.
    with pytest.raises(ValueError, match="dense_last_steps"):
        SparseConfig(dense_steps=2, dense_last_steps=1).is_dense_step(0, None)
    assert SparseConfig(dense_steps=2).is_dense_step(1, None)
    assert not SparseConfig(dense_steps=2).is_dense_step(2, None)


@torch.no_grad()
def test_a_zero_fraction_of_dense_steps_needs_no_step_count():
    # 0.0 of any number of steps is none, as dense_last_steps=0.0 already was; before, a bare transformer refused it.
    model = tiny_wan_pipeline().transformer
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, 16, 2, 8, 8, generator=g)
    text = torch.randn(1, 4, tiny_wan_config()["transformer"]["text_dim"], generator=g)
    config = SparseConfig(pattern=Window3D(window=(1, 1, 1)), block_size=16, dense_steps=0.0, dense_last_steps=0.0)
    handle = diffsparse.apply(model, config)
    model(video, torch.tensor([1000.0]), text, return_dict=False)
    calls = handle.stats().calls["transformer"]
    assert calls and all(r.step == 0 and r.sparse for r in calls)


def test_a_density_needs_a_pattern_it_can_solve():
    # Refused when the config is made, not at the first sparse call of a generation.
    for pattern in (FrameSink(), Window3D() | FrameSink()):
        with pytest.raises(ValueError, match=r"SparseConfig.density=0.3 needs a pattern with a parameter"):
            SparseConfig(pattern=pattern, density=0.3)
        SparseConfig(pattern=pattern)
    for pattern in ("radial", "window3d", "spatial_temporal", "searched", "searched_windows", "dense"):
        SparseConfig(pattern=pattern, density=0.3)


def test_correction_refresh_needs_a_correction():
    with pytest.raises(ValueError, match="correction_refresh=2 has no effect"):
        SparseConfig(correction_refresh=2)
    SparseConfig(correction="residual", correction_refresh=2)
    with pytest.raises(ValueError, match="correction_refresh=True"):  # not refreshing every step
        SparseConfig(correction="residual", correction_refresh=True)


def test_measure_step_is_the_last_dense_step_before_a_sparse_one():
    config = SparseConfig(correction="residual", dense_steps=2, dense_last_steps=1)
    assert [s for s in range(10) if config.is_measure_step(s, 10)] == [1]
    assert [s for s in range(3) if config.is_measure_step(s, 3)] == []  # no sparse step follows
    assert not any(SparseConfig(dense_steps=2).is_measure_step(s, 10) for s in range(10))
    assert SparseConfig(correction="residual", dense_steps=3).is_measure_step(2, None)


def test_numpy_numbers_are_the_numbers_they_stand_for():
    # Read from an array or a slider: np.float32(0.25) was refused as "not a number in (0, 1]" and np.int64 step and
    # layer counts as not ints, while np.float64 (a float subclass) passed.
    import numpy as np

    given = SparseConfig(density=np.float32(0.25), block_size=(np.int32(64), 32), dense_steps=np.int64(1),
                         dense_last_steps=np.float32(0.5), dense_layers=[np.int64(0), 3], correction="residual",
                         correction_refresh=np.int8(2))
    plain = SparseConfig(density=0.25, block_size=(64, 32), dense_steps=1, dense_last_steps=0.5, dense_layers=[0, 3],
                         correction="residual", correction_refresh=2)
    assert given == plain and hash(given) == hash(plain) and repr(given) == repr(plain)
    assert type(given.dense_steps) is int and type(SparseConfig(dense_layers=np.int64(2)).dense_layers) is int
    # As the decimals they print as: np.float32(0.29) holds 0.2899..., 14 of 50 steps where 0.29 keeps 15.
    assert SparseConfig(density=np.float32(0.3)) == SparseConfig(density=0.3)
    assert SparseConfig(dense_steps=np.float32(0.29)).is_dense_step(14, 50)
    with np.printoptions(legacy="1.13"):  # which prints np.float64(1 / 3) as 0.333333333333
        assert SparseConfig(density=np.float64(1 / 3)).density == 1 / 3
    block = collections.namedtuple("Block", "q k")(np.int64(32), 64)
    assert SparseConfig(block_size=block).block_sizes == (32, 64)
    assert SparseConfig(block_size=collections.namedtuple("Block", "q k")(32, 64)).block_sizes == (32, 64)
    with pytest.raises(ValueError, match="density must be None or a number"):
        SparseConfig(density=np.bool_(True))
    with pytest.raises(ValueError, match=r"dense_steps as a float must be a fraction in \[0, 1\), got dense_steps=1.5"):
        SparseConfig(dense_steps=np.float32(1.5))
    # A frozenset as a set: its numpy indices were left unconverted and the config refused them.
    frozen = SparseConfig(dense_layers=frozenset({np.int64(1), 3}))
    assert frozen == SparseConfig(dense_layers=frozenset({1, 3})) and type(frozen.dense_layers) is frozenset
    assert all(type(layer) is int for layer in frozen.dense_layers)


def test_an_unhashable_custom_order_is_refused_by_name():
    # A plain @dataclass subclass of TokenOrder is unhashable: a config accepted it, and hash(config) or any block
    # mask in that order failed later with a bare TypeError from a cache.
    from diffsparse.patterns import Dense, TokenOrder, VideoLayout

    @dataclasses.dataclass
    class Mine(TokenOrder):
        t: int = 2

        def _tile(self, layout):
            return (self.t, 2, 2)

    @dataclasses.dataclass(frozen=True)
    class Frozen(TokenOrder):
        t: int = 2

        def _tile(self, layout):
            return (self.t, 2, 2)

    with pytest.raises(ValueError, match=r"order must be hashable .* got order=.*Mine"):
        diffsparse.SparseConfig(pattern="window3d", order=Mine())
    with pytest.raises(ValueError, match="order must be hashable"):
        Dense().block_mask(VideoLayout(2, 2, 2), 4, order=Mine())
    hash(diffsparse.SparseConfig(pattern="window3d", order=Frozen()))


@pytest.mark.parametrize(
    ("pattern", "density", "said"),
    [
        (Radial(decay=0.5, sink=True), 0.25, (
            "diffsparse: SparseConfig.pattern=radial(decay=0.5, min_window=64, sink=True) gives decay=0.5, and "
            "density=0.25 sets decay too: the density wins (decay is solved for it on each layout where decay changes "
            "the density), so decay=0.5 is replaced; give density=None to run the pattern as written, or leave decay "
            "out of the pattern's arguments")),
        (Searched(keep=0.5), 0.25, "gives keep=0.5, and density=0.25 sets keep too: the density wins (keep=0.25 runs)"),
        (SearchedWindows(keep=0.4), 0.2, "gives keep=0.4, and density=0.2 sets keep too"),
        # Nothing replaced: no density; parameters at their defaults (an object cannot tell them from left out);
        # keep equal to the density; parameters the density does not set, or scales (window3d's window).
        (Radial(decay=0.5), None, None), (Radial(), 0.3, None), (Searched(), 0.5, None),
        (Searched(keep=0.3, refresh=4), 0.3, None), (Radial(min_window=32, sink=True), 0.3, None),
        (Window3D(window=(1, 4, 4)), 0.3, None), (SpatialTemporal(frames=1, width=1), 0.3, None),
        # A text is said by the commands, in their options' names (`compare.warn_if_density_replaces`): not here.
        ("radial(decay=0.5)", 0.25, None), ("searched(keep=0.5)", 0.25, None),
    ],
)
def test_a_pattern_object_s_parameter_the_density_replaces_is_said_when_the_config_is_made(pattern, density, said):
    # Before, `SparseConfig(pattern=Radial(decay=0.5), density=0.25)` ran decay solved per layout, and
    # `Searched(keep=0.5)` ran keep=0.25, without a word, while the same as a `--pattern` text warned.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = SparseConfig(pattern=pattern, density=density)
        copied = dataclasses.replace(config, dense_steps=0)  # a new config, made as this one: said again
    assert [w.category for w in caught] == [diffsparse.DiffsparseWarning] * (2 if said else 0)
    assert all(said in str(w.message) for w in caught)
    assert all(w.filename == __file__ for w in caught)  # the user's line, not diffsparse's or dataclasses'
    assert [w.lineno for w in caught] == sorted({w.lineno for w in caught})
    assert copied.resolved_pattern == config.resolved_pattern


def test_an_object_gives_the_parameters_other_than_their_defaults():
    from diffsparse.config import given_parameters

    assert given_parameters(Radial(decay=0.5, sink=True)) == ("radial", {"decay": 0.5, "sink": True})
    # Held otherwise than given (`stride=1` as (1, 1, 1)): still its default.
    assert given_parameters(Window3D(window=(1, 4, 4), stride=1)) == ("window3d", {"window": (1, 4, 4)})
    assert given_parameters(Window3D(window=(3, 4, 4), stride=(1, 2, 2))) == (
        "window3d", {"window": (3, 4, 4), "stride": (1, 2, 2)})
    assert given_parameters("radial(decay=1.0)") == ("radial", {"decay": 1.0})  # a text: as typed

    class SinkRadial(Radial):  # a subclass with an `__init__` of its own, which `dataclasses.replace` cannot call
        def __init__(self, min_window=64):
            super().__init__(sink=True, min_window=min_window)

    # Before, every field counted as given: a warning to leave out a decay nobody gave.
    assert given_parameters(SinkRadial()) == ("radial", {"sink": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffsparse.DiffsparseWarning)
        SparseConfig(pattern=SinkRadial(), density=0.25)
