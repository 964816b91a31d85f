"""Pattern names -> classes, so configs and CLIs can say `pattern="radial"`."""

from __future__ import annotations

import ast
import difflib
import inspect

from .base import Pattern
from .dense import Dense
from .radial import Radial
from .searched import Searched
from .spatial_temporal import SpatialTemporal
from .window3d import Window3D
from .window_search import SearchedWindows

PATTERNS: dict[str, type[Pattern]] = {
    cls.name: cls for cls in (Dense, Radial, Searched, SearchedWindows, SpatialTemporal, Window3D)
}


def parse_pattern_text(text: str) -> tuple[str, dict]:
    """`"searched(keep=0.3, refresh=4)"` -> `("searched", {"keep": 0.3, "refresh": 4})`: a name, optionally called
    with keyword arguments whose values are Python literals."""
    try:
        call = ast.parse(text.strip(), mode="eval").body
        if isinstance(call, ast.Name):
            return call.id, {}
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise ValueError
        names = [kw.arg for kw in call.keywords]
        if None in names:  # `**spread`
            raise ValueError
        params = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    # literal_eval raises TypeError for a literal Python cannot build ({[]: 1}), RecursionError for deep nesting.
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        raise ValueError(
            f"a pattern must be a name or a name with keyword arguments of literal values, e.g. "
            f"'searched(refresh=4)', got {text!r}"
        ) from None
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # Python refuses a repeated keyword in a call; the last value would win silently here
        raise ValueError(f"pattern {text!r}: {repeated[0]!r} is given more than once")
    return call.func.id, params


def get_pattern(name_or_pattern: str | Pattern, **params) -> Pattern:
    r"""
    Resolve a pattern name to an instance; a [`Pattern`] instance passes through unchanged.

    Args:
        name_or_pattern (`str` or [`Pattern`]): a key of `PATTERNS`, optionally called with keyword arguments of
            its constructor as Python literals (`"searched(refresh=4)"`), or a pattern instance.
        **params: parameters for the named pattern's constructor (only with a bare name).

    Example:
        >>> get_pattern("radial", decay=0.2)
        radial(decay=0.2, min_window=64, sink=False)
        >>> get_pattern("window3d")
        window3d(window=(3, 8, 8))
        >>> get_pattern("radial(decay=0.5, sink=True)")
        radial(decay=0.5, min_window=64, sink=True)
        >>> get_pattern(Dense())
        dense()
    """
    if isinstance(name_or_pattern, Pattern):
        if params:
            raise ValueError(
                f"parameters can only be given with a pattern name, got {name_or_pattern!r} and {params=}"
            )
        return name_or_pattern
    if not isinstance(name_or_pattern, str):
        raise ValueError(f"pattern must be a name from {sorted(PATTERNS)} or a Pattern instance, got {name_or_pattern!r}")
    name, spec_params = parse_pattern_text(name_or_pattern)
    if spec_params and params:
        raise ValueError(f"give parameters in the pattern text or as keywords, not both: {name_or_pattern!r}, {params=}")
    if name not in PATTERNS:
        raise ValueError(
            f"pattern must be one of {sorted(PATTERNS)} (optionally with parameters, e.g. 'radial(decay=0.5)') or a "
            f"Pattern instance, got {name_or_pattern!r}{did_you_mean(name, PATTERNS)}"
        )
    given = spec_params or params
    set_by_search = getattr(PATTERNS[name], "set_by_search", ())
    searched = [key for key in given if key in set_by_search]
    if searched:  # the runtime's search would replace it without a word
        raise ValueError(
            f"pattern {name_or_pattern!r}: {searched[0]}={given[searched[0]]!r} is set by {name}'s search (at each "
            f"layer's first sparse call); leave it out"
        )
    accepted = [key for key in inspect.signature(PATTERNS[name]).parameters if key not in set_by_search]
    unknown = [key for key in given if key not in accepted]
    if unknown:
        raise ValueError(
            f"pattern {name_or_pattern!r}: {name} takes {', '.join(accepted) or 'no parameters'}; got {unknown[0]!r}"
            f"{did_you_mean(unknown[0], accepted)}"
        )
    try:
        return PATTERNS[name](**given)
    except TypeError as error:  # a parameter left out that has no default
        raise ValueError(f"pattern {name_or_pattern!r}: {error}") from None


def did_you_mean(word: str, choices) -> str:
    """The end of an error message that names the choice closest to a misspelt `word`, or `""` when none is close:
    `did_you_mean("radail", ["radial", "dense"])` -> `" (did you mean 'radial'?)"`."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
