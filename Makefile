# Two commands on a fresh clone: `make run` (the main job) and `make test`.
# Both create .venv and install the project into it when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffsparse-installed
# torch/torchvision pinned to the builds that lpips' torchvision needs beside them.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

export HF_HUB_OFFLINE := 1

.PHONY: run test install lint clean

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

clean:
	rm -rf $(VENV) outputs .pytest_cache
