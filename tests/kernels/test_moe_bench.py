"""eval/bench/moe.py: argument checking, and a smoke run whose output agrees with transformers' grouped_mm path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

BENCH_PATH = Path(__file__).resolve().parents[2] / "eval" / "bench" / "moe.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("moe_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_are_parsed_and_checked():
    bench = load_bench()
    assert bench.parse_args(["--shapes", "8,16,8,4,2"]).shapes == [(8, 16, 8, 4, 2)]
    assert len(bench.parse_args([]).shapes) == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "8,16,8,4,5"])  # top_k > experts


@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs CUDA or the interpreter"
)
def test_smoke_run_matches_transformers_and_writes_json(tmp_path):
    bench = load_bench()
    out = tmp_path / "moe.json"
    report = bench.main(["--smoke", "--shapes", "24,32,16,4,2", "--impls", "ours", "hf_grouped", "--out", str(out)])
    row = report["results"][0]
    assert row["ours"]["ms"] > 0 and row["hf_grouped"]["ms"] > 0 and row["speedup_vs_hf_grouped"] > 0
    # Same weights: our kernels agree with transformers' experts implementation (fp32 on CPU, bf16 on a GPU).
    assert row["max_rel_diff_vs_hf_grouped"] <= (1e-5 if report["dtype"] == "float32" else 5e-2)
    assert out.read_text().startswith("{")
