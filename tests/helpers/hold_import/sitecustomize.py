"""On PYTHONPATH (tests/test_slurm_units.py): holds a Python program at its first import of a module, so a test
can signal it while it is still importing.

HYBRIDLM_TEST_HOLD_IMPORT=MODULE:DIR
    the first `import MODULE` creates DIR/held, then waits (up to 120 s) until DIR/go exists before importing.
"""

import os
import sys
import time
from pathlib import Path

HOLD_TIMEOUT_S = 120


class _HoldImport:
    def __init__(self, module: str, directory: Path):
        self.module, self.directory = module, directory

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)  # once
        (self.directory / "held").write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not (self.directory / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return None  # the normal finders import it


if spec := os.environ.get("HYBRIDLM_TEST_HOLD_IMPORT"):
    module, _, directory = spec.partition(":")
    sys.meta_path.insert(0, _HoldImport(module, Path(directory)))
