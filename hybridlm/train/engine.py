"""Process group and DeepSpeed engine.

Launch with torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), srun or submitit (the same variables
derived from Slurm's by hybridlm.train.distributed). Without any launcher the run is a single process.
NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hybridlm.parallel.groups import ParallelGroups, build_parallel_groups
from hybridlm.train.config import DeepSpeedConfig, OptimConfig, TrainConfig
from hybridlm.train.distributed import export_torch_env_from_scheduler
from hybridlm.train.schedule import build_scheduler


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or, for a single process, create) the process group and pick this rank's device."""
    import deepspeed

    export_torch_env_from_scheduler()  # srun / submitit tasks: derive the variables from Slurm's
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"RANK is set but {key} is not; launch with torchrun (or srun) which sets both")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        # DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce (~100 s of g++ per fresh venv) that
        # serves only its inference all-reduce; training collectives go through gloo, so skip the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run; `ds.extra` overrides any key."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": device.type == "cuda"}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": device.type == "cuda"}
    config = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(ds.precision, device) == "bf16"},
        # The optimizer is our torch AdamW (no JIT-built fused/CPU Adam); ZeRO accepts it with these two flags.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, ds.extra)


def prepare_for_zero3(model: torch.nn.Module) -> None:
    """ZeRO 3 gathers a module's parameters when its own forward (or backward) runs. Two things in HybridLM need
    telling it: the MoE layer reads its router and expert weights directly in one fused call (so gather a whole MoE
    layer on entry: a "leaf", which also keeps the prefetcher sane under data-dependent routing), and the LM head
    weight is read by the model's own forward (an external parameter of the model). Run before `deepspeed.initialize`."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from deepspeed.utils import set_z3_leaf_modules

    from hybridlm.layers.moe import SparseMoE

    set_z3_leaf_modules(model, [SparseMoE], raise_if_not_found=False)
    head = model.embed_tokens if model.lm_head is None else model.lm_head
    register_external_parameter(model, head.weight)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo, groups: ParallelGroups | None = None):
    """Wrap `model` (a HybridLM) in a DeepSpeed engine with torch AdamW, which runs the model's optimizer-step hook,
    and the configured lr schedule (stepped by the engine). `groups`: the run's (built here when not given)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = groups or build_parallel_groups(cfg.parallel, cfg.model)
    param_groups = model.param_groups(cfg.optim.weight_decay)
    if groups.expert is not None:  # after init_from and any embedding resize: they see the full experts
        from hybridlm.parallel.expert import shard_experts

        shard_experts(model, groups.expert)
        # Expert shards in groups of their own (DeepSpeed names them after the group and the expert-parallel
        # group), which ZeRO 1/2 partition over the expert-data-parallel group.
        named = [{**group, "name": name} for group, name in zip(model.param_groups(cfg.optim.weight_decay),
                                                                 ("decay", "no_decay"))]  # fmt: skip
        param_groups = split_params_into_different_moe_groups_for_optimizer(named)
    if cfg.deepspeed.zero_stage == 3:
        prepare_for_zero3(model)
    optim = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        fused=info.device.type == "cuda" and cfg.deepspeed.offload_optimizer == "none",
    )
    model.register_optimizer_hook(optimizer)  # MoE balancing after every applied step, whichever loop steps
    scheduler = build_scheduler(optimizer, optim, cfg.trainer.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg.deepspeed, optim, info.device),
    )
    return engine
