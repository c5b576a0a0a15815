"""Training configuration: the dataclass tree Hydra validates `configs/train.yaml` against.

`register_configs()` stores `TrainConfig` as the schema `train_schema`; `configs/train.yaml` lists it first in its
defaults, so a misspelt key or a value of the wrong type fails at composition, naming the key. Value checks run in
`__post_init__` when `OmegaConf.to_object` builds the tree, before any data, model or process group exists.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hybridlm.config import ConfigError, ModelConfig
from hybridlm.data.config import DataConfig
from hybridlm.parallel.config import ParallelConfig
from hybridlm.train.preemption import DEFAULT_PREEMPT_SIGNALS, parse_signal

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
OFFLOAD_DEVICES = ("none", "cpu")
WANDB_MODES = ("online", "offline", "disabled")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class OptimConfig:
    """AdamW with a per-step learning-rate multiplier: linear warmup, then cosine, WSD or constant."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying linearly to min_lr_ratio
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (cosine, wsd)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]",
        )
        _require(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _require(self.schedule in SCHEDULES, f"optim.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _require(0.0 < self.decay_fraction <= 1.0, f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")


@dataclass
class DeepSpeedConfig:
    """What the DeepSpeed config dict is built from; `extra` is deep-merged over it last (any DeepSpeed key)."""

    zero_stage: int = 2
    micro_batch_size: int = 8  # rows per rank per forward
    grad_accum_steps: int = 1
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    offload_optimizer: str = "none"  # none | cpu (ZeRO >= 1)
    offload_param: str = "none"  # none | cpu (ZeRO 3 only)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        _require(self.micro_batch_size >= 1, f"deepspeed.micro_batch_size={self.micro_batch_size} must be >= 1")
        _require(self.grad_accum_steps >= 1, f"deepspeed.grad_accum_steps={self.grad_accum_steps} must be >= 1")
        _require(self.precision in PRECISIONS, f"deepspeed.precision={self.precision!r}; choose one of {PRECISIONS}")
        for key in ("offload_optimizer", "offload_param"):
            value = getattr(self, key)
            _require(value in OFFLOAD_DEVICES, f"deepspeed.{key}={value!r}; choose one of {OFFLOAD_DEVICES}")
        _require(
            self.offload_optimizer == "none" or self.zero_stage >= 1,
            "deepspeed.offload_optimizer=cpu needs deepspeed.zero_stage >= 1",
        )
        _require(
            self.offload_param == "none" or self.zero_stage == 3,
            "deepspeed.offload_param=cpu needs deepspeed.zero_stage=3",
        )


@dataclass
class TrainerConfig:
    """The loop: length, logging, validation, checkpoints and resume."""

    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, Hydra's .hydra/ and wandb files
    max_steps: int = 1000  # optimizer steps; the lr schedule spans exactly these
    seq_len: int = 512
    log_every: int = 10
    eval_every: int = 200  # 0: validate only at the end
    eval_batches: int = 20  # per rank; capped by the size of the validation split
    save_every: int = 500  # 0: save only at the end
    keep_last: int = 3  # checkpoints kept (and always the newest whose training was finite); 0 keeps all
    # Consecutive steps with a non-finite loss or grad norm after which the run stops, without saving or pruning.
    # 1 by default: DeepSpeed's bf16/fp32 optimizers apply a non-finite gradient (no loss-scaler skip), so the
    # weights are already lost after the first such step.
    max_bad_steps: int = 1
    resume: str = "auto"  # auto: newest complete checkpoint in out_dir, if any | never | a checkpoint directory
    seed: int = 1234
    progress_bar: bool = True  # in a terminal only; a log file gets a plain line every log_every steps either way
    # torch intra-op threads when training on CPU; 0 keeps torch's default (one per core). A small model's many
    # small ops run several times faster on 1 thread when other processes compete for the cores.
    cpu_threads: int = 0
    # Sent by the scheduler before it kills the job (Slurm: --signal=USR1@300): finish the step, save a checkpoint,
    # requeue the job (hybridlm.train.preemption). Under submitit its own signal (USR2) is handled too. [] for none.
    preempt_signals: list[str] = field(default_factory=lambda: list(DEFAULT_PREEMPT_SIGNALS))
    stop_at_step: int = 0  # >0: save and stop after this step, schedule unchanged (jobs split by a time limit)
    stop_at_val_below_unigram_ratio: float = 0.0  # >0: stop once val loss < this * the unigram baseline
    # At the end of a run (not on preemption): export the final checkpoint to out_dir/export/FORMAT-step_N.
    export_format: str = ""  # "" (no export) | hybridlm | qwen3_next | qwen3_5_moe
    export_dtype: str = "bf16"  # bf16 | fp32
    export_shard_size: str = "5GB"  # largest safetensors shard of the export
    export_push_to_hub: str = ""  # ORG/NAME: push the export to the Hugging Face Hub ("" for no push)
    export_private: bool = False  # create the Hub repository as private
    # Before step 1: check every op the model runs as a kernel on this device against its float64 reference
    # (`hybridlm doctor`'s checks; hybridlm/train/kernel_check.py); a wrong one stops the run, naming the fix.
    kernel_check: bool = True
    # Bitwise-repeatable runs on one device: torch's deterministic algorithms, cuBLAS's fixed workspace, cuDNN
    # without benchmarking, and Triton's autotuning choices cached on disk (hybridlm/train/determinism.py).
    deterministic: bool = False

    def __post_init__(self) -> None:
        _require(bool(self.out_dir), "trainer.out_dir is empty; give the run a directory")
        _require(self.max_steps > 0, f"trainer.max_steps={self.max_steps} must be > 0")
        _require(self.seq_len >= 2, f"trainer.seq_len={self.seq_len} must be >= 2")
        _require(self.log_every > 0, f"trainer.log_every={self.log_every} must be > 0")
        for key in ("eval_every", "save_every", "keep_last", "stop_at_step", "cpu_threads"):
            _require(getattr(self, key) >= 0, f"trainer.{key}={getattr(self, key)} must be >= 0 (0 disables)")
        _require(
            self.max_bad_steps >= 1,
            f"trainer.max_bad_steps={self.max_bad_steps} must be >= 1 (non-finite steps in a row before the run stops)",
        )
        _require(self.eval_batches > 0, f"trainer.eval_batches={self.eval_batches} must be > 0")
        _require(bool(self.resume), "trainer.resume is empty; use auto, never or a checkpoint directory")
        _require(
            self.stop_at_step <= self.max_steps,
            f"trainer.stop_at_step={self.stop_at_step} is past trainer.max_steps={self.max_steps}",
        )
        _require(
            self.stop_at_val_below_unigram_ratio >= 0,
            f"trainer.stop_at_val_below_unigram_ratio={self.stop_at_val_below_unigram_ratio} must be >= 0",
        )
        for name in self.preempt_signals:
            try:
                parse_signal(name)
            except ValueError as err:
                raise ConfigError(f"trainer.preempt_signals: {err}") from None
        _require(
            not self.export_push_to_hub or bool(self.export_format),
            f"trainer.export_push_to_hub={self.export_push_to_hub!r} needs trainer.export_format (what to push)",
        )
        _require(
            not self.export_private or bool(self.export_push_to_hub),
            "trainer.export_private=true needs trainer.export_push_to_hub=ORG/NAME (the repository it makes private)",
        )
        self.export_options()

    def export_options(self):
        """The end-of-training export's options (hybridlm.export.options.ExportOptions, whose one validator checks
        them; its errors are re-raised naming the trainer.export_* key); None for no export (export_format ''),
        whose other values are checked all the same, so a typo never waits for the day it is used."""
        from hybridlm.export.options import ExportOptionError, ExportOptions

        try:
            options = ExportOptions(
                format=self.export_format or "hybridlm",  # '' (no export): check the other values as for any format
                dtype=self.export_dtype,
                shard_size=self.export_shard_size,
                push_to_hub=self.export_push_to_hub or None,
                private=self.export_private,
            )
        except ExportOptionError as error:
            hint = " ('' for no export)" if error.option == "format" else ""
            raise ConfigError(f"trainer.export_{error.option}: {error}{hint}") from None
        return options if self.export_format else None


@dataclass
class WandbConfig:
    """Weights & Biases logging from rank 0. offline and disabled never touch the network; online needs credentials
    (checked before any work) and falls back to offline, with a warning, when the server cannot be reached."""

    mode: str = "disabled"  # online | offline | disabled
    project: str = "hybridlm"
    name: str = ""  # "" -> the name of trainer.out_dir
    entity: str = ""
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 30.0  # online: how long wandb.init may wait for the server before going offline
    # online: how long wandb.finish may upload at the end (after a preemption, inside Slurm's grace period); what is
    # left stays on disk for `wandb sync`
    finish_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _require(self.mode in WANDB_MODES, f"wandb.mode={self.mode!r}; choose one of {WANDB_MODES}")
        for key in ("init_timeout_s", "finish_timeout_s"):
            _require(getattr(self, key) > 0, f"wandb.{key}={getattr(self, key)} must be > 0")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        # Built from plain mappings (tests, scripts) rather than by OmegaConf.
        for key, cls in (
            ("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
            ("deepspeed", DeepSpeedConfig), ("trainer", TrainerConfig), ("wandb", WandbConfig),
            ("parallel", ParallelConfig),
        ):  # fmt: skip
            if isinstance(getattr(self, key), dict):
                setattr(self, key, cls(**getattr(self, key)))
        optim, trainer = self.optim, self.trainer
        _require(
            optim.warmup_steps < trainer.max_steps,
            f"optim.warmup_steps={optim.warmup_steps} must be < trainer.max_steps={trainer.max_steps}",
        )
        if optim.schedule == "wsd":
            decay_steps = wsd_decay_steps(optim, trainer.max_steps)
            _require(
                optim.warmup_steps + decay_steps <= trainer.max_steps,
                f"optim.warmup_steps={optim.warmup_steps} + WSD decay ({decay_steps} steps = decay_fraction "
                f"{optim.decay_fraction} x max_steps) exceeds trainer.max_steps={trainer.max_steps}; "
                "lower one of them",
            )
        _require(
            trainer.seq_len <= self.model.max_position_embeddings,
            f"trainer.seq_len={trainer.seq_len} exceeds model.max_position_embeddings="
            f"{self.model.max_position_embeddings}",
        )
        self.parallel.check_model(self.model)
        self.parallel.check_zero_stage(self.model, self.deepspeed.zero_stage)
        if self.parallel.context_parallel_size > 1:
            self.parallel.check_seq_len(trainer.seq_len)


def wsd_decay_steps(optim: OptimConfig, max_steps: int) -> int:
    return max(1, round(optim.decay_fraction * max_steps))


def to_train_config(cfg) -> TrainConfig:
    """The validated TrainConfig of a composed Hydra config. Keys added with `+key=value` bypass the schema at
    composition (OmegaConf would then drop them silently), so they are rejected here, by name."""
    from omegaconf import OmegaConf

    _reject_unknown_keys(OmegaConf.to_container(cfg, resolve=False), TrainConfig, "")
    return OmegaConf.to_object(cfg)


def _reject_unknown_keys(node: dict, schema: type, prefix: str) -> None:
    hints = typing.get_type_hints(schema)
    known = {f.name for f in dataclasses.fields(schema)}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {path!r}; {prefix or 'the top level '}takes {sorted(known)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _reject_unknown_keys(value, hints[key], f"{path}.")


def register_configs() -> None:
    """Make `train_schema` (the TrainConfig tree) available to Hydra's defaults lists."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
