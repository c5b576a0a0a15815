"""Autotuning policy shared by the MoE kernels.

On a GPU the kernels autotune over a small config list. Under the Triton CPU interpreter
(`TRITON_INTERPRET=1`) the autotuner cannot benchmark, so each kernel gets one fixed small config.
"""

from __future__ import annotations

import os

import torch
import triton

from hybridlm.kernels.arch import device_arch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune(gpu_configs: list[triton.Config], interpret_config: triton.Config, key: list[str], allowed=None):
    """`triton.autotune` over `gpu_configs` on a GPU; the single `interpret_config` under the interpreter.
    `allowed(config, arch, launch_kwargs)` keeps the configs that fit the device's architecture (the autotuner never
    times the others); `early_config_prune(configs, named_args, arch=..., **launch_kwargs)` asks for one."""
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=key)
    prune_configs_by = None
    if allowed is not None:
        def keep_allowed(configs, named_args, arch=None, **kwargs):
            arch = arch or device_arch()
            return [c for c in configs if allowed(c, arch, {**named_args, **kwargs})] or configs[:1]

        prune_configs_by = {"early_config_prune": keep_allowed}
    return triton.autotune(configs=gpu_configs, key=key, prune_configs_by=prune_configs_by)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact IEEE products (TF32 would miss the 1e-5 fp32 target); 16-bit ones ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
