"""Expert parallelism: each rank of an expert-parallel group holds num_experts / EP of a MoE layer's experts, and
tokens travel to their experts and back by all-to-all (dropless: every routed (token, slot) pair is computed).

One MoE layer under EP (`expert_parallel_moe`), on every rank of the group:

    route         the usual router on this rank's tokens (global expert ids, counts, loss statistics; `router`)
    permute       (token, slot) pairs sorted by expert id (stable), so by destination rank: experts
                  [r * E_local, (r + 1) * E_local) live on rank r (Megatron's and torchtitan's layout)
    split sizes   one all-to-all of the per-expert counts tells each rank how many rows it receives per
                  (source rank, local expert); then ONE device-to-host read of send and receive counts together
                  (`_exchange_counts`), the only one of the layer: all_to_all_single needs host split sizes
    dispatch      all_to_all_single with uneven splits (autograd: torch.distributed.nn.functional; `dispatch`)
    experts       the local experts on the received rows (`local_experts`): our grouped-GEMM SwiGLU (Triton on
                  CUDA, the reference on CPU), each received row one single-slot "token" of its local expert
    combine       all_to_all_single back, un-permute, weighted sum over the k slots in a fixed order (fp32), as the
                  EP=1 path does (`combine`)

The router, its losses and the shared expert stay local; the load-balancing loss and the selection bias use the
expert counts summed over all data-parallel ranks, exactly as without EP (hybridlm/layers/moe.py).

Read for the design (not copied): torchtitan torchtitan/distributed/expert_parallel.py (split-size exchange, then
all_to_all_single), Megatron-Core megatron/core/transformer/moe/token_dispatcher.py (MoEAlltoAllTokenDispatcher:
permute by rank, all-to-all, sort chunks by local expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from deepspeed.moe.layer import MoE as DeepSpeedMoE

from hybridlm.kernels.moe.reference import SparseMoEOutput
from hybridlm.ops.registry import MOE
from hybridlm.layers.moe import Experts
from hybridlm.parallel.groups import ExpertParallelGroup


# The backends whose routing and grouped expert GEMMs the dispatch below calls one by one.
EXPERT_PARALLEL_BACKENDS = ("triton", "torch")


def _exchange_counts(expert_counts: torch.Tensor, ep: ExpertParallelGroup) -> tuple[list[int], torch.Tensor]:
    """[E] pairs this rank sends per global expert -> (pairs sent to each rank, [EP, E_local] pairs received per
    (source rank, local expert) as a host tensor). The one device-to-host read of the layer is here."""
    send = expert_counts.to(torch.int64).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ep.group)  # chunk r of `send` (rank r's experts) goes to rank r
    host = torch.cat([send, received]).cpu()  # the single device-to-host read
    send_per_rank = host[: send.numel()].view(ep.size, ep.num_local_experts).sum(dim=1).tolist()
    return send_per_rank, host[send.numel():].view(ep.size, ep.num_local_experts)


def local_experts(rows: torch.Tensor, local_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  backend: str) -> torch.Tensor:
    """SwiGLU of local expert local_ids[i] on rows[i], in row order ([R, H] in rows' dtype); `backend` resolved."""
    num_local = gate_up.shape[0]
    if backend == "triton":
        from hybridlm.kernels.moe.permute import permute_by_expert
        from hybridlm.kernels.moe.routed import RoutedExpertsFunction

        ids = local_ids.to(torch.int32).view(-1, 1)
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        # Each row a one-slot token with weight 1: the routing weights are applied after the way back.
        return RoutedExpertsFunction.apply(rows.contiguous(), ones, gate_up, down,
                                           *permute_by_expert(ids, num_local), 1)  # fmt: skip
    from hybridlm.kernels.moe.reference import swiglu_experts_ref

    order = local_ids.argsort(stable=True)
    counts = torch.bincount(local_ids, minlength=num_local)
    out_sorted = swiglu_experts_ref(rows[order], gate_up, down, counts)
    return torch.empty_like(out_sorted).index_copy(0, order, out_sorted)


def router(backend: str):
    """The routing function of a resolved expert-parallel `backend` (hybridlm.kernels.moe's signature)."""
    if backend not in EXPERT_PARALLEL_BACKENDS:
        raise ValueError(f"model.moe.backend={backend!r} has no expert-parallel path; choose one of "
                         f"{EXPERT_PARALLEL_BACKENDS} or parallel.expert_parallel_size=1")
    if backend == "triton":
        from hybridlm.kernels.moe import route
    else:
        from hybridlm.kernels.moe import route_ref as route
    return route


@dataclass(frozen=True)
class Dispatched:
    """Where this rank's (token, slot) rows went, for the way back."""

    order: torch.Tensor  # [T * k] the rows' flat (token, slot) indices sorted by expert, so by destination rank
    send_per_rank: list[int]
    receive_per_rank: list[int]


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, expert_counts: torch.Tensor,
             ep: ExpertParallelGroup) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
    """Send each (token, slot) row of `x` [T, H] to the rank of its expert (`expert_ids` [T, k] global ids,
    `expert_counts` [E] of them): (received rows [R, H], their local expert ids [R], what `combine` needs)."""
    hidden, top_k = x.shape[1], expert_ids.shape[1]
    order = expert_ids.flatten().long().argsort(stable=True)  # pairs by expert, so by destination rank
    send_per_rank, received_counts = _exchange_counts(expert_counts, ep)
    receive_per_rank = received_counts.sum(dim=1).tolist()
    rows = dist_fn.all_to_all_single(
        x.new_empty(sum(receive_per_rank), hidden), x[order // top_k], receive_per_rank, send_per_rank,
        group=ep.group,
    )
    # Received rows come by source rank, then by local expert inside each source's chunk.
    local_ids = torch.arange(ep.num_local_experts, device=x.device).repeat(ep.size)
    local_ids = local_ids.repeat_interleave(received_counts.flatten().to(x.device))
    return rows, local_ids, Dispatched(order, send_per_rank, receive_per_rank)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, sent: Dispatched,
            ep: ExpertParallelGroup) -> torch.Tensor:
    """The experts' rows back to their tokens' ranks, summed over the k slots by `weights` [T, k] in a fixed order,
    in `weights`' dtype (fp32), as the EP=1 path does: [T, H]."""
    num_tokens, top_k = weights.shape
    returned = dist_fn.all_to_all_single(
        expert_out.new_empty(num_tokens * top_k, expert_out.shape[1]), expert_out, sent.send_per_rank,
        sent.receive_per_rank, group=ep.group,
    )
    out = torch.empty_like(returned).index_copy(0, sent.order, returned).view(num_tokens, top_k, returned.shape[1])
    return (out.to(weights.dtype) * weights.unsqueeze(-1)).sum(dim=1)


