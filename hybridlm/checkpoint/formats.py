"""Native transformers formats our architecture fits: Qwen3-Next and Qwen3.5-MoE (text model).

Each format is one config translation (both directions), one fit check that lists every mismatch, and one weight
table: a list of `Rule`s, each naming our tensors, theirs, and the pure functions between them. Export runs every
rule forwards, import runs the same rules backwards, so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hybridlm.checkpoint.layout import CheckpointError
from hybridlm.config import (
    LAYER_SYMBOLS, MLP_SYMBOLS, AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig, spell_pattern,
)
from hybridlm.model import HybridLM

Tensors = list[torch.Tensor]
# Experts as one module each (`experts.{e}.gate_proj.weight`, ...): the layout of the released checkpoints and the
# one transformers' save_pretrained writes for both families. Import also reads "fused" (`experts.gate_up_proj`).
DEFAULT_EXPERT_LAYOUT = "per_expert"
# Our mixer kinds -> config.json's layer_types names (both families).
HF_LAYER_TYPES = {"gated_deltanet": "linear_attention", "attention": "full_attention"}
# config.json keys an import cannot do without (the others have transformers' defaults).
REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
)


class ExportError(CheckpointError):
    """A model cannot be exported as asked (it does not fit the format); the message lists every reason and the fix.
    Import-direction problems are the reader's CheckpointError."""


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_theirs: Callable[[Tensors], Tensors]
    to_ours: Callable[[Tensors], Tensors]


def _identity(tensors: Tensors) -> Tensors:
    return list(tensors)


def _same(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,), _identity, _identity)


def _qwen3_next_gdn_rule(ours: str, theirs: str, gdn: GatedDeltaNetConfig) -> Rule:
    """Our separate in_proj_{qkv,z,b,a} <-> Qwen3-Next's in_proj_qkvz / in_proj_ba, whose rows are grouped per key
    head: [q_h, k_h, v_group_h, z_group_h] and [b_group_h, a_group_h] for each key head h."""
    heads, group = gdn.num_k_heads, gdn.num_v_heads // gdn.num_k_heads
    dk, dv = gdn.head_k_dim, gdn.head_v_dim
    qkvz_split = (dk, dk, group * dv, group * dv)

    def to_theirs(tensors: Tensors) -> Tensors:
        qkv, z, b, a = tensors
        hidden = qkv.shape[1]
        q, k, v = qkv.split((heads * dk, heads * dk, heads * group * dv), dim=0)
        per_head = [t.reshape(heads, -1, hidden) for t in (q, k, v, z)]
        qkvz = torch.cat(per_head, dim=1).reshape(-1, hidden)
        ba = torch.cat([b.reshape(heads, group, hidden), a.reshape(heads, group, hidden)], dim=1).reshape(-1, hidden)
        return [qkvz, ba]

    def to_ours(tensors: Tensors) -> Tensors:
        qkvz, ba = tensors
        hidden = qkvz.shape[1]
        q, k, v, z = qkvz.reshape(heads, sum(qkvz_split), hidden).split(qkvz_split, dim=1)
        b, a = ba.reshape(heads, 2 * group, hidden).split((group, group), dim=1)
        qkv = torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)], dim=0)
        return [qkv, z.reshape(-1, hidden), b.reshape(-1, hidden), a.reshape(-1, hidden)]

    names = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    return Rule(
        tuple(f"{ours}.{n}.weight" for n in names),
        (f"{theirs}.in_proj_qkvz.weight", f"{theirs}.in_proj_ba.weight"),
        to_theirs,
        to_ours,
    )


def _expert_rule(ours: str, theirs: str, moe: MoEConfig, layout: str) -> Rule:
    """Our fused experts (gate_up [E,2I,H], down [E,H,I]) <-> one module per expert, or the same fused tensors."""
    if layout == "fused":
        return Rule(
            (f"{ours}.experts.gate_up_proj", f"{ours}.experts.down_proj"),
            (f"{theirs}.experts.gate_up_proj", f"{theirs}.experts.down_proj"),
            _identity,
            _identity,
        )
    E, inter = moe.num_experts, moe.intermediate_size
    names = [f"{theirs}.experts.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj") for e in range(E)]

    def to_theirs(tensors: Tensors) -> Tensors:
        gate_up, down = tensors
        return [*gate_up[:, :inter].unbind(0), *gate_up[:, inter:].unbind(0), *down.unbind(0)]

    def to_ours(tensors: Tensors) -> Tensors:
        gate, up, down = tensors[:E], tensors[E : 2 * E], tensors[2 * E :]
        return [torch.cat([torch.stack(gate), torch.stack(up)], dim=1), torch.stack(down)]

    return Rule((f"{ours}.experts.gate_up_proj", f"{ours}.experts.down_proj"), tuple(names), to_theirs, to_ours)


