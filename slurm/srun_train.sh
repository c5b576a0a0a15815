#!/bin/bash
# The body of the sbatch templates in this folder: one `python train.py` rank per Slurm task, joined by
# torch.distributed's env:// variables. Not DeepSpeed's launcher: it passes --local_rank, which Hydra rejects.
# Runs inside the job from the submit directory (the repository root); extra arguments are Hydra overrides.
set -euo pipefail

PYTHON=${PYTHON:-python}  # e.g. PYTHON=.venv/bin/python, or activate an environment before sbatch
# One address and port for the whole job; the port differs between jobs sharing a node.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST," \
  "master $MASTER_ADDR:$MASTER_PORT, overrides: $*"

# The per-task variables exist only inside each task, hence the inner shell. `exec` makes python the task itself,
# so the preemption signal (--signal) reaches it. On that signal the trainer finishes its step, saves a checkpoint
# and runs `scontrol requeue`; the requeued job reruns this script and resumes (trainer.resume=auto, the default).
srun --kill-on-bad-exit=1 bash -c \
  'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID exec "$0" train.py "$@"' \
  "$PYTHON" "$@"
