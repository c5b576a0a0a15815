"""Initialise a model from a checkpoint (`model.init_from=PATH`): a Qwen3-Next / Qwen3.5-MoE directory, a hybridlm
export, or one of our run / DeepSpeed checkpoints. The architecture must match; training-only settings may differ."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hybridlm.checkpoint.layout import CheckpointError
from hybridlm.checkpoint.reader import read_checkpoint
from hybridlm.config import LAYER_SYMBOLS, MLP_SYMBOLS, ModelConfig, spell_pattern, training_only_fields
from hybridlm.model import HybridLM


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def architecture_fields(cfg: ModelConfig) -> dict:
    """The flattened config values that decide what the weights are and compute: all but the fields the config marks
    training-only (hybridlm.config.training_only) and the sections no layer uses (intermediate_size without a dense
    layer, moe.* without an MoE layer, attention.* without an attention layer, gdn.* without a GDN layer). Patterns
    are compared layer by layer."""
    values = _flatten(dataclasses.asdict(cfg))
    values["layer_pattern"] = spell_pattern(cfg.layer_types, LAYER_SYMBOLS)
    values["mlp_pattern"] = spell_pattern(cfg.mlp_types, MLP_SYMBOLS)
    unused = training_only_fields(type(cfg))
    if "dense" not in cfg.mlp_types:
        unused.add("intermediate_size")
    for section, layer_type in (("moe", "moe"), ("attention", "attention"), ("gdn", "gated_deltanet")):
        if layer_type not in cfg.mlp_types + cfg.layer_types:
            unused.update(key for key in values if key.startswith(f"{section}."))
    return {key: value for key, value in values.items() if key not in unused}


def architecture_mismatches(ours: ModelConfig, theirs: ModelConfig) -> list[str]:
    a, b = architecture_fields(ours), architecture_fields(theirs)
    keys = list(a) + [k for k in b if k not in a]
    return [
        f"model.{k}: ours {a.get(k, '(unused)')!r}, checkpoint {b.get(k, '(unused)')!r}"
        for k in keys
        if a.get(k) != b.get(k)
    ]


@torch.no_grad()
def load_pretrained_into(model: HybridLM, path: str | Path) -> dict:
    """Copy the checkpoint's weights into `model` in place (each tensor cast to the parameter's dtype and device).
    Refuses, listing every difference, when the checkpoint's architecture is not the model's. Returns the
    checkpoint's metadata (step, tokens trained, ...) for logging."""
    ckpt = read_checkpoint(path)
    problems = architecture_mismatches(model.config, ckpt.config)
    if problems:
        raise CheckpointError(
            f"cannot initialise from {path}: its architecture differs from the model config:\n  - "
            + "\n  - ".join(problems)
            + "\nset the model config to the checkpoint's (e.g. the matching preset) or pick another checkpoint"
        )
    targets = model.state_dict()
    for name, tensor in ckpt.state_dict.items():
        targets[name].copy_(tensor)
    return {"source": str(ckpt.source), "kind": ckpt.kind, **ckpt.metadata}
