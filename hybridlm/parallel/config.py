"""The `parallel` section of the training config (`configs/parallel/`).

Values are checked in two places: here, against the model config and the ZeRO stage (`ParallelConfig.check_model`,
`check_zero_stage`, called by TrainConfig and by `hybridlm plan`), and at start-up against the world size
(`ParallelConfig.check_world_size`, before the model exists).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridlm.config import ConfigError, ModelConfig


@dataclass
class ParallelConfig:
    # Ranks that share one MoE layer's experts: each holds num_experts / expert_parallel_size of them and tokens
    # reach their experts by all-to-all inside the group. 1: every rank holds every expert (plain data parallel).
    # Models without MoE layers ignore it.
    expert_parallel_size: int = 1
    # Ranks that split every row of the same batch along its length (context parallelism,
    # hybridlm/parallel/context.py): consecutive blocks of CP ranks read the same rows, each computing its
    # contiguous T / CP tokens; the data-parallel size is world / CP. 1: every rank holds its rows whole.
    context_parallel_size: int = 1

    def __post_init__(self) -> None:
        for key in ("expert_parallel_size", "context_parallel_size"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"parallel.{key}={value} must be >= 1 (1 turns it off)")

    def expert_parallel_size_for(self, model: ModelConfig) -> int:
        """The expert-parallel size the model runs with: 1 for a model without MoE layers."""
        return self.expert_parallel_size if "moe" in model.mlp_types else 1

    def check_model(self, model: ModelConfig) -> None:
        ep = self.expert_parallel_size_for(model)
        cp = self.context_parallel_size
        if cp > 1 and ep > 1:
            raise ConfigError(
                f"parallel.context_parallel_size={cp} with parallel.expert_parallel_size={ep}: the two are not "
                "combined yet (untested rank layout); set one of them to 1"
            )
        gdn = model.gdn
        if cp > 1 and "gated_deltanet" in model.layer_types and gdn.backend in ("triton", "auto"):
            from hybridlm.kernels.gated_delta.chunk import MAX_HEAD_DIM

            if gdn.head_k_dim + gdn.head_v_dim > MAX_HEAD_DIM:
                raise ConfigError(
                    f"parallel.context_parallel_size={cp} runs model.gdn.head_k_dim + head_v_dim = "
                    f"{gdn.head_k_dim} + {gdn.head_v_dim} value channels through the Triton GDN kernels, which tile "
                    f"at most {MAX_HEAD_DIM}; use smaller heads, model.gdn.backend=torch or context_parallel_size=1"
                )
        num_experts = model.moe.num_experts
        if num_experts % ep:
            divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
            raise ConfigError(
                f"parallel.expert_parallel_size={ep} does not divide model.moe.num_experts={num_experts}: every "
                f"rank must hold the same number of experts; choose one of {divisors}"
            )

    def check_zero_stage(self, model: ModelConfig, zero_stage: int) -> None:
        ep = self.expert_parallel_size_for(model)
        if ep > 1 and zero_stage == 3:
            raise ConfigError(
                f"parallel.expert_parallel_size={ep} with deepspeed.zero_stage=3: DeepSpeed does not partition MoE "
                "(expert-parallel) parameters under ZeRO 3; use deepspeed=zero2 (each rank then keeps only its "
                "experts' optimizer-state shard) or parallel.expert_parallel_size=1"
            )
        if ep > 1 and zero_stage == 0:
            raise ConfigError(
                f"parallel.expert_parallel_size={ep} with deepspeed.zero_stage=0: DeepSpeed's ZeRO 0 gradient "
                "clipping averages each rank's norm over ranks that hold different experts (deepspeed/runtime/"
                "utils.py clip_grad_norm_), not the norm of the whole gradient; use deepspeed=zero1 or "
                "deepspeed=zero2"
            )

    def check_seq_len(self, seq_len: int) -> None:
        """Every rank's slice of a row a whole number of the GDN kernels' 64-token chunks."""
        cp = self.context_parallel_size
        if seq_len % (cp * 64):
            raise ConfigError(
                f"trainer.seq_len={seq_len} is not a multiple of parallel.context_parallel_size={cp} x 64: each of "
                f"the {cp} ranks takes a slice of whole 64-token chunks; use a multiple of {cp * 64}"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that read different rows: the world over the context-parallel groups."""
        return world_size // self.context_parallel_size

    def check_world_size(self, model: ModelConfig, world_size: int) -> None:
        cp = self.context_parallel_size
        if world_size % cp:
            raise ConfigError(
                f"parallel.context_parallel_size={cp} does not divide the world size {world_size} (ranks launched): "
                f"launch a multiple of {cp} ranks or choose a context_parallel_size that divides {world_size}"
            )
        ep = self.expert_parallel_size_for(model)
        if world_size % ep:
            raise ConfigError(
                f"parallel.expert_parallel_size={ep} does not divide the world size {world_size} (ranks launched): "
                f"launch a multiple of {ep} ranks or choose an expert_parallel_size that divides {world_size}"
            )
