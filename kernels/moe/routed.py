"""The routed sparse-MoE path on Triton kernels: `route` and `sparse_moe` (same contract as the reference).

    logits (fp32 GEMM) -> router kernel -> sync-free permutation -> grouped SwiGLU GEMMs -> weighted combine

Autograd: `RouterFunction` (router.py) differentiates the routing weights and scores w.r.t. the logits;
`RoutedExpertsFunction` below differentiates the experts and the combine w.r.t. x, the routing weights,
gate_up and down. Everything stays on the device: no `.item()`, no host reads of counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_router_inputs, check_sparse_moe_inputs
from .combine import combine, combine_weight_grad
from .grouped_gemm import EPILOGUE_SWIGLU, EPILOGUE_SWIGLU_BACKWARD, expert_rows_gemm, expert_weight_grad
from .permute import permute_by_expert
from .reference import RouterOutput
from .router import router_topk
from .tuning import INTERPRET

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RoutedExpertsFunction(torch.autograd.Function):
    """y[t] = sum_s weights[t, s] * SwiGLU_{e(t,s)}(x[t]) over expert-sorted rows."""

    @staticmethod
    def forward(ctx, x, weights, gate_up, down, sorted_to_pair, pair_to_sorted, expert_counts, top_k):
        pair_weights = weights.contiguous().view(-1)
        rows = (expert_counts, sorted_to_pair, top_k)
        pre_activation, act = expert_rows_gemm(x, gate_up, True, *rows, gather=True, epilogue=EPILOGUE_SWIGLU)
        (expert_out,) = expert_rows_gemm(act, down, True, *rows)
        y = combine(expert_out, pair_to_sorted, top_k, pair_weights, x.dtype)
        ctx.save_for_backward(x, pair_weights, gate_up, down, sorted_to_pair, pair_to_sorted, expert_counts,
                              pre_activation, act, expert_out)  # fmt: skip
        ctx.top_k = top_k
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, pair_weights, gate_up, down, sorted_to_pair, pair_to_sorted, expert_counts, pre_activation, act,
         expert_out) = ctx.saved_tensors  # fmt: skip
        top_k = ctx.top_k
        dy = dy.contiguous()
        rows = (expert_counts, sorted_to_pair, top_k)
        needs_x, needs_weights, needs_gate_up, needs_down = ctx.needs_input_grad[:4]
        dweights = combine_weight_grad(expert_out, pair_to_sorted, top_k, dy) if needs_weights else None
        d_down = (
            expert_weight_grad(dy, act, *rows, gather_left=True, left_pair_weights=pair_weights) if needs_down else None
        )
        dx = d_gate_up = None
        if needs_x or needs_gate_up:
            (d_pre_activation,) = expert_rows_gemm(
                dy, down, False, *rows, gather=True, pair_weights=pair_weights,
                epilogue=EPILOGUE_SWIGLU_BACKWARD, pre_activation=pre_activation,
            )  # fmt: skip
            if needs_gate_up:
                d_gate_up = expert_weight_grad(d_pre_activation, x, *rows, gather_right=True)
            if needs_x:
                (dx_sorted,) = expert_rows_gemm(d_pre_activation, gate_up, False, *rows)
                dx = combine(dx_sorted, pair_to_sorted, top_k, None, x.dtype)
        return dx, dweights, d_gate_up, d_down, None, None, None, None


def _check_triton_device(x: torch.Tensor) -> None:
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(
            f"the Triton MoE path needs CUDA tensors (x is on {x.device}) or TRITON_INTERPRET=1 set before triton is "
            "imported; on CPU call sparse_moe_ref / route_ref instead"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton MoE path supports {SUPPORTED_DTYPES}, got x.dtype={x.dtype}; use sparse_moe_ref for it"
        )


def _route_and_permute(x, router_weight, top_k, score_func, renormalize, selection_bias):
    logits = F.linear(x.float(), router_weight.float())
    weights, expert_ids, scores = router_topk(logits, top_k, score_func, renormalize, selection_bias)
    permutation = permute_by_expert(expert_ids, router_weight.shape[0])
    routing = RouterOutput(weights, expert_ids, logits, scores, permutation.expert_counts.long())
    return routing, permutation


def route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    selection_bias: torch.Tensor | None = None,
) -> RouterOutput:
    """Router only (same contract as `route_ref`): weights, expert ids, logits, scores, expert counts."""
    check_router_inputs(x, router_weight, top_k, score_func, selection_bias)
    _check_triton_device(x)
    return _route_and_permute(x, router_weight, top_k, score_func, renormalize, selection_bias)[0]


def sparse_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    selection_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed SwiGLU MoE: (y [T,H] in x's dtype, router_logits [T,E] fp32, expert_counts [E] int64)."""
    check_sparse_moe_inputs(x, router_weight, gate_up, down, top_k, score_func, selection_bias)
    _check_triton_device(x)
    x = x.contiguous()
    routing, permutation = _route_and_permute(x, router_weight, top_k, score_func, renormalize, selection_bias)
    y = RoutedExpertsFunction.apply(x, routing.weights, gate_up, down, *permutation, top_k)
    return y, routing.router_logits, routing.expert_counts
