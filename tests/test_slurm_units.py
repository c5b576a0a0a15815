"""Preemption handling and Slurm -> torch.distributed environment, without a cluster (CPU).

The trainer's own reaction is tested through train.py: a signal during start-up exits before training with nothing
saved; a signal mid-run and a second one held inside the save (tests/helpers/preemption_hooks.py) give one complete
checkpoint from which a resumed run ends exactly as an uninterrupted one. The real-cluster counterparts (sbatch,
submitit, requeue after a signal) are in test_slurm_cluster.py.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.distributed import run_distributed_test
from helpers.launch import REPO, read_metrics, tiny_run, train, train_command, train_env

from hybridlm.checkpoint.layout import complete_checkpoints
from hybridlm.train.distributed import TORCH_ENV_KEYS, export_torch_env_from_scheduler, job_master_port
from hybridlm.train.preemption import PreemptionHandler, parse_signal

SLURM_ENV_PREFIXES = ("SLURM_", "SUBMITIT_")


@pytest.fixture
def clean_env(monkeypatch):
    """No torchrun, Slurm or submitit variables from the machine running the tests; the whole environment is put
    back afterwards, including the variables the code under test sets (a leaked RANK would hang later tests)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key in TORCH_ENV_KEYS or key == "LOCAL_WORLD_SIZE" or key.startswith(SLURM_ENV_PREFIXES):
            del os.environ[key]
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def _fake_scontrol(tmp_path: Path, monkeypatch, body: str) -> Path:
    """An `scontrol` first on PATH that appends its arguments to calls.txt, then runs `body`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    calls = tmp_path / "calls.txt"
    script.write_text(f'#!/bin/bash\necho "$@" >> {calls}\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


# --- signal names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SIGUSR1", "USR1", "usr1", " SIGUSR1 "])
def test_parse_signal_accepts_slurm_and_python_spellings(name):
    assert parse_signal(name) is signal.SIGUSR1


@pytest.mark.parametrize("name", ["SIGUSR3", "", "SIGKILL", "9"])
def test_parse_signal_rejects_unknown_or_uncatchable_names(name):
    with pytest.raises(ValueError, match="not a catchable signal name"):
        parse_signal(name)


def test_bad_signal_name_fails_before_any_handler_is_installed():
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(ValueError, match="SIGUSR9"):
        PreemptionHandler(["SIGUSR1", "SIGUSR9"]).install()
    assert signal.getsignal(signal.SIGUSR1) is before


# --- the handler -------------------------------------------------------------------------------------------------


def test_signals_only_set_the_flag_and_uninstall_restores_previous_handlers(clean_env):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    handler = PreemptionHandler(["SIGUSR1", "SIGTERM"]).install()
    try:
        assert not handler.agree()
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest with the default handler
        assert handler.requested and handler.received is signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.agree() and handler.received is signal.SIGTERM  # the first signal is kept
    finally:
        handler.uninstall()
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


# --- the trainer: signals during start-up, mid-run and during the save ---------------------------------------------

HOOKS = [REPO / "tests" / "helpers" / "preemption_hooks.py"]
MAX_STEPS = 12


@pytest.fixture(scope="module")
def run_overrides(data_cache) -> list[str]:
    # 8 rows per step: slow enough (~0.2 s a step) that a signal sent after step 1 lands mid-run.
    return tiny_run(data_cache) + [f"trainer.max_steps={MAX_STEPS}", "deepspeed.micro_batch_size=8"]


def test_signal_while_building_the_data_exits_before_training_with_nothing_saved(run_overrides, tmp_path):
    out_dir = tmp_path / "run"
    result = train(out_dir, run_overrides, prefix=HOOKS, env={"HYBRIDLM_TEST_SIGNAL_DURING": "data"})
    assert "[preemption] SIGUSR1 during start-up (data): nothing trained" in result.stdout, result.stdout[-3000:]
    assert "not under Slurm; exiting" in result.stdout  # the requeue step of a plain process
    assert not (out_dir / "metrics.jsonl").exists() and not (out_dir / "checkpoints").exists()


def test_signal_while_train_py_still_imports_torch_requeues_instead_of_killing(run_overrides, tmp_path):
    """The first seconds of a job are imports (torch, DeepSpeed, transformers): train.py records the signal from its
    first line, and the trainer acts on it once it is up, as on any start-up signal (without: exit -10)."""
    out_dir, hold = tmp_path / "run", tmp_path / "hold"
    hold.mkdir()
    env = train_env({"HYBRIDLM_TEST_HOLD_IMPORT": f"torch:{hold}",
                     "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "helpers" / "hold_import"),
                                                    os.environ.get("PYTHONPATH", "")])})
    proc = subprocess.Popen(train_command(out_dir, run_overrides), cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (hold / "held").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (hold / "held").exists(), "train.py never reached `import torch`"
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)  # delivered while the import is held
        (hold / "go").touch()
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "[preemption] SIGUSR1 during start-up (data): nothing trained" in output, output[-3000:]
    assert "not under Slurm; exiting" in output
    assert not (out_dir / "metrics.jsonl").exists() and not (out_dir / "checkpoints").exists()


def test_start_up_recorder_hands_signals_to_the_handler_and_gives_back_the_others(clean_env):
    """What record_signals_during_start_up() caught before the trainer's handler existed: a watched signal counts
    as caught; one the run does not watch gets its old handler back and is raised again."""
    from hybridlm.train import preemption

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    got_usr2 = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: got_usr2.append(signum))
    try:
        preemption.record_signals_during_start_up(["SIGUSR1", "SIGUSR2"])
        os.kill(os.getpid(), signal.SIGUSR1)  # would end pytest with the default handler
        os.kill(os.getpid(), signal.SIGUSR2)
        assert got_usr2 == []  # only recorded
        handler = PreemptionHandler(["SIGUSR1"]).install()
        try:
            assert handler.requested and handler.received is signal.SIGUSR1 and handler.signals_caught == 1
            assert got_usr2 == [signal.SIGUSR2]  # back to its own handler, and delivered
        finally:
            handler.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous[signal.SIGUSR1]  # not the recorder
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def test_signal_while_loading_the_checkpoint_exits_before_training_and_keeps_it(run_overrides, tmp_path):
    out_dir = tmp_path / "run"
    train(out_dir, run_overrides + ["trainer.stop_at_step=3"])
    before = (out_dir / "metrics.jsonl").read_text()
    result = train(out_dir, run_overrides, prefix=HOOKS, env={"HYBRIDLM_TEST_SIGNAL_DURING": "checkpoint"})
    assert "during start-up (model, engine and checkpoint): nothing trained" in result.stdout, result.stdout[-3000:]
    assert [path.name for path in complete_checkpoints(out_dir)] == ["step_00000003"]
    assert (out_dir / "metrics.jsonl").read_text() == before  # not one more step


def test_signal_mid_run_and_again_during_the_save_then_resume_matches_the_uninterrupted_run(run_overrides, tmp_path):
    reference_dir, out_dir = tmp_path / "reference", tmp_path / "preempted"
    train(reference_dir, run_overrides)
    held = tmp_path / "save-held"
    command = train_command(out_dir, run_overrides, prefix=HOOKS)
    log = tmp_path / "preempted.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                                   env=train_env({"HYBRIDLM_TEST_HOLD_PREEMPTION_SAVE": str(held)}))  # fmt: skip
    try:
        metrics = out_dir / "metrics.jsonl"
        _wait_until(lambda: metrics.exists() and "\n" in metrics.read_text(), process, log)  # step 1 is logged
        process.send_signal(signal.SIGUSR1)  # the scheduler's warning, mid-run
        _wait_until(held.exists, process, log)  # every rank has written the checkpoint; not yet published
        process.send_signal(signal.SIGUSR1)  # a second warning during the save
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "[test hook] checkpoint save held: 2 signal(s) caught before publishing" in text, text[-3000:]
    (stopped,) = complete_checkpoints(out_dir)
    assert 1 <= int(stopped.name.removeprefix("step_")) < MAX_STEPS
    resumed = train(out_dir, run_overrides)
    assert f"resumed from {stopped}" in resumed.stdout
    expected, got = read_metrics(reference_dir), read_metrics(out_dir)
    assert got[MAX_STEPS]["loss"] == expected[MAX_STEPS]["loss"]  # exact: CPU fp32, same data, RNG and optimizer state
    assert read_metrics(out_dir, "val_loss")[MAX_STEPS] == read_metrics(reference_dir, "val_loss")[MAX_STEPS]


@pytest.mark.slow
def test_local_launcher_preset_runs_a_two_point_sweep_of_two_rank_jobs(data_cache, tmp_path):
    """`-m hydra/launcher=local` (submitit_local): each sweep point is a 2-rank job whose ranks find each other
    through submitit's environment (hybridlm.train.distributed) and train in trainer.out_dir/N."""
    sweep_dir = tmp_path / "sweep"
    overrides = tiny_run(data_cache) + ["trainer.max_steps=4"]
    command = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2",
               f"trainer.out_dir={sweep_dir}", *overrides, "optim.lr=1e-3,2e-3"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=600)
    job_logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(sweep_dir.glob(".submitit/**/*.out")))
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}\n{job_logs}"
    for point, lr in enumerate(("0.001", "0.002")):
        (final,) = complete_checkpoints(sweep_dir / str(point))
        assert final.name == "step_00000004"
        assert f"lr: {lr}" in (final / "config.yaml").read_text()
        assert sorted(p.name for p in final.glob("trainer_state_rank*.pt")) == [
            "trainer_state_rank0.pt", "trainer_state_rank1.pt"]  # fmt: skip
    assert job_logs.count("2 rank(s) on cpu") == 2, job_logs  # printed by rank 0 of each job


