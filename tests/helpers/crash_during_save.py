"""`python crash_during_save.py STEP <train.py overrides>`: train, but die (os._exit(17), like a kill) inside the
checkpoint save of step STEP, after every rank has written its files and before the checkpoint is published."""

import os
import runpy
import sys
from pathlib import Path

import hybridlm.checkpoint.save as checkpoint

CRASH_EXIT_CODE = 17


def main() -> None:
    crash_step = int(sys.argv.pop(1))
    publish = checkpoint.publish

    def publish_or_crash(tmp: Path, final: Path) -> None:
        if final.name == checkpoint.step_dir_name(crash_step):
            os._exit(CRASH_EXIT_CODE)
        publish(tmp, final)

    checkpoint.publish = publish_or_crash
    train_py = Path(__file__).resolve().parents[2] / "train.py"
    sys.argv[0] = str(train_py)
    runpy.run_path(str(train_py), run_name="__main__")


if __name__ == "__main__":
    main()
