"""Ahead-of-time compilation for NVIDIA GPUs without one, shared by the kernel compile tests: A100 (sm_80), L40S /
RTX 4090 (sm_89), H100 / H200 (sm_90) and B200 (sm_100), all that Triton 3.9's bundled ptxas (12.9, with
ptxas-blackwell for sm_100) targets.

Compiles through Triton's NVIDIA backend and reads the cubin with the bundled cuobjdump. Launch
specialisation is imitated as a real call gets it: pointers (and the `aligned_ints` named) divisible by 16. The
interpreter replaces `triton.jit` at import time, so under TRITON_INTERPRET=1 `run_without_interpreter` runs the
compilation in a child process with the interpreter off.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


ARCHS = (80, 89, 90, 100)
# The SASS opcode family of each architecture's tensor-core instruction: mma.sync, wgmma, tcgen05.mma.
MMA_OPCODE = {80: "HMMA", 89: "HMMA", 90: "GMMA", 100: "UTCHMMA"}


def compile_for(fn, constexprs: dict, param_type: Callable[[str], str], arch: int = 90, num_warps: int = 4,
                num_stages: int = 3, aligned_ints=()):  # fmt: skip
    """Compile the jit function `fn` (or an autotuner's) for sm_`arch` with `param_type(name)` for every argument
    that is not in `constexprs`; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else param_type(n) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n] != "constexpr" and (signature[n].startswith("*") or n in aligned_ints)}  # fmt: skip
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def pretend_device_arch(arch: int) -> None:
    """Make Triton's active driver report an sm_`arch` device, what the autotuners' pruning asks (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    class Device:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    triton.runtime.driver.set_active(Device())


def cuobjdump(compiled, *flags: str) -> list[str]:
    """cuobjdump's output for each of `flags` (e.g. -res-usage, -sass) on the compiled kernel's cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return [subprocess.run([str(tool), flag, str(cubin)], capture_output=True, text=True, check=True).stdout
                for flag in flags]  # fmt: skip


def registers_and_stack(res_usage: str) -> dict:
    """{"regs", "stack"} per thread from cuobjdump -res-usage (stack bytes: spills, for kernels without local
    arrays)."""
    found = re.search(r"REG:(\d+) STACK:(\d+)", res_usage)
    assert found, f"no resource usage in cuobjdump output: {res_usage[-2000:]}"
    return {"regs": int(found.group(1)), "stack": int(found.group(2))}


def run_without_interpreter(test_file: str, function: str, namespace: dict, *args):
    """Call `function(*args)` of the test module `test_file` (its __file__) with TRITON_INTERPRET off: in this
    process when it is already off (`namespace`: that module's globals), else in a child process (`args` as reprs)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return namespace[function](*args)
    path = Path(test_file).resolve()
    code = f"import sys; sys.path.insert(0, {str(path.parent)!r}); import {path.stem} as t; t.{function}(*{args!r})"
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"},
                           capture_output=True, text=True)  # fmt: skip
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-4000:]
