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

header.json's `checksums` (version 2) holds the sha256 of every data file. Opening a store checks what is cheap
every time (every file present, every .bin of the size its token count needs, the offsets' shape and ends, the
tokenizer the one the store was written with); the full pass (each file's sha256, every token id below vocab_size,
offsets non-decreasing) reads the whole store, so it runs once per store content: with `verified_dir`, a stamp
keyed by the store's path and its files' sizes and mtimes records a pass, and only a changed store is read again.
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
STORE_VERSION = 2  # 2: per-file sha256 checksums in the header
READABLE_VERSIONS = (1, 2)  # 1: no checksums; its sizes, offsets and token ids are still checked
SPLITS = ("train", "val")
_ENCODE_BATCH_DOCUMENTS = 512
_READ_CHUNK_BYTES = 64 << 20  # the full pass reads files in pieces of this size
_REWRITE = ("the store is damaged or incompletely copied: copy it again or re-run `hybridlm prepare-data` (a token "
            "cache under data.cache_dir: delete it, the next run rebuilds it)")


class StoreError(ValueError):
    """A token store file is missing, damaged or inconsistent; the message names the file."""


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
    try:
        header = json.loads(header_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{header_path} is not valid JSON ({error}); {_REWRITE}") from None
    if not isinstance(header, dict):
        raise StoreError(f"{header_path} holds {type(header).__name__}, not a store header; {_REWRITE}")
    if header.get("format") != STORE_FORMAT or header.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{header_path} is format {header.get('format')} v{header.get('version')}, expected {STORE_FORMAT} "
            f"v{STORE_VERSION}; re-run `hybridlm prepare-data`"
        )
    try:
        np.dtype(header["dtype"])
        int(header["vocab_size"]), float(header["val_fraction"]), str(header["tokenizer_sha256"])
        for split in SPLITS:
            for shard in header["splits"][split]["shards"]:
                str(shard["tokens"]), str(shard["offsets"]), int(shard["num_documents"]), int(shard["num_tokens"])
        if header["version"] >= 2:
            dict(header["checksums"])
    except (KeyError, TypeError, ValueError) as error:
        raise StoreError(f"{header_path} lacks or garbles {error}; {_REWRITE}") from None
    return header


def open_stores(
    store_dirs: list[Path], val_fraction: float | None = None, verified_dir: Path | None = None,
    full_check: bool = True,
) -> TokenStore:
    """Open store directories; with `val_fraction`, require that they were split with it. Each store is checked
    (see the module docstring): the full pass on every call, once per store content with `verified_dir`, or never
    with `full_check=False` (data.verify_store_contents=false)."""
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
    tokenizer = _store_tokenizer(store_dirs[0], headers[0])
    splits = {}
    counts = {}
    for split in SPLITS:
        shards = []
        counts[split] = np.zeros(headers[0]["vocab_size"], dtype=np.int64)
        for path, header in zip(store_dirs, headers):
            dtype = np.dtype(header["dtype"])
            for shard in header["splits"][split]["shards"]:
                offsets = _load_npy(path / shard["offsets"], mmap=True)
                _check_offsets(path / shard["offsets"], offsets, shard)
                _check_size(path / shard["tokens"], shard["num_tokens"] * dtype.itemsize,
                            f"{shard['num_tokens']} tokens of {dtype.name}")
                tokens = np.memmap(path / shard["tokens"], dtype=dtype, mode="r", shape=(int(offsets[-1]),))
                shards.append((tokens, offsets))
            split_counts = _load_npy(path / f"{split}-target-counts.npy", mmap=False)
            if split_counts.shape != (header["vocab_size"],) or split_counts.dtype != np.int64:
                raise StoreError(f"{path / f'{split}-target-counts.npy'} holds {split_counts.dtype} "
                                 f"{split_counts.shape}, not int64 [{header['vocab_size']}]; {_REWRITE}")  # fmt: skip
            counts[split] += split_counts
        splits[split] = DocumentSet(shards)
    for path, header in zip(store_dirs, headers):
        if full_check:
            _verify_once(path, header, verified_dir)
        else:
            log.warning("%s: contents not verified (data.verify_store_contents=false): a changed shard or a token "
                        "id beyond the vocabulary goes unnoticed", path)  # fmt: skip
    fingerprint = hashlib.sha256(
        json.dumps([header["content_sha256"] for header in headers]).encode()
    ).hexdigest()[:16]
    return TokenStore(tokenizer, splits["train"], splits["val"], counts["train"], counts["val"], fingerprint)


