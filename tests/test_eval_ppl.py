"""Perplexity: packed, document-aware, token-weighted; equal to scoring each document alone; the CLI end to end."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.data.tokenizer import encode_documents, train_byte_level_bpe
from hybridlm.evaluate.cli import add_eval_parser
from hybridlm.evaluate.ppl import InMemoryDocuments, evaluate_perplexity, num_document_rows, packed_batches
from hybridlm.checkpoint.reader import Checkpoint
from hybridlm.export.writer import write_model_dir
from hybridlm.model import HybridLM

VOCAB = 300
EOS = 7
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "the quick brown fox jumps over the lazy dog",
    "hybrid models mix gated delta rules with attention layers",
    "x = [i * i for i in range(10)]\nprint(sum(x))\n",
    "short",
] * 3


def small_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, layer_pattern="GA", mlp_pattern="MD", intermediate_size=48,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, partial_rotary_factor=0.5),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16),
    )


@pytest.fixture(scope="module")
def model() -> HybridLM:
    """float64, so packed and unpacked runs agree to rounding (the logits are still cast to fp32)."""
    torch.manual_seed(0)
    return HybridLM(small_config()).double().eval()


def random_documents(lengths, seed=0) -> InMemoryDocuments:
    rng = np.random.default_rng(seed)
    return InMemoryDocuments([rng.integers(8, VOCAB, size=n) for n in lengths])


def per_document_nll(model, documents, eos: int) -> tuple[float, int]:
    """Reference: every document alone, unpacked; its tokens predict the next one, the last predicts EOS."""
    nll, count = 0.0, 0
    for index in range(documents.num_documents):
        tokens = torch.as_tensor(np.asarray(documents.document(index), dtype=np.int64))
        targets = torch.cat([tokens[1:], torch.tensor([eos])])
        with torch.no_grad():
            logits = model(tokens[None]).logits[0]
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(tokens)
    return nll, count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_packed_perplexity_equals_documents_scored_alone(model, batch_size):
    documents = random_documents([5, 17, 1, 30, 9, 12, 2])
    batches = list(packed_batches(documents, seq_len=32, batch_size=batch_size, eos_token_id=EOS))
    assert sum(len(b["input_ids"]) for b in batches) == num_document_rows(documents, 32)
    assert len(batches[0]["cu_seqlens"]) > 2  # several documents share a row
    result = evaluate_perplexity(model, batches)
    nll, count = per_document_nll(model, documents, EOS)
    assert result.tokens == count == documents.lengths.sum()
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_documents_longer_than_a_row_keep_every_target(model):
    documents = random_documents([70, 3, 41, 15, 16], seed=1)
    batches = list(packed_batches(documents, seq_len=16, batch_size=4, eos_token_id=EOS))
    assert sum(len(b["input_ids"]) for b in batches) == num_document_rows(documents, 16)
    result = evaluate_perplexity(model, batches)
    assert result.tokens == documents.lengths.sum()
    # The 15-token document (16 with EOS) does not fit after the 41-token one's 9-token tail: it fills a row alone.
    rows = torch.cat([b["input_ids"] for b in batches])
    expected = torch.cat([torch.as_tensor(documents.document(3)), torch.tensor([EOS])])
    assert any(torch.equal(row, expected) for row in rows)


def test_token_weighting_is_not_a_mean_of_batch_perplexities(model):
    """One long and one short batch: the result is the pooled NLL, not the average of the two."""
    documents = random_documents([60, 2], seed=2)
    batches = list(packed_batches(documents, seq_len=62, batch_size=1, eos_token_id=EOS))
    parts = [evaluate_perplexity(model, [b]) for b in batches]
    pooled = evaluate_perplexity(model, batches)
    assert pooled.nll == pytest.approx(sum(p.nll for p in parts), rel=1e-6)
    assert pooled.tokens == sum(p.tokens for p in parts)
    assert pooled.loss != pytest.approx(np.mean([p.loss for p in parts]), rel=1e-3)


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="seq_len=1 must be >= 2"):
        next(packed_batches(random_documents([3]), seq_len=1, batch_size=1, eos_token_id=EOS))
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate_perplexity(model, [])


# --- `hybridlm eval ppl` on an exported model --------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hybridlm")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, model) -> Path:
    root = tmp_path_factory.mktemp("ppl")
    tokenizer = train_byte_level_bpe(TEXTS, VOCAB - 20)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    ckpt = Checkpoint(model.config, model.state_dict(), root, "hybridlm", root / "tokenizer")
    out = root / "export"
    out.mkdir()
    write_model_dir(ckpt, out, "hybridlm", torch.float32, 1 << 30)
    return out


def test_cli_scores_text_files_like_the_library(tmp_path, export_dir, model):
    from transformers import AutoTokenizer

    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    out_json = tmp_path / "ppl.json"
    assert run_cli(["eval", "ppl", str(export_dir), "--data", str(data), "--seq-len", "64", "--batch-size", "2",
                    "--device", "cpu", "--json", str(out_json)]) == 0
    written = json.loads(out_json.read_text())

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    documents = InMemoryDocuments(encode_documents(tokenizer, TEXTS))
    nll, count = per_document_nll(model, documents, tokenizer.eos_token_id)
    assert written["tokens"] == count
    assert written["documents"] == len(TEXTS)
    assert written["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_cli_scores_a_token_store_split_with_a_progress_bar(tmp_path, export_dir, model, capsys):
    """`hybridlm prepare-data` with the model's tokenizer, then `hybridlm eval ppl STORE` through the console entry
    point: the val split's documents, scored as if alone, and a progress bar that counts every row."""
    from hybridlm.cli import main
    from hybridlm.data.store import open_stores

    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"{text} #{i}"}) + "\n" for i, text in enumerate(TEXTS)))
    store = tmp_path / "store"
    assert main(["prepare-data", "--source", "text_files", "--paths", str(data), "--tokenizer", str(export_dir),
                 "--val-fraction", "0.4", "--out", str(store)]) == 0
    val = open_stores([store]).val
    assert 0 < val.num_documents < len(TEXTS)
    capsys.readouterr()

    out_json = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(export_dir), "--data", str(store), "--split", "val", "--seq-len", "48",
                 "--batch-size", "1", "--device", "cpu", "--progress", "--json", str(out_json)]) == 0
    bar = capsys.readouterr().err
    rows = num_document_rows(val, 48)
    assert "perplexity: 100%" in bar and f"{rows}/{rows}" in bar
    written = json.loads(out_json.read_text())
    nll, count = per_document_nll(model, val, open_stores([store]).tokenizer.eos_token_id)
    assert written["documents"] == val.num_documents and written["tokens"] == count
    assert written["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)

    assert main(["eval", "ppl", str(export_dir), "--data", str(store), "--device", "cpu", "--no-progress"]) == 0
    assert "perplexity:" not in capsys.readouterr().err


def test_cli_refuses_a_store_of_another_tokenizer(tmp_path, export_dir):
    from hybridlm.cli import main

    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"{text} #{i}"}) + "\n" for i, text in enumerate(TEXTS)))
    store = tmp_path / "store"
    assert main(["prepare-data", "--source", "text_files", "--paths", str(data), "--vocab-size", "300",
                 "--val-fraction", "0.5", "--out", str(store)]) == 0
    with pytest.raises(ValueError, match="different tokenizer than the model's"):
        main(["eval", "ppl", str(export_dir), "--data", str(store), "--device", "cpu"])


def test_cli_names_a_missing_data_path(export_dir):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        run_cli(["eval", "ppl", str(export_dir), "--data", "/nonexistent/*.jsonl", "--device", "cpu"])


def test_cli_deepconf_runs_on_an_export(tmp_path, export_dir):
    """`hybridlm eval deepconf` plumbing on JSONL problems (a random model: the figures are not the point)."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"prompt": "x = 1", "answer": "2"}) + "\n"
                        + json.dumps({"prompt": "def f", "answer": "3"}) + "\n")
    out_json = tmp_path / "deepconf.json"
    assert run_cli(["eval", "deepconf", str(export_dir), "--problems", str(problems), "--num-traces", "3",
                    "--num-warmup", "1", "--window", "2", "--max-new-tokens", "5", "--device", "cpu",
                    "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert report["problems"] == 2
    assert [row["gold"] for row in report["per_problem"]] == ["2", "3"]
    assert 0 < report["deepconf_tokens"] <= 2 * 3 * 5 and 0 < report["majority_tokens"] <= 2 * 3 * 5
    with pytest.raises(SystemExit, match="needs a capture group"):
        run_cli(["eval", "deepconf", str(export_dir), "--problems", str(problems), "--answer-pattern", r"\d+"])
