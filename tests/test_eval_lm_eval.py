"""lm-eval 0.4 on our exports: a tiny model learns one-digit addition here, is exported in every format, and the
stock `lm_eval --model hf` CLI scores the shipped offline task (tests/lm_eval_task) on each export, with no code of
ours in between (how lm_eval is run: tests/helpers/lm_eval.py). The chat-template path (`--apply_chat_template` on
an SFT export) is in test_sft_recipe.py, beside the SFT run it needs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.lm_eval import TASK_DIR, run_lm_eval

from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.data.tokenizer import encode_documents, train_byte_level_bpe
from hybridlm.checkpoint.reader import Checkpoint
from hybridlm.export.writer import write_model_dir
from hybridlm.loss import IGNORE_INDEX
from hybridlm.model import HybridLM

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval>=0.4,<0.5')")
pytestmark = pytest.mark.slow  # three lm_eval processes, ~1 min each on 2 cores

TASK = "hybridlm_addition"
FORMATS = ("hybridlm", "qwen3_next", "qwen3_5_moe")


def problems() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "addition.jsonl").read_text().splitlines()]


def model_config(vocab_size: int) -> ModelConfig:
    """Exportable to all three formats: MoE on every layer with a shared expert, GDN + gated attention."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=64, num_layers=2, layer_pattern="GA", mlp_pattern="M",
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=2, head_k_dim=32, head_v_dim=32),
        attention=AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=32, partial_rotary_factor=0.5),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=64, shared_expert_intermediate_size=64),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, tokenizer dir): every fact `a+b=s` is one document; trained until it knows them."""
    root = tmp_path_factory.mktemp("lm_eval")
    facts = [p["question"] + p["answer"] for p in problems()]
    tokenizer = train_byte_level_bpe(facts, 257)  # the 256 bytes and EOS: one token per character
    tokenizer.save_pretrained(str(root / "tokenizer"))
    batch = fact_rows(encode_documents(tokenizer, facts), tokenizer.eos_token_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than they save
    try:
        torch.manual_seed(0)
        model = HybridLM(model_config(len(tokenizer)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(300):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), root / "tokenizer"


def fact_rows(documents, eos: int) -> dict[str, torch.Tensor]:
    """One document per row, right-padded: every token predicts the next, the last one EOS."""
    width = max(len(d) for d in documents) + 1
    input_ids = torch.full((len(documents), width), eos)
    labels = torch.full((len(documents), width), IGNORE_INDEX)
    for row, tokens in enumerate(documents):
        tokens = torch.as_tensor(tokens.astype("int64"))
        input_ids[row, : len(tokens)] = tokens
        labels[row, : len(tokens)] = torch.cat([tokens[1:], torch.tensor([eos])])
    return {"input_ids": input_ids, "labels": labels}


def choice_log_likelihoods(model, tokenizer, problem: dict) -> list[float]:
    """Our own scoring: log p(choice | question), summed over the choice's tokens."""
    context = tokenizer.encode(problem["question"], add_special_tokens=False)
    scores = []
    for choice in problem["choices"]:
        target = tokenizer.encode(choice, add_special_tokens=False)
        ids = torch.tensor([context + target])
        with torch.no_grad():
            log_probs = F.log_softmax(model(ids).logits[0, len(context) - 1 : -1], dim=-1)
        scores.append(float(log_probs.gather(-1, torch.tensor(target)[:, None]).sum()))
    return scores


@pytest.mark.parametrize("fmt", FORMATS)
def test_lm_eval_scores_every_export_like_our_model(trained, tmp_path, fmt):
    from transformers import AutoTokenizer

    model, tokenizer_dir = trained
    export_dir = tmp_path / fmt
    export_dir.mkdir()
    write_model_dir(Checkpoint(model.config, model.state_dict(), tmp_path, "hybridlm", tokenizer_dir), export_dir,
                    fmt, torch.float32, 1 << 30)
    result = run_lm_eval(export_dir, fmt, TASK, tmp_path / "results")

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    by_question = {p["question"]: p for p in problems()}
    ours_correct = 0
    for sample in result["samples"]:
        problem = by_question[sample["doc"]["question"]]
        ours = choice_log_likelihoods(model, tokenizer, problem)
        theirs = [float(response[0][0]) for response in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3), problem["question"]
        ours_correct += max(range(len(ours)), key=ours.__getitem__) == problem["label"]
    assert len(result["samples"]) == len(by_question)
    assert result["results"]["acc,none"] == pytest.approx(ours_correct / len(by_question))
    assert result["results"]["acc,none"] >= 0.9  # four choices: chance is 0.25; the model was trained on these facts
