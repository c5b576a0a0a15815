"""Installs from the lock, checks a venv against it, and writes it (stdlib only: it runs before anything is installed).

    python3 requirements/lock.py install --venv .venv --lock requirements/lock-cpu.txt -- -e '.[dev]'
    python3 requirements/lock.py check   --venv .venv --lock requirements/lock-cpu.txt
    python3 requirements/lock.py write   --venv .venv-latest      # `make lock`: both lock files from a tested venv

The lock is a pip constraints file: every distribution of a venv that `make test` passed in, `name==version`. pip
installs exactly those versions (`-c`), and `check` refuses a venv holding anything else. A failed install is reported
as the package and version that could not be had, with the reason pip gave, instead of pip's backtrace.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_LOCK = REPO / "requirements" / "lock-cpu.txt"
CUDA_LOCK = REPO / "requirements" / "lock-cuda.txt"
# PyPI's torch wheels for Linux are the CUDA builds; the CUDA lock is resolved there (metadata only, nothing is
# downloaded but the resolver's metadata).
CUDA_INDEX = "https://pypi.org/simple"
# What differs between the CPU and CUDA locks: torch's build, the triton it pins, and the CUDA libraries it pulls.
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    """PEP 503 normalised name: `Jinja2`, `typing_extensions` and `typing-extensions` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file; `#` comments and blank lines ignored."""
    if not path.is_file():
        sys.exit(f"no lock file {path}: the repository ships requirements/lock-cpu.txt and lock-cuda.txt")
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("===") if "===" in line else line.partition("==")
        if not sep or not version:
            sys.exit(f"{path}:{number}: {line!r} is not `name==version`; regenerate the lock with `make lock`")
        pins[canonical(name)] = version.strip()
    return pins


def venv_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"{venv} has no bin/python: create it with `python3 -m venv {venv}` first")
    return python


def installed(venv: Path) -> dict[str, tuple[str, str]]:
    """{canonical name: (name, version)} of every distribution in the venv except editable ones (hybridlm itself)."""
    out = subprocess.run([str(venv_python(venv)), "-m", "pip", "list", "--format=json", "--exclude-editable",
                          "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    return {canonical(d["name"]): (d["name"], d["version"]) for d in json.loads(out)}


def unsatisfiable_reason(pip_output: str, pins: dict[str, str]) -> str | None:
    """One line saying which locked package and version pip could not install and why, read from pip's output."""
    # A locked version that does not exist here: pip says either "No matching distribution found for X==Y" or, when
    # it had to reconcile that constraint with a requirement, "The user requested (constraint) X==Y" in the conflict.
    missing = re.findall(r"(?:No matching distribution found for|The user requested \(constraint\)) "
                         r"([A-Za-z0-9_.\-]+)===?([^\s;,]+)", pip_output)
    other_python = re.search(r"Package '([^']+)' requires a different Python: (\S+) not in '([^']+)'", pip_output)
    if other_python:
        name, python, wanted = other_python.groups()
        version = pins.get(canonical(name), "?")
        return (f"{name}=={version} (the locked version) requires Python {wanted}; this is Python {python}. Use a "
                f"Python that satisfies {wanted} (the lock was made with the one its header names)")
    if missing:
        name, version = missing[-1]
        ignored = re.search(r"Ignored the following versions that require a different python version: (.+)",
                            pip_output)
        why = (f"its releases need another Python than {platform.python_version()} "
               f"({ignored.group(1).strip()[:200]})" if ignored
               else f"no release of it for Python {platform.python_version()} on {sys.platform} "
                    f"{platform.machine()} on the package indexes pip is configured with")
        hint = (" A CPU machine without a local CPU wheel gets it from PyTorch's index: "
                "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" if canonical(name) == "torch" else "")
        return f"cannot install {name}=={version}, the version the lock pins: {why}.{hint}"
    conflict = re.search(r"Cannot install (.+?) because these package versions have conflicting dependencies",
                         pip_output)
    if conflict:
        return (f"the lock's versions conflict for {conflict.group(1)} (a requirement of the project changed since "
                "the lock was made): regenerate it with `make lock`, then run `make test`")
    return None


