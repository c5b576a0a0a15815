"""Running the stock `lm_eval --model hf` CLI on an export, offline, from tests/lm_eval_task (its shipped tasks).

The native formats (qwen3_next, qwen3_5_moe) run with hybridlm made unimportable: plain transformers only. The
`hybridlm` format runs with `--model_args ...,trust_remote_code=True`: its config.json's auto_map names the two shim
files in the export, which import our classes from the installed package. On machines without CUDA, fla is hidden
from transformers too (its Triton kernels need a GPU), so transformers takes its PyTorch paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

TASK_DIR = Path(__file__).resolve().parents[1] / "lm_eval_task"


def run_lm_eval(export_dir: Path, fmt: str, task: str, out_dir: Path, extra_args: list[str] | None = None) -> dict:
    """{"results": the task's metrics, "samples": the logged samples (each with the requests lm-eval sent)}."""
    hidden = [] if fmt == "hybridlm" else ["hybridlm"]
    if not torch.cuda.is_available():
        hidden.append("fla")
    env = dict(os.environ, HIDE_MODULES=",".join(hidden), HF_MODULES_CACHE=str(out_dir / "hf_modules"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(TASK_DIR / "hide_modules"), os.environ.get("PYTHONPATH")])))
    model_args = f"pretrained={export_dir},dtype=float32" + (",trust_remote_code=True" if fmt == "hybridlm" else "")
    command = [shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval")),
               "--model", "hf", "--model_args", model_args, "--tasks", task, "--include_path", ".", "--device", "cpu",
               "--batch_size", "50", "--output_path", str(out_dir), "--log_samples", *(extra_args or [])]
    proc = subprocess.run(command, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out_dir.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    return {"results": results["results"][task], "samples": samples}
