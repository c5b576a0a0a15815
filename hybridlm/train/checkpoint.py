"""Atomic, resumable checkpoints under `out_dir/checkpoints/`.

    step_00000500/
      engine/                      DeepSpeed: model, optimizer and lr-scheduler states (ZeRO shards per rank),
                                   and under expert parallelism each rank's experts (hybridlm/parallel/checkpoint.py)
      trainer_state_rank{r}.pt     step, tokens seen, data-loader position, python/numpy/torch RNG states of rank r
      config.yaml                  the resolved TrainConfig
      tokenizer/                   the run's tokenizer (when the data source has one)
    latest                         text file naming the newest step directory

A save writes everything into `.tmp-step_XXXXXXXX`; after a barrier one rank per node fsyncs the files, then rank 0
fsyncs the directories, renames it to `step_XXXXXXXX` (atomic on one filesystem), fsyncs the parent and replaces
`latest` by write-then-rename, so a published checkpoint survives a power loss too. A crash mid-save leaves only a
`.tmp-step_` directory, which resume ignores and the next save removes, so the previous checkpoint stays the newest
complete one. Resume picks the highest-numbered complete step directory (the `latest` file is for people and
tools; it can lag one rename behind). All ranks must see the same `out_dir` (a shared filesystem across nodes).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hybridlm.parallel.checkpoint import check_resume_expert_parallel_size, model_expert_parallel_size, save_expert_shards

CHECKPOINTS = "checkpoints"
ENGINE_TAG = "engine"
LATEST = "latest"
TMP_PREFIX = ".tmp-"  # a checkpoint being written (.tmp-step_N) or being replaced (.tmp-replaced-step_N)
STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def trainer_state_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"trainer_state_rank{rank}.pt"


def is_checkpoint(path: Path) -> bool:
    return (path / ENGINE_TAG).is_dir() and trainer_state_file(path, 0).is_file()


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Published checkpoints of a run, oldest first."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if STEP_DIR.match(path.name) and is_checkpoint(path)]
    return sorted(found, key=lambda path: path.name)


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run. Raises before any work on a bad `trainer.resume`.

    `never` refuses an out_dir that already holds checkpoints rather than mixing a new run's checkpoints and metrics
    into an old run's (and risking overwriting them).
    """
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    if resume == "never":
        found = complete_checkpoints(out_dir)
        if found:
            raise ValueError(
                f"trainer.resume=never but trainer.out_dir={out_dir} already holds checkpoints (newest: {found[-1]}); "
                "use trainer.resume=auto to continue that run, or choose a new trainer.out_dir"
            )
        return None
    path = Path(resume).expanduser()
    if not is_checkpoint(path):
        raise ValueError(
            f"trainer.resume={resume!r} is not a checkpoint directory (expected {ENGINE_TAG}/ and "
            f"{trainer_state_file(path, 0).name} inside, as in {Path(out_dir) / CHECKPOINTS / 'step_XXXXXXXX'}); "
            "pass one, or use trainer.resume=auto|never"
        )
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine, out_dir: str | Path, step: int, trainer_state: dict, config_yaml: str, tokenizer, keep_last: int
) -> Path:
    """Collective: every rank calls it with its own `trainer_state`. Returns the published directory."""
    rank = dist.get_rank()
    root = checkpoints_root(out_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(root)
        tmp.mkdir()
    dist.barrier()

    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
    save_expert_shards(engine.module, tmp / ENGINE_TAG)  # DeepSpeed's save leaves them out
    torch.save(trainer_state, trainer_state_file(tmp, rank))
    if rank == 0:
        (tmp / "config.yaml").write_text(config_yaml)
        if tokenizer is not None:
            # The chat template inside tokenizer_config.json (not chat_template.jinja beside it), where every
            # inference stack, old or new, reads it.
            tokenizer.save_pretrained(str(tmp / "tokenizer"), save_jinja_files=False)
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        # One process per node: an fsync flushes the node's cached writes to a file, whichever process made them.
        for path in sorted(path for path in tmp.rglob("*") if path.is_file()):
            _fsync_path(path)
    dist.barrier()

    if rank == 0:
        publish(tmp, final)
        _prune(root, keep_last)
    dist.barrier()
    return final


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


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old)


def load_checkpoint(engine, checkpoint: Path, rank: int, world_size: int) -> dict:
    """Restore engine (model, optimizer, scheduler) and return this rank's trainer state (RNG not yet applied)."""
    state_file = trainer_state_file(checkpoint, rank)
    saved_world = len(list(checkpoint.glob("trainer_state_rank*.pt")))
    if saved_world != world_size or not state_file.is_file():
        raise ValueError(
            f"checkpoint {checkpoint} was written by {saved_world} rank(s) but this run has world_size={world_size}; "
            "resume with the same number of processes"
        )
    check_resume_expert_parallel_size(checkpoint / ENGINE_TAG, model_expert_parallel_size(engine.module))
    load_path, _ = engine.load_checkpoint(
        str(checkpoint), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint / ENGINE_TAG}")
    return torch.load(state_file, map_location="cpu", weights_only=False)
