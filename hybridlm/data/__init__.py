"""Data pipeline: sources -> tokenizer -> token store (memmap) -> packed, resumable, rank-split batches.

`build_data(cfg, seq_len=..., micro_batch_size=...)` returns a DataBundle. Each batch is a dict of CPU tensors:
  input_ids    int64 [B, T]
  labels       int64 [B, T]  targets already shifted (labels[:, t] is the target of input t), -100 = no target
  position_ids int64 [B, T]  restart at 0 at every segment
  cu_seqlens   int32 [N+1]   segment boundaries over the flattened B*T tokens (rows always end a segment)
See `packing.py` for the document/EOS/label convention and `loader.py` for the rank split and resume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hybridlm.data.config import DataConfig, MQARConfig
from hybridlm.data.loader import TrainIterator, ValidationBatches, epoch_order
from hybridlm.data.packing import PackedRows, count_rows, segment_ids_from_cu_seqlens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

Batch = dict[str, torch.Tensor]

__all__ = [
    "Batch",
    "DataBundle",
    "DataConfig",
    "MQARConfig",
    "build_data",
    "resolve_cache_dir",
    "segment_ids_from_cu_seqlens",
    "unigram_cross_entropy",
    "unigram_log_probs",
]


@dataclass
class DataBundle:
    tokenizer: PreTrainedTokenizerFast  # eos = pad = <|endoftext|> for trained BPE and MQAR
    train: TrainIterator  # infinite; next() -> Batch; state_dict() / load_state_dict() resume exactly
    val_batches: Callable[..., Iterator[Batch]]  # val_batches(max_batches=None): same batches on every call
    vocab_size: int  # len(tokenizer)
    unigram_loss: float  # nats/token of an add-one unigram fitted on train targets, on all val targets
    unigram_log_probs: torch.Tensor  # float64 [vocab]: that unigram, to score the targets of any batch
    stats: dict = field(default_factory=dict)  # documents/tokens per split, for logging


def resolve_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("HYBRIDLM_CACHE") or Path.home() / ".cache" / "hybridlm").expanduser()


def unigram_log_probs(train_counts: np.ndarray) -> np.ndarray:
    """Log-probabilities of the add-one smoothed unigram fitted on `train_counts`."""
    train_counts = np.asarray(train_counts, dtype=np.float64)
    return np.log(train_counts + 1.0) - math.log(train_counts.sum() + len(train_counts))


def unigram_cross_entropy(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) on `val_counts` of the add-one smoothed unigram fitted on `train_counts`."""
    val_counts = np.asarray(val_counts, dtype=np.float64)
    return float(-(val_counts * unigram_log_probs(train_counts)).sum() / val_counts.sum())


def _check_model_vocab(vocab_size: int, model_vocab_size: int | None, what: str) -> None:
    if model_vocab_size is not None and vocab_size > model_vocab_size:
        raise ValueError(
            f"{what} has {vocab_size} tokens but the model's vocab_size is {model_vocab_size}; "
            f"set model.vocab_size >= {vocab_size} or use a smaller tokenizer (data.vocab_size <= {model_vocab_size})"
        )


