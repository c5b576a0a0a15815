"""Compile every MoE kernel for an H100 (sm_90) ahead of time, without a GPU, and check what the real compiler
makes of them: no spills in the router kernels; for the grouped GEMMs, for each way the routed path calls them, no
spills inside the wgmma loop and at most a few spilled registers in all (the SwiGLU-backward epilogue holds three
fp32 tiles at once).

The CPU interpreter runs kernels as Python, so it misses errors only the real compiler sees (a non-constexpr
global, an unsupported construct, a bad dot shape) and says nothing of registers. This compiles with Triton's
NVIDIA backend and reads the SASS (see sm90.py); no device is needed. Launch-time specialisation is imitated as a
real bf16 call gets it (16-byte aligned pointers, sizes and strides divisible by 16, unit strides as constants).
"""

from __future__ import annotations

import json
import re
from functools import partial

import pytest
import sm90

# Spilled bytes per thread a GEMM may have, all outside its wgmma loop (a few epilogue registers).
MAX_SPILL_BYTES = 64
_POINTER_TYPES = {"sorted_to_pair_ptr": "*i32", "counts_ptr": "*i32", "pair_weights_ptr": "*fp32",
                  "pair_to_sorted_ptr": "*i32", "dweights_ptr": "*fp32", "weights_ptr": "*fp32"}  # fmt: skip


def _param_type(name: str, overrides: dict) -> str:
    if name in overrides:
        return overrides[name]
    if name in _POINTER_TYPES:
        return _POINTER_TYPES[name]
    return "*bf16" if name.endswith("_ptr") else "i32"


def compile_for_h100(fn, constexprs, num_warps=4, num_stages=3, types=None, aligned_ints=()):
    """Compile for sm_90 as a launch specialises: aligned pointers and `aligned_ints`; returns the compiled kernel."""
    return sm90.compile_for_h100(fn, constexprs, partial(_param_type, overrides=types or {}), num_warps, num_stages,
                                 aligned_ints)  # fmt: skip


def resource_usage(compiled, gemm: bool = True) -> dict:
    """Registers and stack bytes per thread (spills: these kernels have no local arrays) from the cubin, and for a
    `gemm` the number of spill instructions (STL/LDL) inside a loop that issues wgmma (its main loop)."""
    usage, sass = sm90.cuobjdump(compiled, "-res-usage", "-sass")
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    in_loop = 0
    for address, text in code:
        branch = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:  # a loop's back edge
            body = [t for a, t in code if int(branch.group(1), 16) <= a <= address]
            if any("GMMA" in t for t in body):
                in_loop += sum(bool(re.search(r"\b(STL|LDL)\b", t)) for t in body)
    assert not gemm or any("GMMA" in text for _, text in code), "no wgmma in the SASS: the loop check sees nothing"
    return {**sm90.registers_and_stack(usage), "spills_in_wgmma_loop": in_loop}


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


def compile_all_kernels() -> list[dict]:
    """Compiles each kernel (main flag combinations; each GEMM call at its config with the most accumulator values
    per thread) and checks the GEMMs' spills; raises on the first failure. Returns one row per GEMM compile."""
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
            usage = resource_usage(compile_for_h100(kernel, kernel_flags, types=fp32), gemm=False)
            assert usage["stack"] == 0, f"router E={num_experts} sigmoid={sigmoid}: spills {usage}"

    e_pad, block = permute._block_size(128)
    int32 = {name: "*i32" for name in ("ids_ptr", "hist_ptr", "run_start_ptr", "sorted_to_pair_ptr")}
    compile_for_h100(permute._block_histogram_kernel, dict(E_PAD=e_pad, BLOCK=block), types=int32)
    compile_for_h100(permute._block_scatter_kernel, dict(E_PAD=e_pad, BLOCK=block), types=int32)

    compile_for_h100(combine._combine_kernel, dict(TOP_K=8, BLOCK_T=combine.BLOCK_TOKENS, BLOCK_H=256,
                                                   HAS_WEIGHTS=True))  # fmt: skip
    compile_for_h100(combine._routing_weight_grad_kernel, dict(BLOCK_P=combine.BLOCK_TOKENS, BLOCK_I=256))

    rows = []
    aligned = ("N", "K", "stride_am", "stride_be", "stride_bk", "stride_bn", "stride_lm", "stride_rm")
    for name, kernel, flags, unit_stride in routed_gemm_calls():
        # The config with the most accumulator values per thread: the first to run out of registers.
        config = max(kernel.configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // c.num_warps)
        constexprs = dict(flags, **config.kwargs, **({unit_stride: 1} if unit_stride else {}))
        compiled = compile_for_h100(kernel, constexprs, config.num_warps, config.num_stages, aligned_ints=aligned)
        row = dict(call=name, config=str(config), smem=compiled.metadata.shared, **resource_usage(compiled))
        rows.append(row)
        print(json.dumps(row), flush=True)
        assert row["spills_in_wgmma_loop"] == 0, f"{name}: spills inside the wgmma loop: {row}"
        assert row["stack"] <= MAX_SPILL_BYTES, f"{name}: {row['stack']} B of stack (spills): {row}"
    return rows


@pytest.mark.slow
def test_moe_kernels_compile_for_h100_without_spills_in_the_gemm_loops():
    pytest.importorskip("triton.backends.nvidia")
    sm90.run_without_interpreter(__file__, "compile_all_kernels", globals())
