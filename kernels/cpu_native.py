"""The compiled CPU kernel (`csrc/block_sparse_cpu.cpp`): built with torch's C++ extension loader on first use.

The `"cpu"` backend runs it for float32 and bfloat16 inference and keeps its torch-ops path for the rest
(float16, autograd). `DIFFSPARSE_CPU_KERNEL` chooses:

- `auto` (default): the compiled kernel when it builds and loads; otherwise the torch-ops path (same results,
  slower), with one warning that says why.
- `native`: the compiled kernel or a `RuntimeError` with the build error.
- `portable`: never build; always the torch-ops path.

The first build takes about 30 s (a C++ compiler and `ninja` are needed) and is cached by torch in
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions/py<version>_<cuda>`), in a folder
`diffsparse_cpu_<12 hex>` named by a hash of what makes the binary (`_extension_name`): installs at other paths,
other torch or Python builds, and hosts with other CPUs sharing a home directory each build and keep their own instead
of rebuilding one shared folder in turn. Folders left by earlier sources or installs are never read again and can be
deleted.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "DIFFSPARSE_CPU_KERNEL"
MODES = ("auto", "native", "portable")
SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
DTYPES = (torch.float32, torch.bfloat16)
LDFLAGS = ("-fopenmp",)


def mode() -> str:
    value = os.environ.get(ENV_VAR, "auto")
    if value not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {ENV_VAR}={value!r}")
    return value


def _build_flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    # at::vec picks its SIMD width from these macros; use the one torch itself dispatches to on this CPU.
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        flags += ["-march=native", f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return flags


def _cpu_model() -> str:
    """The CPU `-march=native` compiles for: its model and feature flags where Linux lists them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")  # x86, then arm
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in keys))


def _extension_name(source: Path, cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    """`diffsparse_cpu_<12 hex>`, from everything in the build command and what `-march=native` reads.

    torch keys its build folder by this name alone and rebuilds whenever the command in it changes: under one fixed
    name two installs (a second venv, a clone beside a work tree) rebuilt it in turn, and hosts sharing a home
    directory loaded each other's `-march=native` builds. The op keeps its namespace (`TORCH_LIBRARY(diffsparse_cpu,
    ...)` in the source), so the name only picks the folder and the library's file name.
    """
    parts = [
        str(source.resolve()), *cflags, "|", *ldflags, os.environ.get("CXX", "c++"),
        str(Path(torch.__file__).resolve().parent), torch.__version__, sys.version, sysconfig.get_paths()["include"],
        platform.machine(), _cpu_model(),
    ]
    digest = hashlib.sha256("\0".join(parts).encode())
    digest.update(source.read_bytes())
    return f"diffsparse_cpu_{digest.hexdigest()[:12]}"


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip-installed one sits in the venv's bin, absent from PATH when the
    venv's python is called without activating it (as `make test` does)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the loader's own error then says that ninja is missing
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _load() -> tuple[object | None, str]:
    """(op, "") once built and loaded, else (None, why). Cached: a failed build is not retried per call."""
    try:
        # Importing the loader warns that no CUDA runtime exists, which is irrelevant to a CPU kernel.
        loader_logger = logging.getLogger("torch.utils.cpp_extension")
        level = loader_logger.level
        loader_logger.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            loader_logger.setLevel(level)

        _put_ninja_on_path()
        cflags = _build_flags()
        cpp_extension.load(
            name=_extension_name(SOURCE, cflags, LDFLAGS),
            sources=[str(SOURCE)],
            extra_cflags=cflags,
            extra_ldflags=list(LDFLAGS),
            is_python_module=False,
        )
        return torch.ops.diffsparse_cpu.forward, ""
    # Build errors (RuntimeError), missing ninja or compiler (RuntimeError, OSError), a library that does not
    # load, e.g. a torch without MKL's BLAS symbols (OSError).
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        return None, f"{type(error).__name__}: {error}"


def forward_op():
    """The compiled forward op, or None when the mode is `portable` or (in `auto`) it cannot be built."""
    chosen = mode()
    if chosen == "portable":
        return None
    op, why = _load()
    if op is None:
        if chosen == "native":
            raise RuntimeError(f"{ENV_VAR}=native but the compiled CPU kernel could not be built: {why}")
        _warn_once(why)
    return op


@functools.cache
def _warn_once(why: str) -> None:
    logger.warning(
        f"diffsparse: the compiled CPU kernel is unavailable ({why}); the 'cpu' backend uses its torch-ops "
        f"path (same results, slower). Set {ENV_VAR}=portable to silence this."
    )
