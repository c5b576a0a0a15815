"""Training through a REAL one-node Slurm cluster (slurmctld + slurmd + munged started here; see helpers/).

- the multi-node sbatch template (run with --nodes=1) trains 2 CPU ranks (gloo, ZeRO 2, expert parallel 2: the
  templates and the submitit preset pass parallel.expert_parallel_size through) to completion, and its srun hands
  each rank the job's --cpus-per-task;
- a one-node template job signalled mid-run (USR1 to its batch shell, which forwards it to the ranks; then a second
  USR1 while the save is held open) saves once, requeues itself, resumes and ends with the uninterrupted run's exact
  final loss;
- `train.py -m hydra/launcher=slurm` submits one 2-rank job per sweep point and both leave checkpoints; the one
  signalled mid-run requeues through submitit and resumes.

Needs root (installs Debian's slurm packages when missing) or an installed Slurm. As root (CI) a Slurm that cannot
be installed or started fails the tests; otherwise they skip with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.launch import tiny_run
from helpers.slurm_cluster import SlurmCluster, start_test_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 40
CPUS_PER_TASK = 2
# The 8-GPU template shrunk to this 2-core machine: command-line options override its #SBATCH lines.
CPU_JOB = ["--ntasks-per-node=2", "--gpus-per-node=0", f"--cpus-per-task={CPUS_PER_TASK}", "--time=10"]
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    # 8 CPUs declared on this 2-core machine: the two sweep jobs (2 ranks x 2 CPUs each) run side by side.
    cluster = start_test_cluster(tmp_path_factory.mktemp("slurm"), cpus=8)
    # Jobs run `python` from the venv running the tests, one thread per rank (ranks outnumber cores here).
    cluster.env["PATH"] = f"{Path(sys.executable).parent}:{cluster.env['PATH']}"
    # SLURM_EXACT: a job step gets only the CPUs it asks for (as under the task binding of real clusters), so its
    # CPU count shows whether srun was given the job's --cpus-per-task.
    cluster.env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", SLURM_EXACT="1")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tiny(data_cache) -> list[str]:
    """Overrides for a tiny CPU run (every layer kind, 64-token rows) that logs every step, in ZeRO 2 with its MoE
    experts sharded over the job's 2 ranks."""
    # 8 rows per step: slow enough (~0.2 s a step) that a signal sent after step 2 lands mid-run.
    return tiny_run(data_cache) + [
        f"trainer.max_steps={MAX_STEPS}", "deepspeed=zero2", "deepspeed.micro_batch_size=8",
        "parallel.expert_parallel_size=2",
    ]  # fmt: skip


def _submit_template(slurm: SlurmCluster, template: str, out_dir: Path, overrides: list[str], *options: str,
                     env: dict[str, str] | None = None) -> str:  # fmt: skip
    return slurm.sbatch(
        *CPU_JOB, *options, f"--output={out_dir}.log", f"slurm/{template}", f"trainer.out_dir={out_dir}", *overrides,
        cwd=REPO, env=env,
    )  # fmt: skip


def _step_cpus(slurm: SlurmCluster, job_id: str) -> int:
    """CPUs of the job's first srun step (`scontrol show step JOB.0`); the job must be running it."""
    job = slurm.job_info(job_id)["JobId"]  # the numeric id, also for an array task such as 12_0
    out = subprocess.run(["scontrol", "show", "step", f"{job}.0", "--oneliner"], env=slurm.env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return int(re.search(r"\bCPUs=(\d+)", out).group(1))


def _metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]  # a line being written is not one yet


