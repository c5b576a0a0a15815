"""`python optimizer_hook_steps.py STEPS <train.py overrides>`: for each ZeRO stage 0-3, build the DeepSpeed engine
as train.py does and run STEPS optimizer steps of deepspeed.grad_accum_steps micro-batches on random tokens, without ever calling
after_optimizer_step; the last step's boundary micro-batch backpropagates a NaN loss (ZeRO 1-3 skip that step).
Prints one JSON line: {stage: records}, with one record per engine.step() of what the first MoE layer held before and after:
{"boundary", "applied", "counts_before", "counts_after", "bias_before", "bias_after"}, and "rate": the bias update rate."""

import json
import sys

import torch
from launch import compose_train_config

from hybridlm.model import HybridLM
from hybridlm.train.engine import build_engine, init_distributed


def main() -> None:
    steps, overrides = int(sys.argv[1]), sys.argv[2:]
    info = init_distributed()
    report = {}
    for stage in range(4):
        cfg = compose_train_config([*overrides, f"deepspeed.zero_stage={stage}"])
        report[stage] = run_steps(cfg, info, steps)
    print(json.dumps({**report, "rate": cfg.model.moe.bias_update_rate}))


def run_steps(cfg, info, steps: int) -> list[dict]:
    torch.manual_seed(0)
    engine = build_engine(HybridLM(cfg.model), cfg, info)
    moe = engine.module.moe_layers[0]
    rows, seq_len, accum = cfg.deepspeed.micro_batch_size, cfg.trainer.seq_len, cfg.deepspeed.grad_accum_steps
    records = []
    for step in range(steps):
        for _ in range(accum):
            tokens = torch.randint(0, cfg.model.vocab_size, (rows, seq_len + 1))
            out = engine(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
            boundary = engine.is_gradient_accumulation_boundary()
            poisoned = step == steps - 1 and boundary
            engine.backward(out.loss * float("nan") if poisoned else out.loss)
            before = {"counts_before": moe.counts_since_step.tolist(), "bias_before": moe.expert_bias.tolist()}
            engine.step()
            records.append({"boundary": boundary, "applied": engine.was_step_applied(), **before,
                            "counts_after": moe.counts_since_step.tolist(), "bias_after": moe.expert_bias.tolist()})  # fmt: skip
    return records


if __name__ == "__main__":
    main()
