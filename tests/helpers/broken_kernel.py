"""`python broken_kernel.py <train.py overrides>`: train with our GDN chunk kernel replaced by one whose output is
0.1 % off (a kernel that is silently wrong on some GPU), to check that the start-up kernel check stops the run."""

import runpy
import sys
from pathlib import Path

import hybridlm.kernels.gated_delta as gated_delta


def main() -> None:
    kernel = gated_delta.chunk_gated_delta_rule

    def wrong_by_a_little(*args, **kwargs):
        o, final_state = kernel(*args, **kwargs)
        return o * 1.001, final_state

    gated_delta.chunk_gated_delta_rule = wrong_by_a_little
    train_py = Path(__file__).resolve().parents[2] / "train.py"
    sys.argv[0] = str(train_py)
    runpy.run_path(str(train_py), run_name="__main__")


if __name__ == "__main__":
    main()
