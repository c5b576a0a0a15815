"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd started from a temp dir, stopped by PID.

Installs Debian's `slurmctld slurmd slurm-client munge` when they are missing (needs root). Nothing outside the temp
dir is written: the daemons get their own munge socket, ports, state, spool and logs, and clients find the cluster
through `SLURM_CONF` (in `cluster.env`). Starts in about 7 s without systemd or cgroups.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; tests skip with this message."""


def ensure_slurm_installed(timeout_s: float = 300) -> None:
    """apt-get install the Slurm packages when a binary is missing; SlurmUnavailable when that is impossible."""
    if all(shutil.which(name) for name in SLURM_BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed and installing {' '.join(SLURM_PACKAGES)} needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *SLURM_PACKAGES]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(command)}` took longer than {timeout_s} s") from None
        if result.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(command)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        raise SlurmUnavailable(f"installed {SLURM_PACKAGES} but {missing} are still not on PATH")


def start_test_cluster(root: Path, cpus: int | None = None) -> SlurmCluster:
    """A started cluster for a test fixture: as root (CI) a Slurm that cannot be installed or started fails the test,
    otherwise it skips with the reason."""
    import pytest

    try:
        ensure_slurm_installed()
        return SlurmCluster(root, cpus=cpus).start()
    except SlurmUnavailable as err:
        if os.geteuid() == 0:
            pytest.fail(f"no Slurm cluster although running as root: {err}")
        pytest.skip(f"no Slurm cluster (not root): {err}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """One node (this machine) in one partition `debug`; jobs run as the calling user (root in CI)."""

    def __init__(self, root: Path, cpus: int | None = None):
        """`cpus`: CPUs to declare for the node instead of the machine's own (more lets small jobs share cores)."""
        self.root = Path(root)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        # Jobs inherit this environment (sbatch --export=ALL); variables of an enclosing Slurm job must not leak in.
        outer = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_"))}
        self.env = dict(outer, SLURM_CONF=str(self.conf))
        self._daemons: dict[str, subprocess.Popen] = {}

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        for sub in ("munge", "state", "spool", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        self._write_munge_key()
        self._write_conf()
        try:
            self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={self.root / 'munge' / 'munge.key'}",
                                   f"--log-file={self.root / 'logs' / 'munged.log'}",
                                   f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                                   f"--seed-file={self.root / 'munge' / 'munged.seed'}"])  # fmt: skip
            self._wait_for(lambda: self.munge_socket.exists(), timeout_s, "munged to open its socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait_for(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, timeout_s,
                           "slurmctld to answer `scontrol ping`")  # fmt: skip
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_for(self._node_idle, timeout_s, f"node {self.node} to become idle")
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel and drain the cluster's jobs, then SIGTERM each daemon we started (newest first), SIGKILL any that
        is still there after 10 s. Daemons stopped under a running job would strand its slurmstepd for good."""
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            self._drain_jobs(timeout_s=60)
        for name, proc in reversed(list(self._daemons.items())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons.clear()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- jobs ------------------------------------------------------------------------------------------------------

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit (`sbatch --parsable ARGS`) and return the job id."""
        result = self._run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); finished jobs stay for MinJobAge."""
        out = self._run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout_s: float) -> dict[str, str]:
        """Wait until the job is in a final state; its `scontrol show job` fields. TimeoutError names the state."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s} s:\n{self.logs()}")
            time.sleep(1)

    def _drain_jobs(self, timeout_s: float) -> None:
        jobs = self._run(["squeue", "--noheader", "--format=%i"], check=False).stdout.split()
        if jobs:
            self._run(["scancel", *jobs], check=False)
        deadline = time.monotonic() + timeout_s
        while self._run(["squeue", "--noheader"], check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)

    def logs(self, tail_chars: int = 3000) -> str:
        """The end of each daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "logs").glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-tail_chars:]}")
        return "\n".join(parts)

    # --- internals -------------------------------------------------------------------------------------------------

    def _write_munge_key(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def _write_conf(self) -> None:
        hardware = self._run(["slurmd", "-C"]).stdout.splitlines()[0]  # NodeName=... CPUs=... RealMemory=...
        hardware = re.sub(r"^NodeName=\S+", f"NodeName={self.node}", hardware)
        if self.cpus is not None:  # accepted with SlurmdParameters=config_overrides below
            hardware = re.sub(r"CPUs=\d+ Boards=\S+ SocketsPerBoard=\S+ CoresPerSocket=\S+ ThreadsPerCore=\S+",
                              f"CPUs={self.cpus}", hardware)  # fmt: skip
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        root = self.root
        self.conf.write_text(
            f"""ClusterName=hybridlm-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
# Our own munge socket; short credential lifetime so a requeued job can restart after ~11 s instead of 120.
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "logs" / "slurmctld.log"}
SlurmdLogFile={root / "logs" / "slurmd.log"}
# No systemd or cgroups needed.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
KillWait=5
SlurmdParameters=config_overrides
MinJobAge=600
InactiveLimit=0
{hardware} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.stdout", "wb")
        self._daemons[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _node_idle(self) -> bool:
        result = self._run(["sinfo", "--noheader", "--format=%T", "--nodes", self.node], check=False)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                           f"{self._daemon_output(name)}\n{self.logs()}")  # fmt: skip
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out after {timeout_s} s waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)

    def _daemon_output(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.stdout").read_text(errors="replace")[-3000:]

    def _run(self, command: list[str], check: bool = True, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        result = subprocess.run(command, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result
