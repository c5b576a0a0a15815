"""Preemption (hybridlm/train/preemption.py): once the scheduler's warning signal reached any rank, every rank stops
after the same step (the checkpoint callback saves it) and, at the end, the job requeues instead of exporting."""

from __future__ import annotations

from hybridlm.train.callbacks import Callback

STOP_REASON = "preemption signal"


class PreemptionStop(Callback):
    def __init__(self, handler):
        self.handler = handler

    def should_stop(self, run) -> str | None:
        return STOP_REASON if self.handler.agree() else None  # collective: every rank, after every step

    def on_end(self, run) -> None:
        if run.stop_reason == STOP_REASON:
            self.handler.requeue()  # the checkpoint is saved on every rank; does not return
        self.handler.uninstall()
