# Two commands do all set-up on a fresh machine: `make smoke` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Cache DeepSpeed's JIT-built C++ ops inside the venv so only the first run pays for them.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= disabled
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifneq ($(HAS_CUDA),1)
# Triton runs on CPU only in interpreter mode; it must be set before triton is imported.
export TRITON_INTERPRET := 1
endif
PYTEST_ARGS ?=

.PHONY: install install-dev smoke test test-gpu gpu-kit clean

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The package and its runtime dependencies: all that `make smoke` needs.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
ifeq ($(HAS_CUDA),1)
	$(PIP) install -q torch
else
	# CPU machine: the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
endif
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e .
	touch $@

# The test tools on top (pytest, ninja, lm-eval and its large dependency tree), only for `make test`.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e '.[dev]'
	touch $@

smoke: install
	$(PY) train.py experiment=smoke

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: install-dev
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# The first thing to run on a GPU machine (<= 12 min): test-gpu, hybridlm doctor, every benchmark -> eval/bench/results/
gpu-kit: install-dev
	$(PY) eval/bench/gpu_kit.py

clean:
	rm -rf $(VENV) outputs runs
