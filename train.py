"""Train a hybrid model: `python train.py experiment=smoke`, `torchrun --nproc_per_node 8 train.py model=gpu_1b ...`,
`sbatch slurm/train_1node.sbatch ...` (slurm/), or a sweep, one Slurm job per point:
`python train.py -m hydra/launcher=slurm trainer.out_dir=runs/lr_sweep optim.lr=3e-4,6e-4`.

Configs live in configs/ (see configs/train.yaml); any key can be overridden on the command line.
"""

# First of all, before torch, Hydra, DeepSpeed and transformers load (seconds): from here on the scheduler's
# preemption signal is recorded, and requeues the job once the trainer is up, instead of killing the process.
from hybridlm.train.preemption import record_signals_during_start_up

record_signals_during_start_up()

import os  # noqa: E402

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

if not torch.cuda.is_available():
    # Triton runs on CPU only in interpreter mode, which must be chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridlm.train import register_configs, run, to_train_config  # noqa: E402

register_configs()


@hydra.main(version_base=None, config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # Sweep point N of a multirun trains in trainer.out_dir/N (hydra.sweep in configs/train.yaml).
        cfg.trainer.out_dir = hydra_cfg.runtime.output_dir
    run(to_train_config(cfg))


if __name__ == "__main__":
    main()
