# Cites: dropless top-k MoE (Switch, arXiv 2101.03961; Mixtral, arXiv 2401.04088).
"""The routed sparse-MoE path on Triton kernels: `route` and `sparse_moe` (same contract as the reference).

    logits (input-dtype GEMM, fp32 out) -> router kernel -> sync-free permutation -> grouped SwiGLU GEMMs -> combine

Autograd: `RouterLogitsFunction` below differentiates the router GEMM w.r.t. x and the router weight;
`RouterFunction` (router.py) differentiates the routing weights, scores and loss stats w.r.t. the logits;
`RoutedExpertsFunction` below differentiates the experts and the combine w.r.t. x, the routing weights,
gate_up and down. Everything stays on the device: no `.item()`, no host reads of counts.

Saved for backward: x (once, in its own dtype), the fp32 logits, the expert weights, the permutation and the
SwiGLU pre-activation. The activation is recomputed from the pre-activation inside the down-projection weight
gradient, and the routing-weight gradient is <down_e^T dy, act> from the SwiGLU backward (combine.py), so neither
the activation [T*k, I] nor the expert outputs [T*k, H] are kept.
"""

from __future__ import annotations

import torch

from .checks import check_router_inputs, check_sparse_moe_inputs
from .combine import combine, swiglu_routing_weight_grad
from .grouped_gemm import EPILOGUE_SWIGLU, EPILOGUE_SWIGLU_BACKWARD, expert_rows_gemm, expert_weight_grad
from .permute import permute_by_expert
from .reference import RouterLossStats, RouterOutput, SparseMoEOutput
from .router import router_topk
from .tuning import INTERPRET

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `out_dtype`, accumulated in fp32. One 16-bit dtype on CUDA runs on the tensor cores as it is
    (cuBLAS with an fp32 result where asked); anything else is multiplied on fp32 copies that live only here."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in HALF_DTYPES:
        if out_dtype == torch.float32:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b).to(out_dtype)
    return torch.mm(a.float(), b.float()).to(out_dtype)


class RouterLogitsFunction(torch.autograd.Function):
    """logits [T,E] fp32 = x [T,H] @ router_weight[E,H].T; saves x and the weight as they are (no fp32 copy of x)."""

    @staticmethod
    def forward(ctx, x, router_weight):
        ctx.save_for_backward(x, router_weight)
        return _matmul(x, router_weight.t(), torch.float32)

    @staticmethod
    def backward(ctx, dlogits):
        x, router_weight = ctx.saved_tensors
        # 16-bit operands of one dtype take the gradient in that dtype, as a 16-bit linear layer's autograd does.
        dlogits = dlogits.to(x.dtype if x.dtype == router_weight.dtype else torch.float32)
        dx = _matmul(dlogits, router_weight, x.dtype) if ctx.needs_input_grad[0] else None
        drouter_weight = _matmul(dlogits.t(), x, router_weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, drouter_weight


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
                              pre_activation)  # fmt: skip
        ctx.top_k = top_k
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, pair_weights, gate_up, down, sorted_to_pair, pair_to_sorted, expert_counts,
         pre_activation) = ctx.saved_tensors  # fmt: skip
        top_k = ctx.top_k
        dy = dy.contiguous()
        rows = (expert_counts, sorted_to_pair, top_k)
        needs_x, needs_weights, needs_gate_up, needs_down = ctx.needs_input_grad[:4]
        d_down = (
            expert_weight_grad(dy, pre_activation, *rows, gather_left=True, left_pair_weights=pair_weights,
                               right_swiglu=True)
            if needs_down else None
        )  # fmt: skip
        dx = dweights = d_gate_up = None
        if needs_x or needs_gate_up or needs_weights:
            # d(pre-activation) of the unweighted expert output: the routing-weight gradient needs it so, and the
            # two GEMMs that use it scale its rows by the pair weights on the fly.
            (d_pre_unweighted,) = expert_rows_gemm(
                dy, down, False, *rows, gather=True, epilogue=EPILOGUE_SWIGLU_BACKWARD, pre_activation=pre_activation
            )
            if needs_weights:
                dweights = swiglu_routing_weight_grad(d_pre_unweighted, pre_activation, pair_to_sorted, top_k)
            if needs_gate_up:
                d_gate_up = expert_weight_grad(d_pre_unweighted, x, *rows, left_pair_weights=pair_weights,
                                               gather_right=True)  # fmt: skip
            if needs_x:
                (dx_sorted,) = expert_rows_gemm(d_pre_unweighted, gate_up, False, *rows, pair_weights=pair_weights)
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
    logits = RouterLogitsFunction.apply(x, router_weight)
    weights, expert_ids, scores, logsumexp, probability_sums = router_topk(
        logits, top_k, score_func, renormalize, selection_bias
    )
    permutation = permute_by_expert(expert_ids, router_weight.shape[0])
    loss_stats = RouterLossStats(logsumexp, probability_sums)
    routing = RouterOutput(weights, expert_ids, logits, scores, permutation.expert_counts.long(), loss_stats)
    return routing, permutation


def route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    selection_bias: torch.Tensor | None = None,
) -> RouterOutput:
    """Router only (same contract as `route_ref`): weights, expert ids, logits, scores, expert counts, loss stats."""
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
) -> SparseMoEOutput:
    """Routed SwiGLU MoE (same contract as `sparse_moe_ref`): y [T,H] in x's dtype, router logits, expert counts
    and loss stats."""
    check_sparse_moe_inputs(x, router_weight, gate_up, down, top_k, score_func, selection_bias)
    _check_triton_device(x)
    x = x.contiguous()
    routing, permutation = _route_and_permute(x, router_weight, top_k, score_func, renormalize, selection_bias)
    y = RoutedExpertsFunction.apply(x, routing.weights, gate_up, down, *permutation, top_k)
    return SparseMoEOutput(y, routing.router_logits, routing.expert_counts, routing.loss_stats)
