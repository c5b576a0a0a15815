"""Preemption: the scheduler's warning signal -> every rank stops after the same step, saves, and the job requeues.

    handler = PreemptionHandler(["SIGUSR1"]).install()
    for step in ...:
        train_step()
        if handler.agree():          # collective: every rank calls it after every step
            save_checkpoint()        # atomic; all ranks
            handler.requeue()        # does not return

The signal handler only sets a flag, so a signal that arrives mid-step, or a second one during the save, changes
nothing but the flag: the step and the save always finish. Requeue goes through the launcher that started the job:
submitit's checkpoint/requeue protocol under submitit (the job reruns the same Hydra job, which resumes with
`trainer.resume=auto`), `scontrol requeue $SLURM_JOB_ID` in a plain sbatch job; elsewhere the process just exits.
Importing this module does not import torch (the config schema validates signal names with `parse_signal`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch


DEFAULT_PREEMPT_SIGNALS = ("SIGUSR1",)  # trainer.preempt_signals' default: Slurm's --signal=USR1@300

# record_signals_during_start_up(): signal -> the handler it replaced, and the signals caught before the trainer's
# PreemptionHandler took them over.
_recorded_handlers: dict[signal.Signals, object] = {}
_caught_during_start_up: list[signal.Signals] = []


def _record_start_up_signal(signum: int, frame) -> None:
    _caught_during_start_up.append(signal.Signals(signum))


def record_signals_during_start_up(signals: Sequence[str] = DEFAULT_PREEMPT_SIGNALS) -> None:
    """Catch `signals` from now on and only record them: train.py calls this first, before torch, DeepSpeed and
    transformers load (seconds), during which the scheduler's warning signal would otherwise kill the process
    (exit -10) instead of requeueing the job. PreemptionHandler.install() takes the record over: a recorded signal
    it watches counts as caught (so the start-up check requeues before the first step); one it does not watch is
    given back to its previous handler and raised again, with the effect it would have had."""
    for sig in (parse_signal(name) for name in signals):
        if sig not in _recorded_handlers:
            _recorded_handlers[sig] = signal.signal(sig, _record_start_up_signal)


def parse_signal(name: str) -> signal.Signals:
    """`SIGUSR1`, `USR1` or `usr1` -> signal.SIGUSR1; a clear error for anything else."""
    key = name.strip().upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    sig = getattr(signal, key, None)
    if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(
            f"preemption signal {name!r} is not a catchable signal name; use e.g. SIGUSR1 or SIGTERM "
            "(the one your sbatch --signal / submitit sends)"
        )
    return sig


def _submitit_signal_handler() -> tuple[signal.Signals, object] | None:
    """submitit's preemption signal and its own handler for it when this process is a submitit job, else None.

    submitit installs it on its signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) before calling the job
    function. Calling it later runs submitit's protocol: pickle the job's `checkpoint()` resubmission (Hydra's
    launcher reruns the same job), `scontrol requeue`, exit; on ranks other than 0 it only returns.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    from submitit.core.job_environment import JobEnvironment, SignalHandler

    sig = JobEnvironment._usr_sig()
    handler = signal.getsignal(sig)
    return (sig, handler) if isinstance(getattr(handler, "__self__", None), SignalHandler) else None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


