# Cites: Switch balancing loss (arXiv 2101.03961), ST-MoE z-loss (2202.08906), DeepSeek-V3 bias (2412.19437).
"""Sparse mixture of SwiGLU experts: dropless top-k routing, fused expert weights, optional gated shared expert,
load-balancing and z losses, and aux-loss-free selection bias.

The losses come from the router's own statistics (`RouterLossStats`: per-token logsumexp, per-expert sums of the
balancing probabilities), computed in the same pass over the logits as the routing; nothing here re-reads them.

"Over the global batch": the expert counts are summed over every data-parallel rank (only while training with a loss
or a bias that needs them). With `aux_loss_scope=step` the balancing loss also counts the optimizer step's earlier
micro-batches (Megatron's `global_aux_loss`): the model keeps the step's counts (`counts_since_step`), hands each
MoE forward a copy of those before it (a checkpointed forward is recomputed after its own counts were added), and
the training loop clears them after every optimizer step (`after_optimizer_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from hybridlm import ops
from hybridlm.config import MoEConfig
from hybridlm.layers.mlp import SwiGLU

if TYPE_CHECKING:
    from hybridlm.parallel.groups import ExpertParallelGroup


@dataclass
class RouterStats:
    aux_loss: torch.Tensor  # load-balancing loss in transformers' load_balancing_loss_func form (differentiable)
    z_loss: torch.Tensor  # mean logsumexp(router logits)^2 (differentiable)
    # [E] int64 (token, slot) pairs per expert; summed over data-parallel ranks while training with an aux loss or a
    # selection bias (see SparseMoE.counts_are_global), this rank's own otherwise.
    expert_counts: torch.Tensor


def load_balancing_loss(
    probability_sums: torch.Tensor, num_tokens: int, expert_counts: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss as transformers' `load_balancing_loss_func` computes it for one layer
    (Mixtral, Qwen3-Next, Qwen3.5-MoE): E * sum_e f_e * P_e, where

    - f_e = pairs routed to expert e / tokens (so sum_e f_e = top_k), from `expert_counts`, which may cover more
      tokens than this call's (all data-parallel ranks): the token count is recovered as counts.sum() / top_k;
    - P_e = probability_sums[e] / num_tokens, the mean balancing probability of e over this call's tokens.

    Balanced routing gives top_k. Gradients reach the router through P only; averaged over data-parallel ranks with
    equal token counts they are the gradient of the loss over all ranks' tokens.
    """
    num_experts = probability_sums.shape[0]
    counted_tokens = (expert_counts.sum().to(probability_sums.dtype) / top_k).clamp(min=1)
    fraction_routed = expert_counts.to(probability_sums.dtype) / counted_tokens
    mean_probability = probability_sums / max(num_tokens, 1)
    return num_experts * (fraction_routed * mean_probability).sum()


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
        # Set by hybridlm.parallel.expert.shard_experts: this rank then holds only its experts' slice and the
        # forward dispatches tokens to their experts' ranks by all-to-all.
        self.expert_parallel: ExpertParallelGroup | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        if cfg.selection_bias:
            # Changes which experts are chosen, never their weights; trained by counts, not by gradients.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        if cfg.selection_bias or cfg.aux_loss_scope == "step":
            # [E] int64: (token, slot) pairs per expert over this optimizer step's micro-batches so far
            self.register_buffer("counts_since_step", torch.zeros(cfg.num_experts, dtype=torch.int64),
                                 persistent=False)

    def counts_are_global(self) -> bool:
        """Whether forward sums the expert counts over data-parallel ranks: only while training, under a process
        group of several ranks, with an aux loss or a selection bias that uses them. Never in eval or generation,
        where ranks may run different forwards (a collective there would hang)."""
        cfg = self.cfg
        needed = self.training and (cfg.aux_loss_coef > 0 or cfg.selection_bias)
        return needed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def earlier_step_counts(self) -> torch.Tensor | None:
        """For `forward`: a copy of the step's counts so far while training with aux_loss_scope=step, else None."""
        if self.training and self.cfg.aux_loss_scope == "step":
            return self.counts_since_step.clone()
        return None

    def forward(
        self, x: torch.Tensor, earlier_step_counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RouterStats]:
        """`earlier_step_counts` (from `earlier_step_counts()`): the optimizer step's earlier counts, which the
        balancing loss's routed fractions then include."""
        cfg = self.cfg
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        bias = self.expert_bias.float() if cfg.selection_bias else None
        routed_args = (tokens, self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj, cfg.top_k)
        routed_kwargs = dict(score_func=cfg.score_func, renormalize=cfg.renormalize, selection_bias=bias,
                             backend=cfg.backend)  # fmt: skip
        if self.expert_parallel is not None:
            from hybridlm.parallel.expert import expert_parallel_moe

            routed = expert_parallel_moe(*routed_args, self.expert_parallel, **routed_kwargs)
        else:
            routed = ops.sparse_moe(*routed_args, **routed_kwargs)
        y, counts, loss_stats = routed.y, routed.expert_counts, routed.loss_stats
        if cfg.shared_expert_intermediate_size:
            y = y + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        counts = counts.to(torch.int64)
        # Added to counts_since_step by HybridLM.forward (count_step), not here: a checkpointed block runs twice.
        if self.counts_are_global():
            dist.all_reduce(counts)
        balanced = counts if earlier_step_counts is None else counts + earlier_step_counts
        num_tokens = tokens.shape[0]
        return y.reshape(shape), RouterStats(
            aux_loss=load_balancing_loss(loss_stats.probability_sums, num_tokens, balanced, cfg.top_k),
            z_loss=loss_stats.logsumexp.pow(2).sum() / max(num_tokens, 1),
            expert_counts=counts,
        )

    @torch.no_grad()
    def count_step(self, counts: torch.Tensor) -> None:
        """Add one training micro-batch's counts to the step's, where the selection bias or the loss uses them."""
        if self.training and hasattr(self, "counts_since_step"):
            self.counts_since_step += counts

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts and lower the over-loaded,
        by a fixed step (counts are global, so every rank takes the same step); then start the next step's counts."""
        if not hasattr(self, "counts_since_step"):
            return
        load = self.counts_since_step
        if self.cfg.selection_bias and load.sum() > 0:
            load_mean = load.double().mean()
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_mean - load).to(self.expert_bias.dtype)
        load.zero_()
