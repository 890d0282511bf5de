# Two entry points that work on a fresh machine: `make demo` and `make test`.
# torch is pinned to the CPU wheel the machines carry; the constraints file stops any other package
# (accelerate, deepspeed, ray extras) from pulling a newer torch with GBs of CUDA libraries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup assets demo test lint bench gpu-check zeroshot-demo

$(BIN)/dist-prune: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 setuptools wheel
	# deepspeed ships as an sdist whose setup.py imports torch: build it against the torch above, no compiled ops.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/dist-prune

assets: setup
	$(BIN)/dist-prune assets

demo: assets
	$(BIN)/dist-prune prune --config configs/demo.yaml --overwrite

# Zero-shot accuracy of the dense SmolLM2 on the offline BIG-bench suite, 40 examples a task (69 s on 2 idle cores).
zeroshot-demo: assets
	$(BIN)/dist-prune eval --model smollm2-135m --tasks bigbench --limit 40

test: assets
	$(BIN)/ruff check dist_prune tests bench
	$(BIN)/python -m pytest -q

bench: assets
	$(BIN)/python bench/quality.py

# On a machine with a CUDA GPU: the CUDA test tier, then the GPU benchmark (its section of bench/RESULTS.md).
gpu-check: assets
	$(BIN)/python -m pytest -q -m cuda tests/test_cuda.py
	$(BIN)/python bench/gpu.py
