"""The end-to-end benchmark scripts cannot rot: --help, the no-GPU message, and the tiny CPU smoke mode end to end
(JSON with command/date/device/versions, a PNG, Markdown tables). The numbers of a tiny CPU run mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "eval" / "bench"


def run(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "script", ["train_throughput.py", "decode.py", "moe_ep.py", "plot.py", "context_parallel.py",
               "../mqar_gdn_vs_hybrid.py",
               "../deepconf_arithmetic.py"]
)
def test_help_works_without_a_gpu(script):
    proc = run(str(BENCH / script), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
@pytest.mark.parametrize("script", ["train_throughput.py", "decode.py"])
def test_full_run_without_cuda_explains_itself(script):
    proc = run(str(BENCH / script))
    assert proc.returncode != 0
    assert "no CUDA GPU is visible" in proc.stderr
    proc = run(str(BENCH / script), "--device", "cpu")
    assert "add --tiny" in proc.stderr


def check_metadata(report: dict) -> None:
    for key in ("command", "date", "device", "versions", "git"):
        assert report[key], key
    assert report["tiny"] is True and report["complete"] is True
    assert {"torch", "transformers", "hybridlm"} <= set(report["versions"])


@pytest.mark.slow  # two gloo ranks on CPU, two model builds and steps: ~70 s on a busy 2-core box
def test_context_parallel_smoke(tmp_path):
    out = tmp_path / "cp.json"
    proc = run(str(BENCH / "context_parallel.py"), "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["benchmark"] == "context_parallel"
    assert [(row["seq_len"], row["context_parallel"]) for row in report["results"]] == [(256, 1), (256, 2)]
    assert all(row["tokens_per_s_per_gpu"] > 0 and row["world_size"] == 2 for row in report["results"])


@pytest.mark.slow  # both suites, the twin, five experts implementations: 12 s idle, ~50 s on a busy 2-core box
def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "train.json"
    proc = run(str(BENCH / "train_throughput.py"), "--device", "cpu", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    check_metadata(report)
    rows = {(row["impl"], row["data"]): row for row in report["transformers"]}
    assert list(rows) == [("hybridlm", "packed"), ("hybridlm", "rows"), ("transformers", "packed"),
                          ("transformers", "rows")]
    assert rows["hybridlm", "packed"]["tokens_per_s"] > 0 and rows["transformers", "rows"]["tokens_per_s"] > 0
    assert report["documents"]["segments"] > rows["hybridlm", "packed"]["batch"]  # several documents per row
    # Without fla (hidden on CPU) transformers cannot keep packed documents apart, and says so.
    assert "flash-linear-attention" in rows["transformers", "packed"]["error"]
    kernels = report["transformers_kernels"]
    chunk = kernels["functions"]["torch_chunk_gated_delta_rule"]
    assert chunk == "torch fallback" or chunk.startswith("unknown: "), chunk
    assert {"eager", "grouped_mm", "batched_mm"} <= set(kernels["experts_implementations"])
    probed = {p["experts_implementation"]: p for p in kernels["experts_probes"]}
    assert set(probed) == set(kernels["experts_implementations"])
    fastest = min((p for p in probed.values() if p.get("step_s")), key=lambda p: p["step_s"])
    assert kernels["experts_implementation"] == fastest["experts_implementation"]
    assert rows["transformers", "rows"]["experts_implementation"] == fastest["experts_implementation"]
    assert report["hybridlm_kernels"] == {"gdn": "torch", "moe": "torch", "attention": "sdpa"}
    hybrid = [row for row in report["crossover"] if row["model"] == "hybrid"]
    attention = [row for row in report["crossover"] if row["model"] == "attention"]
    assert [r["seq_len"] for r in hybrid] == [r["seq_len"] for r in attention] == [32, 64]
    assert set(attention[0]["layer_pattern"]) == {"A"}
    assert abs(attention[0]["parameters"] / hybrid[0]["parameters"] - 1) < 0.05  # equal size within 5 %
    assert out.with_suffix(".png").stat().st_size > 0

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-results:begin -->\nold table\n<!-- bench-results:end -->\nrest\n")
    tables = run(str(BENCH / "plot.py"), str(out), "--markdown-only", "--readme", str(readme))
    assert tables.returncode == 0, tables.stderr
    assert "| hybridlm | packed |" in tables.stdout and "| attention (A) |" in tables.stdout
    updated = readme.read_text()
    assert "old table" not in updated and "| hybridlm | packed |" in updated
    assert updated.startswith("intro\n") and updated.endswith("<!-- bench-results:end -->\nrest\n")


@pytest.mark.slow  # 3 spawned ranks importing torch and DeepSpeed: ~40 s on a busy 2-core box
def test_moe_ep_smoke_times_every_phase_at_ep_1_and_2(tmp_path):
    """eval/bench/moe_ep.py --smoke: EP = 1 and 2 on gloo, every phase timed, every dispatched row accounted for."""
    out = tmp_path / "moe_ep.json"
    proc = run(str(BENCH / "moe_ep.py"), "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for key in ("command", "date", "device", "versions", "git"):
        assert report[key], key
    assert report["smoke"] is True and report["complete"] is True
    tokens, hidden, experts, top_k = (report[k] for k in ("tokens_per_rank", "hidden", "experts", "top_k"))
    assert [row["ep"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert "error" not in row, f"{row}\n{proc.stderr[-4000:]}"
        assert set(row["ms"]) == {"layer", "routing", "dispatch", "experts", "combine", "all_to_all"}
        assert all(ms > 0 for ms in row["ms"].values()), row
        assert row["experts_per_rank"] == experts // row["ep"]
        assert row["rows_total"] == row["ep"] * tokens * top_k  # dropless: every (token, slot) row dispatched
        assert row["max_rel_diff_vs_all_experts"] <= 1e-5  # fp32: the sharded layer is the whole layer
        # out and back, forward and backward, fp32
        assert row["all_to_all_mib_per_rank"] * 2**20 == 4 * tokens * top_k * hidden * 4
    assert "layer ms" in proc.stdout
    if not torch.cuda.is_available():
        proc = run(str(BENCH / "moe_ep.py"))
        assert proc.returncode != 0 and "no CUDA GPU visible" in proc.stderr


def test_packed_batches_follow_train_py_and_transformers_formats():
    """The benchmark's data: rows cut by hybridlm.data.packing (what train.py's loader gives the model) and the
    same tokens in transformers' flattened packed format."""
    sys.path.insert(0, str(BENCH))
    try:
        import train_throughput
    finally:
        sys.path.remove(str(BENCH))
    batch = train_throughput.packed_batch(vocab_size=50, seq_len=32, batch=3, mean_doc_tokens=10)
    ids, cu = batch["input_ids"], batch["cu_seqlens"].long()
    assert ids.shape == (3, 32) and int(cu[-1]) == 96 and set(range(0, 96, 32)) <= set(cu.tolist())
    starts = torch.zeros(96, dtype=torch.bool)
    starts[cu[:-1]] = True
    assert torch.equal(batch["position_ids"].reshape(-1) == 0, starts)  # positions restart at each document
    theirs = train_throughput.transformers_packed(batch)
    assert torch.equal(theirs["input_ids"], ids.reshape(1, -1))
    assert torch.equal(theirs["labels"][0] == -100, starts)  # no target across a document start
    assert theirs["max_length_q"] == int(torch.diff(cu).max())
    long = train_throughput.packed_batch(vocab_size=50, seq_len=32, batch=3, mean_doc_tokens=None)
    assert long["cu_seqlens"].tolist() == [0, 32, 64, 96]  # the crossover's rows: one segment each


