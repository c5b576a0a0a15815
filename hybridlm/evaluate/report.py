"""What every result file records: the command, date, device, versions and git commit, so a number can be
reproduced."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def git_state(directory: str | Path | None = None) -> dict:
    """{"commit": HEAD, "dirty": uncommitted changes to tracked files} of the checkout holding `directory` (default:
    this package's); {"commit": None} outside a git checkout."""
    directory = Path(directory) if directory is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def run_metadata(device: str | None = None, argv: list[str] | None = None) -> dict:
    """command (python + this process's arguments, or `argv` given to a script's main), date, device, versions, git."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        ours = version("hybridlm")
    except PackageNotFoundError:
        ours = "not installed"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "hybridlm": ours}
    # From the installed distributions' metadata: importing fla and transformers only to read a version costs ~9 s.
    for name, distributions in (("transformers", ["transformers"]), ("triton", ["triton"]),
                                ("fla", ["flash-linear-attention", "fla-core"]), ("deepspeed", ["deepspeed"])):
        for distribution in distributions:
            try:
                versions[name] = version(distribution)
                break
            except PackageNotFoundError:
                continue
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else (
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv] if argv is None else ["python", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "versions": versions,
        "git": git_state(),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    """Written to a temporary file beside `path`, then renamed over it: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def finish_report(report: dict, out: str | Path | None, print_table) -> dict:
    """A benchmark's last step: the report marked complete (partial ones were written after every shape), its table
    printed, and the file written when `out` is given."""
    report["complete"] = True
    print_table(report)
    if out:
        write_json(out, report)
        print(f"wrote {out}")
    return report
