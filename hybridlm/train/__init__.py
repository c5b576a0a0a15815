"""Training: Hydra config schema, DeepSpeed engine, the step loop and its callbacks (callbacks/), checkpoints and
metrics. Entry point: `run(cfg)`.

The names below load on first use, so that `hybridlm.train.preemption` can be imported before torch (train.py
records preemption signals before its heavy imports)."""

from __future__ import annotations

import importlib

_EXPORTS = {"TrainConfig": "config", "register_configs": "config", "to_train_config": "config", "run": "loop"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
