# Cites: Switch balancing loss (arXiv 2101.03961), ST-MoE z-loss (2202.08906), DeepSeek-V3 bias (2412.19437).
"""Plain PyTorch reference for the routed sparse-MoE path; also the CPU implementation.

Readable, any dtype, differentiable by autograd. The routed path is the same as the Triton one:

    router:   logits = x @ router_weight.T (fp32, or fp64 for fp64 inputs)
              scores = softmax(logits) | sigmoid(logits)
              expert_ids = topk(scores + selection_bias)      (the bias changes the choice only)
              weights = scores gathered at expert_ids (renormalised to sum to 1 when asked)
              loss stats: logsumexp(logits) per token (z-loss); per expert, the sum over tokens of the balancing
              probability, softmax(logits) or sigmoid(logits) / sum_e sigmoid(logits) (load-balancing loss)
    permute:  stable sort of the T*k (token, slot) pairs by expert -> expert-contiguous rows
    experts:  per expert e: down_e(silu(gate_e x) * up_e x) on its contiguous slice
    combine:  un-permute, y[t] = sum_k weights[t, k] * out[t, k] (fp32 sum, deterministic, no index_add)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .checks import check_router_inputs, check_sparse_moe_inputs

# Sigmoid scores of the chosen experts can all be ~0; keeps renormalisation finite.
RENORM_EPS = 1e-20


class RouterLossStats(NamedTuple):
    """What the z-loss and the load-balancing loss need, produced by the router from its one read of the logits.

    Both are differentiable w.r.t. the logits; fp32 (fp64 for fp64 inputs).
    """

    logsumexp: torch.Tensor  # [T] logsumexp of each token's logits (z-loss = mean of its square)
    probability_sums: torch.Tensor  # [E] sum over tokens of each expert's balancing probability (see module doc)


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [T, k] routing weights (fp32; fp64 for fp64 inputs), differentiable
    expert_ids: torch.Tensor  # [T, k] int32 chosen experts, best first
    router_logits: torch.Tensor  # [T, E] fp32 logits, differentiable
    scores: torch.Tensor  # [T, E] softmax/sigmoid of the logits, differentiable
    expert_counts: torch.Tensor  # [E] int64 number of (token, slot) pairs routed to each expert
    loss_stats: RouterLossStats


class SparseMoEOutput(NamedTuple):
    """What every implementation of `sparse_moe` returns."""

    y: torch.Tensor  # [T, H] in x's dtype
    router_logits: torch.Tensor  # [T, E] fp32 (fp64 for fp64 inputs), differentiable
    expert_counts: torch.Tensor  # [E] int64 (token, slot) pairs routed to each expert
    loss_stats: RouterLossStats  # for the z and load-balancing losses


def router_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Routing runs in fp32 at least; fp64 inputs keep fp64 so float64 references stay exact."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def route_ref(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    selection_bias: torch.Tensor | None = None,
) -> RouterOutput:
    check_router_inputs(x, router_weight, top_k, score_func, selection_bias)
    compute_dtype = router_compute_dtype(x)
    logits = x.to(compute_dtype) @ router_weight.to(compute_dtype).T
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    choice_scores = scores.detach()
    if selection_bias is not None:
        choice_scores = choice_scores + selection_bias.to(compute_dtype)
    expert_ids = choice_scores.topk(top_k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    expert_counts = torch.zeros(router_weight.shape[0], dtype=torch.int64, device=x.device)
    expert_counts.scatter_add_(0, expert_ids.flatten(), torch.ones_like(expert_ids.flatten()))
    if score_func == "softmax":
        balancing_probs = scores
    else:
        balancing_probs = scores / (scores.sum(dim=-1, keepdim=True) + RENORM_EPS)
    loss_stats = RouterLossStats(torch.logsumexp(logits, dim=-1), balancing_probs.sum(dim=0))
    return RouterOutput(weights, expert_ids.to(torch.int32), logits, scores, expert_counts, loss_stats)


def swiglu_experts_ref(
    x_sorted: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, expert_counts: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of each expert on its contiguous slice of expert-sorted rows `x_sorted [T*k, H]`.

    A loop over experts (never tokens); slice bounds come from one host read of the counts. Experts with
    no tokens run on an empty slice, which keeps the output defined for T = 0.
    """
    intermediate = down.shape[2]
    outputs = []
    start = 0
    for expert, count in enumerate(expert_counts.tolist()):
        rows = x_sorted[start : start + count]
        gate_up_out = rows @ gate_up[expert].T
        hidden = F.silu(gate_up_out[:, :intermediate]) * gate_up_out[:, intermediate:]
        outputs.append(hidden @ down[expert].T)
        start += count
    return torch.cat(outputs)


def sparse_moe_ref(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    selection_bias: torch.Tensor | None = None,
) -> SparseMoEOutput:
    """Routed SwiGLU MoE: y = sum_k w_k * down_e(silu(gate_e x) * up_e x), with the router's logits, expert counts
    and loss stats."""
    check_sparse_moe_inputs(x, router_weight, gate_up, down, top_k, score_func, selection_bias)
    routing = route_ref(x, router_weight, top_k, score_func, renormalize, selection_bias)
    num_tokens = x.shape[0]
    # Stable sort keeps tokens in order inside each expert, so the result does not depend on sort internals.
    order = routing.expert_ids.flatten().argsort(stable=True)
    x_sorted = x[order // top_k]
    out_sorted = swiglu_experts_ref(x_sorted, gate_up, down, routing.expert_counts)
    # Back to (token, slot) order, then a fixed-order weighted sum over the k slots.
    out = torch.empty_like(out_sorted).index_copy(0, order, out_sorted).view(num_tokens, top_k, x.shape[1])
    y = (out.to(routing.weights.dtype) * routing.weights.unsqueeze(-1)).sum(dim=1)
    return SparseMoEOutput(y.to(x.dtype), routing.router_logits, routing.expert_counts, routing.loss_stats)
