"""The distribution ships every package on disk under its installed name, and the console script works."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def packages_on_disk() -> set[str]:
    found = set()
    for root, installed in (("hybridlm", "hybridlm"), ("kernels", "hybridlm.kernels")):
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / root).parts
            found.add(".".join((installed, *relative)))
    return found


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert packages_on_disk() == listed, "add new packages to [tool.setuptools] packages in pyproject.toml"


def test_kernels_are_importable_as_hybridlm_kernels_only():
    out = subprocess.run(
        [sys.executable, "-c", "import hybridlm.kernels.gated_delta, hybridlm.kernels.moe, importlib.util as u;"
         "print(u.find_spec('kernels') is None or 'hybridlm' not in (u.find_spec('kernels').origin or ''))"],
        capture_output=True, text=True, cwd="/", check=True,
    )
    assert out.stdout.strip() == "True"


def test_console_script_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "hybridlm.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("prepare-data", "export", "generate", "eval"):
        assert command in out.stdout
