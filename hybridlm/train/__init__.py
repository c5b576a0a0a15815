"""Training: Hydra config schema, DeepSpeed engine, loop, checkpoints and metrics. Entry point: `run(cfg)`."""

from hybridlm.train.config import TrainConfig, register_configs, to_train_config
from hybridlm.train.loop import run

__all__ = ["TrainConfig", "register_configs", "run", "to_train_config"]
