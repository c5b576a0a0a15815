"""What a training run has built and where it stands: what the step loop advances and the callbacks read (and, for
`stop_reason`, `checkpoint` and the validation figures, write)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridlm.checkpoint.layout import metrics_file
from hybridlm.train.metrics import append_line

if TYPE_CHECKING:
    from hybridlm.train.callbacks import Callback
    from hybridlm.train.config import TrainConfig
    from hybridlm.train.engine import DistInfo
    from hybridlm.train.metrics import MetricsWindow
    from hybridlm.train.progress import Progress


@dataclass
class RunState:
    cfg: TrainConfig
    info: DistInfo
    engine: Any  # deepspeed.DeepSpeedEngine
    bundle: Any  # hybridlm.data.DataBundle
    window: MetricsWindow
    progress: Progress
    callbacks: list[Callback]
    tokens_per_step: int
    resume_from: Path | None
    context_parallel: Any = None  # hybridlm.parallel.context.ContextParallelGroup; None: CP = 1
    step: int = 0
    tokens_seen: int = 0
    lr: float = 0.0  # of the step being trained
    stop_reason: str | None = None  # set by the loop (max_steps, stop_at_step) or a callback; ends the loop
    checkpoint: Path | None = None  # the newest checkpoint saved or resumed from
    finite: bool = True  # the last step's loss and grad norm were finite (recorded in its checkpoint)
    val_loss: float | None = None
    unigram_loss: float | None = None
    evaluated_step: int | None = None
    export: Path | None = None

    def say(self, text: str) -> None:
        """Rank 0 prints (above the progress bar in a terminal)."""
        self.progress.say(text)

    def record(self, step: int, values: dict) -> None:
        """Rank 0: one JSON line in out_dir/metrics.jsonl, then each callback's on_metrics (wandb)."""
        if not self.info.is_main:
            return
        append_line(metrics_file(self.cfg.trainer.out_dir), json.dumps({"step": step, **values}))
        for callback in self.callbacks:
            callback.on_metrics(step, values)

    @contextlib.contextmanager
    def clock_paused(self):
        """Validation and checkpoints do not count against the training throughput (tokens/s, MFU)."""
        self.window.pause()
        try:
            yield
        finally:
            self.window.resume()

    def result(self) -> dict:
        return {
            "step": self.step,
            "checkpoint": self.checkpoint,
            "val_loss": self.val_loss,
            "unigram_loss": self.unigram_loss,
            "stop_reason": self.stop_reason,
            "export": self.export,
        }
