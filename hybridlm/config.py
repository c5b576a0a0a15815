"""Model configuration: small validated dataclasses, usable directly as Hydra structured configs.

Every check runs at construction (`__post_init__`), so a bad value fails before any tensor is allocated, with a
message naming the key, the value and a fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Pattern symbol -> layer kind, for the mixers and the feed-forward layers; spell_pattern writes the inverse.
LAYER_SYMBOLS = {"G": "gated_deltanet", "A": "attention"}
MLP_SYMBOLS = {"M": "moe", "D": "dense"}
AUX_LOSS_SCOPES = ("micro_batch", "step")
# Field metadata key: the setting changes training or the kernels, not what the weights compute, so a checkpoint made
# with another value still fits (model.init_from and imports compare the rest; see training_only_fields).
TRAINING_ONLY = "training_only"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""


def training_only(default):
    """A field with `default` marked training-only (see TRAINING_ONLY)."""
    return field(default=default, metadata={TRAINING_ONLY: True})


def training_only_fields(config_class: type) -> set[str]:
    """The dotted names (`moe.backend`) of the fields of `config_class` and its sub-configs marked training-only."""
    names = set()
    for config_field in dataclasses.fields(config_class):
        if config_field.metadata.get(TRAINING_ONLY):
            names.add(config_field.name)
        elif dataclasses.is_dataclass(config_field.default_factory):  # a sub-config section
            names.update(f"{config_field.name}.{name}" for name in training_only_fields(config_field.default_factory))
    return names


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_backend(op: str, backend: str) -> None:
    """`backend` names an implementation that op `op` ("GATED_DELTA", "MOE", "ATTENTION") registered in
    hybridlm.ops, and its package is installed."""
    from hybridlm import ops  # imported here: hybridlm.ops imports torch, and importing this module needs none

    refusal = getattr(ops, op).refusal(backend)
    _require(refusal is None, refusal or "")


def normalize_pattern(pattern, key: str) -> str:
    """A pattern as written in a config: a string (`GGGA`, `G,G,G,A`) or a YAML list of symbols (`[G, G, G, A]`)
    -> the compact string form every consumer (export, logs) reads."""
    if isinstance(pattern, str):
        return pattern.replace(" ", "").replace(",", "")
    if isinstance(pattern, (list, tuple)) and all(isinstance(symbol, str) for symbol in pattern):
        return "".join(symbol.strip() for symbol in pattern)
    raise ConfigError(f"{key}={pattern!r} must be a string such as GGGA or a list of symbols such as [G, G, G, A]")


def expand_pattern(pattern: str, num_layers: int, symbols: dict[str, str], key: str) -> list[str]:
    """`GGGA` with 8 layers -> GGGAGGGA; a pattern as long as the stack is taken as the explicit per-layer list."""
    pattern = normalize_pattern(pattern, key)
    _require(len(pattern) > 0, f"{key} is empty; give at least one symbol from {sorted(symbols)}")
    unknown = sorted({s for s in pattern if s not in symbols})
    _require(
        not unknown,
        f"{key}={pattern!r} has unknown symbol(s) {unknown}; use only {', '.join(f'{s} ({n})' for s, n in symbols.items())}",
    )
    _require(
        num_layers % len(pattern) == 0,
        f"{key}={pattern!r} (length {len(pattern)}) does not tile num_layers={num_layers}; "
        f"make num_layers a multiple of {len(pattern)} or spell out all {num_layers} layers",
    )
    return [symbols[s] for s in pattern * (num_layers // len(pattern))]


def spell_pattern(kinds: list[str], symbols: dict[str, str]) -> str:
    """One symbol per layer: ["gated_deltanet", "attention"] with LAYER_SYMBOLS -> "GA" (expand_pattern's inverse)."""
    symbol_of = {kind: symbol for symbol, kind in symbols.items()}
    return "".join(symbol_of[kind] for kind in kinds)


@dataclass
class GatedDeltaNetConfig:
    """Gated DeltaNet mixer (Qwen3-Next / Qwen3.5 linear attention)."""

    num_k_heads: int = 4  # H: query/key heads
    num_v_heads: int = 8  # HV: value heads, a multiple of H (grouped value heads)
    head_k_dim: int = 32
    head_v_dim: int = 32
    conv_kernel: int = 4  # depthwise causal short convolution over q, k, v
    # A = exp(A_log) ~ U(a_init_min, a_init_max); dt = softplus(a + dt_bias) starts in [dt_init_min, dt_init_max]
    a_init_min: float = training_only(0.01)
    a_init_max: float = training_only(16.0)
    dt_init_min: float = training_only(0.001)
    dt_init_max: float = training_only(0.1)
    backend: str = training_only("auto")  # auto: triton on CUDA, torch reference on CPU

    def __post_init__(self) -> None:
        for key in ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "conv_kernel"):
            _require(getattr(self, key) > 0, f"model.gdn.{key}={getattr(self, key)} must be > 0")
        _require(
            self.num_v_heads % self.num_k_heads == 0,
            f"model.gdn.num_v_heads={self.num_v_heads} is not a multiple of model.gdn.num_k_heads={self.num_k_heads}; "
            "grouped value heads need HV = m * H",
        )
        _require(
            0 < self.a_init_min < self.a_init_max,
            f"model.gdn.a_init_min/max=({self.a_init_min}, {self.a_init_max}) must satisfy 0 < min < max",
        )
        _require(
            0 < self.dt_init_min < self.dt_init_max,
            f"model.gdn.dt_init_min/max=({self.dt_init_min}, {self.dt_init_max}) must satisfy 0 < min < max",
        )
        _require_backend("GATED_DELTA", self.backend)


