"""`pip install .` (not editable): the wheel carries every file the package reads at run time, and works from where
it is installed (the shipped testbed weights found by package path, not through the checkout)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Checkout folder -> where its files go in the wheel (pyproject.toml's package-dir).
PACKAGE_FOLDERS = {
    "diffsparse": "diffsparse",
    "kernels": "diffsparse/kernels",
    "patterns": "diffsparse/patterns",
    "pipelines": "diffsparse/pipelines",
}


def _checkout_files() -> list[str]:
    """The checkout's files as git sees them (tracked and new, not ignored)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the wheel is built from the files git sees)")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from a copy of the checkout (a build writes into its source folder), and the build's output."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in _checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    build = _succeeds([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                     "--verbose", "-w", str(out), str(source)])
    (wheel,) = out.glob("diffsparse-*.whl")
    return wheel, build.stdout + build.stderr


def test_the_wheel_carries_every_package_file_and_nothing_else(built_wheel):
    wheel, log = built_wheel
    expected = set()
    for name in _checkout_files():
        folder, _, rest = name.partition("/")
        if folder in PACKAGE_FOLDERS and rest:
            expected.add(f"{PACKAGE_FOLDERS[folder]}/{rest}")
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if ".dist-info/" not in name}
    assert {name for name in expected if name.endswith((".safetensors", ".json", ".cpp"))}, "no data files listed"
    assert packed == expected, (sorted(expected - packed), sorted(packed - expected))
    # setuptools' warnings (a data folder missing from `packages`, deprecated metadata) are what a user sees at
    # `pip install .`, and some turn into errors in later setuptools.
    assert "BuildBackendWarning" not in log and "SetuptoolsDeprecationWarning" not in log, log[-3000:]


def test_the_installed_wheel_loads_its_shipped_testbed(built_wheel, tmp_path):
    wheel, _ = built_wheel
    target = tmp_path / "site"
    _succeeds([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)])
    check = (
        "import diffsparse\n"
        "from diffsparse.pipelines import testbed\n"
        f"assert diffsparse.__file__.startswith({str(target)!r}), diffsparse.__file__\n"
        f"assert str(testbed.WEIGHTS_PATH).startswith({str(target)!r}), testbed.WEIGHTS_PATH\n"
        "pipe = testbed.load()\n"
        "print(pipe.transformer.config.num_layers)\n"
    )
    # From an empty folder, the installed copy ahead of the editable checkout on the path.
    environment = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    assert _succeeds([sys.executable, "-c", check], cwd=tmp_path, env=environment).stdout.split() == ["4"]


def _succeeds(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `command`, which must exit with 0 (else the test fails showing the ends of its output)."""
    done = subprocess.run(command, check=False, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done



def test_every_module_imports_first_in_a_fresh_interpreter():
    # The tests import `diffsparse` first (conftest), which hid a circular import: an adapter importing the runtime
    # at its top failed `import diffsparse.runtime` as a process's first import of diffsparse (`bench causal` and
    # `bench attention` import it so), and pytest's filter naming `diffsparse.runtime.StepScheduleWarning` went off.
    check = (
        "import importlib, pkgutil, sys\n"
        "import diffsparse\n"
        # The checkout's folders are subpackages only by pyproject's package-dir: walked apart.
        "packages = [diffsparse] + [importlib.import_module(f'diffsparse.{sub}') for sub in ('pipelines', 'patterns', "
        "'kernels')]\n"
        "names = [p.__name__ for p in packages[1:]] + [m.name for p in packages\n"
        "         for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.') if m.name != 'diffsparse.__main__']\n"
        "assert 'diffsparse.runtime' in names and 'diffsparse.pipelines.minimax_h3' in names, names\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'diffsparse' or m.startswith('diffsparse.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as error:\n"
        "        failed.append(f'{name}: {error}')\n"
        "print(len(names))\n"
        "assert not failed, failed\n"
    )
    done = _succeeds([sys.executable, "-c", check], cwd=ROOT.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert int(done.stdout.split()[-1]) > 50
