"""Compile every MoE kernel ahead of time, without a GPU, for sm_80, sm_89, sm_90 and sm_100, and check what the real
compiler makes of them: no spills in the router kernels; for the grouped GEMMs, for each way the routed path calls
them and every config the autotuner offers on that architecture (its pruning is keyed on the device's compute
capability), no spills inside the tensor-core loop (mma.sync, wgmma or tcgen05), at most a few spilled registers in
all (the SwiGLU-backward epilogue holds three fp32 tiles at once), and shared memory within the device's limit.

The CPU interpreter runs kernels as Python, so it misses errors only the real compiler sees (a non-constexpr
global, an unsupported construct, a bad dot shape) and says nothing of registers. This compiles with Triton's
NVIDIA backend and reads the SASS (see aot.py); no device is needed. Launch-time specialisation is imitated as a
real bf16 call gets it (16-byte aligned pointers, sizes and strides divisible by 16, unit strides as constants).
"""

from __future__ import annotations

import json
import re
from functools import partial

import aot
import pytest

from hybridlm.kernels.arch import max_shared_bytes

# Spilled bytes per thread a GEMM may have, all outside its tensor-core loop (a few epilogue registers).
MAX_SPILL_BYTES = 64
_POINTER_TYPES = {"sorted_to_pair_ptr": "*i32", "counts_ptr": "*i32", "pair_weights_ptr": "*fp32",
                  "pair_to_sorted_ptr": "*i32", "dweights_ptr": "*fp32", "weights_ptr": "*fp32"}  # fmt: skip


def _param_type(name: str, overrides: dict) -> str:
    if name in overrides:
        return overrides[name]
    if name in _POINTER_TYPES:
        return _POINTER_TYPES[name]
    return "*bf16" if name.endswith("_ptr") else "i32"


def compile_for(fn, constexprs, arch, num_warps=4, num_stages=3, types=None, aligned_ints=()):
    """Compile for sm_`arch` as a launch specialises: aligned pointers and `aligned_ints`; returns the compiled
    kernel."""
    return aot.compile_for(fn, constexprs, partial(_param_type, overrides=types or {}), arch, num_warps, num_stages,
                           aligned_ints)  # fmt: skip


def resource_usage(compiled, arch: int, gemm: bool = True) -> dict:
    """Registers and stack bytes per thread (spills: these kernels have no local arrays) from the cubin, and for a
    `gemm` the number of spill instructions (STL/LDL) inside a loop that issues the architecture's tensor-core
    instruction (its main loop)."""
    mma = aot.MMA_OPCODE[arch]
    usage, sass = aot.cuobjdump(compiled, "-res-usage", "-sass")
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    in_loop = 0
    for address, text in code:
        branch = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:  # a loop's back edge
            body = [t for a, t in code if int(branch.group(1), 16) <= a <= address]
            if any(mma in t for t in body):
                in_loop += sum(bool(re.search(r"\b(STL|LDL)\b", t)) for t in body)
    assert not gemm or any(mma in text for _, text in code), f"no {mma} in the SASS: the loop check sees nothing"
    return {**aot.registers_and_stack(usage), "spills_in_mma_loop": in_loop}


def routed_gemm_calls():
    """(name, kernel, constexprs, unit strides) of each grouped GEMM as the routed path calls it (bf16, k=8)."""
    from hybridlm.kernels.moe import grouped_gemm as gg

    rows = dict(TOP_K=8, E_PAD=128, PRECISION="tf32", A_GATHER=False, A_SCALE=False, SWIGLU_FORWARD=False,
                SWIGLU_BACKWARD=False)  # fmt: skip
    grads = dict(TOP_K=8, E_PAD=128, PRECISION="tf32", L_GATHER=False, L_SCALE=False, R_GATHER=False, R_SWIGLU=False)
    rows_kernel, grad_kernel = gg._expert_rows_gemm_kernel, gg._expert_weight_grad_kernel
    return [
        ("gate_up forward + SwiGLU", rows_kernel, dict(rows, A_GATHER=True, SWIGLU_FORWARD=True), "stride_bk"),
        ("down forward", rows_kernel, rows, "stride_bk"),
        ("down backward + SwiGLU backward", rows_kernel, dict(rows, A_GATHER=True, SWIGLU_BACKWARD=True), "stride_bn"),
        ("gate_up backward (dx)", rows_kernel, dict(rows, A_SCALE=True), "stride_bn"),
        ("d down (act recomputed)", grad_kernel, dict(grads, L_GATHER=True, L_SCALE=True, R_SWIGLU=True), None),
        ("d gate_up", grad_kernel, dict(grads, L_SCALE=True, R_GATHER=True), None),
    ]


