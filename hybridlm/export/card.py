"""The generated model card (README.md): architecture, parameter counts, training and eval numbers when known."""

from __future__ import annotations

import torch

from hybridlm.config import LAYER_SYMBOLS, MLP_SYMBOLS, ModelConfig, spell_pattern

_LOADING = {
    "hybridlm": "import hybridlm  # registers the model type (or pass trust_remote_code=True, hybridlm installed)\n",
    "qwen3_next": "# plain transformers: Qwen3NextForCausalLM, no trust_remote_code\n",
    "qwen3_5_moe": "# plain transformers: Qwen3_5MoeForCausalLM (text model), no trust_remote_code\n",
}


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def model_card(cfg: ModelConfig, format: str, dtype: torch.dtype, metadata: dict) -> str:  # noqa: A002
    counts = cfg.parameter_counts()  # equal to the module's own count (tests/test_model.py)
    layers = spell_pattern(cfg.layer_types, LAYER_SYMBOLS)
    mlps = spell_pattern(cfg.mlp_types, MLP_SYMBOLS)
    m, g, a = cfg.moe, cfg.gdn, cfg.attention
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [hybridlm, gated-deltanet, mixture-of-experts]",
        "---",
        "",
        "# Hybrid Gated DeltaNet + MoE language model",
        "",
        f"Trained with hybridlm; exported as `{format}` ({str(dtype).removeprefix('torch.')}).",
        "",
        "## Architecture",
        "",
        f"- {cfg.num_layers} layers, hidden size {cfg.hidden_size}, vocabulary {cfg.vocab_size}",
        f"- mixers (G: Gated DeltaNet, A: gated softmax attention): `{layers}`",
        f"- feed-forward (M: MoE, D: dense SwiGLU): `{mlps}`",
        f"- Gated DeltaNet: {g.num_k_heads} key heads x {g.head_k_dim}, {g.num_v_heads} value heads x {g.head_v_dim}, "
        f"conv {g.conv_kernel}",
        f"- attention: {a.num_heads} heads, {a.num_kv_heads} KV heads, head dim {a.head_dim}, "
        f"RoPE theta {a.rope_theta:g} on {a.partial_rotary_factor:g} of each head",
        f"- MoE: {m.num_experts} experts of {m.intermediate_size}, top-{m.top_k} ({m.score_func}), shared expert "
        f"{m.shared_expert_intermediate_size or 'none'}",
        f"- parameters: {_millions(counts['total'])} total, {_millions(counts['active'])} active per token",
        "",
        "## Training",
        "",
    ]
    if "tokens_trained" in metadata:
        lines.append(f"- tokens trained: {int(metadata['tokens_trained']):,}")
    if "step" in metadata:
        lines.append(f"- optimizer steps: {metadata['step']}")
    if not {"tokens_trained", "step"} & metadata.keys():
        lines.append("- not recorded in the checkpoint")
    lines += ["", "## Evaluation", ""]
    evals = metadata.get("eval") or {}
    lines += [f"- {name}: {value}" for name, value in evals.items()] if evals else ["- no evaluation recorded"]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        _LOADING[format] + "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
    ]
    return "\n".join(lines)
