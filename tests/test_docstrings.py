"""Every `>>>` example in the package's docstrings runs and prints what it shows (the docs a user copies from)."""

import doctest
import importlib
import pkgutil

import pytest
import torch

PACKAGES = ("diffsparse", "diffsparse.kernels", "diffsparse.patterns", "diffsparse.pipelines", "diffsparse.testbed")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [f"{package}.{module.name}" for module in pkgutil.iter_modules(path)
                  if not module.ispkg and module.name != "__main__"]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write a file (a pattern's `render`) write it here
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(module, name):
        needs_cuda = any('device="cuda"' in example.source for example in test.examples)
        if not needs_cuda or torch.cuda.is_available():
            runner.run(test)
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples in {name} failed (output above)"


def test_the_examples_are_found():
    # A finder that found nothing would pass every case above.
    found = sum(len(test.examples) for name in _modules()
                for test in doctest.DocTestFinder().find(importlib.import_module(name), name))
    assert found >= 200
