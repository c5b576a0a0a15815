"""eval/bench/gated_delta.py: the varlen documents it draws, and a smoke run end to end (JSON with the command, date,
git commit, device, versions and the timed run counts). The numbers of a CPU interpreter run mean nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from hybridlm.evaluate.report import git_state

BENCH_PATH = Path(__file__).resolve().parents[2] / "eval" / "bench" / "gated_delta.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gated_delta_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_varlen_documents_cover_the_row_and_are_not_chunk_aligned():
    bench = load_bench()
    shape = next(s for s in bench.SHAPES if s.documents)
    for seed in range(3):
        bounds = bench.document_bounds(shape, torch.Generator().manual_seed(seed), torch)
        lengths = bounds[1:] - bounds[:-1]
        assert bounds[0] == 0 and bounds[-1] == shape.seq_len and len(lengths) == shape.documents
        assert (lengths > 0).all() and ((lengths % 64) != 0).any()


@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs CUDA or the interpreter"
)
def test_smoke_run_writes_json(tmp_path):
    bench = load_bench()
    out = tmp_path / "gdn.json"
    argv = ["--smoke", "--columns", "ours", "ours_raw", "attention", "--out", str(out)]
    report = bench.main(argv)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["command"] == "python eval/bench/gated_delta.py " + " ".join(argv)
    assert written["git"] == git_state() and written["date"] and written["device"] and written["complete"]
    assert {"torch", "triton", "fla"} <= written["versions"].keys()
    (row,) = written["rows"]
    assert sum(row["document_lengths"]) == row["shape"]["seq_len"]
    expected_runs = bench.MIN_RUNS if torch.cuda.is_available() else 1
    for column in ("ours", "ours_raw", "attention"):
        for mode in ("fwd", "fwd_bwd"):
            assert row[column][mode]["ms"] > 0 and row[column][mode]["runs"] >= expected_runs, (column, mode, row)
