"""Text sources: list the files of a source, check them, and stream their documents in a fixed order.

Documents are plain strings. The train/validation split is decided per document by a hash of its text, so it is
stable across runs, machines and `max_documents` caps, and duplicate documents always land in the same split.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from hybridlm.data.config import DataConfig

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
MAX_STDLIB_FILE_BYTES = 1 << 20  # skips generated data modules (pydoc topics) that are not representative code
_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def is_validation_document(text: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a sorted, machine-independent order (by path relative to the root)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if not _EXCLUDED_STDLIB_DIRS.intersection(path.relative_to(root).parts)
        and path.is_file()
        and path.stat().st_size <= MAX_STDLIB_FILE_BYTES
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def text_files(patterns: list[str]) -> list[Path]:
    """Expand `patterns` (globs, `**` allowed) in order; every pattern must match at least one supported file."""
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise FileNotFoundError(
                f"data.paths entry {pattern!r} matches no file; fix the path or glob (e.g. 'corpus/**/*.jsonl')"
            )
        for match in matches:
            path = Path(match).resolve()
            if path.is_dir():
                raise ValueError(
                    f"data.paths entry {pattern!r} matches the directory {match}; use a glob like '{match}/*.txt'"
                )
            if path.suffix not in TEXT_SUFFIXES:
                raise ValueError(
                    f"data.paths entry {pattern!r} matches {match}, which is not one of {', '.join(TEXT_SUFFIXES)}"
                )
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


def source_files(cfg: DataConfig) -> list[Path]:
    if cfg.source == "stdlib":
        return stdlib_files()
    if cfg.source == "text_files":
        return text_files(cfg.paths)
    raise ValueError(f"data.source={cfg.source} has no text files")


def check_text_files(files: list[Path], text_field: str) -> None:
    """Fail fast on files that cannot yield documents: empty files, or a jsonl/parquet without `text_field`."""
    if not files:
        raise FileNotFoundError("no input files: set data.paths to globs of .txt/.jsonl/.parquet files")
    for path in files:
        if path.stat().st_size == 0:
            raise ValueError(f"input file {path} is empty; remove it from data.paths")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            if text_field not in names:
                raise ValueError(f"{path} has no column data.text_field={text_field!r}; its columns are {names}")
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                first = next((line for line in handle if line.strip()), None)
            if first is None:
                raise ValueError(f"input file {path} has no JSON lines; remove it from data.paths")
            _jsonl_text(first, text_field, path, 1)


def source_fingerprint(cfg: DataConfig, files: list[Path]) -> dict:
    """Identifies the source content cheaply (path, size, mtime of every file) for cache keys."""
    stat_hash = hashlib.sha256()
    for path in files:
        stat = path.stat()
        stat_hash.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    fingerprint = {"source": cfg.source, "num_files": len(files), "files_sha256": stat_hash.hexdigest()}
    if cfg.source == "stdlib":
        fingerprint["python"] = sys.version
    else:
        fingerprint["text_field"] = cfg.text_field
    return fingerprint


def iter_documents(cfg: DataConfig, files: list[Path]) -> Iterator[str]:
    """Every non-empty document of `files` in order, capped at `cfg.max_documents` (0 = no cap)."""
    count = 0
    for path in files:
        for text in _file_documents(path, cfg.source, cfg.text_field):
            if not text:
                continue
            yield text
            count += 1
            if count == cfg.max_documents:
                return


def _file_documents(path: Path, source: str, text_field: str) -> Iterator[str]:
    if source == "stdlib":
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few test modules are deliberately not UTF-8
            pass
    elif path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    yield _jsonl_text(line, text_field, path, line_number)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
                yield text or ""
    else:
        raise ValueError(f"unsupported input file {path}: use one of {', '.join(TEXT_SUFFIXES)}")


def _jsonl_text(line: str, text_field: str, path: Path, line_number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line_number} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = list(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}:{line_number} has no field data.text_field={text_field!r}; it has {keys}")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{line_number}: field {text_field!r} holds {type(text).__name__}, not text")
    return text
