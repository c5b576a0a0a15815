"""Resuming a run: which checkpoint (`trainer.resume=auto|never|PATH`), verified before anything is loaded, and the
engine and trainer state read back with weights_only=True.

`auto` takes the newest complete checkpoint that verifies (its manifest's checksums, and every `.pt` file a whole
archive that loads without code); an unreadable one is named and the previous complete checkpoint used instead,
never deleted, so a requeued job does not fail the same way on every restart. `PATH` to a bad checkpoint is refused
with the same message.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from hybridlm.checkpoint.experts import check_resume_expert_parallel_size, model_expert_parallel_size
from hybridlm.checkpoint.layout import (
    CHECKPOINTS,
    ENGINE_TAG,
    TRAINER_STATE_FILE,
    CheckpointError,
    complete_checkpoints,
    is_checkpoint,
    trainer_state_file,
)
from hybridlm.checkpoint.manifest import verify_manifest
from hybridlm.checkpoint.safe_load import check_tensors_file, deepspeed_loads_weights_only, load_tensors_file


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run. Raises before any work on a bad `trainer.resume`.

    `never` refuses an out_dir that already holds checkpoints rather than mixing a new run's checkpoints and metrics
    into an old run's (and risking overwriting them).
    """
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        problems = []
        for candidate in reversed(found):
            try:
                verify_checkpoint(candidate)
            except CheckpointError as error:
                problems.append(str(error))
                _say(f"[resume] skipping {candidate}: {error}; kept as it is, resuming from an older checkpoint")
                continue
            return candidate
        if problems:
            raise CheckpointError(
                f"trainer.resume=auto: no checkpoint in {Path(out_dir) / CHECKPOINTS} is intact:\n  - "
                + "\n  - ".join(problems)
                + "\nrestore one from a copy, or start a new run in another trainer.out_dir"
            )
        return None
    if resume == "never":
        found = complete_checkpoints(out_dir)
        if found:
            raise CheckpointError(
                f"trainer.resume=never but trainer.out_dir={out_dir} already holds checkpoints (newest: {found[-1]}); "
                "use trainer.resume=auto to continue that run, or choose a new trainer.out_dir"
            )
        return None
    path = Path(resume).expanduser()
    if not is_checkpoint(path):
        raise CheckpointError(
            f"trainer.resume={resume!r} is not a checkpoint directory (expected {ENGINE_TAG}/ and "
            f"{trainer_state_file(path, 0).name} inside, as in {Path(out_dir) / CHECKPOINTS / 'step_XXXXXXXX'}); "
            "pass one, or use trainer.resume=auto|never"
        )
    try:
        verify_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"trainer.resume={resume!r} cannot be resumed from: {error}") from error
    return path


def verify_checkpoint(checkpoint: Path) -> None:
    """Refuse, naming the bad file, a checkpoint whose files differ from its manifest, or with a `.pt` file that is
    not a whole archive or would need code to load (a manifest rewritten with the file does not hide that)."""
    verify_manifest(checkpoint)
    for path in sorted(checkpoint.rglob("*.pt")):
        check_tensors_file(path)


def trained_finitely(checkpoint: Path) -> bool:
    """Whether the step saved in `checkpoint` had a finite loss and grad norm (checkpoints from before the flag was
    recorded count as finite)."""
    try:
        return bool(load_tensors_file(trainer_state_file(checkpoint, 0)).get("finite", True))
    except CheckpointError:
        return False


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # before the process group exists: every rank resolves the resume
        print(text, flush=True)


def rng_state() -> dict:
    """The RNG states as tensors and plain values, so the trainer state loads with weights_only=True."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(engine, checkpoint: Path, rank: int, world_size: int) -> dict:
    """Restore engine (model, optimizer, scheduler) and return this rank's trainer state (RNG not yet applied)."""
    state_file = trainer_state_file(checkpoint, rank)
    saved_world = sum(1 for path in checkpoint.iterdir() if TRAINER_STATE_FILE.match(path.name))
    if saved_world != world_size or not state_file.is_file():
        raise CheckpointError(
            f"checkpoint {checkpoint} was written by {saved_world} rank(s) but this run has world_size={world_size}; "
            "resume with the same number of processes"
        )
    check_resume_expert_parallel_size(checkpoint / ENGINE_TAG, model_expert_parallel_size(engine.module))
    with deepspeed_loads_weights_only():
        load_path, _ = engine.load_checkpoint(
            str(checkpoint), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {checkpoint / ENGINE_TAG}")
    return load_tensors_file(state_file)
