"""eval/bench/moe.py: argument checking, and a smoke run whose output agrees with transformers' grouped_mm path."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from hybridlm.evaluate.report import git_state

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
    argv = ["--smoke", "--shapes", "24,32,16,4,2", "--impls", "ours", "hf_grouped", "--out", str(out)]
    report = bench.main(argv)
    row = report["results"][0]
    assert row["ours"]["ms"] > 0 and row["hf_grouped"]["ms"] > 0 and row["speedup_vs_hf_grouped"] > 0
    # Same weights: our kernels agree with transformers' experts implementation (fp32 on CPU, bf16 on a GPU).
    assert row["max_rel_diff_vs_hf_grouped"] <= (1e-5 if report["dtype"] == "float32" else 5e-2)
    # Saved for backward by ours, fp32: logits [T,E], ids, weights, 2 permutations [T*k], counts [E], pre [T*k, 2I].
    tokens, experts, pairs, intermediate = 24, 4, 48, 16
    expected_bytes = 4 * (tokens * experts + 4 * pairs + experts + pairs * 2 * intermediate)
    assert row["ours"]["saved_mib"] * 2**20 == pytest.approx(expected_bytes)
    assert row["hf_grouped"]["saved_mib"] > 0
    assert (row["ours"]["peak_mib"] is None) == (not torch.cuda.is_available())
    written = json.loads(out.read_text())
    assert written["command"] == "python eval/bench/moe.py " + " ".join(argv)
    assert written["git"] == git_state() and written["date"] and written["device"] and written["complete"]
    assert {"torch", "triton", "transformers"} <= written["versions"].keys()
