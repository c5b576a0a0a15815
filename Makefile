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
# A fresh venv $(1) of the newest releases within pyproject's ranges, with torch as $(2) asks.
define fresh_venv
	rm -rf $(1) && python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(1)/bin/python -m pip install -q --upgrade --upgrade-strategy eager --no-build-isolation -e '.[dev]' '$(2)'
endef
# The torch the CPU lock is made with (its CUDA twin is resolved from it); the newest CPU build you can get.
LOCK_TORCH ?= torch==2.13.0+cpu

.PHONY: install install-dev smoke test test-gpu gpu-kit test-latest lock clean

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

# Drift check, not in CI: today's releases of everything (no lock; on Linux PyPI's newest torch is a CUDA build of
# several GB, CPU machine or not) against the fast CPU tests, to see the next upstream break first.
test-latest:
	$(call fresh_venv,.venv-latest,torch)
	.venv-latest/bin/python -m pytest -m "not slow and not slurm and not gpu" $(PYTEST_ARGS)

# Regenerate both lock files from a fresh venv of the newest releases; then `make clean test` before committing them.
lock:
	$(call fresh_venv,.venv-lock,$(LOCK_TORCH))
	python3 requirements/lock.py write --venv .venv-lock

clean:
	rm -rf $(VENV) .venv-latest .venv-lock outputs runs
