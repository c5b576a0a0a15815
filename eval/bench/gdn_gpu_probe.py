"""One GDN chunk call, forward then backward, at gpu_1b's head shapes (B=1, T=512, H=4, HV=8, K=V=128) on the GPU:

    CUDA_LAUNCH_BLOCKING=1 python eval/bench/gdn_gpu_probe.py ours|fla bfloat16|float32

prints how far it got and, on a failure, the traceback (with CUDA_LAUNCH_BLOCKING=1 it names the failing kernel).
The smallest reproducer for the H200 failure in eval/bench/results/h200_bare_2026-12-04/."""

from __future__ import annotations

import sys
import time
import traceback

import torch


def main(implementation: str, dtype_name: str) -> None:
    if implementation == "ours":
        from hybridlm.kernels.gated_delta import chunk_gated_delta_rule
    elif implementation == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    else:
        raise SystemExit(f"implementation {implementation!r}: choose ours or fla")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    B, T, H, HV, K, V = 1, 512, 4, 8, 128, 128
    q = torch.randn(B, T, H, K, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, H, K, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, HV, V, device="cuda", dtype=dtype, requires_grad=True)
    g = (-torch.rand(B, T, HV, device="cuda") * 0.5).to(dtype).requires_grad_()
    beta = torch.rand(B, T, HV, device="cuda").to(dtype).requires_grad_()
    label, started = f"{implementation} {dtype_name}", time.time()
    try:
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
        torch.cuda.synchronize()
        print(label, "forward ok", f"{time.time() - started:.1f}s", flush=True)
        o.float().square().sum().backward()
        torch.cuda.synchronize()
        print(label, "backward ok", f"{time.time() - started:.1f}s", flush=True)
    except Exception:
        print(label, "FAILED", f"{time.time() - started:.1f}s")
        traceback.print_exc(limit=6)


if __name__ == "__main__":
    main(*sys.argv[1:3])
