"""torch.distributed's env:// variables from Slurm or submitit, for tasks that torchrun did not start.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT itself. A task started by `srun` (the sbatch
templates in slurm/) or by submitit (`python train.py -m hydra/launcher=slurm`) has only Slurm's variables; this
module derives torch's from them so that every launcher ends in the same `init_process_group(init_method="env://")`.
"""

from __future__ import annotations

import os
import subprocess

TORCH_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as `gpu[03-05,9],cpu1` (rank 0 runs there under block layout)."""
    try:
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"cannot expand the Slurm node list {nodelist!r} with `scontrol show hostnames` ({err}); "
            "set MASTER_ADDR to the first node's hostname yourself"
        ) from err
    return result.stdout.split()[0]


def job_master_port(job_id: str) -> int:
    """A port that all tasks of a job compute alike and that differs between jobs sharing a node."""
    return 20000 + int(job_id.split("_")[0]) % 20000


def export_torch_env_from_scheduler() -> str | None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT when torchrun did not; says who provided them.

    Returns "environment" when RANK is already set (torchrun, the sbatch templates; nothing changes), "submitit" or
    "slurm" when the variables were derived here, None outside any launcher (the caller runs a single process).
    A MASTER_ADDR or MASTER_PORT already in the environment is kept, so users can pick them.
    """
    if "RANK" in os.environ:
        return "environment"
    if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        from submitit.helpers import TorchDistributedEnvironment

        # Not its export(): that narrows CUDA_VISIBLE_DEVICES (the trainer picks cuda:LOCAL_RANK itself) and
        # refuses a MASTER_PORT chosen by the user, whom it otherwise honours.
        job = TorchDistributedEnvironment()
        os.environ.update(
            RANK=str(job.rank),
            WORLD_SIZE=str(job.world_size),
            LOCAL_RANK=str(job.local_rank),
            MASTER_ADDR=os.environ.get("MASTER_ADDR") or job.master_addr,
            MASTER_PORT=str(job.master_port),
        )
        return "submitit"
    # SLURM_STEP_ID exists only inside `srun` tasks; the batch script itself also has SLURM_PROCID=0 and the job's
    # SLURM_NTASKS, and must not pose as rank 0 of a world it does not belong to.
    if "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ["SLURM_LOCALID"],
            MASTER_ADDR=os.environ.get("MASTER_ADDR") or first_slurm_host(nodelist),
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(job_master_port(os.environ["SLURM_JOB_ID"])),
        )
        return "slurm"
    return None
