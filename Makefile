# make help: list the targets. The two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the CPU build of torch first, so pip never pulls the multi-GB CUDA build.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export OMP_NUM_THREADS ?= 2

.PHONY: help setup demo compare test test-fast lint format clean

help:  ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	@if [ -z "$(HAS_GPU)" ]; then echo "No GPU found: installing the CPU build ($(CPU_TORCH))"; \
		$(PYTHON) -m pip install --quiet "$(CPU_TORCH)"; fi
	$(PYTHON) -m pip install --quiet -e ".[dev,trackers,bench]"
	touch $(STAMP)

setup: $(STAMP)  ## Create .venv and install the project (CPU torch when there is no GPU)

demo: $(STAMP)  ## Run the embedded default: tiny model, bundled data, CPU, DFT at alpha 0.5
	$(PYTHON) train.py

compare: $(STAMP)  ## ce, dft, alpha 0.5, asft, eaft on the embedded demo, 2 seeds: docs/results/compare_demo/verdict.md
	$(PYTHON) -m evaluation.compare --seeds 1,2 --results docs/results/compare_demo

test: $(STAMP)  ## Run every test (what CI runs), distributed ones included
	$(PYTHON) -m pytest -q

test-fast: $(STAMP)  ## Skip slow and distributed tests while iterating
	$(PYTHON) -m pytest -q -m "not slow and not distributed"

lint: $(STAMP)  ## Ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:  ## Remove outputs, caches and the venv
	rm -rf outputs .cache .pytest_cache .ruff_cache $(VENV)
