"""Compile every gated delta rule kernel ahead of time, without a GPU, for sm_80, sm_89, sm_90 and sm_100, and check
what the real compiler makes of it: no register spills (at K = V = 128 and 256, bf16, every config the autotuner
offers on that architecture: its pruning is keyed on the device's compute capability), shared memory within the
architecture's limit, and 64-bit address arithmetic from the program ids on (per-chunk state offsets pass 2^31 at
long context).

The CPU interpreter runs kernels as Python, so it sees none of it. This compiles with Triton's NVIDIA backend and
reads registers / stack / shared memory from the cubin (see aot.py), 16-byte aligned pointers as in a real launch.
"""

from __future__ import annotations

import json
import re

import aot
import pytest

from hybridlm.kernels.arch import max_shared_bytes

# Stack bytes per thread a config may use: spills would be far larger (the monolithic backward kernel had 1-3 KB).
MAX_STACK_BYTES = 0
# Before Hopper the output-gradient and WY-gradient kernels spill at every config (triton_common's
# fewest_spills_before_hopper; measured at most 192 and 720 bytes): bounded so that it cannot grow unseen.
PRE_HOPPER_STACK_BYTES = {"output_grads": 256, "wy_backward": 768}
HEAD_DIMS = (128, 256)

# Pointer dtypes of a bf16 training call (raw gates, L2 norm); everything not listed is bf16.
_FP32 = {"Ainv", "Ainv_out", "q_rnorm", "k_rnorm", "q_rnorm_out", "k_rnorm_out", "x_rnorm", "initial_state",
         "final_state", "d_final_state", "d_initial_state", "dq_out", "dk_out", "dk", "dx_heads", "dgate_partial",
         "dgate_out", "dbeta_out", "dA_log_partial", "a", "A_log", "dt_bias", "b", "g", "beta"}
_FP64 = {"G", "G_out"}
_INT32 = {"cu_seqlens", "chunk_indices", "chunk_offsets"}
_SCALARS = {"scale": "fp32", "factor": "fp32"}


def _param_type(name: str) -> str:
    if name in _SCALARS:
        return _SCALARS[name]
    if name.startswith("stride_") or name in ("T", "NT", "H", "HV", "tokens", "NUM_K_BLOCKS"):
        return "i32"
    if name in _FP64:
        return "*fp64"
    if name in _FP32:
        return "*fp32"
    if name in _INT32:
        return "*i32"
    return "*bf16"


def gdn_kernels(K: int):
    """(name, autotuned kernel, constexprs) of every GDN kernel as a bf16 varlen training / decoding call uses it."""
    from hybridlm.kernels.gated_delta import backward, forward, recurrent
    from hybridlm.kernels.gated_delta.chunk import K_BLOCK, tile_size

    common = dict(K=K, V=K, BT=64, L2NORM=True, IS_VARLEN=True, DOT_PRECISION="tf32")
    k_block, k_tile = min(K_BLOCK, tile_size(K)), tile_size(K)
    raw = dict(GATE_FROM_RAW=True, HAS_DT_BIAS=True, BETA_FROM_RAW=True)
    return [
        ("prepare_wy", forward.prepare_wy_kernel,
         dict(common, **raw, BK=k_block, FOR_BACKWARD=True)),
        ("state_forward", forward.state_forward_kernel,
         dict(common, BK=k_tile, HAS_INITIAL_STATE=True, STORE_FINAL_STATE=True)),
        ("output", forward.output_kernel, dict(common, BK=k_block)),
        ("local_dv", backward.local_dv_kernel, dict(common, BK=k_block)),
        ("state_backward", backward.state_backward_kernel,
         dict(common, BK=k_tile, HAS_D_FINAL_STATE=True, STORE_D_INITIAL_STATE=True)),
        ("output_grads", backward.output_grads_kernel, dict(common, BK=k_block)),
        ("wy_backward", backward.wy_backward_kernel, dict(common, **raw, BK=k_block)),
        ("qk_grads", backward.qk_grads_kernel, dict(K=K, BK=k_tile, L2NORM=True)),
        ("recurrent", recurrent.recurrent_kernel,
         dict(K=K, V=K, BK=k_tile, **raw, L2NORM=True, HAS_INITIAL_STATE=True, STORE_FINAL_STATE=True,
              IS_VARLEN=True)),
    ]


