"""diffsparse: 3D-aware block-sparse attention for Hugging Face diffusers video transformers.

>>> import diffsparse
>>> config = diffsparse.SparseConfig(pattern="radial", dense_steps=0.2)
"""

import importlib.util
import os
import sys


def _put_checkout_root_behind_installed_packages() -> None:
    # In a source checkout, `python -m ...`, `python -c` and the REPL put the checkout root first on sys.path, and
    # its top-level folder `kernels/` (installed as `diffsparse.kernels`) then shadows Hugging Face's `kernels`
    # package, which transformers (>= 5.25 depends on it) imports as soon as a model class loads. Behind the
    # installed packages the root still serves anything only it has, and `kernels` means the real package again.
    spec = importlib.util.find_spec(".kernels", __name__)
    if spec is None or not spec.submodule_search_locations:
        return
    # The checkout root holds `kernels/`; in an installed copy this is the package's own folder, never on sys.path.
    root = os.path.dirname(os.path.realpath(spec.submodule_search_locations[0]))
    at_root = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) == root]
    if at_root:
        sys.path[:] = [entry for entry in sys.path if entry not in at_root] + at_root


_put_checkout_root_behind_installed_packages()

# The public names load with their modules on first use (PEP 562), so that `diffsparse --help` and `import
# diffsparse.cli` do not import torch and diffusers (about 6 s on a 2-core machine).
_PUBLIC = {
    "LayerStats": "api", "SparseHandle": "api", "SparseStats": "api", "apply": "api", "remove": "api",
    "sparse": "api", "stats": "api", "suspended": "api", "SparseConfig": "config",
}
__all__ = [
    "DiffsparseWarning", "LayerStats", "SparseConfig", "SparseHandle", "SparseStats", "apply", "remove", "sparse",
    "stats", "suspended",
]
__version__ = "0.1.0"


class DiffsparseWarning(UserWarning):
    """The category of every Python warning diffsparse raises (the schedule's `StepScheduleWarning` and the metrics'
    `NonFiniteScoreWarning` among them; the CPU kernel's fallback is a log message), so that one filter silences or
    raises them all, and `compare` and `eval` tell them apart from the warnings of torch or diffusers that
    diffsparse's calls pass on."""


# Whose frames lie between a user's line and a warning diffsparse raises: its own (adapters, patterns and kernels
# too), the module calls and hooks of torch, diffusers and accelerate (offloading), `dataclasses.replace` of a
# config, and `contextlib`'s `__enter__` and `__exit__` of a `with diffsparse.sparse(...)` block (or an `ExitStack`).
_CALL_PACKAGES = frozenset({"diffsparse", "torch", "diffusers", "accelerate", "dataclasses", "contextlib"})


def outside_stacklevel() -> int:
    """`warnings.warn`'s `stacklevel`, given in the function that calls it, naming the first frame whose module is
    outside `_CALL_PACKAGES`: the user's line that called the pipeline, the transformer, `SparseConfig` or `apply`,
    or entered or left a `sparse` block, however many frames lie between (a fixed count named a line of diffsparse's
    own, and differs under accelerate's hooks, torch.compile's and `sparse`'s generator). By module name, so a
    dataclass's generated `__init__` counts as its class's module."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _CALL_PACKAGES:
        frame, level = frame.f_back, level + 1
    return level


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
