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
    def __init__(self, max_bad_steps: int, out_dir: str | Path, resumed_from: Path | None):
        self.max_bad_steps = max_bad_steps
        self.out_dir = out_dir
        self.resumed_from = resumed_from
        self.bad_steps = 0
        self.trained_a_finite_step = False

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
        self.trained_a_finite_step |= self.bad_steps == 0
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingDiverged(
                f"step {step}: the loss ({_show(step_loss)}) or grad norm ({_show(grad_norm)}) is not finite, "
                f"{self.bad_steps} step(s) in a row (trainer.max_bad_steps={self.max_bad_steps}); the run stops "
                f"without saving or pruning a checkpoint. {self._last_good()}; lower optim.lr or check the data"
            )
        return self.bad_steps == 0

    def _last_good(self) -> str:
        good = [path for path in complete_checkpoints(self.out_dir) if trained_finitely(path)]
        suspect = ""
        if not self.trained_a_finite_step and self.resumed_from is not None:
            # Not one finite step since the resume: the checkpoint resumed from may be damaged itself.
            suspect = f"every step since resuming from {self.resumed_from} diverged, so it may be damaged itself; "
            good = [path for path in good if path.name < self.resumed_from.name]
        if not good:
            return suspect + "no earlier finite checkpoint was saved"
        return suspect + f"the last good checkpoint is {good[-1]} (trainer.resume={good[-1]} continues from it)"


def _show(value: torch.Tensor) -> str:
    number = float(value.detach().double().sum())
    return str(number) if not math.isfinite(number) else f"{number:.4g}"
