"""`python engine_buffer_dtypes.py STEPS <train.py overrides>`: build the DeepSpeed engine as train.py does, train
STEPS steps on random tokens, and print one JSON line: {"buffers": {name: dtype}, "parameters": {dtype: count},
"expert_bias": [values of the first MoE layer's bias]}."""

import json
import sys

import torch
from launch import compose_train_config

from hybridlm.model import HybridLM
from hybridlm.train.engine import build_engine, init_distributed


def main() -> None:
    steps, overrides = int(sys.argv[1]), sys.argv[2:]
    cfg = compose_train_config(overrides)
    info = init_distributed()
    torch.manual_seed(0)
    engine = build_engine(HybridLM(cfg.model), cfg, info)
    rows, seq_len = cfg.deepspeed.micro_batch_size, cfg.trainer.seq_len
    for _ in range(steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (rows, seq_len + 1))
        out = engine(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
        engine.backward(out.loss)
        engine.step()
    parameters: dict[str, int] = {}
    for param in engine.module.parameters():
        parameters[str(param.dtype)] = parameters.get(str(param.dtype), 0) + 1
    print(json.dumps({
        "buffers": {name: str(buffer.dtype) for name, buffer in engine.module.named_buffers()},
        "parameters": parameters,
        "expert_bias": engine.module.moe_layers[0].expert_bias.tolist(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
