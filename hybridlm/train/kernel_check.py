"""The trainer's start-up kernel check (`trainer.kernel_check`, default true).

Before step 1, every op the model runs as a kernel on this device (our Triton kernels, fla's, FlexAttention or the
CUDA SDPA kernels; not the PyTorch references) is checked as `hybridlm doctor` checks it: once, at a small shape of
the model's own dimensions, in the training dtype, against its float64 reference. A failure stops the run before
any training, with the doctor's report naming the op and the override that avoids it; nothing falls back silently.
The result is printed and written to `out_dir/kernel_check.json`. On a CPU with the default backends every op is a
PyTorch reference and there is nothing to check; with `model.gdn.backend=triton` / `model.moe.backend=triton` under
`TRITON_INTERPRET=1` the kernels are checked in the interpreter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hybridlm.evaluate.doctor import DTYPES, DoctorReport, run_checks
from hybridlm.evaluate.report import write_json
from hybridlm.train.config import TrainConfig
from hybridlm.train.engine import DistInfo, resolve_precision

REPORT_NAME = "kernel_check.json"


class KernelCheckFailed(RuntimeError):
    """An op the model would train with is wrong on this device; the message is the doctor's report and the fix."""


def check_kernels(cfg: TrainConfig, info: DistInfo) -> DoctorReport | None:
    """Collective: every rank checks its own device; if any rank fails, every rank raises KernelCheckFailed.
    None when trainer.kernel_check=false."""
    if not cfg.trainer.kernel_check:
        return None
    report_dtype = resolve_precision(cfg.deepspeed.precision, info.device)
    dtype = DTYPES[report_dtype]
    if info.is_main:
        print(f"kernel check: the model's kernels at small shapes, {report_dtype} on {info.device}, against "
              "float64 ...", flush=True)
    report = run_checks(cfg.model, info.device, dtype, kernels_only=True,
                        model_name=f"{cfg.model.layer_pattern} x {cfg.model.mlp_pattern}")
    forget_autotuning()
    failed_ranks = torch.tensor([1.0 if report.failures else 0.0], device=info.device)
    dist.all_reduce(failed_ranks)
    if info.is_main:
        write_json(Path(cfg.trainer.out_dir) / REPORT_NAME, {**report.to_dict(), "failed_ranks": int(failed_ranks)})
        if report.results:
            print(report.format(), flush=True)
        else:
            print(f"kernel check: nothing to check, every op runs a PyTorch reference on {info.device}", flush=True)
    if failed_ranks.item():
        fixes = sorted({r.fix for r in report.failures})
        where = "this rank" if report.failures else f"{int(failed_ranks.item())} other rank(s)"
        raise KernelCheckFailed(
            f"kernel check failed on {where} before step 1; nothing was trained. "
            + (f"Fix: {'; '.join(fixes)}.\n{report.format()}" if report.failures else
               f"See the failing rank's report; this rank's:\n{report.format()}")
            + "\n(trainer.kernel_check=false skips the check, for an op you have verified some other way)"
        )
    return report


def forget_autotuning() -> None:
    """Drop the configs Triton's autotuner chose for our kernels during the check: it timed them at the check's small
    shapes, and their autotune keys leave out the number of tokens, so training would keep those choices. The
    compiled kernels stay cached; training re-times them at its own shapes."""
    from triton.runtime.autotuner import Autotuner

    for name, module in list(sys.modules.items()):
        if name.startswith("hybridlm.kernels.") and module is not None:
            for value in vars(module).values():
                if isinstance(value, Autotuner):
                    value.cache.clear()