def expert_parallel_moe(x, router_weight, gate_up, down, top_k, ep: ExpertParallelGroup, *, score_func="softmax",
                        renormalize=True, selection_bias=None, backend="auto"):
    """The routed MoE path with this rank's experts only (`gate_up` [E_local, 2I, H], `down` [E_local, H, I]):
    the `SparseMoEOutput` `ops.sparse_moe` returns for the full expert set (expert counts of this rank's tokens).
    Every rank of `ep.group` must call it (collectives). The phases (route, dispatch, local experts, combine) are
    the functions above, which eval/bench/moe_ep.py times one by one."""
    backend = MOE.resolve(backend, x.device)
    routing = router(backend)(x, router_weight, top_k, score_func, renormalize, selection_bias)
    rows, local_ids, sent = dispatch(x, routing.expert_ids, routing.expert_counts, ep)
    expert_out = local_experts(rows, local_ids, gate_up, down, backend)
    y = combine(expert_out, routing.weights, sent, ep)
    return SparseMoEOutput(y.to(x.dtype), routing.router_logits, routing.expert_counts.to(torch.int64),
                           routing.loss_stats)


class ExpertShard(Experts, DeepSpeedMoE):
    """This rank's slice of one MoE layer's fused experts: gate_up_proj [E_local, 2I, H], down_proj [E_local, H, I].

    A `deepspeed.moe.layer.MoE` only so that DeepSpeed's engine knows the model has expert-parallel layers
    (`has_moe_layers`, an isinstance test): it then builds the expert / expert-data-parallel groups into ZeRO 1/2,
    reduces these parameters' gradients over the expert-data-parallel group only (divided by the whole data-parallel
    size, so gradients equal EP=1's), and keeps them out of the data-parallel rank 0's model-states file. Nothing of
    DeepSpeed's MoE layer runs: its __init__ is skipped. Its checkpoint reader loads `num_local_experts` files per
    layer (layer_L_expert_G); ours is one file per layer and expert-parallel rank holding the fused slice, which
    hybridlm's checkpoint writer saves (hybridlm/checkpoint/experts.py)."""

    num_local_experts = 1  # for DeepSpeed's checkpoint reader: one file (the fused slice) per layer and EP rank

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, num_experts: int, group_name: str):
        torch.nn.Module.__init__(self)  # not Experts' or DeepSpeed MoE's: the tensors are given, nothing is built
        self.gate_up_proj = torch.nn.Parameter(gate_up_proj)
        self.down_proj = torch.nn.Parameter(down_proj)
        self.num_experts = num_experts  # the layer's, over all ranks (DeepSpeed records it in its checkpoints)
        self.expert_group_name = group_name
        for param in (self.gate_up_proj, self.down_proj):
            # DeepSpeed's MoE parameter marks (deepspeed.moe.utils.is_moe_param): reduced over the expert-data-
            # parallel group `group_name` names, grouped apart by the optimizer, counted once in the grad norm.
            param.allreduce = False
            param.group_name = group_name


    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's engine calls this to build the layer's groups; hybridlm.parallel.groups built them already
        (its E + D layout)."""
        if use_data_before_expert_parallel_:
            raise ValueError(
                "deepspeed.extra.use_data_before_expert_parallel_=true (D + E rank layout) is not supported: "
                "hybridlm places expert-parallel groups on consecutive ranks (hybridlm/parallel/groups.py); remove it"
            )


def shard_experts(model: torch.nn.Module, ep: ExpertParallelGroup) -> None:
    """Keep only this rank's slice of every MoE layer's fused expert weights (every rank built the same full
    weights from one seed, so EP and EP=1 runs start alike) and dispatch its forward by `expert_parallel_moe`.
    Run before `deepspeed.initialize`."""
    from hybridlm.layers.moe import SparseMoE

    chosen = slice(ep.first_expert, ep.first_expert + ep.num_local_experts)
    for module in model.modules():
        if isinstance(module, SparseMoE):
            num_experts = module.experts.gate_up_proj.shape[0]
            if num_experts != ep.size * ep.num_local_experts:
                raise ValueError(f"a MoE layer has {num_experts} experts; expert parallelism over {ep.size} ranks "
                                 f"with {ep.num_local_experts} each needs {ep.size * ep.num_local_experts}")
            full = module.experts
            module.experts = ExpertShard(full.gate_up_proj.data[chosen].clone(), full.down_proj.data[chosen].clone(),
                                         num_experts, ep.name)  # fmt: skip
            module.expert_parallel = ep