def test_run_all_is_valid_bash_and_needs_a_gpu():
    assert "eval/bench/moe_ep.py" in (BENCH / "run_all.sh").read_text()
    script = BENCH / "run_all.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if not torch.cuda.is_available():
        proc = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHON": sys.executable})
        assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr
    proc = subprocess.run(["bash", str(script), "--fast"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument: --fast" in proc.stderr


@pytest.mark.parametrize("chunk", ["0", "16"])
def test_decode_smoke_generates_the_same_tokens_as_transformers(tmp_path, chunk):
    """One-pass and chunked prefill, the same way on both sides."""
    out = tmp_path / "decode.json"
    proc = run(str(BENCH / "decode.py"), "--device", "cpu", "--tiny", "--prefill-chunk", chunk, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    check_metadata(report)
    assert report["prefill_chunk"] == int(chunk)
    conv_update = report["kernels"]["transformers"]["functions"]["causal_conv1d_update"]
    assert conv_update == "torch fallback" or conv_update.startswith("unknown: "), conv_update
    rows = report["results"]
    assert [(r["impl"], r["batch"]) for r in rows] == [("hybridlm", 1), ("transformers", 1), ("hybridlm", 2),
                                                       ("transformers", 2)]
    # Same weights, greedy: our cached decoding and transformers' agree token for token.
    assert all(row["same_tokens"] for row in rows)
    assert all(row["prefill_s"] > 0 and row["decode_s"] > 0 and "decode_peak_memory_gib" in row for row in rows)
    assert out.with_suffix(".png").stat().st_size > 0


def test_gpu_kit_lists_its_three_steps_within_the_12_minute_budget(capsys):
    sys.path.insert(0, str(BENCH))
    import gpu_kit

    assert gpu_kit.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["test_gpu", "doctor", "benchmarks"]
    assert "make test-gpu PYTEST_ARGS=--junitxml=eval/bench/results/test_gpu_" in lines[0]
    assert "-m hybridlm.cli doctor model=gpu_1b --json eval/bench/results/doctor_" in lines[1]
    assert lines[2].endswith("eval/bench/run_all.sh")
    plan = gpu_kit.steps(sys.executable, "h100", long=False)
    assert sum(limit for _, limit, _ in plan) <= gpu_kit.BUDGET_S == 720
    assert lines[3] == "total: at most 720 s (12.0 min); results in eval/bench/results/"
    one_gpu = {name: limit for name, limit, _ in plan}
    several = {name: limit for name, limit, _ in gpu_kit.steps(sys.executable, "h100", long=False, gpus=8)}
    assert several["benchmarks"] == one_gpu["benchmarks"] + 240  # run_all.sh's moe_ep.py
    if not torch.cuda.is_available():
        assert gpu_kit.main([]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_kit_step_limit_kills_a_silent_step_and_records_it(tmp_path):
    sys.path.insert(0, str(BENCH))
    import gpu_kit

    with (tmp_path / "log").open("w") as log:
        slow = gpu_kit.run_step("silent", 1, [sys.executable, "-c", "import time; time.sleep(30)"], log)
        quick = gpu_kit.run_step("quick", 30, [sys.executable, "-c", "print('done')"], log)
    assert slow["timed_out"] and not slow["ok"] and slow["seconds"] < 10
    assert quick == {**quick, "ok": True, "exit": 0, "timed_out": False}
    assert "=== silent: time limit" in (tmp_path / "log").read_text() and "done" in (tmp_path / "log").read_text()


def test_transformers_kernel_detection_reads_the_wrappers_or_says_unknown(monkeypatch):
    """The benchmark's record of which kernels transformers calls: read from the installed transformers' kernel
    wrappers (fla's kernels when fla imports, as here), and "unknown: <why>" instead of a crash when a release wraps
    its functions differently."""
    import importlib.util

    import transformers.models.qwen3_next.modeling_qwen3_next as qwen3_next

    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH / "e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    functions = e2e.transformers_kernels()["functions"]
    assert set(functions) == set(e2e.TRANSFORMERS_KERNEL_FUNCTIONS)
    assert functions["torch_chunk_gated_delta_rule"] == "fla.ops.gated_delta_rule.chunk.chunk_gated_delta_rule"
    assert not any(value.startswith("unknown") for value in functions.values()), functions

    monkeypatch.setattr(qwen3_next, "causal_conv1d_fn", lambda x: x)  # a release without the fallback wrapper
    monkeypatch.delattr(qwen3_next, "causal_conv1d_update")
    functions = e2e.transformers_kernels()["functions"]
    assert functions["causal_conv1d_fn"].startswith("unknown: ") and "closure" in functions["causal_conv1d_fn"]
    assert functions["causal_conv1d_update"].startswith("unknown: ") and "has no" in functions["causal_conv1d_update"]
    assert functions["torch_chunk_gated_delta_rule"].startswith("fla.")
