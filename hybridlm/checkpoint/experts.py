"""Expert shards in checkpoints: every expert-parallel rank's slice of every MoE layer is saved, and read back into
the full fused expert tensors for export, `model.init_from` and `hybridlm generate`.

DeepSpeed writes the model states (mp_rank_00_model_states.pt) from data-parallel rank 0 only; since our expert
shards are DeepSpeed MoE parameters (hybridlm/parallel/expert.py ExpertShard) it leaves them out of that file. We
write them beside it, one file per MoE layer L and expert-parallel rank r, from the first replica of each shard
(expert-data-parallel rank 0), under DeepSpeed's own name for expert files:

    engine/layer_{L}_expert_{r}_mp_rank_00_model_states.pt   {"layers.N.mlp.experts.gate_up_proj": [E/EP, 2I, H],
                                                             "layers.N.mlp.experts.down_proj": [E/EP, H, I]}

so that DeepSpeed's `load_checkpoint` (its load_moe_state_dict, one file per layer and local "expert": our fused
slice, ExpertShard.num_local_experts = 1) puts each rank's slice back into the module state it loads. The files hold
the module's weights (bf16 runs: the bf16 weights, not ZeRO's fp32 masters, which DeepSpeed's zero_to_fp32 cannot
consolidate across expert-data-parallel partitions).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from hybridlm.checkpoint.layout import CheckpointError
from hybridlm.checkpoint.safe_load import load_tensors_file

EXPERT_SHARD_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def expert_shard_path(engine_dir: Path, layer: int, ep_rank: int) -> Path:
    return engine_dir / f"layer_{layer}_expert_{ep_rank}_mp_rank_00_model_states.pt"


def model_expert_parallel_size(model: torch.nn.Module) -> int:
    """The expert-parallel size `model`'s MoE layers run with (1 when unsharded or without MoE layers)."""
    from hybridlm.layers.moe import SparseMoE

    sizes = {m.expert_parallel.size for m in model.modules() if isinstance(m, SparseMoE) and m.expert_parallel}
    return sizes.pop() if sizes else 1


def save_expert_shards(model: torch.nn.Module, engine_dir: Path) -> None:
    """Every rank calls it after DeepSpeed's save (no collective); the first replica of each shard writes it."""
    from hybridlm.layers.moe import SparseMoE

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE) and m.expert_parallel]
    if not layers:
        return
    from deepspeed.utils import groups

    for layer, (name, moe) in enumerate(layers):  # DeepSpeed's moe_layer_id: MoE modules in named_modules() order
        group_name = moe.expert_parallel.name
        if groups._get_expert_data_parallel_rank(group_name) != 0:
            continue
        state = {f"{name}.experts.{key}": value.detach().cpu().clone()
                 for key, value in moe.experts.state_dict().items()}  # fmt: skip
        torch.save(state, expert_shard_path(engine_dir, layer, moe.expert_parallel.rank))


def read_expert_shards(engine_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The full fused expert tensors of an expert-parallel checkpoint and its expert-parallel size; ({}, 1) for a
    checkpoint without expert shards. A missing or extra rank's file is an error naming it."""
    found: dict[int, dict[int, Path]] = {}
    for path in engine_dir.iterdir():
        match = EXPERT_SHARD_FILE.match(path.name)
        if match:
            found.setdefault(int(match[1]), {})[int(match[2])] = path
    if not found:
        return {}, 1
    ep_size = max(len(ranks) for ranks in found.values())
    state: dict[str, torch.Tensor] = {}
    for layer, ranks in sorted(found.items()):
        if sorted(ranks) != list(range(ep_size)):
            missing = sorted(set(range(ep_size)) - set(ranks))
            raise CheckpointError(
                f"{engine_dir}: MoE layer {layer} has expert shards for ranks {sorted(ranks)} of {ep_size}; "
                f"{[expert_shard_path(engine_dir, layer, r).name for r in missing]} missing (an incomplete save)"
            )
        parts = [load_tensors_file(ranks[r]) for r in range(ep_size)]
        for key in parts[0]:
            state[key] = torch.cat([part[key] for part in parts], dim=0)
    return state, ep_size


def check_resume_expert_parallel_size(engine_dir: Path, expert_parallel_size: int) -> None:
    """Resume needs the checkpoint's expert-parallel size: each rank's optimizer partition of its experts was cut
    for it. Refuses another size naming both."""
    saved = read_expert_parallel_size(engine_dir)
    if saved != expert_parallel_size:
        raise CheckpointError(
            f"checkpoint {engine_dir.parent} was trained with parallel.expert_parallel_size={saved} but this run has "
            f"parallel.expert_parallel_size={expert_parallel_size}; resume with parallel.expert_parallel_size={saved}"
            ", or start a new run from its weights with model.init_from (any expert-parallel size)"
        )


def read_expert_parallel_size(engine_dir: Path) -> int:
    """The expert-parallel size a checkpoint was saved with (1 without expert shards), from its files' names."""
    ranks = {int(m[2]) for m in map(EXPERT_SHARD_FILE.match, (p.name for p in engine_dir.iterdir())) if m}
    return max(ranks) + 1 if ranks else 1
