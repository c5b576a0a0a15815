"""Checksums: every checkpoint carries `manifest.json`, the size and sha256 of each of its files, written last inside
the `.tmp-step_N` directory before the rename that publishes it. Resume, export, generation and `model.init_from`
verify it before reading a tensor, so bit-rot or a truncated copy is named, not trained on (issue 19)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hybridlm.checkpoint.layout import MANIFEST_FILE, CheckpointError

HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.is_file() and p != checkpoint / MANIFEST_FILE)


def write_manifest(checkpoint: Path) -> Path:
    """Record every file now in `checkpoint`; returns the manifest's path."""
    files = {
        path.relative_to(checkpoint).as_posix(): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in checkpoint_files(checkpoint)
    }
    manifest = checkpoint / MANIFEST_FILE
    manifest.write_text(json.dumps({"files": files}, indent=1) + "\n")
    return manifest


def verify_manifest(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files differ from its manifest, naming the first bad file. A checkpoint without a
    manifest (written before manifests existed, or by hand) is left to the readers' own checks."""
    manifest = checkpoint / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        message = f"{manifest} is corrupt ({error}); the checkpoint {checkpoint} cannot be verified"
        raise CheckpointError(message) from error
    for name, expected in sorted(files.items()):
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {manifest.name} lists it; {checkpoint} is incomplete")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{path} is truncated or corrupt: {size} bytes, {manifest.name} records {expected['bytes']}"
            )
        if file_sha256(path) != expected["sha256"]:
            raise CheckpointError(
                f"{path} is corrupt: its sha256 differs from the one in {manifest.name} (bit-rot or a damaged copy)"
            )
