"""The GPU architecture a Triton launch compiles for, and the per-architecture limits the autotuners prune by."""

from __future__ import annotations

# Shared memory one block may opt into, by compute capability (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"): A100 163 KB, L40S / RTX 4090 99 KB, H100 / B200 227 KB.
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


def device_arch() -> int:
    """Compute capability of the GPU Triton launches on (80 for sm_80, 90, 100, ...): the target it compiles for."""
    import triton

    return triton.runtime.driver.active.get_current_target().arch


def max_shared_bytes(arch: int) -> int:
    """The opt-in shared memory limit of sm_`arch` (the nearest listed architecture below it for unlisted ones)."""
    return MAX_SHARED_BYTES[max((a for a in MAX_SHARED_BYTES if a <= arch), default=80)]
