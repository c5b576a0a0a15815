"""Autotuning policy shared by the MoE kernels.

On a GPU the kernels autotune over a small config list. Under the Triton CPU interpreter
(`TRITON_INTERPRET=1`) the autotuner cannot benchmark, so each kernel gets one fixed small config.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune(gpu_configs: list[triton.Config], interpret_config: triton.Config, key: list[str]):
    """`triton.autotune` over `gpu_configs` on a GPU; the single `interpret_config` under the interpreter."""
    return triton.autotune(configs=[interpret_config] if INTERPRET else gpu_configs, key=key)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact IEEE products (TF32 would miss the 1e-5 fp32 target); 16-bit ones ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
