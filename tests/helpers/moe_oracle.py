"""Independent float64 oracle for the sparse-MoE tests: a per-expert loop with a per-token mask (checked itself in
tests/kernels/test_moe_oracle.py), random inputs, and one forward + backward of any implementation.

Written the obvious way (dense scores, boolean masks, no sorting) so it shares no code or tricks with
`hybridlm.kernels.moe`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LoopOutput(NamedTuple):
    """The fields of `SparseMoEOutput`, then the routing itself."""

    y: torch.Tensor
    router_logits: torch.Tensor
    expert_counts: torch.Tensor
    loss_stats: tuple[torch.Tensor, torch.Tensor]  # (logsumexp [T], probability_sums [E])
    expert_ids: torch.Tensor
    weights: torch.Tensor


def moe_loop(x, router_weight, gate_up, down, top_k, score_func="softmax", renormalize=True, selection_bias=None):
    """The routed MoE and its routing, computed in float64."""
    x, router_weight, gate_up, down = (t.double() for t in (x, router_weight, gate_up, down))
    num_experts = router_weight.shape[0]
    intermediate = down.shape[2]
    logits = x @ router_weight.T
    scores = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
    choice = scores.detach().clone()
    if selection_bias is not None:
        choice = choice + selection_bias.double()
    expert_ids = choice.argsort(dim=-1, descending=True)[:, :top_k]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, expert_ids, True)  # [T, E]
    dense_weights = torch.where(chosen, scores, torch.zeros_like(scores))
    if renormalize:
        dense_weights = dense_weights / dense_weights.sum(dim=-1, keepdim=True)
    y = torch.zeros_like(x)
    for expert in range(num_experts):
        token_mask = chosen[:, expert]
        tokens = x[token_mask]
        gate = tokens @ gate_up[expert, :intermediate].T
        up = tokens @ gate_up[expert, intermediate:].T
        out = (F.silu(gate) * up) @ down[expert].T
        contribution = torch.zeros_like(x)
        contribution[token_mask] = dense_weights[token_mask, expert, None] * out
        y = y + contribution
    weights = dense_weights.gather(1, expert_ids)
    return LoopOutput(y, logits, chosen.sum(dim=0), router_loss_stats_loop(logits, score_func), expert_ids, weights)


def router_loss_stats_loop(logits, score_func):
    """(logsumexp [T], probability_sums [E]) by their definitions, in float64: log(sum(exp(logits))) per token, and
    per expert the sum over tokens of softmax(logits) or of sigmoid(logits) normalised over experts."""
    logits = logits.double()
    logsumexp = logits.exp().sum(dim=-1).log()
    if score_func == "softmax":
        probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
    else:
        probs = torch.sigmoid(logits) / torch.sigmoid(logits).sum(dim=-1, keepdim=True)
    return logsumexp, probs.sum(dim=0)


def random_moe_inputs(num_tokens, hidden, intermediate, num_experts, dtype=torch.float32, seed=0):
    """x, router_weight, gate_up, down with scales that keep activations O(1)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    x = randn(num_tokens, hidden)
    router_weight = randn(num_experts, hidden, scale=hidden**-0.5)
    gate_up = randn(num_experts, 2 * intermediate, hidden, scale=hidden**-0.5)
    down = randn(num_experts, hidden, intermediate, scale=intermediate**-0.5)
    return x, router_weight, gate_up, down


class PathResult(NamedTuple):
    y: torch.Tensor
    logits: torch.Tensor
    counts: torch.Tensor
    loss_stats: tuple[torch.Tensor, torch.Tensor]  # (logsumexp [T], probability_sums [E])
    grads: list[torch.Tensor]  # d x, d router_weight, d gate_up, d down


def forward_backward(fn, inputs, seed=123, **kwargs) -> PathResult:
    """Forward `fn` (an implementation, or `moe_loop`) with its loss stats, then backward fixed random cotangents on
    y, the logits and both loss stats: the last three stand in for the z and balancing losses of the MoE layer."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    routed = fn(*leaves, **kwargs)
    y, logits, counts, loss_stats = routed.y, routed.router_logits, routed.expert_counts, routed.loss_stats
    outputs = [y, logits, *loss_stats]
    generator = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in outputs]
    torch.autograd.backward(outputs, cotangents)
    return PathResult(y.detach(), logits.detach(), counts, tuple(t.detach() for t in loss_stats),
                      [leaf.grad for leaf in leaves])  # fmt: skip
