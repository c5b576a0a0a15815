"""MQAR recall accuracy: scored against oracle models, and eval/mqar_gdn_vs_hybrid.py end to end with train.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.data.config import MQARConfig
from hybridlm.evaluate.cli import add_eval_parser
from hybridlm.evaluate.recall import mqar_accuracy, mqar_sweep
from hybridlm.model import LMOutput

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "mqar_gdn_vs_hybrid.py"  # the GDN-only vs hybrid experiment driver


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


def test_script_refuses_pairs_beyond_the_trained_length():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--curriculum", "4:10", "8:10", "--eval-kv", "4", "16"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--eval-kv [16] exceed the last stage's 8 pairs" in proc.stderr


@pytest.mark.slow  # four short train.py runs (two models x two curriculum stages)
def test_recall_curriculum_trains_with_train_py_beats_chance_and_matches_the_cli(tmp_path):
    out = tmp_path / "mqar"
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--curriculum", "2:100", "4:150", "--eval-kv", "2", "4",
         "--vocab-size", "24", "--num-keys", "8", "--eval-examples", "64", "--runs-dir", str(runs),
         "--out", str(out), "--override", "trainer.eval_every=0", "optim.warmup_steps=10",
         "data.mqar.num_examples=2000", "data.mqar.num_val_examples=64"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    for key in ("command", "date", "device", "versions", "git"):
        assert report[key], key
    assert report["trained_seq_len"] == 16 and report["chance"] == pytest.approx(1 / 15)
    by_model = {run["model"]: run for run in report["runs"]}
    assert set(by_model) == {"gdn", "hybrid"}
    assert set(by_model["gdn"]["layer_pattern"]) == {"G"} and "A" in by_model["hybrid"]["layer_pattern"]
    sizes = [run["parameters"] for run in report["runs"]]
    assert max(sizes) / min(sizes) < 1.05  # equal size within 5 %
    for run in report["runs"]:
        first, second = run["stages"]
        assert (first["pairs"], first["seq_len"], second["pairs"], second["seq_len"]) == (2, 8, 4, 16)
        # The second stage starts from the first one's weights, through train.py's model.init_from.
        saved = sorted(Path(second["run_dir"]).glob("checkpoints/step_*/config.yaml"))[-1]
        assert yaml.safe_load(saved.read_text())["model"]["init_from"] == first["run_dir"]
        assert [r["seq_len"] for r in run["results"]] == [16, 16]  # scored at the trained length
        # Trained by train.py, the models must recall far better than guessing among the 15 values.
        assert run["results"][-1]["accuracy"] > 2 * report["chance"], run["results"]

    hybrid = by_model["hybrid"]
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "recall", hybrid["run_dir"], "--num-kv-pairs", "2", "4", "--num-examples",
                              "64", "--seq-len", "16", "--device", "cpu", "--json", str(tmp_path / "cli.json")])
    assert args.func(args) == 0
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert (cli["mqar_vocab_size"], cli["mqar_num_keys"]) == (24, 8)  # read from the run's config.yaml
    assert [r["accuracy"] for r in cli["results"]] == [r["accuracy"] for r in hybrid["results"]]
