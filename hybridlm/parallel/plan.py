"""`hybridlm plan`: what each GPU holds and sends for a model config on a number of GPUs, for each ZeRO stage x
expert-parallel size, from the config alone (nothing is built or launched).

    hybridlm plan model=gpu_1b --gpus 64                   # every ZeRO stage x every EP size that fits
    hybridlm plan model=gpu_1b --gpus 64 --ep 8 --zero 2   # one row; an impossible choice is refused, naming it
    hybridlm plan path/to/Qwen3-Next-80B-A3B --gpus 64     # a transformers model directory (or its config.json)

Overrides come before the options. A transformers directory's model is read by our importer (qwen3_next,
qwen3_5_moe); the rest of the config (batch, sequence length, precision) is configs/train.yaml with the overrides.

Per rank:
- parameters: dense (every non-expert weight: embeddings, mixers, routers, shared experts, norms), held by every
  rank; routed experts, num_experts / EP of each MoE layer (`ModelConfig.parameter_counts`);
- model-state bytes, after the ZeRO paper (Rajbhandari et al., arXiv 1910.02054, section 3.1): weights and gradients
  in the training dtype, Adam's two fp32 moments, and fp32 master weights when the training dtype is not fp32 (bf16:
  2 + 2 + 4 + 8 = 16 bytes per parameter). ZeRO 1 partitions the optimizer states (master + moments), ZeRO 2 the
  gradients too, ZeRO 3 the weights too, over the ranks that hold the same parameters: all GPUs for the dense ones,
  the GPUs / EP ranks of the expert-data-parallel group for a rank's experts (hybridlm/parallel/groups.py);
  activations, buffers and fragmentation come on top;
- all-to-all bytes per optimizer step: every routed (token, slot) row goes to its expert's rank and comes back
  (2 directions), in the forward and again in the backward (2), in the training dtype, at every MoE layer
  (hybridlm/parallel/expert.py). Rows whose expert is on the sending rank are counted too (all_to_all_single copies
  them); with balanced routing 1/EP of them stay on the rank.

Tokens per rank per step are deepspeed.micro_batch_size x trainer.seq_len x deepspeed.grad_accum_steps of the
composed config; the training dtype is deepspeed.precision on a GPU (auto: bf16).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from hybridlm.config import ConfigError, ModelConfig
from hybridlm.evaluate.doctor import add_config_source_argument
from hybridlm.parallel.config import ParallelConfig

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
ZERO_STAGES = (0, 1, 2, 3)
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master weights, when the weights are not fp32 themselves


@dataclass(frozen=True)
class PlanRow:
    zero_stage: int
    expert_parallel_size: int
    experts_per_rank: int  # of each MoE layer
    dense_params: int  # per rank, before ZeRO 3's partition
    expert_params: int  # per rank, before ZeRO 3's partition
    model_state_bytes: int  # per rank
    all_to_all_bytes: int  # per rank and optimizer step


def model_state_bytes(params: int, replicas: int, zero_stage: int, dtype_bytes: int) -> int:
    """Bytes one rank keeps for `params` parameters that `replicas` ranks hold alike, at `zero_stage`."""
    optimizer = ADAM_MOMENT_BYTES + (MASTER_BYTES if dtype_bytes != 4 else 0)
    shard = math.ceil(params / replicas)  # ZeRO pads each partition to equal size
    weights = dtype_bytes * (shard if zero_stage >= 3 else params)
    grads = dtype_bytes * (shard if zero_stage >= 2 else params)
    states = optimizer * (shard if zero_stage >= 1 else params)
    return weights + grads + states


def _check_gpus_and_stages(gpus: int, zero_stages: list[int]) -> None:
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} must be >= 1")
    bad = [zero for zero in zero_stages if zero not in ZERO_STAGES]
    if bad:
        raise ConfigError(f"--zero {bad}: ZeRO stages are {ZERO_STAGES}")


def plan_row(model: ModelConfig, gpus: int, expert_parallel_size: int, zero_stage: int, tokens_per_rank: int,
             dtype_bytes: int) -> PlanRow:
    """One ZeRO stage x EP size; a combination training would refuse raises its ConfigError (values and fix)."""
    _check_gpus_and_stages(gpus, [zero_stage])
    parallel = ParallelConfig(expert_parallel_size=expert_parallel_size)
    parallel.check_model(model)
    parallel.check_zero_stage(model, zero_stage)
    parallel.check_world_size(model, gpus)
    ep = parallel.expert_parallel_size_for(model)
    counts = model.parameter_counts()
    dense = counts["total"] - counts["routed_experts"]
    experts = counts["routed_experts"] // ep
    moe_layers = model.mlp_types.count("moe")
    # dispatch + combine, forward + backward; nothing leaves a rank without expert parallelism
    all_to_all = tokens_per_rank * model.moe.top_k * model.hidden_size * dtype_bytes * 2 * 2 * moe_layers
    return PlanRow(
        zero_stage=zero_stage,
        expert_parallel_size=ep,
        experts_per_rank=model.moe.num_experts // ep if moe_layers else 0,
        dense_params=dense,
        expert_params=experts,
        model_state_bytes=model_state_bytes(dense, gpus, zero_stage, dtype_bytes)
        + model_state_bytes(experts, gpus // ep, zero_stage, dtype_bytes),
        all_to_all_bytes=all_to_all if ep > 1 else 0,
    )


def plan_table(model: ModelConfig, gpus: int, tokens_per_rank: int, dtype_bytes: int,
               expert_parallel_sizes: list[int] | None = None,
               zero_stages: list[int] | None = None) -> tuple[list[PlanRow], list[str]]:
    """(rows, one line per ZeRO stage some EP sizes were left out of, with the reason). An EP size that does not
    divide num_experts or `gpus`, and a ZeRO stage asked for explicitly that an EP size rules out, raise their
    ConfigError (values and fix). By default the EP sizes are those dividing both (1 alone without MoE layers),
    the stages 0-3, and the pairs training refuses are left out."""
    _check_gpus_and_stages(gpus, zero_stages or [])
    if expert_parallel_sizes is None:
        experts = model.moe.num_experts if "moe" in model.mlp_types else 1
        expert_parallel_sizes = [d for d in range(1, min(experts, gpus) + 1) if experts % d == 0 and gpus % d == 0]
    rows, refused = [], {}  # zero stage -> ([EP sizes], the first's reason)
    for ep in expert_parallel_sizes:
        parallel = ParallelConfig(expert_parallel_size=ep)
        parallel.check_model(model)
        parallel.check_world_size(model, gpus)
        for zero in zero_stages if zero_stages is not None else ZERO_STAGES:
            try:
                parallel.check_zero_stage(model, zero)
            except ConfigError as error:
                if zero_stages is not None:
                    raise
                refused.setdefault(zero, ([], str(error)))[0].append(ep)
                continue
            rows.append(plan_row(model, gpus, ep, zero, tokens_per_rank, dtype_bytes))
    return rows, [f"ZeRO {zero} with EP {', '.join(map(str, eps))}: {why}" for zero, (eps, why) in refused.items()]


def _billions(count: int) -> str:
    return f"{count / 1e9:.3f} B" if count >= 1e8 else f"{count / 1e6:.3f} M"


def _gib(count: int) -> str:
    if count == 0:
        return "-"
    return f"{count / 2**30:.2f} GiB" if count >= 2**27 else f"{count / 2**20:.2f} MiB"


def format_table(rows: list[PlanRow]) -> str:
    header = ("ZeRO", "EP", "experts/rank", "dense params/rank", "expert params/rank", "model states/rank",
              "all-to-all/step/rank")  # fmt: skip
    cells = [header] + [(str(r.zero_stage), str(r.expert_parallel_size), str(r.experts_per_rank),
                         _billions(r.dense_params), _billions(r.expert_params), _gib(r.model_state_bytes),
                         _gib(r.all_to_all_bytes)) for r in rows]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def add_plan_parser(subparsers):
    parser = subparsers.add_parser(
        "plan", help="parameters, model-state bytes and all-to-all bytes per GPU for each ZeRO stage x EP size",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_source_argument(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) in the job")
    parser.add_argument("--ep", type=int, nargs="+", default=None,
                        help="expert-parallel sizes (default: every size dividing num_experts and --gpus)")
    parser.add_argument("--zero", type=int, nargs="+", default=None, help="ZeRO stages (default: 0 1 2 3)")
    parser.set_defaults(func=run_plan)
    return parser


def load_plan_config(source: str | None, overrides: list[str]):
    """The TrainConfig to plan: a transformers model directory or config.json of a native format gives the model,
    configs/train.yaml with `overrides` the rest; anything else is what `hybridlm doctor` reads."""
    import json

    from hybridlm.checkpoint.formats import format_for_model_type
    from hybridlm.evaluate.doctor import load_train_config

    path = Path(source) if source is not None else None
    hf_config = path / "config.json" if path is not None and path.is_dir() else path
    if hf_config is not None and hf_config.suffix == ".json" and hf_config.is_file():
        hf = json.loads(hf_config.read_text())
        native = format_for_model_type(hf.get("model_type", ""))
        if native is None:
            raise ValueError(f"{hf_config}: model_type {hf.get('model_type')!r} is not one our importer reads "
                             "(qwen3_next, qwen3_5_moe); pass a run directory or model=... overrides")
        cfg = load_train_config(None, overrides)
        cfg.model = native.model_config(hf)
        return cfg
    return load_train_config(source, overrides)


def run_plan(args) -> int:
    import torch

    from hybridlm.train.engine import resolve_precision

    source = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if source is not None else args.args
    try:  # a bad source, override or combination: its message (values and fix), no traceback
        cfg = load_plan_config(source, overrides)
        ds = cfg.deepspeed
        dtype = resolve_precision(ds.precision, torch.device("cuda"))  # what the GPUs would train in
        tokens = ds.micro_batch_size * cfg.trainer.seq_len * ds.grad_accum_steps
        rows, refused = plan_table(cfg.model, args.gpus, tokens, DTYPE_BYTES[dtype], args.ep, args.zero)
    except ValueError as error:  # ConfigError, CheckpointError (an unreadable config.json) and the readers' errors
        print(f"hybridlm plan: {error}", file=sys.stderr)
        return 2
    counts = cfg.model.parameter_counts()
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), source or "model")
    print(f"{name}: {_billions(counts['total'])} parameters ({_billions(counts['routed_experts'])} in routed "
          f"experts), {_billions(counts['active'])} active per token; {args.gpus} GPUs, {dtype}, {tokens} tokens "
          f"per rank per step ({ds.micro_batch_size} x {cfg.trainer.seq_len} x {ds.grad_accum_steps} accum)")
    print(format_table(rows))
    for line in refused:
        print(f"not possible: {line}")
    return 0