def _store_tokenizer(store_dir: Path, header: dict) -> PreTrainedTokenizerFast:
    if not (store_dir / "tokenizer.json").is_file():
        raise StoreError(f"{store_dir / 'tokenizer.json'} is missing; {_REWRITE}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(store_dir))
    except Exception as error:  # tokenizers' parse errors have no common base class
        raise StoreError(f"{store_dir / 'tokenizer.json'} cannot be loaded ({type(error).__name__}: {error}); "
                         f"{_REWRITE}") from None  # fmt: skip
    if tokenizer_sha256(tokenizer) != header["tokenizer_sha256"]:
        raise StoreError(f"{store_dir / 'tokenizer.json'} is not the tokenizer the store was written with (its "
                         f"hash differs from header.json's tokenizer_sha256); {_REWRITE}")  # fmt: skip
    return tokenizer


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise StoreError(f"{path} is missing; {_REWRITE}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise StoreError(f"{path} is not a readable .npy array ({error}); {_REWRITE}") from None


def _check_offsets(path: Path, offsets: np.ndarray, shard: dict) -> None:
    """Shape, dtype and both ends against the header (cheap on a memmap); the order is the full pass's."""
    expected = (int(shard["num_documents"]) + 1,)
    if offsets.dtype != np.int64 or offsets.shape != expected:
        raise StoreError(f"{path} holds {offsets.dtype} {offsets.shape}, header.json says int64 {expected}; "
                         f"{_REWRITE}")  # fmt: skip
    if int(offsets[0]) != 0 or int(offsets[-1]) != int(shard["num_tokens"]):
        raise StoreError(f"{path} spans tokens {int(offsets[0])}..{int(offsets[-1])}, header.json says "
                         f"0..{shard['num_tokens']}; {_REWRITE}")  # fmt: skip


def _check_size(path: Path, expected: int, what: str) -> None:
    if not path.is_file():
        raise StoreError(f"{path} is missing; {_REWRITE}")
    size = path.stat().st_size
    if size != expected:
        raise StoreError(f"{path} has {size} bytes, header.json says {expected} ({what}); {_REWRITE}")


def _store_files(header: dict) -> list[str]:
    names = ["header.json", "tokenizer.json"]
    for split in SPLITS:
        names += [name for shard in header["splits"][split]["shards"] for name in (shard["tokens"], shard["offsets"])]
        names.append(f"{split}-target-counts.npy")
    return names


def _verify_once(store_dir: Path, header: dict, verified_dir: Path | None) -> None:
    """The full pass over `store_dir`, skipped when `verified_dir` holds the stamp of a pass over these very files."""
    stamp = None
    if verified_dir is not None:
        stats = [(name, (store_dir / name).stat().st_size, (store_dir / name).stat().st_mtime_ns)
                 for name in _store_files(header)]  # fmt: skip
        key = json.dumps([str(store_dir.resolve()), header["content_sha256"], stats])
        stamp = Path(verified_dir) / hashlib.sha256(key.encode()).hexdigest()[:32]
        if stamp.is_file():
            return
    started = time.perf_counter()
    checksums = header.get("checksums")
    if checksums is None:
        log.warning("%s is a version 1 store, without checksums: its sizes, offsets and token ids are checked, not "
                    "its contents; re-run `hybridlm prepare-data` for a store with checksums", store_dir)  # fmt: skip
    dtype = np.dtype(header["dtype"])
    for split in SPLITS:
        for shard in header["splits"][split]["shards"]:
            digest, largest = _scan_tokens(store_dir / shard["tokens"], dtype)
            if checksums is not None:
                _compare(store_dir / shard["tokens"], digest, checksums)
            if largest is not None and largest >= header["vocab_size"]:
                raise StoreError(f"{store_dir / shard['tokens']} holds token id {largest}, beyond the vocabulary "
                                 f"(vocab_size {header['vocab_size']}); {_REWRITE}")  # fmt: skip
            offsets = np.load(store_dir / shard["offsets"], mmap_mode="r")
            if len(offsets) > 1 and (np.diff(offsets) < 0).any():
                raise StoreError(f"{store_dir / shard['offsets']} has decreasing document offsets; {_REWRITE}")
        if checksums is not None:
            for name in (*(shard["offsets"] for shard in header["splits"][split]["shards"]),
                         f"{split}-target-counts.npy"):  # fmt: skip
                _compare(store_dir / name, _file_sha256(store_dir / name), checksums)
    log.info("verified token store %s in %.1fs", store_dir, time.perf_counter() - started)
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()


def _scan_tokens(path: Path, dtype: np.dtype) -> tuple[str, int | None]:
    """sha256 of the file and its largest token id (None if empty), in one read."""
    digest, largest = hashlib.sha256(), None
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK_BYTES - _READ_CHUNK_BYTES % dtype.itemsize):
            digest.update(chunk)
            chunk_max = int(np.frombuffer(chunk, dtype=dtype).max())
            largest = chunk_max if largest is None else max(largest, chunk_max)
    return digest.hexdigest(), largest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _compare(path: Path, digest: str, checksums: dict) -> None:
    if checksums.get(path.name) != digest:
        raise StoreError(f"{path}: its sha256 differs from header.json's checksum (the file's contents changed "
                         f"since it was written); {_REWRITE}")  # fmt: skip


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
        self._open = {}  # split -> (file handle, offsets list, shard record, sha256 of the bytes written)
        self._checksums = {}  # file name -> sha256
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
            handle, offsets, _, digest = self._shard(split)
            data = tokens.astype(self.dtype, copy=False).tobytes()
            handle.write(data)
            digest.update(data)
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
            name = f"{split}-target-counts.npy"
            np.save(self.directory / name, self._counts[split])
            self._checksums[name] = _file_sha256(self.directory / name)
        header = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            **header_fields,
            "splits": self._split,
            "content_sha256": self._content_hash.hexdigest(),
            "checksums": self._checksums,
        }
        (self.directory / "header.json").write_text(json.dumps(header, indent=2) + "\n")
        return header

    def _shard(self, split: str):
        if split not in self._open:
            index = len(self._split[split]["shards"])
            record = {"tokens": f"{split}-{index:05d}.bin", "offsets": f"{split}-{index:05d}.idx.npy"}
            self._open[split] = ((self.directory / record["tokens"]).open("wb"), [0], record, hashlib.sha256())
        return self._open[split]

    def _close(self, split: str) -> None:
        if split not in self._open:
            return
        handle, offsets, record, digest = self._open.pop(split)
        handle.close()
        np.save(self.directory / record["offsets"], np.asarray(offsets, dtype=np.int64))
        self._checksums[record["tokens"]] = digest.hexdigest()
        self._checksums[record["offsets"]] = _file_sha256(self.directory / record["offsets"])
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