def compile_all_kernels(arch: int) -> list[dict]:
    """Compiles each kernel for sm_`arch` (main flag combinations; each GEMM call at every config the autotuner
    offers there) and checks the spills; raises on the first failure. Returns one row per GEMM compile."""
    from hybridlm.kernels.moe import combine, permute, router

    fp32 = {name: "*fp32" for name in ("logits_ptr", "bias_ptr", "scores_ptr", "logsumexp_ptr",
                                       "probability_partials_ptr", "dweights_ptr", "dscores_ptr", "dlogsumexp_ptr",
                                       "dprobability_sums_ptr", "dlogits_ptr")}  # fmt: skip
    fp32["ids_ptr"] = "*i32"
    for num_experts, sigmoid in [(64, False), (128, True)]:  # the two that spilled with 4K-value tiles
        e_pad, block_t = router._block_tokens(num_experts)
        flags = dict(E_PAD=e_pad, BLOCK_T=block_t, SIGMOID=sigmoid, RENORMALIZE=True, EPS=1e-20, TOP_K=8)
        backward_flags = dict(flags, HAS_DWEIGHTS=True, HAS_DSCORES=True, HAS_DLOGSUMEXP=True,
                              HAS_DPROBABILITY_SUMS=True)  # fmt: skip
        for kernel, kernel_flags in [(router._router_forward_kernel, dict(flags, K_PAD=8, HAS_BIAS=True)),
                                     (router._router_backward_kernel, backward_flags)]:  # fmt: skip
            usage = resource_usage(compile_for(kernel, kernel_flags, arch, types=fp32), arch, gemm=False)
            assert usage["stack"] == 0, f"sm_{arch} router E={num_experts} sigmoid={sigmoid}: spills {usage}"

    e_pad, block = permute._block_size(128)
    int32 = {name: "*i32" for name in ("ids_ptr", "hist_ptr", "run_start_ptr", "sorted_to_pair_ptr")}
    compile_for(permute._block_histogram_kernel, dict(E_PAD=e_pad, BLOCK=block), arch, types=int32)
    compile_for(permute._block_scatter_kernel, dict(E_PAD=e_pad, BLOCK=block), arch, types=int32)

    compile_for(combine._combine_kernel, dict(TOP_K=8, BLOCK_T=combine.BLOCK_TOKENS, BLOCK_H=256, HAS_WEIGHTS=True),
                arch)  # fmt: skip
    compile_for(combine._routing_weight_grad_kernel, dict(BLOCK_P=combine.BLOCK_TOKENS, BLOCK_I=256), arch)

    rows = []
    aligned = ("N", "K", "stride_am", "stride_be", "stride_bk", "stride_bn", "stride_lm", "stride_rm")
    for name, kernel, flags, unit_stride in routed_gemm_calls():
        prune = kernel.early_config_prune
        for config in prune(kernel.configs, {}, arch=arch, **flags) if prune else kernel.configs:
            constexprs = dict(flags, **config.kwargs, **({unit_stride: 1} if unit_stride else {}))
            compiled = compile_for(kernel, constexprs, arch, config.num_warps, config.num_stages, aligned_ints=aligned)
            row = dict(arch=arch, call=name, config=str(config), smem=compiled.metadata.shared,
                       **resource_usage(compiled, arch))  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            assert row["spills_in_mma_loop"] == 0, f"{name}: spills inside the tensor-core loop: {row}"
            assert row["stack"] <= MAX_SPILL_BYTES, f"{name}: {row['stack']} B of stack (spills): {row}"
            assert row["smem"] <= max_shared_bytes(arch), f"{name}: {row['smem']} B of shared memory: {row}"
    return rows


def check_gemm_pruning_follows_the_device():
    """Without an explicit arch the grouped GEMM's pruning asks the driver: an sm_89 device is never offered the
    SwiGLU-forward tiles whose pipeline outgrows its 99 KB of shared memory, nor sm_80 the 128 x 128 tiles that
    spill there; an sm_90 device keeps both."""
    from hybridlm.kernels.moe import grouped_gemm as gg

    kernel, offered = gg._expert_rows_gemm_kernel, {}
    for arch in (80, 89, 90):
        aot.pretend_device_arch(arch)
        offered[arch] = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                         for c in kernel.early_config_prune(kernel.configs, {}, SWIGLU_FORWARD=True)}  # fmt: skip
    assert (64, 128, 8) in offered[80] and (64, 128, 8) not in offered[89] and (64, 128, 8) in offered[90], offered
    assert (128, 128, 8) not in offered[80] and (128, 128, 8) in offered[90], offered


def test_gemm_pruning_follows_the_device_architecture():
    pytest.importorskip("triton.backends.nvidia")
    aot.run_without_interpreter(__file__, "check_gemm_pruning_follows_the_device", globals())


@pytest.mark.slow
@pytest.mark.parametrize("arch", aot.ARCHS)
def test_moe_kernels_compile_without_spills_in_the_gemm_loops(arch):
    pytest.importorskip("triton.backends.nvidia")
    aot.run_without_interpreter(__file__, "compile_all_kernels", globals(), arch)
