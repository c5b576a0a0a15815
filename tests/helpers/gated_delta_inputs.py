"""Random gated-delta-rule inputs for the kernel tests, on the device the Triton kernels run on there (the CPU under
TRITON_INTERPRET=1, else CUDA), and the bounds each dtype is held to."""

import os

import torch
import torch.nn.functional as F

from hybridlm.kernels.tolerances import GDN_REL_TOL

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# The bounds (and why each is what it is) live in hybridlm.kernels.tolerances, shared with `hybridlm doctor`.
FP32_REL_TOL, BF16_REL_TOL, FP16_REL_TOL = (GDN_REL_TOL[t] for t in (torch.float32, torch.bfloat16, torch.float16))


def make_inputs(B, T, H, HV, K, V, *, N=None, dtype=torch.float32, seed=0, raw_gates=False, with_state=True,
                dt_bias=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    inputs = {"q": randn(B, T, H, K), "k": F.normalize(randn(B, T, H, K), dim=-1), "v": randn(B, T, HV, V)}
    if raw_gates:
        inputs.update(a=randn(B, T, HV), A_log=randn(HV) * 0.5, b=randn(B, T, HV))
        if dt_bias:
            inputs["dt_bias"] = randn(HV)
    else:
        inputs.update(g=F.logsigmoid(randn(B, T, HV) + 2.0), beta=torch.sigmoid(randn(B, T, HV)))
    if with_state:
        inputs["initial_state"] = randn(N or B, HV, K, V) * 0.5
    return {n: t.to(DEVICE, dtype if n in ("q", "k", "v") else torch.float32).requires_grad_() for n, t in
            inputs.items()}
