"""Synthetic multi-query associative recall (MQAR, Arora et al. 2023 "Zoology").

An example is `k1 v1 k2 v2 ... kN vN` (distinct keys, random values) followed by `num_queries` pairs `k v` that
repeat context keys in a random order. Only query keys carry a label: the value bound to that key, which is also
the next input token. Every example fills one row, padded with token 0 (<|endoftext|>, label -100), and is one
segment (`cu_seqlens` = row boundaries). The examples are fixed by `MQARConfig.seed`; training order comes from the
run's seed. `DataBundle.tokenizer` is a word-level tokenizer over the names "<|endoftext|>", "k0".., "v0".., so
decoding and `save_pretrained` work like for text.
"""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerFast

from hybridlm.data.config import MQARConfig
from hybridlm.data.packing import Row
from hybridlm.data.tokenizer import EOS_TOKEN, wrap_tokenizer
from hybridlm.loss import IGNORE_INDEX

PAD_TOKEN_ID = 0
_GENERATION_CHUNK = 4096  # examples generated per vectorised step (bounds memory for large key vocabularies)


def mqar_tokenizer(cfg: MQARConfig) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = [EOS_TOKEN] + [f"k{i}" for i in range(cfg.keys)] + [f"v{i}" for i in range(cfg.vocab_size - 1 - cfg.keys)]
    tokenizer = Tokenizer(models.WordLevel({name: index for index, name in enumerate(names)}, unk_token=EOS_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return wrap_tokenizer(tokenizer)


def generate_examples(cfg: MQARConfig, num_examples: int, split: str) -> np.ndarray:
    """Token ids [num_examples, cfg.example_length]; deterministic in (cfg.seed, split)."""
    rng = np.random.default_rng([cfg.seed, {"train": 0, "val": 1}[split]])
    pairs, queries = cfg.num_kv_pairs, cfg.queries
    first_value = 1 + cfg.keys
    num_values = cfg.vocab_size - first_value
    examples = np.empty((num_examples, cfg.example_length), dtype=np.int64)
    for start in range(0, num_examples, _GENERATION_CHUNK):
        count = min(_GENERATION_CHUNK, num_examples - start)
        keys = 1 + rng.random((count, cfg.keys)).argsort(axis=1)[:, :pairs]
        values = first_value + rng.integers(0, num_values, size=(count, pairs))
        queried = rng.random((count, pairs)).argsort(axis=1)[:, :queries]
        block = examples[start : start + count]
        block[:, 0 : 2 * pairs : 2] = keys
        block[:, 1 : 2 * pairs : 2] = values
        block[:, 2 * pairs :: 2] = np.take_along_axis(keys, queried, axis=1)
        block[:, 2 * pairs + 1 :: 2] = np.take_along_axis(values, queried, axis=1)
    return examples


def answer_mask(cfg: MQARConfig) -> np.ndarray:
    """Bool [example_length]: positions whose label is the answer (the query keys)."""
    mask = np.zeros(cfg.example_length, dtype=bool)
    mask[2 * cfg.num_kv_pairs :: 2] = True
    return mask


def answer_counts(cfg: MQARConfig, examples: np.ndarray) -> np.ndarray:
    """int64 [vocab_size]: how often each token is an answer (a labelled target)."""
    answers = examples[:, 2 * cfg.num_kv_pairs + 1 :: 2]
    return np.bincount(answers.ravel(), minlength=cfg.vocab_size).astype(np.int64)


def example_row(cfg: MQARConfig, example: np.ndarray, seq_len: int) -> Row:
    length = cfg.example_length
    input_ids = np.full(seq_len, PAD_TOKEN_ID, dtype=np.int64)
    input_ids[:length] = example
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    mask = answer_mask(cfg)
    labels[:length][mask] = example[1:][mask[:-1]]
    return Row(input_ids, labels, np.arange(seq_len, dtype=np.int64), [0])


class ExampleRows:
    """One example per row in `order(epoch)`; position (epoch, cursor). Same interface as PackedRows."""

    def __init__(self, cfg: MQARConfig, examples: np.ndarray, order, *, seq_len: int, infinite: bool):
        self.cfg = cfg
        self.examples = examples
        self._order_for_epoch = order
        self.seq_len = seq_len
        self.infinite = infinite
        self._set_position(0, 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._set_position(int(state["epoch"]), int(state["cursor"]))

    def _set_position(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        self._order = self._order_for_epoch(epoch)

    def _current_example(self) -> int | None:
        if self.cursor == len(self._order):
            if not self.infinite:
                return None
            self._set_position(self.epoch + 1, 0)
        return int(self._order[self.cursor])

    def skip_row(self) -> None:
        if self._current_example() is not None:
            self.cursor += 1

    def next_row(self) -> Row | None:
        index = self._current_example()
        if index is None:
            return None
        self.cursor += 1
        return example_row(self.cfg, self.examples[index], self.seq_len)