def _wait_for_step(out_dir: Path, step: int, still_running, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Poll metrics.jsonl closely until `step` is logged; `still_running()` raises if the job went wrong."""
    deadline = time.monotonic() + timeout_s
    last_check = 0.0
    while not any(r["step"] >= step for r in _metrics(out_dir)):
        assert time.monotonic() < deadline, f"no step {step} in {out_dir} after {timeout_s} s"
        if time.monotonic() - last_check > 2:
            still_running()
            last_check = time.monotonic()
        time.sleep(0.02)


def _final(records: list[dict], key: str) -> float:
    """The last value of `key` logged at the last step (a resumed run may log a step twice: the later counts)."""
    return [r[key] for r in records if r["step"] == MAX_STEPS and key in r][-1]


def _checkpoint_steps(out_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out_dir / "checkpoints").glob("step_*"))


def _task_pids(slurm: SlurmCluster, job_id: str) -> list[int]:
    """PIDs of the job's srun tasks on this node (`scontrol listpids`: PID JOBID STEPID LOCALID GLOBALID)."""
    result = subprocess.run(["scontrol", "listpids", job_id], env=slurm.env, capture_output=True, text=True)
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    return [int(row[0]) for row in rows if len(row) == 5 and row[2] != "batch" and row[3].isdigit()]


def _assert_completed(slurm: SlurmCluster, job_id: str, info: dict, log: Path) -> None:
    details = f"{info}\n--- job log ---\n{log.read_text()[-6000:] if log.exists() else '(none)'}\n{slurm.logs()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", details


@pytest.fixture(scope="module")
def uninterrupted_run(slurm, tiny, tmp_path_factory):
    """The multi-node template on one node; its step's CPUs are checked while it runs."""
    out_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    job_id = _submit_template(slurm, "train_multinode.sbatch", out_dir, tiny, "--nodes=1")

    def still_running():
        assert slurm.job_info(job_id)["JobState"] in ("PENDING", "RUNNING"), Path(f"{out_dir}.log").read_text()

    _wait_for_step(out_dir, 1, still_running)
    step_cpus = _step_cpus(slurm, job_id)
    info = slurm.wait(job_id, JOB_TIMEOUT_S)
    _assert_completed(slurm, job_id, info, Path(f"{out_dir}.log"))
    return out_dir, info, step_cpus


def test_multinode_template_on_one_node_trains_two_gloo_ranks_to_completion(uninterrupted_run):
    out_dir, info, step_cpus = uninterrupted_run
    log = Path(f"{out_dir}.log").read_text()
    assert "2 rank(s) on cpu, ZeRO 2, expert parallel 2 (2 experts per rank)" in log
    engine_dir = out_dir / "checkpoints" / f"step_{MAX_STEPS:08d}" / "engine"
    assert (engine_dir / "layer_0_expert_1_mp_rank_00_model_states.pt").is_file()  # rank 1's experts saved
    assert f"{CPUS_PER_TASK} CPUs per task" in log
    assert step_cpus == 2 * CPUS_PER_TASK  # srun passed --cpus-per-task on (SRUN_CPUS_PER_TASK); else 1 per rank
    assert info["Restarts"] == "0"
    records = _metrics(out_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, MAX_STEPS + 1))
    assert _final(records, "loss") < records[0]["loss"]
    assert _checkpoint_steps(out_dir) == [MAX_STEPS]


def _python_with_preemption_hooks(directory: Path) -> Path:
    """An executable for the templates' PYTHON that runs train.py through tests/helpers/preemption_hooks.py."""
    wrapper = directory / "python-with-preemption-hooks"
    hooks = REPO / "tests" / "helpers" / "preemption_hooks.py"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{hooks}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_signalled_job_saves_requeues_resumes_and_matches_the_uninterrupted_run(slurm, tiny, uninterrupted_run):
    reference_dir, _, _ = uninterrupted_run
    out_dir = reference_dir.parent / "preempted"
    log = Path(f"{out_dir}.log")
    save_held = reference_dir.parent / "preempted-save-held"
    hooks = {"PYTHON": str(_python_with_preemption_hooks(reference_dir.parent)),
             "HYBRIDLM_TEST_HOLD_PREEMPTION_SAVE": str(save_held)}  # fmt: skip
    job_id = _submit_template(slurm, "train_1node.sbatch", out_dir, tiny, env=hooks)

    def still_running():
        assert slurm.job_info(job_id)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-6000:]

    _wait_for_step(out_dir, 2, still_running)  # mid-run: a few steps done, most to go
    # Slurm's warning to the batch shell (what --signal=B:USR1@300 sends); its trap forwards it to every rank ...
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm.env, check=True)
    # ... and a second one while the save is held open on rank 0 (every rank's files written, not yet published).
    # Sent to the task PIDs directly: scancel retries a job that is being requeued until it runs again, and would hit
    # the restarted job.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not save_held.exists():
        assert time.monotonic() < deadline, log.read_text()[-6000:]
        time.sleep(0.02)
    for pid in _task_pids(slurm, job_id):
        os.kill(pid, signal.SIGUSR1)
    info = slurm.wait(job_id, JOB_TIMEOUT_S)
    _assert_completed(slurm, job_id, info, log)

    text = log.read_text()
    assert "batch shell got SIGUSR1: forwarding it to the tasks" in text, text[-6000:]
    assert "[test hook] checkpoint save held: 2 signal(s) caught before publishing" in text, text[-6000:]
    assert "rank 0: 2 signal(s) caught" in text and "rank 1: 2 signal(s) caught" in text, text[-6000:]
    assert info["Restarts"] == "1", text[-6000:]
    stopped = sorted(set(_checkpoint_steps(out_dir)) - {MAX_STEPS})
    assert len(stopped) == 1 and 2 <= stopped[0] < MAX_STEPS, (stopped, text[-6000:])
    assert f"resumed from {out_dir / 'checkpoints' / f'step_{stopped[0]:08d}'} at step {stopped[0]}" in text
    preempted, reference = _metrics(out_dir), _metrics(reference_dir)
    # Exact on CPU fp32: same data order, RNG and optimizer state after the resume as without the interruption.
    assert _final(preempted, "loss") == _final(reference, "loss")
    assert _final(preempted, "val_loss") == _final(reference, "val_loss")


