"""Atomic checkpoints under `out_dir/checkpoints/` (the layout: hybridlm/checkpoint/layout.py).

A save writes everything into `.tmp-step_XXXXXXXX`, then `manifest.json` (every file's sha256) last; after a barrier
one rank per node fsyncs the files, then rank 0 fsyncs the directories, renames it to `step_XXXXXXXX` (atomic on one
filesystem), fsyncs the parent and replaces `latest` by write-then-rename, so a published checkpoint survives a
power loss too. A crash mid-save leaves only a `.tmp-step_` directory, which resume ignores and the next save
removes, so the previous checkpoint stays the newest complete one. A save that fails (the disk full) says so, where,
and which checkpoint is the newest intact one. All ranks must see the same `out_dir` (a shared filesystem across
nodes). OLMo-core's train/checkpoint.py `Checkpointer` is the model: one owner of save, find and load.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from hybridlm.checkpoint.experts import save_expert_shards
from hybridlm.checkpoint.layout import (
    CONFIG_FILE,
    ENGINE_TAG,
    LATEST,
    TMP_PREFIX,
    TOKENIZER_DIR,
    CheckpointError,
    checkpoints_root,
    complete_checkpoints,
    step_dir_name,
    trainer_state_file,
)
from hybridlm.checkpoint.manifest import write_manifest
from hybridlm.checkpoint.resume import trained_finitely

# What torch.save's zip writer says when the OS accepted fewer bytes than it wrote (a full disk or quota): it drops
# the errno (PyTorch's caffe2/serialize/inline_container.cc).
SHORT_WRITE_MARKERS = ("inline_container.cc", "unexpected pos", "No space left on device")


def save_checkpoint(
    engine, out_dir: str | Path, step: int, trainer_state: dict, config_yaml: str, tokenizer, keep_last: int
) -> Path:
    """Collective: every rank calls it with its own `trainer_state` (tensors and plain containers: it must load
    with weights_only=True). Returns the published directory. Pruning keeps the newest `keep_last` checkpoints and,
    always, the newest one whose training was finite (`trainer_state["finite"]`)."""
    rank = dist.get_rank()
    root = checkpoints_root(out_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(root)
        tmp.mkdir()
    dist.barrier()

    failure = None
    try:
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
        save_expert_shards(engine.module, tmp / ENGINE_TAG)  # DeepSpeed's save leaves them out
        torch.save(trainer_state, trainer_state_file(tmp, rank))
        if rank == 0:
            (tmp / CONFIG_FILE).write_text(config_yaml)
            if tokenizer is not None:
                # The chat template inside tokenizer_config.json (not chat_template.jinja beside it), where every
                # inference stack, old or new, reads it.
                tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR), save_jinja_files=False)
    except (OSError, RuntimeError) as error:
        failure = error
    _raise_if_any_rank_failed(failure, out_dir, tmp)
    if rank == 0:
        try:
            write_manifest(tmp)  # last: every rank's files are written (the barrier above)
        except OSError as error:
            failure = error
    _raise_if_any_rank_failed(failure, out_dir, tmp)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        # One process per node: an fsync flushes the node's cached writes to a file, whichever process made them.
        for path in sorted(path for path in tmp.rglob("*") if path.is_file()):
            _fsync_path(path)
    dist.barrier()

    if rank == 0:
        publish(tmp, final)
        prune(root, keep_last)
    dist.barrier()
    return final


def _raise_if_any_rank_failed(failure: BaseException | None, out_dir: str | Path, tmp: Path) -> None:
    """Collective: every rank learns whether one failed to write (so none waits at a barrier the others left)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    failed = torch.tensor([failure is not None], dtype=torch.int32, device=device)
    dist.all_reduce(failed)
    if not failed.item():
        return
    newest = complete_checkpoints(out_dir)
    intact = f"the newest intact checkpoint is {newest[-1]}" if newest else "there is no intact checkpoint yet"
    if failure is None:
        raise CheckpointError(f"another rank failed to write {tmp}; see its message. {intact}")
    if _is_disk_full(failure):
        free = shutil.disk_usage(tmp.parent).free
        raise CheckpointError(
            f"the disk is full (ENOSPC: no space left on device) while writing {tmp} ({free} bytes free there; "
            f"{failure}). {intact} (trainer.resume=auto continues from it); the half-written {tmp.name} is ignored "
            "and removed by the next save. Free space (or lower trainer.keep_last), then rerun"
        ) from failure
    raise CheckpointError(f"writing {tmp} failed ({failure}); {intact}; {tmp.name} is ignored") from failure


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(marker in str(error) for marker in SHORT_WRITE_MARKERS)


def sweep_leftovers(root: Path) -> None:
    """Remove what crashed saves left in `root`: `.tmp-step_N` (never complete), and `.tmp-replaced-step_N` (a
    published checkpoint caught between publish()'s two renames) once step_N is published again; until then it is
    kept: rename it back to step_N to use it."""
    for stale in root.glob(f"{TMP_PREFIX}step_*"):
        shutil.rmtree(stale)
    for replaced in root.glob(f"{TMP_PREFIX}replaced-step_*"):
        if (root / replaced.name.removeprefix(f"{TMP_PREFIX}replaced-")).is_dir():
            shutil.rmtree(replaced)


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written (and fsynced) checkpoint visible: one rename, then point `latest` at it."""
    for directory in sorted((path for path in tmp.rglob("*") if path.is_dir()), reverse=True):
        _fsync_path(directory)  # the entries of every directory, deepest first, then tmp itself
    _fsync_path(tmp)
    replaced = None
    if final.exists():  # same step saved by an earlier attempt (resumed from an older checkpoint): replace it
        replaced = final.parent / f"{TMP_PREFIX}replaced-{final.name}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)
    pointer = final.parent / f".{LATEST}.tmp"
    with pointer.open("w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, final.parent / LATEST)
    _fsync_path(final.parent)


def _fsync_path(path: Path) -> None:
    """fsync a file's data, or a directory's entries (so a rename inside it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0: all) and the newest one whose training was finite: a run that
    went NaN never prunes away its last good checkpoint (issue 19)."""
    if keep_last <= 0:
        return
    published = complete_checkpoints(root.parent)
    keep = set(published[-keep_last:])
    keep.update(next(([path] for path in reversed(published) if trained_finitely(path)), []))
    for old in published:
        if old not in keep:
            shutil.rmtree(old)
