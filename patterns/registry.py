"""Pattern names -> classes, so configs and CLIs can say `pattern="radial"`."""

from __future__ import annotations

from .base import Pattern
from .dense import Dense
from .radial import Radial
from .spatial_temporal import SpatialTemporal
from .window3d import Window3D

PATTERNS: dict[str, type[Pattern]] = {cls.name: cls for cls in (Dense, Radial, SpatialTemporal, Window3D)}


def get_pattern(name_or_pattern: str | Pattern, **params) -> Pattern:
    r"""
    Resolve a pattern name to an instance; a [`Pattern`] instance passes through unchanged.

    Args:
        name_or_pattern (`str` or [`Pattern`]): a key of `PATTERNS` or a pattern instance.
        **params: parameters for the named pattern's constructor (only with a name).

    Example:
        >>> get_pattern("radial", decay=0.2)
        radial(decay=0.2, min_window=64, sink=False)
        >>> get_pattern("window3d")
        window3d(t=3, h=8, w=8)
        >>> get_pattern(Dense())
        dense()
    """
    if isinstance(name_or_pattern, Pattern):
        if params:
            raise ValueError(
                f"parameters can only be given with a pattern name, got {name_or_pattern!r} and {params=}"
            )
        return name_or_pattern
    if name_or_pattern not in PATTERNS:
        raise ValueError(
            f"pattern must be one of {sorted(PATTERNS)} or a Pattern instance, got {name_or_pattern!r}"
        )
    return PATTERNS[name_or_pattern](**params)