def test_hydra_submitit_multirun_runs_a_job_per_sweep_point_and_requeues_a_signalled_one(slurm, tiny, tmp_path):
    """Two sweep points, two ranks each; point 0 gets submitit's signal mid-run, requeues through submitit's
    checkpoint protocol (Hydra reruns the same job) and resumes; the multirun ends once both jobs have finished."""
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "train.py", "-m", "hydra/launcher=slurm",
        "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null", "hydra.launcher.tasks_per_node=2",
        f"hydra.launcher.cpus_per_task={CPUS_PER_TASK}", "hydra.launcher.timeout_min=10",
        "hydra.launcher.max_num_timeout=1",
        f"trainer.out_dir={sweep_dir}",  # the sweep's root; point N trains in sweep_dir/N
        *tiny, "optim.lr=1e-3,2e-3",
    ]  # fmt: skip
    output = tmp_path / "multirun.log"
    with output.open("w") as out:
        multirun = subprocess.Popen(command, cwd=REPO, env=slurm.env, stdout=out, stderr=subprocess.STDOUT)
    def still_running():
        assert multirun.poll() is None, output.read_text()[-5000:]

    try:
        _wait_for_step(sweep_dir / "0", 2, still_running)
        (job_id,) = [p.name for p in (sweep_dir / ".submitit").glob("*_0")]  # array job: <array id>_<point>
        step_cpus = _step_cpus(slurm, job_id)
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm.env, check=True)  # submitit's signal
        multirun.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if multirun.poll() is None:
            multirun.kill()
            multirun.wait()
    job_logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(sweep_dir.glob(".submitit/*/*.out")))
    details = f"{output.read_text()[-3000:]}\n{job_logs}\n{slurm.logs()}"
    assert multirun.returncode == 0, details
    assert step_cpus == 2 * CPUS_PER_TASK, details  # the preset's setup line passes --cpus-per-task on to srun
    # submitit returns once every rank has written its result; the jobs themselves end just after.
    for point in (0, 1):
        info = slurm.wait(f"{job_id.rsplit('_', 1)[0]}_{point}", JOB_TIMEOUT_S)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{details}"

    for point, lr in enumerate(("0.001", "0.002")):
        run_dir = sweep_dir / str(point)
        assert _checkpoint_steps(run_dir)[-1] == MAX_STEPS, details
        config = (run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}" / "config.yaml").read_text()
        assert f"lr: {lr}" in config
        (rank0_log,) = sweep_dir.glob(f".submitit/*_{point}/*_{point}_0_log.out")
        assert "2 rank(s) on cpu, ZeRO 2, expert parallel 2" in rank0_log.read_text(), details
    assert slurm.job_info(job_id)["Restarts"] == "1", details
    stopped = _checkpoint_steps(sweep_dir / "0")[:-1]
    assert len(stopped) == 1 and 2 <= stopped[0] < MAX_STEPS, (stopped, details)
    point0_output = next(sweep_dir.glob(".submitit/*_0/*_0_0_log.out")).read_text()
    assert f"resumed from {sweep_dir / '0' / 'checkpoints' / f'step_{stopped[0]:08d}'}" in point0_output
