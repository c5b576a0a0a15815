"""Sparse mixture of SwiGLU experts: dropless top-k routing, fused expert weights, optional gated shared expert,
load-balancing and z losses, and aux-loss-free selection bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.config import MoEConfig
from hybridlm.layers.mlp import SwiGLU


@dataclass
class RouterStats:
    aux_loss: torch.Tensor  # Switch/Mixtral load-balancing loss (differentiable)
    z_loss: torch.Tensor  # mean logsumexp(router logits)^2 (differentiable)
    expert_counts: torch.Tensor  # [E] int64 (token, slot) pairs per expert, summed over data-parallel ranks


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


class Experts(nn.Module):
    """Fused expert weights as transformers 5 stores them: gate_up_proj [E,2I,H] (gate rows first), down_proj [E,H,I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, hidden_size, cfg.intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        if cfg.selection_bias:
            # Changes which experts are chosen, never their weights; trained by counts, not by gradients.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
            self.register_buffer("_load_since_update", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        cfg = self.cfg
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        bias = self.expert_bias.float() if cfg.selection_bias else None
        y, router_logits, counts = ops.sparse_moe(
            tokens,
            self.gate.weight,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            cfg.top_k,
            score_func=cfg.score_func,
            renormalize=cfg.renormalize,
            selection_bias=bias,
            backend=cfg.backend,
        )
        if cfg.shared_expert_intermediate_size:
            y = y + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        # Counted by HybridLM.forward into _load_since_update: a checkpointed block runs twice.
        counts = _all_reduce_sum(counts.to(torch.int64))
        return y.reshape(shape), RouterStats(
            aux_loss=self.load_balancing_loss(router_logits, counts),
            z_loss=torch.logsumexp(router_logits, dim=-1).pow(2).mean(),
            expert_counts=counts,
        )

    def load_balancing_loss(self, router_logits: torch.Tensor, global_counts: torch.Tensor) -> torch.Tensor:
        """E * sum_e f_e * P_e: f_e, the share of routed (token, slot) pairs that went to expert e over the global
        batch (all data-parallel ranks), times P_e, the mean router probability of e over local tokens. Gradients
        reach the router through P; averaging them over ranks gives the global-batch loss's gradient."""
        E = self.cfg.num_experts
        if self.cfg.score_func == "softmax":
            probs = router_logits.softmax(dim=-1)
        else:
            scores = router_logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        share = global_counts.float() / global_counts.sum().clamp(min=1).float()
        return E * (share * probs.mean(dim=0)).sum()

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts and lower the over-loaded,
        by a fixed step. Counts are already global, so every rank takes the same step."""
        if not self.cfg.selection_bias:
            return
        load = self._load_since_update
        if load.sum() > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load).to(self.expert_bias.dtype)
        load.zero_()
