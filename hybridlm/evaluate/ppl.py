"""Token-weighted perplexity over held-out documents, packed into rows with document boundaries.

Every target token counts once: the result is exp(total negative log-likelihood / total targets), not a mean of
per-batch perplexities. Several documents share a row, and `cu_seqlens` keeps each one's state, convolution and
attention to itself; unlike training rows, a document is never cut at a row boundary unless it is longer than a row.
So every document shorter than `seq_len` scores exactly as if it were evaluated alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybridlm.data.packing import Row, collate
from hybridlm.loss import IGNORE_INDEX


@dataclass
class PerplexityResult:
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # targets scored
    documents: int | None = None

    @property
    def loss(self) -> float:
        """Mean nats per target token."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "loss": self.loss, "nll": self.nll, "tokens": self.tokens,
                "documents": self.documents}


class InMemoryDocuments:
    """Token id arrays with the `lengths` / `document(i)` interface of a token store split."""

    def __init__(self, documents: list[np.ndarray]):
        self._documents = documents
        self.lengths = np.asarray([len(d) for d in documents], dtype=np.int64)

    @property
    def num_documents(self) -> int:
        return len(self._documents)

    def document(self, index: int) -> np.ndarray:
        return self._documents[index]


def document_rows(documents, *, seq_len: int, eos_token_id: int) -> Iterator[Row]:
    """Rows of whole documents (each followed by EOS), in order; a document that does not fit in what is left of a
    row starts the next one, so it keeps its whole context. Only a document longer than a row is split, into
    row-sized pieces (each piece's last token still predicts the next piece's first). Labels follow
    `hybridlm.data.packing`: every token predicts the next, EOS predicts nothing; row tails are padding segments."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")

    def empty_row() -> Row:
        return Row(np.full(seq_len, eos_token_id, dtype=np.int64), np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
                   np.zeros(seq_len, dtype=np.int64), [])

    def close(row: Row, filled: int) -> Row:
        if filled < seq_len:
            row.segment_starts.append(filled)
            row.position_ids[filled:] = np.arange(seq_len - filled)
        return row

    row, filled = empty_row(), 0
    for index in range(documents.num_documents):
        tokens = np.append(np.asarray(documents.document(index), dtype=np.int64), eos_token_id)
        targets = np.append(tokens[1:], IGNORE_INDEX)
        if filled and filled + len(tokens) > seq_len:
            yield close(row, filled)
            row, filled = empty_row(), 0
        for start in range(0, len(tokens), seq_len):
            piece = slice(start, min(start + seq_len, len(tokens)))
            size = piece.stop - piece.start
            row.input_ids[filled : filled + size] = tokens[piece]
            row.labels[filled : filled + size] = targets[piece]
            row.position_ids[filled : filled + size] = np.arange(size)
            row.segment_starts.append(filled)
            filled += size
            if filled == seq_len:
                yield row
                row, filled = empty_row(), 0
    if filled:
        yield close(row, filled)


def packed_batches(documents, *, seq_len: int, batch_size: int, eos_token_id: int) -> Iterator[dict]:
    """Every document once, in order, as batches of `document_rows`; the last batch may have fewer rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    pending = []
    for row in document_rows(documents, seq_len=seq_len, eos_token_id=eos_token_id):
        pending.append(row)
        if len(pending) == batch_size:
            yield collate(pending)
            pending = []
    if pending:
        yield collate(pending)


def num_document_rows(documents, seq_len: int) -> int:
    """How many rows `document_rows` makes (for the progress bar), from the lengths alone."""
    rows, filled = 0, 0
    for length in documents.lengths + 1:
        if filled and filled + length > seq_len:
            rows, filled = rows + 1, 0
        filled += int(length)
        rows, filled = rows + filled // seq_len, filled % seq_len
    return rows + (1 if filled else 0)


@torch.no_grad()
def evaluate_perplexity(model, batches: Iterable[dict], *, device: torch.device | str | None = None,
                        progress: bool = False, total: int | None = None) -> PerplexityResult:
    """Sum the next-token NLL of every labelled position over `batches` (data-pipeline layout)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    try:
        for batch in tqdm(batches, desc="perplexity", unit="batch", total=total, disable=not progress):
            labels = batch["labels"].to(device)
            # The model's own loss is computed chunk by chunk: no [B, T, vocab] logits.
            mean = model(
                batch["input_ids"].to(device),
                labels=labels,
                position_ids=batch["position_ids"].to(device) if "position_ids" in batch else None,
                cu_seqlens=batch["cu_seqlens"].to(device) if "cu_seqlens" in batch else None,
            ).ce_loss
            count = int((labels != IGNORE_INDEX).sum())
            nll += mean.double() * count
            tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the evaluation data has no target tokens; give non-empty documents")
    return PerplexityResult(float(nll), tokens)


def load_documents(data: list[str], tokenizer, *, split: str = "val", text_field: str = "text"):
    """The documents to score: a token store directory (from `hybridlm prepare-data`; its `split`) or globs of
    .txt/.jsonl/.parquet files (every document, tokenised with the model's tokenizer)."""
    from hybridlm.data.config import DataConfig
    from hybridlm.data.sources import check_text_files, iter_documents, text_files
    from hybridlm.data.store import open_stores, read_header
    from hybridlm.data.tokenizer import encode_documents, tokenizer_sha256

    if not data:
        raise ValueError("no --data given: pass a token store directory or globs of .txt/.jsonl/.parquet files")
    if len(data) == 1 and Path(data[0]).expanduser().is_dir():
        store_dir = Path(data[0]).expanduser()
        header = read_header(store_dir)
        if split not in ("train", "val"):
            raise ValueError(f"--split={split!r}: a token store has the splits 'train' and 'val'")
        if tokenizer is not None and header.get("tokenizer_sha256") != tokenizer_sha256(tokenizer):
            raise ValueError(
                f"{store_dir} was tokenised with a different tokenizer than the model's; re-run `hybridlm "
                f"prepare-data --tokenizer <the model's tokenizer dir>` or pass the raw text files instead"
            )
        store = open_stores([store_dir])
        return getattr(store, split), store.tokenizer.eos_token_id
    if tokenizer is None:
        raise ValueError("scoring raw text needs the model's tokenizer, and none was found beside the model")
    files = text_files(data)
    check_text_files(files, text_field)
    cfg = DataConfig(source="text_files", paths=list(data), text_field=text_field)
    texts = list(iter_documents(cfg, files))
    return InMemoryDocuments(encode_documents(tokenizer, texts)), tokenizer.eos_token_id