@dataclass
class AttentionConfig:
    """Softmax attention (Qwen3-Next gated attention when output_gate=True)."""

    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # share of head_dim that is rotated (Qwen3-Next: 0.25)
    output_gate: bool = True  # sigmoid gate on the attention output, from the query projection
    qk_norm: bool = True
    sliding_window: int = 0  # 0: full causal attention
    bias: bool = False
    # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex (packed rows; on CPU forward only)
    backend: str = training_only("auto")

    def __post_init__(self) -> None:
        for key in ("num_heads", "num_kv_heads", "head_dim"):
            _require(getattr(self, key) > 0, f"model.attention.{key}={getattr(self, key)} must be > 0")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"model.attention.num_heads={self.num_heads} is not a multiple of "
            f"model.attention.num_kv_heads={self.num_kv_heads}; GQA shares each KV head among a whole group",
        )
        _require(
            0.0 < self.partial_rotary_factor <= 1.0,
            f"model.attention.partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]",
        )
        rotary = int(self.head_dim * self.partial_rotary_factor)
        _require(
            rotary % 2 == 0 and rotary > 0,
            f"model.attention.partial_rotary_factor={self.partial_rotary_factor} with head_dim={self.head_dim} rotates "
            f"{rotary} dims; RoPE needs an even, positive number",
        )
        _require(self.rope_theta > 0, f"model.attention.rope_theta={self.rope_theta} must be > 0")
        _require(self.sliding_window >= 0, f"model.attention.sliding_window={self.sliding_window} must be >= 0")
        _require_backend("ATTENTION", self.backend)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass
class MoEConfig:
    """Sparse mixture of SwiGLU experts, dropless, with an optional gated shared expert."""

    num_experts: int = 8
    top_k: int = 2
    intermediate_size: int = 128  # per expert
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    score_func: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # top-k weights sum to one
    selection_bias: bool = False  # aux-loss-free balancing: a bias that changes which experts are chosen
    bias_update_rate: float = training_only(1e-3)
    aux_loss_coef: float = training_only(1e-2)  # Switch/Mixtral load-balancing loss over the global batch
    # Which expert counts the load-balancing loss balances: micro_batch (this micro-batch on every data-parallel
    # rank, as transformers computes it) or step (also the earlier micro-batches of the optimizer step: Megatron's
    # global_aux_loss, Qwen's global-batch balancing; the same as micro_batch without gradient accumulation).
    aux_loss_scope: str = training_only("micro_batch")
    z_loss_coef: float = training_only(1e-3)  # router z-loss (ST-MoE)
    backend: str = training_only("auto")  # auto: triton on CUDA, torch reference on CPU

    def __post_init__(self) -> None:
        for key in ("num_experts", "top_k", "intermediate_size"):
            _require(getattr(self, key) > 0, f"model.moe.{key}={getattr(self, key)} must be > 0")
        _require(
            self.top_k <= self.num_experts,
            f"model.moe.top_k={self.top_k} > model.moe.num_experts={self.num_experts}; "
            f"choose top_k <= {self.num_experts}",
        )
        _require(
            self.score_func in ("softmax", "sigmoid"),
            f"model.moe.score_func={self.score_func!r}; choose 'softmax' or 'sigmoid'",
        )
        for key in ("shared_expert_intermediate_size", "bias_update_rate", "aux_loss_coef", "z_loss_coef"):
            _require(getattr(self, key) >= 0, f"model.moe.{key}={getattr(self, key)} must be >= 0")
        _require(
            not self.selection_bias or self.bias_update_rate > 0,
            f"model.moe.selection_bias=true with model.moe.bias_update_rate={self.bias_update_rate} never moves the "
            "bias; set bias_update_rate > 0 (e.g. 1e-3) or selection_bias=false",
        )
        _require(
            self.aux_loss_scope in AUX_LOSS_SCOPES,
            f"model.moe.aux_loss_scope={self.aux_loss_scope!r}; choose one of {AUX_LOSS_SCOPES}",
        )
        _require_backend("MOE", self.backend)