def autotune_configs(kernel, K: int, arch: int):
    """The configs the autotuner would time for head dims K = V on sm_`arch` (after its pruning)."""
    prune = kernel.early_config_prune
    return prune(kernel.configs, {}, K=K, V=K, arch=arch) if prune else kernel.configs


def compile_config(kernel, constexprs: dict, config, arch: int):
    """Compile one config for sm_`arch`; returns (compiled kernel, {"regs", "stack", "smem"})."""
    compiled = aot.compile_for(kernel, dict(constexprs, **config.kwargs), _param_type, arch, config.num_warps,
                               config.num_stages)  # fmt: skip
    (usage,) = aot.cuobjdump(compiled, "-res-usage")
    return compiled, {**aot.registers_and_stack(usage), "smem": compiled.metadata.shared}


_PROGRAM_ID = re.compile(r"(%[\w.#]+) = tt\.get_program_id")


def narrow_program_id_uses(ttir: str) -> list[str]:
    """TTIR lines that use a program id other than to sign-extend it to i64 (i32 index arithmetic)."""
    ids = _PROGRAM_ID.findall(ttir)
    bad = []
    for line in ttir.splitlines():
        if "tt.get_program_id" in line:
            continue
        used = [pid for pid in ids if re.search(re.escape(pid) + r"\b", line)]
        if used and not re.search(r"arith\.extsi .* : i32 to i64", line):
            bad.append(line.strip())
    return bad


def check_all_kernels(arch: int) -> list[dict]:
    """Compiles every kernel and offered config for sm_`arch`; returns one row per compile, and raises on the first
    violation."""
    rows = []
    for K in HEAD_DIMS:
        for name, kernel, constexprs in gdn_kernels(K):
            for config in autotune_configs(kernel, K, arch):
                compiled, usage = compile_config(kernel, constexprs, config, arch)
                row = dict(arch=arch, kernel=name, K=K, config=str(config), **usage)
                rows.append(row)
                print(json.dumps(row), flush=True)
                max_stack = PRE_HOPPER_STACK_BYTES.get(name, MAX_STACK_BYTES) if arch < 90 else MAX_STACK_BYTES
                where = f"sm_{arch} {name} K=V={K} {config}"
                assert usage["stack"] <= max_stack, f"{where}: {usage['stack']} B of stack spills"
                assert usage["smem"] <= max_shared_bytes(arch), f"{where}: {usage['smem']} B of shared memory"
                narrow = narrow_program_id_uses(compiled.asm["ttir"])
                assert not narrow, f"{name}: program ids used in i32 arithmetic: {narrow[:3]}"
    return rows


def check_pruning_follows_the_device():
    """Without an explicit arch the pruning asks the driver for the device's: an sm_80 device is never offered the
    configs that spill there, an sm_90 one keeps them."""
    from hybridlm.kernels.gated_delta import forward

    kernel, offered = forward.output_kernel, {}
    for arch in (80, 90):
        aot.pretend_device_arch(arch)
        offered[arch] = {(c.kwargs["BV"], c.num_warps) for c in kernel.early_config_prune(kernel.configs, {}, K=128)}
    assert offered[80] == {(64, 4), (64, 8)}, offered
    assert (32, 8) in offered[90] and (32, 4) not in offered[90], offered


def test_narrow_program_id_uses_finds_i32_offsets():
    """The TTIR check itself: it flags an i32 multiply of a program id and accepts a sign extension."""
    ttir = """
    %pid = tt.get_program_id x : i32
    %0 = arith.muli %pid, %c16384_i32 : i32
    %pid_1 = tt.get_program_id y : i32
    %1 = arith.extsi %pid_1 : i32 to i64
    """
    assert narrow_program_id_uses(ttir) == ["%0 = arith.muli %pid, %c16384_i32 : i32"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", aot.ARCHS)
def test_gated_delta_kernels_compile_without_spills_and_with_64_bit_offsets(arch):
    pytest.importorskip("triton.backends.nvidia")
    aot.run_without_interpreter(__file__, "check_all_kernels", globals(), arch)


def test_autotuner_pruning_follows_the_device_architecture():
    pytest.importorskip("triton.backends.nvidia")
    aot.run_without_interpreter(__file__, "check_pruning_follows_the_device", globals())
