"""Compile every MoE kernel for an H100 (sm_90) ahead of time, without a GPU.

The CPU interpreter runs kernels as Python, so it misses errors only the real compiler sees (a non-constexpr
global, an unsupported construct, a bad dot shape). This compiles the GPU configs through Triton's NVIDIA backend
(its bundled ptxas), which needs no device. The interpreter replaces `triton.jit` at import time, so under
TRITON_INTERPRET=1 the compilation runs in a child process with the interpreter off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_for_h100(fn, signature, constexprs, num_warps=4, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    options = {"num_warps": num_warps, "num_stages": num_stages}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_all_kernels():
    """Compiles each kernel (largest GEMM configs, main flag combinations); raises on the first failure."""
    from hybridlm.kernels.moe import combine, permute, router
    from hybridlm.kernels.moe import grouped_gemm as gg

    sizes = dict(num_tokens="i32", num_experts="i32")
    e_pad, block_t = router._block_tokens(128)
    for sigmoid in (False, True):
        flags = dict(E_PAD=e_pad, BLOCK_T=block_t, SIGMOID=sigmoid, RENORMALIZE=True, EPS=1e-20, TOP_K=8)
        pointers = dict(logits_ptr="*fp32", bias_ptr="*fp32", scores_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32")
        compile_for_h100(router._router_forward_kernel, {**pointers, **sizes}, dict(flags, K_PAD=8, HAS_BIAS=True))
        pointers = dict(logits_ptr="*fp32", ids_ptr="*i32", dweights_ptr="*fp32", dscores_ptr="*fp32", dlogits_ptr="*fp32")
        compile_for_h100(router._router_backward_kernel, {**pointers, **sizes}, dict(flags, HAS_DSCORES=True))

    e_pad, block = permute._block_size(128)
    sizes = dict(num_pairs="i32", num_experts="i32")
    pointers = dict(ids_ptr="*i32", hist_ptr="*i32")
    compile_for_h100(permute._block_histogram_kernel, {**pointers, **sizes}, dict(E_PAD=e_pad, BLOCK=block))
    pointers = dict(ids_ptr="*i32", run_start_ptr="*i32", pair_to_sorted_ptr="*i32", sorted_to_pair_ptr="*i32")
    compile_for_h100(permute._block_scatter_kernel, {**pointers, **sizes}, dict(E_PAD=e_pad, BLOCK=block))

    sizes = dict(num_tokens="i32", hidden="i32")
    blocks = dict(TOP_K=8, BLOCK_T=combine.BLOCK_TOKENS, BLOCK_H=256)
    pointers = dict(rows_ptr="*bf16", pair_to_sorted_ptr="*i32", weights_ptr="*fp32", out_ptr="*bf16")
    compile_for_h100(combine._combine_kernel, {**pointers, **sizes}, dict(blocks, HAS_WEIGHTS=True))
    pointers = dict(rows_ptr="*bf16", pair_to_sorted_ptr="*i32", dout_ptr="*bf16", dweights_ptr="*fp32")
    compile_for_h100(combine._combine_weight_grad_kernel, {**pointers, **sizes}, blocks)

    signature = dict(
        a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", act_ptr="*bf16", pre_ptr="*bf16", sorted_to_pair_ptr="*i32",
        pair_weights_ptr="*fp32", counts_ptr="*i32", num_experts="i32", N="i32", K="i32",
        stride_am="i32", stride_be="i32", stride_bk="i32", stride_bn="i32",
    )  # fmt: skip
    config = max(gg._rows_gemm_configs(), key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    # (A_GATHER, A_SCALE, SWIGLU_FORWARD, SWIGLU_BACKWARD) as the routed path uses them
    for gather, scale, forward, backward in [(True, False, True, False), (False, False, False, False),
                                             (True, True, False, True)]:  # fmt: skip
        flags = dict(TOP_K=8, A_GATHER=gather, A_SCALE=scale, SWIGLU_FORWARD=forward, SWIGLU_BACKWARD=backward,
                     E_PAD=128, PRECISION="tf32", **config.kwargs)  # fmt: skip
        compile_for_h100(gg._expert_rows_gemm_kernel, signature, flags, config.num_warps, config.num_stages)

    signature = dict(l_ptr="*bf16", r_ptr="*bf16", out_ptr="*bf16", sorted_to_pair_ptr="*i32",
                     pair_weights_ptr="*fp32", counts_ptr="*i32", num_experts="i32", N="i32", K="i32",
                     stride_lm="i32", stride_rm="i32")  # fmt: skip
    config = max(gg._weight_grad_configs(), key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])
    for gather_left, scale, gather_right in [(True, True, False), (False, False, True)]:
        flags = dict(TOP_K=8, L_GATHER=gather_left, L_SCALE=scale, R_GATHER=gather_right, E_PAD=128,
                     PRECISION="tf32", **config.kwargs)  # fmt: skip
        compile_for_h100(gg._expert_weight_grad_kernel, signature, flags, config.num_warps, config.num_stages)


@pytest.mark.slow
def test_moe_kernels_compile_for_h100():
    pytest.importorskip("triton.backends.nvidia")
    if os.environ.get("TRITON_INTERPRET") != "1":
        compile_all_kernels()
        return
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_moe_compile; test_moe_compile.compile_all_kernels()"
    child = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-4000:]
