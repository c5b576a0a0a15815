"""Every layer and kernel module names, on its first line, the paper (arXiv id) or upstream file it follows (issue 13).
Pure plumbing modules (package __init__, input checks, autotuning policy) have nothing to cite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUMBING = {"__init__.py", "checks.py", "tuning.py"}
MODULES = sorted(p for folder in ("hybridlm/layers", "kernels/gated_delta", "kernels/moe")
                 for p in (ROOT / folder).glob("*.py") if p.name not in PLUMBING)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_starts_with_a_citation(path: Path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# Cites: "), \
        f"{path}: first line must be '# Cites: <paper (arXiv id) or upstream file>'"
    assert re.search(r"arXiv \d{4}\.\d{4,5}|\w+\.py", first_line), \
        f"{path}: no arXiv id or upstream file in {first_line!r}"
