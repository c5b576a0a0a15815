"""Multi-query associative recall (MQAR) accuracy of a trained model.

An answer counts as correct when the model's most likely next token at a query key is the value bound to that key
in the context. Examples come from `hybridlm.data.mqar` with the same layout as training, so a model trained with
`data=mqar` at one number of key-value pairs can be scored at others. An example of N pairs fills 2 * (N + queries)
tokens; rows can be padded (after the example, as in training) to a fixed `seq_len`, e.g. the trained length.
"""

from __future__ import annotations

import dataclasses

import torch

from hybridlm.data.config import MQARConfig
from hybridlm.data.mqar import example_row, generate_examples
from hybridlm.data.packing import collate
from hybridlm.loss import IGNORE_INDEX


@torch.no_grad()
def mqar_accuracy(model, cfg: MQARConfig, *, num_examples: int = 256, batch_size: int = 64,
                  split: str = "val", seq_len: int = 0) -> dict:
    """Share of query positions answered exactly (greedy) over `num_examples` examples of `split`, each in a row of
    `seq_len` tokens (0: the example's own length)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"num_examples={num_examples} and batch_size={batch_size} must be >= 1")
    seq_len = seq_len or cfg.example_length
    if seq_len < cfg.example_length:
        raise ValueError(f"seq_len={seq_len} cannot hold an example of {cfg.num_kv_pairs} pairs "
                         f"({cfg.example_length} tokens); raise seq_len or score fewer pairs")
    vocab = model.config.vocab_size
    if cfg.vocab_size > vocab:
        raise ValueError(
            f"MQAR vocab_size={cfg.vocab_size} exceeds the model's vocab_size={vocab}; score with the vocabulary "
            "the model was trained on (data.mqar.vocab_size of its run)"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples = generate_examples(cfg, num_examples, split)
    correct = total = 0
    try:
        for start in range(0, num_examples, batch_size):
            rows = [example_row(cfg, example, seq_len) for example in examples[start : start + batch_size]]
            batch = collate(rows)
            labels = batch["labels"].to(device)
            predicted = model(batch["input_ids"].to(device)).logits.argmax(dim=-1)
            answered = labels != IGNORE_INDEX
            correct += int((predicted[answered] == labels[answered]).sum())
            total += int(answered.sum())
    finally:
        model.train(was_training)
    return {"num_kv_pairs": cfg.num_kv_pairs, "example_length": cfg.example_length, "seq_len": seq_len,
            "accuracy": correct / total, "correct": correct, "queries": total, "examples": num_examples}


def mqar_sweep(model, base: MQARConfig, num_kv_pairs: list[int], *, num_examples: int = 256, batch_size: int = 64,
               seq_len: int = 0) -> list[dict]:
    """Accuracy at each number of pairs, every query key repeated once (num_queries = num_kv_pairs), in rows of
    `seq_len` tokens (0: each example's own length)."""
    results = []
    for pairs in num_kv_pairs:
        cfg = dataclasses.replace(base, num_kv_pairs=pairs, num_queries=0)
        results.append(mqar_accuracy(model, cfg, num_examples=num_examples, batch_size=batch_size, seq_len=seq_len))
    return results
