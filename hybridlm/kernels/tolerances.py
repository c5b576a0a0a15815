"""How close each op must come to its float64 reference, per dtype it runs in: stated once, here, for the kernel
tests (tests/kernels/, tests/test_attention.py) and for `hybridlm doctor` and the trainer's start-up check
(hybridlm/evaluate/doctor.py).

Each bound goes with its own error measure: the gated delta rule and attention are bounded in the norm
(`rel_err`), the MoE path per element against the largest value (`max_rel_err`).
"""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300)).item()


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (0 when both are 0)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# Gated delta rule (chunked and recurrent), `rel_err` against the float64 token loop. fp32: ieee dots. bf16: bf16
# inputs and tensor-core dots with fp32 accumulation and an fp32 state. fp16: fp16 intermediates (w, u, v_new,
# per-chunk states) and dot operands, a few roundings of 2^-11 (on a GPU the bf16 bound is the one asserted).
GDN_REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# Routed MoE path (router, grouped SwiGLU GEMMs, combine, and their gradients), `max_rel_err` against float64.
MOE_MAX_REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}
# bf16 rounding of the logits can flip near-tied expert choices: at most this share of the (token, slot) pairs.
MOE_CHOICE_FLIP_FRACTION = 0.02

# Attention (SDPA or compiled FlexAttention, forward and backward), `rel_err` against float64 SDPA. fp32 is the
# bound the CUDA flex-vs-SDPA test asserts. bf16: inputs, probabilities, output and the backward's dP rounded to
# bf16 (2^-8 each); a wrong mask or scale is off by O(0.1-1).
ATTENTION_REL_TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}
