"""Stop on divergence: a non-finite loss or grad norm for `trainer.max_bad_steps` consecutive steps ends the run
before anything is saved, pruned or exported, naming the step and the last good checkpoint (issue 19: a NaN run
must not save NaN checkpoints and let keep_last delete the good ones)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from hybridlm.checkpoint.layout import complete_checkpoints
from hybridlm.checkpoint.resume import trained_finitely


class TrainingDiverged(RuntimeError):
    """The loss or the grad norm stayed non-finite for trainer.max_bad_steps steps."""


class DivergenceGuard:
    def __init__(self, max_bad_steps: int, out_dir: str | Path):
        self.max_bad_steps = max_bad_steps
        self.out_dir = out_dir
        self.bad_steps = 0

    def check(self, step: int, step_loss: torch.Tensor, grad_norm) -> bool:
        """Collective (one all-reduce of a flag, so every rank stops together). Returns whether this step was
        finite; raises TrainingDiverged once `max_bad_steps` consecutive steps were not."""
        grad_norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float64)
        bad = torch.tensor(
            [not (torch.isfinite(step_loss).all() and torch.isfinite(grad_norm).all())], dtype=torch.int32,
            device=step_loss.device,
        )  # fmt: skip
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.bad_steps = self.bad_steps + 1 if bad.item() else 0
        if self.bad_steps >= self.max_bad_steps:
            good = [path for path in complete_checkpoints(self.out_dir) if trained_finitely(path)]
            last_good = (
                f"the last good checkpoint is {good[-1]} (trainer.resume={good[-1]} continues from it)" if good
                else "no finite checkpoint was saved before it"
            )  # fmt: skip
            raise TrainingDiverged(
                f"step {step}: the loss ({_show(step_loss)}) or grad norm ({_show(grad_norm)}) is not finite, "
                f"{self.bad_steps} step(s) in a row (trainer.max_bad_steps={self.max_bad_steps}); the run stops "
                f"without saving or pruning a checkpoint. {last_good}; lower optim.lr or check the data and the "
                "checkpoint it resumed from"
            )
        return self.bad_steps == 0


def _show(value: torch.Tensor) -> str:
    number = float(value.detach().double().sum())
    return str(number) if not math.isfinite(number) else f"{number:.4g}"
