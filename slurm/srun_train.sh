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
# srun does not inherit the job's --cpus-per-task (Slurm >= 22.05 reads only SRUN_CPUS_PER_TASK): without this each
# rank gets one CPU, and one core once tasks are bound (task/affinity, task/cgroup).
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST," \
  "${SLURM_CPUS_PER_TASK:-default} CPUs per task, master $MASTER_ADDR:$MASTER_PORT, overrides: $*"

# The per-task variables exist only inside each task, hence the inner shell. `exec` makes python the task itself,
# so the preemption signal (--signal) reaches it. On that signal the trainer finishes its step, saves a checkpoint
# and runs `scontrol requeue`; the requeued job reruns this script and resumes (trainer.resume=auto, the default).
srun --kill-on-bad-exit=1 bash -c \
  'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID exec "$0" train.py "$@"' \
  "$PYTHON" "$@" &
srun_pid=$!

# A signal sent to this batch shell (`--signal=B:USR1@300`, `scancel --signal=USR1 --batch`) would end it without a
# save; srun forwards it to every task instead, which then save and requeue as above.
forwarded=0
forward() {
  forwarded=1
  echo "[slurm] batch shell got SIG$1: forwarding it to the tasks" >&2
  kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# A trapped signal ends `wait` early; wait again until srun itself has ended, and exit with its status.
while :; do
  forwarded=0
  status=0
  wait "$srun_pid" || status=$?
  ((forwarded)) || break
done
exit "$status"