def install(venv: Path, lock: Path, pip_args: list[str], log: Path | None = None) -> None:
    pins = read_lock(lock)
    command = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(lock),
               *pip_args]
    proc = subprocess.run(command, capture_output=True, text=True)
    log = log or venv / "pip-install.log"
    log.write_text(f"$ {' '.join(command)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        reason = unsatisfiable_reason(proc.stdout + proc.stderr, pins)
        print(f"install failed: {reason or 'pip could not install ' + ' '.join(pip_args)}\n"
              f"(pip's full output: {log})", file=sys.stderr)
        sys.exit(1)
    if "--dry-run" not in pip_args:
        check(venv, lock)


def check(venv: Path, lock: Path) -> None:
    """Every distribution in the venv is the locked version: nothing newer slipped in, nothing unlocked."""
    pins = read_lock(lock)
    wrong = [f"{name}=={version} (lock: {pins[key]})" for key, (name, version) in installed(venv).items()
             if key in pins and pins[key] != version]
    unlocked = [f"{name}=={version}" for key, (name, version) in installed(venv).items() if key not in pins]
    if wrong or unlocked:
        details = "; ".join(filter(None, [wrong and "not the locked version: " + ", ".join(wrong),
                                          unlocked and "not in the lock: " + ", ".join(unlocked)]))
        sys.exit(f"{venv} does not match {lock}: {details}. A dependency of the project changed "
                 "without the lock: run `make lock` (then `make test`), or `make clean` if the venv was altered by hand")


def header(kind: str, how: str) -> str:
    return (f"# hybridlm's {kind} lock: every distribution `make test` passed with (pip constraints; see README).\n"
            f"# Made {date.today().isoformat()} with Python {platform.python_version()} on {sys.platform} "
            f"{platform.machine()} by `make lock`: {how}.\n")


def write(venv: Path) -> None:
    """The CPU lock from the venv (a fresh one of the newest releases, tested), then the CUDA lock: the same versions
    resolved against PyPI with torch's CUDA build, which brings its own triton and CUDA libraries."""
    python = str(venv_python(venv))
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable",
                             "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    pins = sorted((line for line in freeze.splitlines() if line and "==" in line), key=canonical)
    torch = next((line for line in pins if canonical(line.split("==")[0]) == "torch"), None)
    if torch is None or "+cpu" not in torch:
        sys.exit(f"make lock needs a venv with torch's CPU build (it has {torch}): it freezes the CPU lock and "
                 "resolves the CUDA one from it")
    CPU_LOCK.write_text(header("CPU", f"pip freeze of {venv.name}") + "\n".join(pins) + "\n")
    shared = [line for line in pins if not TORCH_STACK.match(canonical(line.split("==")[0]))]
    torch_version = torch.split("==")[1].split("+")[0]
    with tempfile.TemporaryDirectory() as scratch:
        constraints, report = Path(scratch) / "shared.txt", Path(scratch) / "report.json"
        constraints.write_text("\n".join(shared) + "\n")
        # --isolated: not this machine's pip configuration (its local CPU wheel, its caps), only PyPI.
        subprocess.run([python, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "-q",
                        "--index-url", CUDA_INDEX, "--report", str(report), "-c", str(constraints),
                        f"torch=={torch_version}", "-e", f"{REPO}[dev]"], check=True)
        resolved = json.loads(report.read_text())["install"]
    # torch===: exactly the CUDA build's version string; `==2.13.0` would also admit a local `2.13.0+cpu` wheel.
    cuda = [f"{item['metadata']['name']}{'===' if canonical(item['metadata']['name']) == 'torch' else '=='}"
            f"{item['metadata']['version']}" for item in resolved if canonical(item["metadata"]["name"]) != "hybridlm"]
    # pip, setuptools and wheel are in the venv but no requirement of the project: keep the CPU lock's.
    names = {canonical(line.split("==")[0]) for line in cuda}
    cuda += [line for line in shared if canonical(line.split("==")[0]) not in names]
    CUDA_LOCK.write_text(header("CUDA", f"the CPU lock's versions resolved on {CUDA_INDEX} with "
                                        f"torch=={torch_version}'s CUDA build") + "\n".join(sorted(cuda, key=canonical)) + "\n")
    print(f"wrote {CPU_LOCK.relative_to(REPO)} ({len(pins)} pins) and {CUDA_LOCK.relative_to(REPO)} ({len(cuda)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "check", "write"])
    parser.add_argument("--venv", type=Path, required=True)
    parser.add_argument("--lock", type=Path, help="install / check: the lock file")
    parser.add_argument("--log", type=Path, help="install: where pip's full output goes (default VENV/pip-install.log)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.pip_args = argv[split + 1:]  # install: what to pip install, after `--`
    if args.action != "write" and args.lock is None:
        parser.error(f"{args.action} needs --lock")
    if args.action == "install":
        install(args.venv, args.lock.resolve(), args.pip_args, args.log)
    elif args.action == "check":
        check(args.venv, args.lock.resolve())
    else:
        write(args.venv)


if __name__ == "__main__":
    main()
