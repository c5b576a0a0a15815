"""The trainer's start-up kernel check (trainer.kernel_check) and determinism mode (trainer.deterministic).

On a CPU the check runs our Triton kernels in the interpreter (fp32) when the backends name them; a kernel returning
wrong values stops the run before step 1, naming the op and the fix. Two deterministic runs give bitwise-equal losses
(the CUDA twin is marked gpu)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.launch import REPO, read_metrics, tiny_run, train

from hybridlm.train.determinism import make_deterministic

KERNEL_BACKENDS = ["model.gdn.backend=triton", "model.moe.backend=triton"]
KERNEL_OPS = ["gdn.chunk fwd+bwd", "gdn.decode step", "moe.router fwd+bwd", "moe.permutation",
              "moe.experts+combine fwd+bwd", "moe.path fwd+bwd"]


def test_kernels_checked_in_the_interpreter_then_two_deterministic_runs_give_bitwise_equal_losses(data_cache, tmp_path):
    overrides = tiny_run(data_cache) + KERNEL_BACKENDS + ["trainer.max_steps=3", "trainer.deterministic=true"]
    first, second = tmp_path / "first", tmp_path / "second"
    result = train(first, overrides)
    report = json.loads((first / "kernel_check.json").read_text())
    assert report["ok"] and report["dtype"] == "fp32" and report["failed_ranks"] == 0
    # Every op the model runs as a kernel, and only those: attention on a CPU is the SDPA reference.
    assert [r["op"] for r in report["results"]] == KERNEL_OPS
    for r in report["results"]:
        assert r["status"] == "pass" and r["kernel"] and not r["on_gpu"] and "interpreter" in r["implementation"]
    assert "kernels run on the CPU only (Triton interpreter, eager FlexAttention), not on a GPU: gdn" in result.stdout
    assert result.stdout.index("kernel check") < result.stdout.index("step 1/3")

    train(second, overrides + ["trainer.kernel_check=false"])
    assert not (second / "kernel_check.json").exists()
    losses = [[record["loss"] for record in read_metrics(run).values()] for run in (first, second)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]  # floats from JSON: equal means bitwise equal


def test_a_broken_kernel_stops_the_run_before_step_1_naming_the_fix(data_cache, tmp_path):
    out_dir = tmp_path / "run"
    overrides = tiny_run(data_cache) + ["model.gdn.backend=triton", "trainer.max_steps=3"]
    result = train(out_dir, overrides, prefix=[REPO / "tests" / "helpers" / "broken_kernel.py"], check=False)
    assert result.returncode != 0
    assert "KernelCheckFailed: kernel check failed on this rank before step 1; nothing was trained. " \
           "Fix: model.gdn.backend=fla or model.gdn.backend=torch." in result.stderr
    assert "FAIL" in result.stderr and "gdn.chunk fwd+bwd" in result.stderr
    assert "step 1/" not in result.stdout and not (out_dir / "metrics.jsonl").exists()
    report = json.loads((out_dir / "kernel_check.json").read_text())
    assert not report["ok"]
    assert {r["op"]: r["status"] for r in report["results"]} == {"gdn.chunk fwd+bwd": "FAIL", "gdn.decode step": "pass"}


def test_deterministic_mode_sets_torch_cublas_and_triton(monkeypatch):
    for name in ("CUBLAS_WORKSPACE_CONFIG", "TRITON_CACHE_AUTOTUNING"):
        monkeypatch.delenv(name, raising=False)
    make_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        make_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.gpu
def test_two_deterministic_runs_on_cuda_give_bitwise_equal_losses(data_cache, tmp_path):
    """bf16 on the GPU, our kernels (backend auto), compiled FlexAttention, the kernel check first."""
    overrides = tiny_run(data_cache) + ["trainer.max_steps=5", "trainer.deterministic=true"]
    for name in ("first", "second"):
        train(tmp_path / name, overrides)
    assert json.loads((tmp_path / "first" / "kernel_check.json").read_text())["ok"]
    losses = [[r["loss"] for r in read_metrics(tmp_path / name).values()] for name in ("first", "second")]
    assert len(losses[0]) == 5 and losses[0] == losses[1]


def test_the_checks_autotuning_choices_are_forgotten_before_training():
    """The check times our kernels at small shapes; training must not keep those choices (keys leave out T)."""
    from triton.runtime.autotuner import Autotuner

    from hybridlm.kernels.gated_delta import backward
    from hybridlm.kernels.moe import grouped_gemm
    from hybridlm.train.kernel_check import forget_autotuning

    tuners = [backward.state_backward_kernel, grouped_gemm._expert_rows_gemm_kernel]
    assert all(isinstance(tuner, Autotuner) for tuner in tuners)
    for tuner in tuners:
        tuner.cache[("a key",)] = tuner.configs[0]
    forget_autotuning()
    assert all(not tuner.cache for tuner in tuners)
