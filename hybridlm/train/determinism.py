"""`trainer.deterministic=true`: two runs of one config on one device give bitwise-equal losses.

The loop already seeds Python, NumPy and torch (every device) from `trainer.seed`, and the data order depends on the
seed only. What varies between runs without this mode:
- torch ops whose CUDA kernels reduce with atomics (index_add, scatter_add, some backward passes):
  `torch.use_deterministic_algorithms(True)` takes their deterministic variants, and raises, naming the op, where
  one has none (rather than letting it vary);
- cuBLAS's split reductions: `CUBLAS_WORKSPACE_CONFIG=:4096:8` (NVIDIA's reproducibility condition, which torch's
  deterministic mode requires) and cuDNN without autotuning;
- Triton's autotuner, which picks each kernel's config by timing it, so two runs may pick different ones (with
  different reduction orders): `TRITON_CACHE_AUTOTUNING=1` keeps the first run's choice on disk and later runs reuse
  it. Our kernels themselves reduce in a fixed order: no atomics in kernels/gated_delta/ or kernels/moe/ (the MoE
  router and combine sum per-program partials in order; the GDN backward's per-chunk gate partials are summed by
  torch afterwards).
"""

from __future__ import annotations

import os
import sys

import torch

# The kernel modules read Triton's autotuning knobs when they are imported; the ops import them on first use.
KERNEL_MODULES = ("hybridlm.kernels.gated_delta.chunk", "hybridlm.kernels.moe.routed")


def make_deterministic(enabled: bool) -> None:
    """Switch the process to deterministic algorithms (trainer.deterministic); nothing when not `enabled`. Call it
    before the model first runs: the cuBLAS workspace and Triton's autotuning cache are read at first use."""
    if not enabled:
        return
    imported = [name for name in KERNEL_MODULES if name in sys.modules]
    if imported and os.environ.get("TRITON_CACHE_AUTOTUNING") != "1" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"trainer.deterministic=true must be applied before the kernels are imported ({imported} "
                           "already are); set TRITON_CACHE_AUTOTUNING=1 in the environment instead")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
