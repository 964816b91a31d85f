# Two commands on a fresh clone: `make run` (the main job) and `make test`.
# Both create .venv and install the project into it when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffsparse-installed
# torch/torchvision pinned to the builds that lpips' torchvision needs beside them.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

export HF_HUB_OFFLINE := 1

.PHONY: run test install lint clean gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e ".[metrics,demo,dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/diffsparse compare --two-stage --still-candidates 4 --pattern searched --density 0.25

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# For a GPU machine with no network and its own torch, Triton and transformers (README, "GPU"): the package and
# the pure-Python packages it adds there, as wheels in .whl/ (ignored by git) to carry.
gpu-wheels: $(STAMP)
	rm -rf .whl build
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w .whl .
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 ftfy wcwidth
	rm -rf build

clean:
	rm -rf $(VENV) outputs .pytest_cache .whl
