"""The trainer's callbacks: everything around the step loop (hybridlm/train/loop.py) that a run may or may not want,
each in its own module. The loop calls every callback's hooks in the order of `default_callbacks`:

    check()              before any work (no process group yet): refuse what would fail later
    on_start(run)        everything is built and resumed; step `run.step` + 1 comes next
    should_stop(run)     after each step that did not reach max_steps / stop_at_step: a reason to stop, or None;
                         collective where it agrees across ranks (preemption); the first reason wins
    on_step_end(run)     after each step, once `run.stop_reason` is settled (a callback may still set it)
    on_metrics(step, v)  rank 0, whenever `run.record` writes a metrics.jsonl line
    on_end(run)          after the last step, in order (the preemption requeue does not return)

`run` is the RunState (hybridlm/train/state.py). Modelled on OLMo-core's train/callbacks/ (pre_train, post_step,
log_metrics, post_train)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridlm.train.config import TrainConfig
    from hybridlm.train.preemption import PreemptionHandler
    from hybridlm.train.state import RunState


class Callback:
    """Every hook does nothing unless overridden."""

    def check(self) -> None:
        pass

    def on_start(self, run: RunState) -> None:
        pass

    def should_stop(self, run: RunState) -> str | None:
        return None

    def on_step_end(self, run: RunState) -> None:
        pass

    def on_metrics(self, step: int, values: dict) -> None:
        pass

    def on_end(self, run: RunState) -> None:
        pass


def default_callbacks(cfg: TrainConfig, preemption: PreemptionHandler) -> list[Callback]:
    """Order matters: the step's log line and validation come before the save that follows them; wandb finishes its
    upload before a preempted job requeues; a run that requeues never exports."""
    from hybridlm.train.callbacks.checkpoint import Checkpointing
    from hybridlm.train.callbacks.export import ExportAtEnd
    from hybridlm.train.callbacks.log import MetricsLog
    from hybridlm.train.callbacks.preemption import PreemptionStop
    from hybridlm.train.callbacks.validation import Validation
    from hybridlm.train.callbacks.wandb import Wandb

    return [
        MetricsLog(cfg),
        Validation(cfg),
        Checkpointing(cfg),
        Wandb(cfg),
        PreemptionStop(preemption),
        ExportAtEnd(cfg),
    ]
