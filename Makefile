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

# The lock (requirements/lock-*.txt): the exact versions `make test` passed with, one file per torch build.
LOCK := requirements/lock-$(if $(HAS_CUDA),cuda,cpu).txt
LOCKED_PIP := python3 requirements/lock.py install --venv $(VENV) --lock $(LOCK) --
# `make test-latest` / `make lock`: a separate venv of the newest releases within pyproject's ranges. torch stays the
# CPU build on a CPU machine (PyPI's newest torch is a multi-GB CUDA build); override LATEST_TORCH to move it.
LATEST_VENV := .venv-latest
LATEST_TORCH ?= $(if $(HAS_CUDA),torch,torch==2.13.0+cpu)

.PHONY: install install-dev smoke test test-gpu gpu-kit test-latest lock latest-venv clean

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The package and its runtime dependencies at the locked versions: all that `make smoke` needs.
$(VENV)/.installed: pyproject.toml $(LOCK) requirements/lock.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(LOCKED_PIP) pip setuptools wheel
	$(LOCKED_PIP) --no-build-isolation -e .
	touch $@

# The test tools on top (pytest, ninja, lm-eval and its large dependency tree), only for `make test`.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(LOCKED_PIP) --no-build-isolation -e '.[dev]'
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

# Drift check, not in CI: today's releases (no lock) against the fast CPU tests, to see the next upstream break first.
test-latest: latest-venv
	$(LATEST_VENV)/bin/python -m pytest -m "not slow and not slurm and not gpu" $(PYTEST_ARGS)

# Regenerate both lock files from a fresh venv of the newest releases; then `make clean test` before committing them.
lock: latest-venv
	python3 requirements/lock.py write --venv $(LATEST_VENV)

latest-venv:
	rm -rf $(LATEST_VENV) && python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LATEST_VENV)/bin/python -m pip install -q $(LATEST_TORCH)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager --no-build-isolation -e '.[dev]'

clean:
	rm -rf $(VENV) $(LATEST_VENV) outputs runs