@dataclass(frozen=True)
class NativeFormat:
    """One transformers model family our config can be written as."""

    name: str
    model_type: str  # written into config.json
    architecture: str
    dense_layers: bool  # the target has dense-MLP layers (Qwen3-Next's mlp_only_layers)
    grouped_gdn_projection: bool  # Qwen3-Next's in_proj_qkvz / in_proj_ba
    configurable_topk_norm: bool  # Qwen3-Next's norm_topk_prob; Qwen3.5-MoE always renormalises
    accepted_model_types: tuple[str, ...]

    # --- config ---------------------------------------------------------------------------------------------------

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        """Every reason `cfg` cannot be written as this format; empty when it fits exactly."""
        a, m = cfg.attention, cfg.moe
        problems = []
        if not cfg.zero_centered_norm:
            problems.append("model.zero_centered_norm=False, but the target's RMSNorms scale by (1 + w)")
        if not a.output_gate:
            problems.append("model.attention.output_gate=False, but the target always gates attention outputs")
        if not a.qk_norm:
            problems.append("model.attention.qk_norm=False, but the target always normalises q and k")
        if a.sliding_window:
            problems.append(
                f"model.attention.sliding_window={a.sliding_window}, but the target has full attention only"
            )
        if m.score_func != "softmax":
            problems.append(f"model.moe.score_func={m.score_func!r}, but the target routes by softmax")
        if m.selection_bias:
            problems.append("model.moe.selection_bias=True, but the target's router has no selection bias")
        if not m.shared_expert_intermediate_size:
            problems.append(
                "model.moe.shared_expert_intermediate_size=0, but every target MoE layer has a gated shared expert"
            )
        if not self.configurable_topk_norm and not m.renormalize:
            problems.append("model.moe.renormalize=False, but the target always renormalises the top-k weights")
        if not self.dense_layers and "dense" in cfg.mlp_types:
            dense = [i for i, t in enumerate(cfg.mlp_types) if t == "dense"]
            problems.append(
                f"model.mlp_pattern={cfg.mlp_pattern!r} makes layers {dense} dense, but every {self.name} layer is MoE"
            )
        if "attention" not in cfg.layer_types:
            problems.append(
                f"model.layer_pattern={cfg.layer_pattern!r} has no attention layer, but {self.architecture}'s cache "
                "needs one (its forward with use_cache and generate fail); add an A to the pattern"
            )
        return problems

    def check_fits(self, cfg: ModelConfig) -> None:
        problems = self.mismatches(cfg)
        if problems:
            raise ExportError(
                f"this model does not fit --format {self.name}:\n  - "
                + "\n  - ".join(problems)
                + "\nexport it with --format hybridlm, or train with a config that fits (e.g. model="
                + f"{self.name}_tiny)"
            )

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype, token_ids: dict) -> dict:
        """config.json contents; checked by transformers' own config class before it is written."""
        g, a, m = cfg.gdn, cfg.attention, cfg.moe
        rope = {"rope_type": "default", "rope_theta": a.rope_theta, "partial_rotary_factor": a.partial_rotary_factor}
        if self.name == "qwen3_5_moe":
            # Text positions are equal on all three mrope axes, so any split is plain RoPE; keep Qwen's proportions.
            half, share = a.rotary_dim // 2, a.rotary_dim * 11 // 64
            rope.update(mrope_interleaved=True, mrope_section=[share, share, half - 2 * share])
        config = dict(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=a.num_heads,
            num_key_value_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            hidden_act="silu",
            max_position_embeddings=cfg.max_position_embeddings,
            initializer_range=cfg.initializer_range,
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            rope_parameters=rope,
            attention_bias=a.bias,
            attention_dropout=0.0,
            linear_conv_kernel_dim=g.conv_kernel,
            linear_key_head_dim=g.head_k_dim,
            linear_value_head_dim=g.head_v_dim,
            linear_num_key_heads=g.num_k_heads,
            linear_num_value_heads=g.num_v_heads,
            moe_intermediate_size=m.intermediate_size,
            shared_expert_intermediate_size=m.shared_expert_intermediate_size,
            num_experts_per_tok=m.top_k,
            num_experts=m.num_experts,
            router_aux_loss_coef=m.aux_loss_coef,
            layer_types=[HF_LAYER_TYPES[t] for t in cfg.layer_types],
            dtype=str(dtype).removeprefix("torch."),
            **token_ids,
        )
        if self.dense_layers:
            config.update(
                intermediate_size=cfg.intermediate_size,
                decoder_sparse_step=1,
                norm_topk_prob=m.renormalize,
                mlp_only_layers=[i for i, t in enumerate(cfg.mlp_types) if t == "dense"],
            )
        return config

    def model_config(self, hf: dict) -> ModelConfig:
        """Our config from a config.json of this family (nested `text_config` of the multimodal model included)."""
        if "text_config" in hf:
            hf = {**hf["text_config"], "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
        absent = [key for key in REQUIRED_KEYS if key not in hf]
        if absent:
            raise CheckpointError(f"cannot import this {self.name} checkpoint: config.json lacks {absent}")
        problems = []
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hf['hidden_act']!r}; hybridlm's MLPs use silu")
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            problems.append(f"rope_parameters={rope} with scaling; hybridlm implements the default RoPE only")
        n = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % hf.get("full_attention_interval", 4) == 0 else "linear_attention"
            for i in range(n)
        ]
        ours = {theirs: kind for kind, theirs in HF_LAYER_TYPES.items()}
        unknown = sorted(set(layer_types) - set(ours))
        if unknown:
            problems.append(f"layer_types has {unknown}; hybridlm has {' and '.join(ours)} layers")
        if self.dense_layers:
            step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
            moe_layers = [i not in only and hf.get("num_experts", 0) > 0 and (i + 1) % step == 0 for i in range(n)]
        else:
            moe_layers = [True] * n
        if problems:
            raise CheckpointError(f"cannot import this {self.name} checkpoint:\n  - " + "\n  - ".join(problems))
        values = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=n,
            layer_pattern=_shortest_period(spell_pattern([ours[t] for t in layer_types], LAYER_SYMBOLS)),
            mlp_pattern=_shortest_period(spell_pattern(["moe" if moe else "dense" for moe in moe_layers], MLP_SYMBOLS)),
            intermediate_size=hf.get("intermediate_size") or 1,  # Qwen3.5-MoE has no dense layers to size
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            zero_centered_norm=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=hf.get("initializer_range", 0.02),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            gdn=GatedDeltaNetConfig(
                num_k_heads=hf["linear_num_key_heads"],
                num_v_heads=hf["linear_num_value_heads"],
                head_k_dim=hf["linear_key_head_dim"],
                head_v_dim=hf["linear_value_head_dim"],
                conv_kernel=hf.get("linear_conv_kernel_dim", 4),
            ),
            attention=AttentionConfig(
                num_heads=hf["num_attention_heads"],
                num_kv_heads=hf["num_key_value_heads"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                rope_theta=rope_theta,
                partial_rotary_factor=partial,
                output_gate=True,
                qk_norm=True,
                bias=bool(hf.get("attention_bias", False)),
            ),
            moe=MoEConfig(
                num_experts=hf["num_experts"],
                top_k=hf["num_experts_per_tok"],
                intermediate_size=hf["moe_intermediate_size"],
                shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
                renormalize=bool(hf.get("norm_topk_prob", True)),
                aux_loss_coef=hf.get("router_aux_loss_coef", 1e-2),
            ),
        )
        return ModelConfig(**values)

    # --- weights --------------------------------------------------------------------------------------------------

    def rules(self, cfg: ModelConfig, expert_layout: str = DEFAULT_EXPERT_LAYOUT) -> list[Rule]:
        """The weight table for `cfg`: our state-dict names <-> this format's, in file order."""
        rules = [_same("embed_tokens.weight", "model.embed_tokens.weight")]
        for i, (mixer, mlp) in enumerate(zip(cfg.layer_types, cfg.mlp_types)):
            ours, theirs = f"layers.{i}", f"model.layers.{i}"
            names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
            if mixer == "gated_deltanet":
                gdn_names = ["conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight"]
                if self.grouped_gdn_projection:
                    rules.append(_qwen3_next_gdn_rule(f"{ours}.linear_attn", f"{theirs}.linear_attn", cfg.gdn))
                else:
                    gdn_names = [f"in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")] + gdn_names
                names += [f"linear_attn.{n}" for n in gdn_names]
            else:
                projections = ("q_proj", "k_proj", "v_proj", "o_proj")
                names += [f"self_attn.{p}.weight" for p in (*projections, "q_norm", "k_norm")]
                if cfg.attention.bias:
                    names += [f"self_attn.{p}.bias" for p in projections]
            if mlp == "moe":
                names += ["mlp.gate.weight", "mlp.shared_expert_gate.weight"]
                names += [f"mlp.shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
                rules.append(_expert_rule(f"{ours}.mlp", f"{theirs}.mlp", cfg.moe, expert_layout))
            else:
                names += [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
            rules += [_same(f"{ours}.{n}", f"{theirs}.{n}") for n in names]
        rules.append(_same("norm.weight", "model.norm.weight"))
        if not cfg.tie_embeddings:
            rules.append(_same("lm_head.weight", "lm_head.weight"))
        return rules

    def to_theirs(
        self, cfg: ModelConfig, state: dict[str, torch.Tensor], expert_layout: str = DEFAULT_EXPERT_LAYOUT
    ) -> dict[str, torch.Tensor]:
        return _apply(self.rules(cfg, expert_layout), state, forwards=True)

    def their_shapes(self, cfg: ModelConfig, expert_layout: str) -> dict[str, torch.Size]:
        """Names and shapes of this format's tensors for `cfg` (the rules run on meta tensors: no memory)."""
        with torch.device("meta"):
            ours = {name: torch.empty(shape) for name, shape in expected_shapes(cfg).items()}
            return {name: t.shape for name, t in self.to_theirs(cfg, ours, expert_layout).items()}

    def to_ours(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict from this format's tensors (either expert layout). Refuses, listing each one, tensors that
        config.json does not call for, lacks or shapes otherwise."""
        tensors = {_strip_language_model(k): v for k, v in tensors.items() if not _ignored_on_import(k)}
        if cfg.tie_embeddings and "lm_head.weight" in tensors:
            head, embedding = tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")
            if embedding is not None and not torch.equal(head, embedding):
                raise CheckpointError(
                    f"the {self.name} checkpoint's config.json ties the embeddings (tie_word_embeddings=true), but "
                    "its lm_head.weight differs from model.embed_tokens.weight; set tie_word_embeddings to false in "
                    "config.json to keep that head, or delete lm_head.weight to use the embedding"
                )
        layout = expert_layout_of(tensors)
        expected = self.their_shapes(cfg, layout)
        missing = sorted(expected.keys() - tensors.keys())
        extra = sorted(tensors.keys() - expected.keys())
        misshapen = [
            f"{name} {tuple(tensors[name].shape)}, config.json needs {tuple(shape)}"
            for name, shape in expected.items()
            if name in tensors and tensors[name].shape != shape
        ]
        if missing or extra or misshapen:
            raise CheckpointError(
                f"the {self.name} checkpoint's tensors do not match its config.json:\n"
                f"  missing ({len(missing)}): {_some(missing)}\n"
                f"  unexpected ({len(extra)}): {_some(extra)}\n"
                f"  misshapen ({len(misshapen)}): {_some(misshapen)}"
            )
        return _apply(self.rules(cfg, layout), tensors, forwards=False)


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of every tensor of a model built from `cfg` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    return {name: t.shape for name, t in model.state_dict().items()}


def expert_layout_of(names) -> str:
    """The expert layout of a native checkpoint, from its tensor names."""
    return "per_expert" if any(".experts.0." in name for name in names) else "fused"


def _apply(rules: list[Rule], tensors: dict[str, torch.Tensor], forwards: bool) -> dict[str, torch.Tensor]:
    """Run every rule ours -> theirs (forwards) or theirs -> ours."""
    out = {}
    for rule in rules:
        source, target, convert = (
            (rule.ours, rule.theirs, rule.to_theirs) if forwards else (rule.theirs, rule.ours, rule.to_ours)
        )
        out.update((name, own_storage(t)) for name, t in zip(target, convert([tensors[n] for n in source])))
    return out


def _some(items: list[str], limit: int = 8) -> str:
    return f"{items[:limit]}{' ...' if len(items) > limit else ''}"


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that is the whole of its storage (safetensors refuses slices of a shared one)."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _strip_language_model(name: str) -> str:
    # The multimodal Qwen3.5 checkpoints keep the text model under model.language_model.
    return name.replace("model.language_model.", "model.", 1)


def _ignored_on_import(name: str) -> bool:
    """Multi-token-prediction heads and the vision tower are not part of our model."""
    return name.startswith(("mtp.", "model.visual.", "visual."))


def _shortest_period(pattern: str) -> str:
    for period in range(1, len(pattern) + 1):
        if len(pattern) % period == 0 and pattern[:period] * (len(pattern) // period) == pattern:
            return pattern[:period]
    return pattern


FORMATS = {
    "qwen3_next": NativeFormat(
        name="qwen3_next",
        model_type="qwen3_next",
        architecture="Qwen3NextForCausalLM",
        dense_layers=True,
        grouped_gdn_projection=True,
        configurable_topk_norm=True,
        accepted_model_types=("qwen3_next",),
    ),
    "qwen3_5_moe": NativeFormat(
        name="qwen3_5_moe",
        model_type="qwen3_5_moe_text",
        architecture="Qwen3_5MoeForCausalLM",
        dense_layers=False,
        grouped_gdn_projection=False,
        configurable_topk_norm=False,
        accepted_model_types=("qwen3_5_moe_text", "qwen3_5_moe"),
    ),
}


def format_for_model_type(model_type: str) -> NativeFormat | None:
    return next((f for f in FORMATS.values() if model_type in f.accepted_model_types), None)


def config_to_dict(cfg: ModelConfig) -> dict:
    """Plain, JSON-able dict of a ModelConfig (nested configs included)."""
    return dataclasses.asdict(cfg)
