"""Learning-rate multipliers per optimizer step, for `torch.optim.lr_scheduler.LambdaLR`.

Step s (0-based) is the s-th optimizer update. Warmup rises linearly to 1 over `warmup_steps` updates (the first
update already moves, at 1/warmup_steps); then
  cosine    1 -> min_lr_ratio along half a cosine, reaching min_lr_ratio at the last step
  wsd       1 held, then a linear decay to min_lr_ratio over the last decay_fraction * max_steps steps
  constant  1
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hybridlm.train.config import OptimConfig, wsd_decay_steps


def lr_multiplier(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    warmup, floor = optim.warmup_steps, optim.min_lr_ratio
    decay_steps = wsd_decay_steps(optim, max_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        if optim.schedule == "cosine":
            span = max_steps - warmup - 1
            progress = min(1.0, (step - warmup) / span) if span > 0 else 1.0
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - floor) * progress

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(optim, max_steps))
