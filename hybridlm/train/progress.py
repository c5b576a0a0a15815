"""Training progress where users read it. A terminal gets tqdm's bar, with the log lines printed above it. A log file
(Slurm's --output, submitit's *_log.err, nohup.out) gets no bar: its carriage-return frames would pile up into one
long line. Both get the same plain line every trainer.log_every steps: step, losses, lr, tokens/s, MFU and the ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours unbounded), as tqdm and Slurm print durations."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_log_line(step: int, max_steps: int, metrics: dict, eta_s: float | None) -> str:
    parts = [
        f"step {step}/{max_steps}",
        f"loss {metrics['loss']:.4f} ce {metrics['ce_loss']:.4f} aux {metrics['aux_loss']:.4f} "
        f"z {metrics['z_loss']:.4f}",
    ]
    if "grad_norm" in metrics:
        parts.append(f"grad {metrics['grad_norm']:.3f}")
    parts.append(f"lr {metrics['lr']:.2e}")
    parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    parts.append(f"MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "MFU n/a")
    if "moe_load_max_over_mean/worst" in metrics:
        parts.append(f"expert load max/mean {metrics['moe_load_max_over_mean/worst']:.2f}")
    parts.append(f"ETA {format_duration(eta_s)}" if eta_s is not None else "ETA n/a")
    return " | ".join(parts)


class Progress:
    """Rank 0's console: the bar (`show_bar` and a terminal on `stream`) and the plain lines on stdout.

    `end_step` is where this job stops (trainer.stop_at_step when set, else max_steps): the ETA is the wall time per
    step since this job's first step (validation and checkpoints included) times the steps left to it."""

    def __init__(self, *, max_steps: int, end_step: int, start_step: int, show_bar: bool, active: bool = True,
                 stream: TextIO | None = None):  # fmt: skip
        stream = sys.stderr if stream is None else stream
        self.active = active
        self.max_steps, self.end_step, self.start_step = max_steps, end_step, start_step
        self.bar = tqdm(
            total=max_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            file=stream,
            disable=not (active and show_bar and stream.isatty()),
        )
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        if not self.active:
            return
        if self.bar.disable:
            print(text, flush=True)
        else:
            tqdm.write(text)

    def eta_s(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * max(self.end_step - step, 0)

    def step_done(self) -> None:
        self.bar.update(1)

    def log(self, step: int, metrics: dict) -> None:
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        self.say(format_log_line(step, self.max_steps, metrics, self.eta_s(step)))

    def close(self) -> None:
        self.bar.close()
