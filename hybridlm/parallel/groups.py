"""Process groups for the parallelisms of `parallel` (hybridlm/parallel/config.py), built once at start-up after
the world process group and before `deepspeed.initialize`.

Rank layout (expert parallelism, EP = parallel.expert_parallel_size, world size W, DP = W: every rank reads its own
micro-batches and holds every non-expert parameter):

    expert-parallel groups       consecutive blocks of EP ranks: [0 .. EP-1], [EP .. 2EP-1], ...  (all-to-all
                                 inside a block; with EP <= GPUs per node it never leaves a node)
    expert-data-parallel groups  ranks with the same position in their block: [0, EP, 2EP, ...], [1, EP+1, ...]
                                 (the W / EP replicas of one expert shard; its gradients are reduced there)

This is DeepSpeed's own E + D layout (deepspeed.utils.groups._create_expert_and_data_parallel), and the groups are
DeepSpeed's, so its engine, ZeRO 1/2 optimizer and checkpoints use the same ones: rank r holds expert shard
r % EP.

Context parallelism (CP = parallel.context_parallel_size; not combined with EP > 1 yet):

    context-parallel groups      consecutive blocks of CP ranks (inside a node while CP <= GPUs per node: the
                                 layers' all-gathers run on every layer); they read the same rows, data-parallel
                                 rank = rank // CP of W / CP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from hybridlm.config import ModelConfig
from hybridlm.parallel.config import ParallelConfig
from hybridlm.parallel.context import ContextParallelGroup


@dataclass(frozen=True)
class ExpertParallelGroup:
    """Where a MoE layer's experts live: rank `rank` of `size` ranks in `group` holds experts
    [rank * num_local_experts, (rank + 1) * num_local_experts)."""

    group: dist.ProcessGroup
    size: int
    rank: int
    num_local_experts: int
    name: str  # DeepSpeed's name of the expert-parallel group ("ep_size_N"), which its MoE parameters carry

    @property
    def first_expert(self) -> int:
        return self.rank * self.num_local_experts


@dataclass(frozen=True)
class ParallelGroups:
    expert: ExpertParallelGroup | None  # None: every rank holds every expert (EP = 1, or no MoE layers)
    context: ContextParallelGroup | None = None  # None: every rank holds its rows whole (CP = 1)


def context_parallel_group(cp_size: int) -> ContextParallelGroup:
    """This rank's block of `cp_size` consecutive ranks (every rank must call it: group creation is collective)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = None
    for first in range(0, world_size, cp_size):  # every rank creates every group: new_group is collective
        group = dist.new_group(list(range(first, first + cp_size)))
        if first <= rank < first + cp_size:
            mine = ContextParallelGroup(group=group, size=cp_size, rank=rank - first)
    return mine


def build_parallel_groups(parallel: ParallelConfig, model: ModelConfig) -> ParallelGroups:
    """The groups of this run; every rank must call it (group creation is collective)."""
    ep_size = parallel.expert_parallel_size_for(model)
    if parallel.context_parallel_size > 1:
        parallel.check_world_size(model, dist.get_world_size())
        return ParallelGroups(expert=None, context=context_parallel_group(parallel.context_parallel_size))
    if ep_size == 1:
        return ParallelGroups(expert=None)
    from deepspeed.utils import groups

    parallel.check_world_size(model, dist.get_world_size())
    name = f"ep_size_{ep_size}"  # DeepSpeed's name for the groups of this size
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    expert = ExpertParallelGroup(
        group=groups._get_expert_parallel_group(name),
        size=ep_size,
        rank=groups._get_expert_parallel_rank(name),
        num_local_experts=model.moe.num_experts // ep_size,
        name=name,
    )
    return ParallelGroups(expert=expert)