def _wait_until(ready, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def test_empty_signal_list_watches_nothing(clean_env):
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler([""]) as handler:
        assert handler.signals == []
        assert signal.getsignal(signal.SIGUSR1) is before


def _agree_worker(rank: int, world_size: int, flagged_rank: int) -> tuple[bool, bool, bool]:
    handler = PreemptionHandler(["SIGUSR1"]).install()
    before = handler.agree()
    if rank == flagged_rank:
        os.kill(os.getpid(), signal.SIGUSR1)
    return before, handler.agree(), handler.requested


def test_agree_stops_every_rank_when_one_rank_was_signalled():
    results = run_distributed_test(_agree_worker, world_size=2, func_args=(1,))
    assert results == [(False, True, False), (False, True, True)]


# --- requeue -----------------------------------------------------------------------------------------------------


RUNNING_JOB = 'if [ "$1" = show ]; then echo "JobId=4242 JobName=train JobState=RUNNING Reason=None"; fi'


def test_requeue_in_an_sbatch_job_runs_scontrol_requeue_on_rank_0_and_exits(tmp_path, clean_env):
    calls = _fake_scontrol(tmp_path, clean_env, RUNNING_JOB)
    clean_env.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(SystemExit) as exit_info:
        PreemptionHandler(["SIGUSR1"]).requeue()
    assert exit_info.value.code == 0
    assert calls.read_text().splitlines() == ["show job --oneliner 4242", "requeue 4242"]


def test_cancelled_job_is_not_requeued(tmp_path, clean_env, capsys):
    """`scancel` sends SIGTERM too: with SIGTERM watched, a cancelled job saves but must not come back."""
    calls = _fake_scontrol(tmp_path, clean_env, 'echo "JobId=4242 JobState=COMPLETING Reason=None"')
    clean_env.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(SystemExit):
        PreemptionHandler(["SIGTERM"]).requeue()
    assert calls.read_text().splitlines() == ["show job --oneliner 4242"]
    assert "COMPLETING, not RUNNING" in capsys.readouterr().out


def test_requeue_on_other_ranks_leaves_scontrol_to_rank_0(tmp_path, clean_env):
    calls = _fake_scontrol(tmp_path, clean_env, "exit 0")
    clean_env.setenv("SLURM_JOB_ID", "4242")
    clean_env.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        PreemptionHandler(["SIGUSR1"]).requeue()
    assert not calls.exists()


def test_failed_requeue_says_why_and_how_to_continue(tmp_path, clean_env):
    refuse = 'if [ "$1" = requeue ]; then echo "Requested operation is presently disabled" >&2; exit 1; fi'
    _fake_scontrol(tmp_path, clean_env, f"{RUNNING_JOB}\n{refuse}")
    clean_env.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(RuntimeError, match=r"presently disabled.*sbatch --requeue.*trainer.resume=auto"):
        PreemptionHandler(["SIGUSR1"]).requeue()


def test_requeue_outside_slurm_only_exits(clean_env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        PreemptionHandler(["SIGUSR1"]).requeue()
    assert exit_info.value.code == 0
    assert "trainer.resume=auto" in capsys.readouterr().out


class _ResubmittableJob:
    """Stands for Hydra's submitit launcher: submitit calls checkpoint() to get the resubmission it pickles."""

    def __call__(self):
        return "done"

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def test_under_submitit_its_signal_is_taken_over_and_requeue_runs_its_protocol(tmp_path, clean_env):
    from submitit.core.job_environment import JobEnvironment, SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths

    requeued = []

    class FakeSlurmEnvironment:
        global_rank = 0

        def _requeue(self, countdown):  # the real one runs `scontrol requeue`
            requeued.append(countdown)

    delayed = DelayedSubmission(_ResubmittableJob())
    delayed.set_timeout(timeout_min=60, max_num_timeout=3)
    paths = JobPaths(tmp_path, job_id="77", task_id=0)
    submitit_signal = JobEnvironment._usr_sig()
    submitit_handler = SignalHandler(FakeSlurmEnvironment(), paths, delayed)
    previous = signal.signal(submitit_signal, submitit_handler.checkpoint_and_try_requeue)
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    try:
        handler = PreemptionHandler(["SIGUSR1"]).install()
        os.kill(os.getpid(), submitit_signal)  # submitit's own handler would exit right here, mid-step
        assert handler.requested and handler.received is submitit_signal
        with pytest.raises(SystemExit):
            handler.requeue()
        handler.uninstall()
        assert signal.getsignal(submitit_signal) == submitit_handler.checkpoint_and_try_requeue
    finally:
        signal.signal(submitit_signal, previous)
    assert requeued == [3]  # a preemption, not a time-out: no requeue used up
    assert DelayedSubmission.load(paths.submitted_pickle).result() == "done"


# --- torch.distributed variables from Slurm / submitit -----------------------------------------------------------


def test_variables_already_set_by_torchrun_or_the_template_are_left_alone(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_PROCID", "5")
    assert export_torch_env_from_scheduler() == "environment"
    assert os.environ["RANK"] == "3"


def test_srun_task_gets_rank_world_and_master_from_slurm(tmp_path, clean_env):
    calls = _fake_scontrol(tmp_path, clean_env, 'printf "gpu07\\ngpu08\\n"')
    clean_env.setenv("SLURM_JOB_ID", "123456")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    assert export_torch_env_from_scheduler() == "slurm"
    assert {key: os.environ[key] for key in TORCH_ENV_KEYS} == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert calls.read_text().strip() == "show hostnames gpu[07-08]"


def test_batch_script_outside_srun_is_not_mistaken_for_rank_0(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "9")
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "8")
    assert export_torch_env_from_scheduler() is None
    assert "RANK" not in os.environ


def test_submitit_task_gets_its_variables_from_submitit(clean_env):
    for key, value in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="77", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
                           SLURM_NODEID="1", SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_STEP_ID="0",
                           SLURM_JOB_NODELIST="node[3-4]", MASTER_PORT="29123").items():  # fmt: skip
        clean_env.setenv(key, value)
    assert export_torch_env_from_scheduler() == "submitit"
    assert {key: os.environ[key] for key in TORCH_ENV_KEYS} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node3",
        "MASTER_PORT": "29123",
    }


def test_job_master_port_is_stable_per_job_and_in_range():
    assert job_master_port("123") == job_master_port("123") != job_master_port("124")
    assert all(20000 <= job_master_port(str(job)) < 40000 for job in (1, 19999, 20000, 10**9))
    assert job_master_port("55_3") == job_master_port("55")