class PreemptionHandler:
    """Catches the configured signals (plus submitit's own under submitit) and turns them into a clean stop."""

    def __init__(self, signals: Sequence[str], device: torch.device | str | None = None):
        """`device`: where agree()'s all-reduce tensor lives; None: the current CUDA device under NCCL, else CPU.
        Nothing here needs the process group, so install() can run before it exists: the trainer installs it first
        thing, and a signal during its start-up stops it at the next agree(), before the first step."""
        names = [signals] if isinstance(signals, str) else list(signals)
        self.signals = list(dict.fromkeys(parse_signal(name) for name in names if name))
        self.device = device
        self.requested = False  # this rank caught a signal
        self.received: signal.Signals | None = None  # the first one caught
        self.signals_caught = 0  # all of them: a second warning during the save is counted, and changes nothing else
        self._previous: dict[signal.Signals, object] = {}
        self._submitit: tuple[signal.Signals, object] | None = None

    def install(self) -> PreemptionHandler:
        """Take over the signals (main thread only). Under submitit its preemption signal is taken too, so that it
        also saves before requeueing instead of exiting mid-step."""
        if self._previous:
            return self
        self._submitit = _submitit_signal_handler()
        watched = list(dict.fromkeys(self.signals + ([self._submitit[0]] if self._submitit else [])))
        for sig in watched:
            previous = signal.signal(sig, self._on_signal)
            # uninstall() gives back what was there before the start-up recorder, not the recorder
            self._previous[sig] = _recorded_handlers.pop(sig) if previous is _record_start_up_signal else previous
        for sig, previous in list(_recorded_handlers.items()):  # recorded, but not a preemption signal of this run
            signal.signal(sig, previous)
            del _recorded_handlers[sig]
        caught, _caught_during_start_up[:] = list(_caught_during_start_up), []
        for sig in caught:
            if sig in watched:
                self._on_signal(sig, None)
            else:
                signal.raise_signal(sig)
        return self

    def uninstall(self) -> None:
        """Give the signals back to whoever had them before install()."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame) -> None:
        # Only a flag: the handler runs between two bytecodes of whatever the main thread is doing (a step, a save).
        if not self.requested:
            self.received = signal.Signals(signum)
        self.requested = True
        self.signals_caught += 1

    def agree(self) -> bool:
        """Collective: True on every rank as soon as any rank has caught a signal, so all stop after the same step."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        if self.device is not None:
            device = torch.device(self.device)
        elif dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self) -> NoReturn:
        """Put the job back in the queue (rank 0) and exit this process. Call only after the checkpoint is saved
        on every rank: requeueing kills all of the job's tasks."""
        rank = _rank()
        print(f"[preemption] rank {rank}: {self.signals_caught} signal(s) caught", flush=True)
        if self._submitit is not None:
            print(f"[preemption] rank {rank}: handing over to submitit's checkpoint/requeue", flush=True)
            # On rank 0 this requeues and exits (or raises submitit's UncompletedJobError when the job has used
            # up its requeues: max_num_timeout); elsewhere it returns.
            submitit_signal, submitit_handler = self._submitit
            submitit_handler(submitit_signal, None)
        elif "SLURM_JOB_ID" in os.environ:
            if rank == 0:
                _scontrol_requeue(os.environ["SLURM_JOB_ID"])
        else:
            print(f"[preemption] rank {rank}: not under Slurm; exiting, rerun with trainer.resume=auto", flush=True)
        sys.exit(0)


def _slurm_job_state(job_id: str) -> str | None:
    try:
        result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bJobState=(\S+)", result.stdout)
    return match.group(1) if result.returncode == 0 and match else None


def _scontrol_requeue(job_id: str) -> None:
    # A job that is no longer RUNNING was cancelled (scancel sends SIGTERM too) or is being preempted, which Slurm
    # requeues itself under PreemptMode=REQUEUE: requeueing it here would bring back a job its user cancelled.
    state = _slurm_job_state(job_id)
    if state not in ("RUNNING", None):
        print(f"[preemption] Slurm job {job_id} is {state}, not RUNNING (cancelled, or preempted by Slurm): "
              "not requeueing it", flush=True)  # fmt: skip
        return
    print(f"[preemption] requeueing Slurm job {job_id}", flush=True)
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"`scontrol requeue {job_id}` could not run ({err}); the checkpoint is saved, "
                           "resubmit the job with trainer.resume=auto") from err  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(
            f"`scontrol requeue {job_id}` failed: {result.stderr.strip() or result.stdout.strip()}; the checkpoint "
            "is saved. Submit with `sbatch --requeue` (the slurm/ templates do) or resubmit with trainer.resume=auto"
        )
