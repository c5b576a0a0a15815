"""Validation every trainer.eval_every steps and after the last step (not after a preemption or an early stop):
the model's token-weighted mean cross-entropy against the unigram baseline on the same targets; with
trainer.stop_at_val_below_unigram_ratio, an early stop once the ratio is reached."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from hybridlm.loss import IGNORE_INDEX
from hybridlm.train.callbacks import Callback


def validate(engine, bundle, max_batches: int, device: torch.device) -> tuple[float, float]:
    """Token-weighted mean cross-entropy of the model and of the unigram baseline on the same targets: `max_batches`
    validation batches per rank (spread over the split), over all ranks."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    unigram_log_probs = bundle.unigram_log_probs.to(device)
    engine.eval()
    with torch.no_grad():
        for batch in bundle.val_batches(max_batches):
            batch = {key: value.to(device) for key, value in batch.items()}
            out = engine(**batch)
            labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
            targets = torch.tensor(labels.numel(), dtype=torch.float64, device=device)
            sums += torch.stack([out.ce_loss.double() * targets, -unigram_log_probs[labels].sum(), targets])
    engine.train()
    dist.all_reduce(sums)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


class Validation(Callback):
    def __init__(self, cfg):
        self.trainer = cfg.trainer

    def on_step_end(self, run) -> None:
        trainer, final = self.trainer, run.stop_reason is not None
        periodic = trainer.eval_every and run.step % trainer.eval_every == 0
        if not (periodic or run.stop_reason == "max_steps"):
            return
        with run.clock_paused():
            run.val_loss, run.unigram_loss = validate(run.engine, run.bundle, trainer.eval_batches, run.info.device)
        run.evaluated_step = run.step
        run.record(run.step, {"val_loss": run.val_loss, "unigram_loss": run.unigram_loss})
        run.say(
            f"step {run.step}: val loss {run.val_loss:.4f} (ppl {np.exp(min(run.val_loss, 50)):.1f}) | unigram "
            f"baseline {run.unigram_loss:.4f} | ratio {run.val_loss / run.unigram_loss:.3f}"
        )
        target = trainer.stop_at_val_below_unigram_ratio
        if not final and target and run.val_loss < target * run.unigram_loss:
            run.stop_reason = f"val loss below {target} x unigram baseline"
