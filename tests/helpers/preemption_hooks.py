"""`python preemption_hooks.py <train.py overrides>`: train.py with test hooks for preemption, chosen by env vars.

HYBRIDLM_TEST_SIGNAL_DURING=data|checkpoint
    this process sends itself SIGUSR1 while it builds its data / loads its resume checkpoint (start-up).
HYBRIDLM_TEST_HOLD_PREEMPTION_SAVE=FILE
    the first checkpoint save made after a preemption signal stops on rank 0 once every rank has written its files,
    just before it is published: the hook creates FILE and waits (up to 120 s) until this process has caught a
    second signal, which the test sends, then prints how many it caught and publishes.

Used directly (tests.helpers.launch.train(prefix=...)) or as the PYTHON of the sbatch templates through a wrapper.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

import hybridlm.checkpoint.save as checkpoint
import hybridlm.train.loop as loop

HOLD_TIMEOUT_S = 120


def _preemption_handler():
    """The trainer's PreemptionHandler, found through its bound SIGUSR1 handler."""
    return getattr(signal.getsignal(signal.SIGUSR1), "__self__", None)


def _signal_self_during(module, name: str) -> None:
    original = getattr(module, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)

    setattr(module, name, signalled)


def _hold_preemption_save(marker: Path) -> None:
    publish = checkpoint.publish

    def held_publish(tmp: Path, final: Path) -> None:
        handler = _preemption_handler()
        if handler is not None and handler.requested and not marker.exists():
            caught = handler.signals_caught
            marker.write_text(f"{os.getpid()}\n")
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while handler.signals_caught == caught and time.monotonic() < deadline:
                time.sleep(0.01)
            print(f"[test hook] checkpoint save held: {handler.signals_caught} signal(s) caught before publishing",
                  flush=True)  # fmt: skip
        publish(tmp, final)

    checkpoint.publish = held_publish


def main() -> None:
    during = os.environ.get("HYBRIDLM_TEST_SIGNAL_DURING")
    if during == "data":
        _signal_self_during(loop, "build_data")
    elif during == "checkpoint":
        _signal_self_during(loop, "load_checkpoint")
    elif during:
        raise SystemExit(f"HYBRIDLM_TEST_SIGNAL_DURING={during!r}: use data or checkpoint")
    if marker := os.environ.get("HYBRIDLM_TEST_HOLD_PREEMPTION_SAVE"):
        _hold_preemption_save(Path(marker))
    train_py = Path(__file__).resolve().parents[2] / "train.py"
    if len(sys.argv) > 1 and Path(sys.argv[1]).name == "train.py":  # as the sbatch templates call their PYTHON
        sys.argv.pop(1)
    sys.argv[0] = str(train_py)
    runpy.run_path(str(train_py), run_name="__main__")


if __name__ == "__main__":
    main()
