"""Token stores: the on-disk format of tokenised data, shared by `prepare-data` output and the token cache.

A store is a directory:
  header.json                    format, version, dtype, vocab_size, eos_token_id, val_fraction, source, splits
  tokenizer.json, tokenizer_config.json    the tokenizer (load with AutoTokenizer.from_pretrained(dir))
  {split}-{k:05d}.bin            token ids of the split's documents back to back (uint16, or uint32 if vocab > 65536);
                                 no EOS is stored, the loader appends one to every document
  {split}-{k:05d}.idx.npy        int64 document offsets into that .bin, [num_documents + 1], starting at 0
  {split}-target-counts.npy      int64 [vocab_size]: how often each token is a training target (tokens[1:] + EOS of
                                 every document), for the unigram baseline
  curation/                      with `prepare-data --curate`: report.json, funnel.png, removed/{stage}/*.jsonl.gz
Splits are "train" and "val". Readers use np.memmap and never load the tokens whole. A store appears atomically:
it is written to a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hybridlm.data.config import DEFAULT_SHARD_TOKENS, DataConfig
from hybridlm.data.sources import (
    check_text_files,
    is_validation_document,
    iter_documents,
    source_files,
    source_fingerprint,
)
from hybridlm.data.tokenizer import (
    encode_documents,
    load_tokenizer,
    token_dtype,
    tokenizer_sha256,
    train_byte_level_bpe,
)

if TYPE_CHECKING:
    from hybridlm.data.curation.config import CurationConfig

log = logging.getLogger(__name__)

STORE_FORMAT = "hybridlm-token-store"
STORE_VERSION = 1
SPLITS = ("train", "val")
_ENCODE_BATCH_DOCUMENTS = 512


class DocumentSet:
    """The documents of one split, over one or more memory-mapped shards, addressed by a global index."""

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray]]):
        self._tokens = [tokens for tokens, _ in shards]
        self._offsets = [offsets for _, offsets in shards]
        counts = [len(offsets) - 1 for offsets in self._offsets]
        self._first_document = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        # The one per-document array held in RAM (the loader's shuffle is the other): 4 bytes per document.
        lengths = np.concatenate([np.diff(offsets) for offsets in self._offsets] or [np.zeros(0, np.int64)])
        if len(lengths) and lengths.max() > np.iinfo(np.uint32).max:
            raise ValueError(f"a document of {lengths.max()} tokens is longer than the 2^32 - 1 this reader supports")
        self.lengths = lengths.astype(np.uint32)

    @property
    def num_documents(self) -> int:
        return int(self._first_document[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def document(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first_document, index, side="right")) - 1
        local = index - int(self._first_document[shard])
        offsets = self._offsets[shard]
        return self._tokens[shard][int(offsets[local]) : int(offsets[local + 1])]


@dataclass
class TokenStore:
    """One or more store directories read together (they must share a tokenizer)."""

    tokenizer: PreTrainedTokenizerFast
    train: DocumentSet
    val: DocumentSet
    train_target_counts: np.ndarray
    val_target_counts: np.ndarray
    fingerprint: str  # identifies the data, so a loader state cannot be resumed onto other data


def read_header(store_dir: Path) -> dict:
    header_path = Path(store_dir) / "header.json"
    if not header_path.is_file():
        raise FileNotFoundError(
            f"{store_dir} is not a token store (no header.json); write one with "
            f"`hybridlm prepare-data --source ... --out {store_dir}`"
        )
    header = json.loads(header_path.read_text())
    if header.get("format") != STORE_FORMAT or header.get("version") != STORE_VERSION:
        raise ValueError(
            f"{header_path} is format {header.get('format')} v{header.get('version')}, expected {STORE_FORMAT} "
            f"v{STORE_VERSION}; re-run `hybridlm prepare-data`"
        )
    return header


def open_stores(store_dirs: list[Path], val_fraction: float | None = None) -> TokenStore:
    """Open store directories; with `val_fraction`, require that they were split with it."""
    if not store_dirs:
        raise ValueError("no token store directories given")
    store_dirs = [Path(path) for path in store_dirs]
    headers = [read_header(path) for path in store_dirs]
    if val_fraction is not None:
        for path, header in zip(store_dirs, headers):
            if abs(header["val_fraction"] - val_fraction) > 1e-12:
                raise ValueError(
                    f"data.val_fraction={val_fraction} but {path} was split with val_fraction="
                    f"{header['val_fraction']}; set data.val_fraction={header['val_fraction']} or re-run "
                    f"prepare-data with --val-fraction {val_fraction}"
                )
    for path, header in zip(store_dirs[1:], headers[1:]):
        if header["tokenizer_sha256"] != headers[0]["tokenizer_sha256"]:
            raise ValueError(
                f"token stores {store_dirs[0]} and {path} use different tokenizers; "
                "prepare them with the same --tokenizer (a tokenizer.json or a store's directory)"
            )
    tokenizer = AutoTokenizer.from_pretrained(str(store_dirs[0]))
    splits = {}
    counts = {}
    for split in SPLITS:
        shards = []
        counts[split] = np.zeros(headers[0]["vocab_size"], dtype=np.int64)
        for path, header in zip(store_dirs, headers):
            dtype = np.dtype(header["dtype"])
            for shard in header["splits"][split]["shards"]:
                offsets = np.load(path / shard["offsets"], mmap_mode="r")
                tokens = np.memmap(path / shard["tokens"], dtype=dtype, mode="r", shape=(int(offsets[-1]),))
                shards.append((tokens, offsets))
            counts[split] += np.load(path / f"{split}-target-counts.npy")
        splits[split] = DocumentSet(shards)
    fingerprint = hashlib.sha256(
        json.dumps([header["content_sha256"] for header in headers]).encode()
    ).hexdigest()[:16]
    return TokenStore(tokenizer, splits["train"], splits["val"], counts["train"], counts["val"], fingerprint)


class StoreWriter:
    """Streams tokenised documents of both splits into shards of a (temporary) store directory."""

    def __init__(self, directory: Path, tokenizer: PreTrainedTokenizerFast, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.directory = directory
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.dtype = token_dtype(self.vocab_size)
        self.shard_tokens = shard_tokens
        self._content_hash = hashlib.sha256()
        self._split = {split: {"shards": [], "num_documents": 0, "num_tokens": 0} for split in SPLITS}
        self._open = {}  # split -> (file handle, offsets list, shard record)
        self._counts = {split: np.zeros(self.vocab_size, dtype=np.int64) for split in SPLITS}
        tokenizer.save_pretrained(str(directory))

    def add(self, split: str, documents: list[np.ndarray]) -> None:
        """Append documents (token arrays, no EOS) to `split`; empty ones are dropped."""
        documents = [tokens for tokens in documents if len(tokens)]
        if not documents:
            return
        # One bincount per call: per-document counts would allocate a vocab-sized array for every document.
        targets = np.concatenate([tokens[1:] for tokens in documents])
        self._counts[split] += np.bincount(targets, minlength=self.vocab_size)
        self._counts[split][self.eos_token_id] += len(documents)
        record = self._split[split]
        for tokens in documents:
            handle, offsets, _ = self._shard(split)
            handle.write(tokens.astype(self.dtype, copy=False).tobytes())
            offsets.append(offsets[-1] + len(tokens))
            self._content_hash.update(split.encode() + tokens.astype(np.uint32).tobytes())
            record["num_documents"] += 1
            record["num_tokens"] += len(tokens)
            if offsets[-1] >= self.shard_tokens:
                self._close(split)

    @property
    def num_tokens(self) -> int:
        """Tokens added so far, both splits."""
        return sum(record["num_tokens"] for record in self._split.values())

    def finish(self, **header_fields) -> dict:
        for split in SPLITS:
            self._close(split)
            np.save(self.directory / f"{split}-target-counts.npy", self._counts[split])
        header = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            **header_fields,
            "splits": self._split,
            "content_sha256": self._content_hash.hexdigest(),
        }
        (self.directory / "header.json").write_text(json.dumps(header, indent=2) + "\n")
        return header

    def _shard(self, split: str):
        if split not in self._open:
            index = len(self._split[split]["shards"])
            record = {"tokens": f"{split}-{index:05d}.bin", "offsets": f"{split}-{index:05d}.idx.npy"}
            self._open[split] = ((self.directory / record["tokens"]).open("wb"), [0], record)
        return self._open[split]

    def _close(self, split: str) -> None:
        if split not in self._open:
            return
        handle, offsets, record = self._open.pop(split)
        handle.close()
        np.save(self.directory / record["offsets"], np.asarray(offsets, dtype=np.int64))
        record["num_documents"] = len(offsets) - 1
        record["num_tokens"] = offsets[-1]
        self._split[split]["shards"].append(record)


def _tokenizer_identity(cfg: DataConfig) -> dict:
    if cfg.tokenizer == "bpe":
        return {"bpe_vocab_size": cfg.vocab_size, "train_chars": cfg.tokenizer_train_chars}
    return {"tokenizer_sha256": tokenizer_sha256(load_tokenizer(cfg.tokenizer))}


def _bpe_training_texts(cfg: DataConfig, documents: Iterator[str]) -> Iterator[str]:
    """Train-split documents in source order until `tokenizer_train_chars` characters (validation text is unseen)."""
    budget = cfg.tokenizer_train_chars
    for text in documents:
        if is_validation_document(text, cfg.val_fraction):
            continue
        yield text[:budget]
        budget -= len(text)
        if budget <= 0:
            return


def write_text_store(cfg: DataConfig, out_dir: Path, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                     curation: CurationConfig | None = None) -> dict:  # fmt: skip
    """Tokenise a stdlib/text_files source into a store at `out_dir` (must not exist); returns its header.

    With `curation` stages, the documents first go through hybridlm.data.curation (in a resumable work directory
    beside `out_dir`); the store then also holds curation/ (report, funnel plot, removed documents) and its header a
    `curation` entry."""
    files = source_files(cfg)
    if cfg.source == "text_files":
        check_text_files(files, cfg.text_field)
    out_dir = Path(out_dir)
    curated = None
    if curation is not None and curation.enabled:
        from hybridlm.data.curation import Curation

        curated = Curation(cfg, curation, files, out_dir, source_fingerprint(cfg, files))
        curated.run()

    def documents() -> Iterator[str]:
        return curated.documents() if curated else iter_documents(cfg, files)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        started = time.perf_counter()
        if cfg.tokenizer == "bpe":
            tokenizer = train_byte_level_bpe(_bpe_training_texts(cfg, documents()), cfg.vocab_size)
            log.info("trained a %d-token byte-level BPE in %.1fs", len(tokenizer), time.perf_counter() - started)
        else:
            tokenizer = load_tokenizer(cfg.tokenizer)
        writer = StoreWriter(work_dir, tokenizer, shard_tokens)
        batch: list[str] = []

        def flush() -> None:
            split_documents = {split: [] for split in SPLITS}
            for text, tokens in zip(batch, encode_documents(tokenizer, batch)):
                split_documents["val" if is_validation_document(text, cfg.val_fraction) else "train"].append(tokens)
            for split, documents in split_documents.items():
                writer.add(split, documents)
            batch.clear()

        for text in documents():
            batch.append(text)
            if len(batch) == _ENCODE_BATCH_DOCUMENTS:
                flush()
        flush()
        header = writer.finish(
            val_fraction=cfg.val_fraction,
            tokenizer_sha256=tokenizer_sha256(tokenizer),
            source={**source_fingerprint(cfg, files), "max_documents": cfg.max_documents},
            **({"curation": curated.publish_into(work_dir, tokenizer, writer.num_tokens)} if curated else {}),
        )
        for split in SPLITS:
            if header["splits"][split]["num_documents"] == 0:
                raise ValueError(
                    f"data source {cfg.source} {list(cfg.paths)} gives no {split} documents "
                    f"(max_documents={cfg.max_documents}, val_fraction={cfg.val_fraction}); "
                    "add documents, raise max_documents, or change val_fraction"
                )
        log.info(
            "tokenised %d train / %d val documents (%d / %d tokens) in %.1fs",
            header["splits"]["train"]["num_documents"],
            header["splits"]["val"]["num_documents"],
            header["splits"]["train"]["num_tokens"],
            header["splits"]["val"]["num_tokens"],
            time.perf_counter() - started,
        )
        os.chmod(work_dir, 0o755)  # mkdtemp makes it private; the store is meant to be shared
        os.rename(work_dir, out_dir)
        if curated:
            curated.cleanup()
        return header
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


def cached_text_store(cfg: DataConfig, cache_dir: Path) -> Path:
    """The store of a stdlib/text_files source under `cache_dir`, built once and shared by concurrent processes.

    The key hashes the source files (paths, sizes, mtimes), the tokenizer, the split and the document cap. Processes
    serialise on a lock file, so one builds while the others wait and then read its result.
    """
    files = source_files(cfg)
    if cfg.source == "text_files":
        check_text_files(files, cfg.text_field)
    key_fields = {
        "store_version": STORE_VERSION,
        "source": source_fingerprint(cfg, files),
        "tokenizer": _tokenizer_identity(cfg),
        "val_fraction": cfg.val_fraction,
        "max_documents": cfg.max_documents,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    store_dir = cache_dir / "tokens" / f"{cfg.source}-{key}"
    if (store_dir / "header.json").is_file():
        return store_dir
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(store_dir.parent / f"{store_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (store_dir / "header.json").is_file():
            log.info("building token cache %s", store_dir)
            write_text_store(cfg, store_dir)
    return store_dir
