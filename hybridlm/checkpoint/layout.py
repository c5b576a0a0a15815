"""The run directory's on-disk layout: every file name the trainer writes and the readers look for, in one place.

    out_dir/
      metrics.jsonl                  one JSON object per log or validation event (hybridlm/train/state.py)
      checkpoints/
        step_00000500/
          engine/                    DeepSpeed: mp_rank_00_model_states.pt, ZeRO shards per rank, and under expert
                                     parallelism each rank's experts (hybridlm/checkpoint/experts.py)
          trainer_state_rank{r}.pt   step, tokens seen, data-loader position, RNG states of rank r (finite: bool)
          config.yaml                the resolved TrainConfig
          tokenizer/                 the run's tokenizer (when the data source has one)
          manifest.json              sha256 of every other file, written last (hybridlm/checkpoint/manifest.py)
        latest                       text file naming the newest step directory
        .tmp-step_00000500/          a save in progress (or cut short): never read
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
ENGINE_TAG = "engine"
LATEST = "latest"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's name for data-parallel rank 0's module
TMP_PREFIX = ".tmp-"  # a checkpoint being written (.tmp-step_N) or being replaced (.tmp-replaced-step_N)
STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE_FILE = re.compile(r"^trainer_state_rank(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or resumed from; the message names the path, the problem and the fix."""


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def metrics_file(out_dir: str | Path) -> Path:
    return Path(out_dir) / METRICS_FILE


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def trainer_state_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"trainer_state_rank{rank}.pt"


def is_checkpoint(path: Path) -> bool:
    return (path / ENGINE_TAG).is_dir() and trainer_state_file(path, 0).is_file()


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Published checkpoints of a run, oldest first (the `latest` file is for people and tools; it can lag one
    rename behind)."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if STEP_DIR.match(path.name) and is_checkpoint(path)]
    return sorted(found, key=lambda path: path.name)


def run_dir_of(path: Path) -> Path | None:
    """The run directory `path` is, or is the `checkpoints/` folder of; None otherwise."""
    if (path / CHECKPOINTS).is_dir():
        return path
    if path.name == CHECKPOINTS:
        return path.parent
    return None