@dataclass
class ModelConfig:
    """A hybrid stack: per layer a mixer (G: Gated DeltaNet, A: attention) and an FFN (M: MoE, D: dense SwiGLU)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    # Tiled to num_layers, or one symbol per layer; a string (GGGA) or a YAML list ([G, G, G, A]), kept as the string.
    # Typed Any because OmegaConf's structured configs have no str-or-list type; __post_init__ checks the value.
    layer_pattern: Any = "GGGA"
    mlp_pattern: Any = "M"
    intermediate_size: int = 256  # dense SwiGLU layers
    norm_eps: float = 1e-6
    zero_centered_norm: bool = True  # RMSNorm scales by (1 + w), w initialised to 0 (Qwen3-Next)
    tie_embeddings: bool = False
    initializer_range: float = training_only(0.02)
    max_position_embeddings: int = training_only(32768)
    activation_checkpointing: bool = training_only(False)
    init_from: str = training_only("")  # a checkpoint directory to initialise the weights from
    gdn: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        # Hydra/OmegaConf may hand over plain dicts for the nested configs.
        for key, cls in (("gdn", GatedDeltaNetConfig), ("attention", AttentionConfig), ("moe", MoEConfig)):
            if isinstance(getattr(self, key), dict):
                setattr(self, key, cls(**getattr(self, key)))
        for key in ("vocab_size", "hidden_size", "num_layers", "intermediate_size", "max_position_embeddings"):
            _require(getattr(self, key) > 0, f"model.{key}={getattr(self, key)} must be > 0")
        _require(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        self.layer_pattern = normalize_pattern(self.layer_pattern, "model.layer_pattern")
        self.mlp_pattern = normalize_pattern(self.mlp_pattern, "model.mlp_pattern")
        self.layer_types  # noqa: B018 - validates the patterns
        self.mlp_types  # noqa: B018

    @property
    def layer_types(self) -> list[str]:
        return expand_pattern(self.layer_pattern, self.num_layers, LAYER_SYMBOLS, "model.layer_pattern")

    @property
    def mlp_types(self) -> list[str]:
        return expand_pattern(self.mlp_pattern, self.num_layers, MLP_SYMBOLS, "model.mlp_pattern")

    def parameter_counts(self) -> dict[str, int]:
        """Total and active (per token) parameters, and those of the routed experts (what expert parallelism
        shards), from the config alone (no model needed)."""
        h, g, a, m = self.hidden_size, self.gdn, self.attention, self.moe
        norm = h
        gdn_key, gdn_val = g.num_k_heads * g.head_k_dim, g.num_v_heads * g.head_v_dim
        gdn = (
            h * (2 * gdn_key + gdn_val)  # in_proj_qkv
            + h * gdn_val  # in_proj_z
            + 2 * h * g.num_v_heads  # in_proj_b, in_proj_a
            + (2 * gdn_key + gdn_val) * g.conv_kernel
            + 2 * g.num_v_heads  # A_log, dt_bias
            + g.head_v_dim  # gated norm
            + gdn_val * h  # out_proj
        )
        q_out = a.num_heads * a.head_dim * (2 if a.output_gate else 1)
        attn = h * q_out + 2 * h * a.num_kv_heads * a.head_dim + a.num_heads * a.head_dim * h
        attn += 2 * a.head_dim if a.qk_norm else 0
        attn += (q_out + 2 * a.num_kv_heads * a.head_dim + h) if a.bias else 0  # q, k, v, o biases
        dense = 3 * h * self.intermediate_size
        expert = 3 * h * m.intermediate_size
        shared = 3 * h * m.shared_expert_intermediate_size + (h if m.shared_expert_intermediate_size else 0)
        router = m.num_experts * h
        total = active = self.vocab_size * h * (1 if self.tie_embeddings else 2) + norm
        for mixer, mlp in zip(self.layer_types, self.mlp_types):
            mix = gdn if mixer == "gated_deltanet" else attn
            if mlp == "moe":
                total += 2 * norm + mix + router + shared + m.num_experts * expert
                active += 2 * norm + mix + router + shared + m.top_k * expert
            else:
                total += 2 * norm + mix + dense
                active += 2 * norm + mix + dense
        routed_experts = self.mlp_types.count("moe") * m.num_experts * expert
        return {"total": total, "active": active, "routed_experts": routed_experts}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 * active matmul params + attention scores.

        Embedding lookups are free, the LM head is a matmul; the GDN chunked recurrence is counted per chunk of 64
        (intra-chunk attention-like work plus the K x V state update), attention scores as 4 * T/2 * d per head
        (causal: half the T x T matrix), capped by the sliding window.
        """
        counts = self.parameter_counts()
        matmul_params = counts["active"] - self.vocab_size * self.hidden_size * (0 if self.tie_embeddings else 1)
        flops = 6.0 * matmul_params
        a, g = self.attention, self.gdn
        for mixer in self.layer_types:
            if mixer == "attention":
                span = min(seq_len, a.sliding_window) if a.sliding_window else seq_len / 2
                flops += 3 * 4 * span * a.head_dim * a.num_heads
            else:
                chunk = min(64, seq_len)
                per_head = 2 * chunk * (g.head_k_dim + g.head_v_dim) + 4 * g.head_k_dim * g.head_v_dim
                flops += 3 * per_head * g.num_v_heads
        return flops