def build_data(
    cfg: DataConfig,
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    model_vocab_size: int | None = None,
    init_from: str = "",
) -> DataBundle:
    """Build tokenizer, training iterator and validation batches for this rank. Deterministic given `seed`.
    `init_from` (model.init_from) is where an SFT run's tokenizer comes from (data.tokenizer=checkpoint); an SFT
    tokenizer may outgrow `model_vocab_size` by its chat tokens (the trainer grows the embedding to it)."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    slicing = {"micro_batch_size": micro_batch_size, "rank": rank, "world_size": world_size}
    if cfg.source == "mqar":
        return _build_mqar(cfg.mqar, seq_len, seed, model_vocab_size, slicing)
    if cfg.source == "sft":
        from hybridlm.data.sft import build_sft_data

        return build_sft_data(cfg, seq_len=seq_len, seed=seed, init_from=init_from, slicing=slicing)

    from hybridlm.data.store import cached_text_store, open_stores, read_header
    from hybridlm.data.tokenizer import load_tokenizer

    if cfg.source == "memmap":
        store_dirs = [Path(path).expanduser() for path in cfg.paths]
        for store_dir in store_dirs:
            header = read_header(store_dir)
            _check_model_vocab(header["vocab_size"], model_vocab_size, f"the tokenizer of {store_dir}")
        store = open_stores(store_dirs, val_fraction=cfg.val_fraction,
                            verified_dir=resolve_cache_dir(cfg) / "verified", full_check=cfg.verify_store_contents)
    else:
        if cfg.tokenizer == "bpe":
            _check_model_vocab(cfg.vocab_size, model_vocab_size, f"data.vocab_size={cfg.vocab_size} BPE")
        else:
            _check_model_vocab(len(load_tokenizer(cfg.tokenizer)), model_vocab_size, f"tokenizer {cfg.tokenizer}")
        store = open_stores([cached_text_store(cfg, resolve_cache_dir(cfg))],
                            verified_dir=resolve_cache_dir(cfg) / "verified", full_check=cfg.verify_store_contents)
    vocab_size = len(store.tokenizer)
    _check_model_vocab(vocab_size, model_vocab_size, "the tokenizer")
    eos = store.tokenizer.eos_token_id
    if store.train.num_documents < 1:
        raise ValueError(f"data source {cfg.source} {list(cfg.paths)} has no training documents")

    def rows(documents, *, shuffle: bool, infinite: bool) -> PackedRows:
        order = epoch_order(documents.num_documents, seed=seed, shuffle=shuffle)
        return PackedRows(documents, order, seq_len=seq_len, eos_token_id=eos, pack=cfg.pack, infinite=infinite)

    train = TrainIterator(
        rows(store.train, shuffle=True, infinite=True), seed=seed, data_fingerprint=store.fingerprint, **slicing
    )
    val_rows = count_rows(store.val.lengths, seq_len, cfg.pack)
    val_batches = ValidationBatches(lambda: rows(store.val, shuffle=False, infinite=False), val_rows, **slicing)
    _check_val_size(val_batches, val_rows, micro_batch_size * world_size, "raise data.val_fraction")
    stats = {
        "train_documents": store.train.num_documents,
        "train_tokens": store.train.num_tokens,
        "val_documents": store.val.num_documents,
        "val_tokens": store.val.num_tokens,
        "val_batches": val_batches.num_batches,
    }
    if store.val.num_tokens < cfg.min_val_tokens:
        raise ValueError(
            f"the validation split has {store.val.num_tokens} tokens ({store.val.num_documents} documents), fewer than "
            f"data.min_val_tokens={cfg.min_val_tokens}; raise data.val_fraction={cfg.val_fraction}"
            + (f" or data.max_documents={cfg.max_documents}" if cfg.max_documents else "")
        )
    unigram = unigram_cross_entropy(store.train_target_counts, store.val_target_counts)
    log_probs = torch.from_numpy(unigram_log_probs(store.train_target_counts))
    return DataBundle(store.tokenizer, train, val_batches, vocab_size, unigram, log_probs, stats)


def _check_val_size(val_batches: ValidationBatches, val_rows: int, global_rows: int, fix: str) -> None:
    if val_batches.num_batches == 0:
        raise ValueError(
            f"the validation split fills {val_rows} rows, fewer than one global batch of {global_rows} rows "
            f"(micro_batch_size x world_size); {fix} or lower the batch size"
        )


def _build_mqar(cfg: MQARConfig, seq_len: int, seed: int, model_vocab_size: int | None, slicing: dict) -> DataBundle:
    from hybridlm.data.mqar import ExampleRows, answer_counts, generate_examples, mqar_tokenizer

    if cfg.example_length > seq_len:
        raise ValueError(
            f"MQAR examples need {cfg.example_length} tokens (2 x (num_kv_pairs + num_queries)) but seq_len={seq_len}; "
            "raise seq_len or lower data.mqar.num_kv_pairs / num_queries"
        )
    _check_model_vocab(cfg.vocab_size, model_vocab_size, f"data.mqar.vocab_size={cfg.vocab_size}")
    train_examples = generate_examples(cfg, cfg.num_examples, "train")
    val_examples = generate_examples(cfg, cfg.num_val_examples, "val")

    def rows(examples: np.ndarray, *, shuffle: bool, infinite: bool) -> ExampleRows:
        order = epoch_order(len(examples), seed=seed, shuffle=shuffle)
        return ExampleRows(cfg, examples, order, seq_len=seq_len, infinite=infinite)

    fingerprint = f"mqar-{cfg}"
    train = TrainIterator(rows(train_examples, shuffle=True, infinite=True), seed=seed, data_fingerprint=fingerprint,
                          **slicing)
    val_batches = ValidationBatches(
        lambda: rows(val_examples, shuffle=False, infinite=False), len(val_examples), **slicing
    )
    _check_val_size(val_batches, len(val_examples), slicing["micro_batch_size"] * slicing["world_size"],
                    "raise data.mqar.num_val_examples")
    train_answers = answer_counts(cfg, train_examples)
    unigram = unigram_cross_entropy(train_answers, answer_counts(cfg, val_examples))
    stats = {
        "train_documents": len(train_examples),
        "val_documents": len(val_examples),
        "val_batches": val_batches.num_batches,
    }
    log_probs = torch.from_numpy(unigram_log_probs(train_answers))
    return DataBundle(mqar_tokenizer(cfg), train, val_batches, cfg.vocab_size, unigram, log_probs, stats)
