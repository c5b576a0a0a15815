"""The end-to-end benchmark scripts cannot rot: --help, the no-GPU message, and the tiny CPU smoke mode end to end
(JSON with command/date/device/versions, a PNG, Markdown tables). The numbers of a tiny CPU run mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "eval" / "bench"


def run(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", ["train_throughput.py", "decode.py", "plot.py", "../recall.py"])
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
    for key in ("command", "date", "device", "versions"):
        assert report[key], key
    assert report["tiny"] is True
    assert {"torch", "transformers", "hybridlm"} <= set(report["versions"])


def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "train.json"
    proc = run(str(BENCH / "train_throughput.py"), "--device", "cpu", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    check_metadata(report)
    assert [row["impl"] for row in report["transformers"]] == ["hybridlm", "transformers"]
    assert all(row["tokens_per_s"] > 0 for row in report["transformers"])
    hybrid = [row for row in report["crossover"] if row["model"] == "hybrid"]
    attention = [row for row in report["crossover"] if row["model"] == "attention"]
    assert [r["seq_len"] for r in hybrid] == [r["seq_len"] for r in attention] == [32, 64]
    assert set(attention[0]["layer_pattern"]) == {"A"}
    assert abs(attention[0]["parameters"] / hybrid[0]["parameters"] - 1) < 0.05  # equal size within 5 %
    assert out.with_suffix(".png").stat().st_size > 0

    tables = run(str(BENCH / "plot.py"), str(out), "--markdown-only")
    assert tables.returncode == 0, tables.stderr
    assert "| hybridlm |" in tables.stdout and "| attention (A) |" in tables.stdout


def test_decode_smoke_generates_the_same_tokens_as_transformers(tmp_path):
    out = tmp_path / "decode.json"
    proc = run(str(BENCH / "decode.py"), "--device", "cpu", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    check_metadata(report)
    rows = report["results"]
    assert [(r["impl"], r["batch"]) for r in rows] == [("hybridlm", 1), ("transformers", 1), ("hybridlm", 2),
                                                       ("transformers", 2)]
    # Same weights, greedy: our cached decoding and transformers' agree token for token.
    assert all(row["same_tokens"] for row in rows)
    assert out.with_suffix(".png").stat().st_size > 0
