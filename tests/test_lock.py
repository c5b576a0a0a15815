"""The lock (requirements/lock-*.txt): the environment the tests run in is exactly the locked one, the CUDA lock is the
same set with torch's CUDA build, and a lock this machine cannot satisfy is reported by package and version."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LOCK_SCRIPT = REPO / "requirements" / "lock.py"
sys.path.insert(0, str(LOCK_SCRIPT.parent))
import lock  # noqa: E402  (requirements/lock.py: a script, not part of the package)

VENV = Path(sys.prefix)


def run_lock(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOCK_SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_the_test_environment_is_the_locked_one():
    """`make test` installs from the lock and checks it; this proves the venv the tests run in has no other version."""
    if not (VENV / ".installed").exists():
        pytest.skip(f"{VENV} was not installed by `make` from the lock")
    lock_file = lock.CUDA_LOCK if torch.version.cuda else lock.CPU_LOCK
    proc = run_lock("check", "--venv", str(VENV), "--lock", str(lock_file))
    assert proc.returncode == 0, proc.stderr


def test_cuda_lock_is_the_cpu_lock_with_torch_s_cuda_build():
    cpu, cuda = lock.read_lock(lock.CPU_LOCK), lock.read_lock(lock.CUDA_LOCK)
    assert cpu["torch"].endswith("+cpu") and cuda["torch"] == cpu["torch"].removesuffix("+cpu")
    assert "===" in next(line for line in lock.CUDA_LOCK.read_text().splitlines() if line.startswith("torch"))
    # PyPI's torch 2.13.0 pins its triton; the CPU build leaves triton to us.
    assert cuda["triton"] != cpu["triton"] or cuda["torch"] != "2.13.0"
    stack = {name for name in cuda if lock.TORCH_STACK.match(name)}
    assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= stack
    shared = set(cpu) - {name for name in cpu if lock.TORCH_STACK.match(name)}
    assert {name: cpu[name] for name in shared} == {name: cuda[name] for name in shared}
    assert {"pip", "setuptools", "wheel", "transformers", "kernels", "datatrove", "deepspeed", "lm-eval"} <= shared


def test_a_venv_off_the_lock_is_named(tmp_path):
    pins = lock.read_lock(lock.CPU_LOCK)
    (tmp_path / "lock.txt").write_text("".join(f"{name}=={version}\n" for name, version in pins.items()
                                               if name not in ("tqdm", "numpy")) + "numpy==0.1\n")
    proc = run_lock("check", "--venv", str(VENV), "--lock", str(tmp_path / "lock.txt"))
    assert proc.returncode == 1
    assert "not the locked version: numpy==" in proc.stderr and "(lock: 0.1)" in proc.stderr
    unlocked = proc.stderr.split("not in the lock: ", 1)[1]
    assert "tqdm==" in unlocked.split(". ")[0] and "make lock" in proc.stderr


def fake_wheel(directory: Path, name: str, version: str, requires_python: str) -> None:
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nRequires-Python: {requires_python}\n"
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist_info}/METADATA", metadata)
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")


@pytest.mark.parametrize("case", ["no release", "newer python"])
def test_an_unsatisfiable_lock_names_the_package_and_version(tmp_path, case):
    """As on a machine with an old Python: one line naming what could not be installed, not pip's backtrace."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "lockprobe", "1.0", ">=3.99" if case == "newer python" else ">=3")
    (tmp_path / "lock.txt").write_text("lockprobe==1.0\n" if case == "newer python" else "lockprobe==2.0\n")
    proc = run_lock("install", "--venv", str(VENV), "--lock", str(tmp_path / "lock.txt"), "--log",
                    str(tmp_path / "pip-install.log"), "--", "--dry-run",
                    "--ignore-installed", "--no-index", "--find-links", str(wheels), "lockprobe")
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()
    assert len(message) == 2 and "Traceback" not in proc.stderr, proc.stderr
    if case == "newer python":
        assert "lockprobe==1.0" in message[0] and "requires Python >=3.99" in message[0]
    else:
        assert "cannot install lockprobe==2.0" in message[0]
    assert "pip-install.log" in message[1]
