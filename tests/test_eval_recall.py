"""MQAR recall accuracy: scored against oracle models, and the eval/recall.py script end to end with train.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.data.config import MQARConfig
from hybridlm.evaluate.cli import add_eval_parser
from hybridlm.evaluate.recall import mqar_accuracy, mqar_sweep
from hybridlm.model import LMOutput

REPO = Path(__file__).resolve().parents[1]


class RecallOracle(nn.Module):
    """Looks each token up among the earlier context keys and predicts the value that followed it; with
    `wrong_every` = n, every n-th query (counted per row) gets a wrong value instead."""

    def __init__(self, vocab_size: int, wrong_every: int = 0):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.wrong_every = wrong_every

    def forward(self, input_ids: torch.Tensor, **_) -> LMOutput:
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            row, seen, queries = input_ids[b].tolist(), {}, 0
            for t in range(T):
                if row[t] in seen and t % 2 == 0:
                    value = seen[row[t]]
                    queries += 1
                    if self.wrong_every and queries % self.wrong_every == 0:
                        value = (value + 1) % self.config.vocab_size
                    logits[b, t, value] = 1.0
                elif t % 2 == 0 and t + 1 < T:
                    seen[row[t]] = row[t + 1]
        return LMOutput(logits=logits)


def test_oracle_scores_one_and_a_half_wrong_oracle_one_half():
    cfg = MQARConfig(num_kv_pairs=6, vocab_size=40)
    assert mqar_accuracy(RecallOracle(40), cfg, num_examples=10, batch_size=3)["accuracy"] == 1.0
    half = mqar_accuracy(RecallOracle(40, wrong_every=2), cfg, num_examples=10, batch_size=4)
    assert half["accuracy"] == 0.5
    assert half["queries"] == 10 * 6 and half["seq_len"] == 24


def test_sweep_changes_pairs_and_refuses_impossible_settings():
    results = mqar_sweep(RecallOracle(40), MQARConfig(num_kv_pairs=4, vocab_size=40), [2, 8], num_examples=4)
    assert [(r["num_kv_pairs"], r["seq_len"], r["accuracy"]) for r in results] == [(2, 8, 1.0), (8, 32, 1.0)]
    with pytest.raises(ValueError, match="cannot give num_kv_pairs=30 distinct keys"):
        mqar_sweep(RecallOracle(40), MQARConfig(num_kv_pairs=4, vocab_size=40), [30])
    with pytest.raises(ValueError, match="exceeds the model's vocab_size=20"):
        mqar_accuracy(RecallOracle(20), MQARConfig(num_kv_pairs=4, vocab_size=40))


@pytest.mark.slow  # two train.py runs
def test_recall_script_trains_with_train_py_and_matches_the_cli(tmp_path):
    out = tmp_path / "mqar"
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "recall.py"), "--train-kv", "4", "--eval-kv", "2", "4", "--steps", "3",
         "--eval-examples", "16", "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
         "--override", "trainer.eval_every=0", "optim.warmup_steps=1", "data.mqar.num_examples=64", "data.mqar.num_val_examples=32",
         "deepspeed.micro_batch_size=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert {run["model"] for run in report["runs"]} == {"gdn", "hybrid"}
    patterns = {run["model"]: run["layer_pattern"] for run in report["runs"]}
    assert set(patterns["gdn"]) == {"G"} and "A" in patterns["hybrid"]
    sizes = [run["parameters"] for run in report["runs"]]
    assert max(sizes) / min(sizes) < 1.05  # equal size within 5 %
    for key in ("command", "date", "device", "versions"):
        assert report[key]
    hybrid = next(run for run in report["runs"] if run["model"] == "hybrid")
    assert hybrid["steps"] == 3

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "recall", hybrid["run_dir"], "--num-kv-pairs", "2", "4", "--num-examples",
                              "16", "--device", "cpu", "--json", str(tmp_path / "cli.json")])
    assert args.func(args) == 0
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert cli["mqar_vocab_size"] == report["setting"]["vocab_size"]  # read from the run's config.yaml
    assert [r["accuracy"] for r in cli["results"]] == [r["accuracy"] for r in hybrid["results"]]
