"""What to run first on a machine with a GPU, in one command (at most 12 minutes on one H100/H200):

    python eval/bench/gpu_kit.py            # or: make gpu-kit
    python eval/bench/gpu_kit.py --dry-run  # list the steps, their time limits and the budget; run nothing

1. `make test-gpu`: every test marked gpu (bf16 kernels against float64, against fla, compiled FlexAttention, decode
   kernels, deterministic training), with a JUnit report;
2. `hybridlm doctor model=gpu_1b`: every op of the GPU preset at its own dims in bf16 against float64;
3. `eval/bench/run_all.sh`: every benchmark (about 8 minutes by its own limits), its plots and tables.

Each step runs under its own time limit (their sum is the budget, so the kit never takes longer), and a step that
fails or times out does not stop the next. Everything lands in eval/bench/results/: the steps' own files
(test_gpu_<gpu>.xml, doctor_<gpu>.json, the benchmarks' JSON/PNG/README.md), the whole output in gpu_kit.log, and
gpu_kit_<gpu>.json with the device, versions, date, git commit and each step's exit status and seconds. Commit that
folder afterwards. The exit status is non-zero if any step failed or timed out.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "eval" / "bench" / "results"
BUDGET_S = 12 * 60


def steps(python: str, tag: str, long: bool, gpus: int = 1) -> list[tuple[str, int, list[str]]]:
    """(name, time limit in seconds, command); the limits add up to at most BUDGET_S on one GPU (without --long).
    With several GPUs run_all.sh also runs the expert-parallel benchmark (4 minutes more)."""
    results = RESULTS.relative_to(REPO)
    return [
        # 32 GPU tests, the largest 266K tokens (marked slow): compile + autotune dominate; each test at most 120 s.
        ("test_gpu", 150, ["make", "test-gpu",
                           f"PYTEST_ARGS=--junitxml={results}/test_gpu_{tag}.xml --timeout=120 -p no:cacheprovider"]),
        # Compiles and autotunes every kernel the preset uses once (the training start-up check pays the same).
        ("doctor", 60, [python, "-m", "hybridlm.cli", "doctor", "model=gpu_1b", "--json",
                        f"{results}/doctor_{tag}.json"]),
        # run_all.sh's own limits: 180 + 90 + 90 + 50 + 50 + 30 s (+ 4 min with --long, + 4 min for moe_ep.py
        # on a node with >= 2 GPUs), plus its start-up.
        ("benchmarks", 510 + (240 if long else 0) + (240 if gpus >= 2 else 0),
         ["eval/bench/run_all.sh", *(["--long"] if long else [])]),
    ]


def run_step(name: str, limit: int, command: list[str], log) -> dict:
    log.write(f"=== {name} (limit {limit}s): {' '.join(command)}\n")
    log.flush()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHON": sys.executable}, start_new_session=True)
    # The limit holds even for a step that stops printing: a timer kills its whole process group.
    timer = threading.Timer(limit, os.killpg, (process.pid, signal.SIGKILL))
    timer.start()
    for line in process.stdout:  # line by line to the console and the log, so a long step shows its progress
        sys.stdout.write(line)
        log.write(line)
    status = process.wait()
    timed_out = not timer.is_alive() and status != 0
    timer.cancel()
    seconds = time.perf_counter() - started
    log.write(f"=== {name}: {'time limit' if timed_out else f'exit {status}'} after {seconds:.0f}s\n")
    log.flush()
    return {"name": name, "command": command, "limit_s": limit, "seconds": round(seconds, 1), "exit": status,
            "timed_out": timed_out, "ok": status == 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the steps and the budget; run nothing")
    parser.add_argument("--long", action="store_true", help="run_all.sh --long (the 32K and 64K crossover points)")
    args = parser.parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    tag = "<gpu>"  # the GPU's short name (e2e.device_tag) on a GPU
    if on_gpu:
        sys.path.insert(0, str(REPO / "eval" / "bench"))
        import e2e

        tag = e2e.device_tag("cuda")
    plan = steps(sys.executable, tag, args.long, torch.cuda.device_count())
    total = sum(limit for _, limit, _ in plan)
    if args.dry_run:
        for name, limit, command in plan:
            print(f"{name:<11} at most {limit:4d} s  {' '.join(command)}")
        print(f"total: at most {total} s ({total / 60:.1f} min); results in {RESULTS.relative_to(REPO)}/")
        return 0
    if not on_gpu:
        print("gpu_kit.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run lists its steps",
              file=sys.stderr)
        return 1
    from hybridlm.evaluate.report import run_metadata, write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "gpu_kit.log").open("w") as log:
        results = [run_step(name, limit, command, log) for name, limit, command in plan]
    summary = write_json(RESULTS / f"gpu_kit_{tag}.json", {**run_metadata("cuda", argv=sys.argv), "budget_s": total,
                                                            "steps": results})
    failed = [r["name"] for r in results if not r["ok"]]
    print(f"gpu kit: {len(results) - len(failed)} of {len(results)} steps ok; summary {summary.relative_to(REPO)}"
          + (f"; failed or timed out: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
