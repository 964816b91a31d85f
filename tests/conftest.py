import os

# Tests never reach the Hugging Face hub: every model is built from a config with random weights.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

# Before any test module imports diffusers: under `python -m pytest` the checkout root is first on sys.path, and
# importing diffsparse first moves it behind the installed packages (see diffsparse/__init__.py).
import diffsparse  # noqa: F401

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_pipe():
    from diffsparse.pipelines.tiny import tiny_wan_pipeline

    return tiny_wan_pipeline()

