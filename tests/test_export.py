"""Export: reading run / DeepSpeed checkpoints, the hybridlm format round trip, sharding, tokenizer, model card,
every refusal path, atomic output, the CLI and the Hub push (at the HTTP boundary: huggingface_hub's own request
code runs against a mock transport, offline). Real DeepSpeed runs (bf16 masters, ZeRO-3) are in test_export_zero.py,
transformers' own classes in test_export_native.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import hybridlm  # noqa: F401 - registers the hybridlm model type with transformers
from hybridlm.checkpoint import CheckpointError
from hybridlm.checkpoint.formats import FORMATS
from hybridlm.checkpoint.init_from import architecture_mismatches, load_pretrained_into
from hybridlm.checkpoint.reader import read_checkpoint
from hybridlm.cli import main as cli_main
from hybridlm.config import (
    AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig, training_only, training_only_fields,
)
from hybridlm.data.tokenizer import train_byte_level_bpe
from hybridlm.export import ExportError, export_checkpoint
from hybridlm.export.hub import PUSH_RECORD
from hybridlm.export.writer import export_and_push_once
from hybridlm.model import HybridLM

VOCAB = 300


def small_config(**overrides) -> ModelConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=4,
        layer_pattern="GGGA",
        mlp_pattern="MD",
        intermediate_size=40,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, partial_rotary_factor=0.5),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, shared_expert_intermediate_size=16),
    )
    values.update(overrides)
    return ModelConfig(**values)


def random_model(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "A_log" not in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the quick brown fox jumps over the lazy dog", "hybrid models mix recurrences and attention"] * 20
    return train_byte_level_bpe(texts, VOCAB - 20)


def write_run(root: Path, model: HybridLM, tokenizer, step: int = 3, state: dict | None = None) -> Path:
    """A run directory laid out as the trainer writes it (hybridlm/checkpoint/layout.py) for a ZeRO-0/1/2 engine:
    checkpoints/latest -> step_XXXXXXXX/{engine/mp_rank_00_model_states.pt, config.yaml, tokenizer/, trainer_state}."""
    step_dir = root / "checkpoints" / f"step_{step:08d}"
    (step_dir / "engine").mkdir(parents=True)
    module = {k: v.clone() for k, v in (state if state is not None else model.state_dict()).items()}
    torch.save({"module": module, "global_steps": step}, step_dir / "engine" / "mp_rank_00_model_states.pt")
    torch.save({"step": step, "tokens_seen": 4096 * step}, step_dir / "trainer_state_rank0.pt")
    (step_dir / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(model.config)}))
    tokenizer.save_pretrained(str(step_dir / "tokenizer"))
    (root / "checkpoints" / "latest").write_text(step_dir.name)
    (root / "metrics.jsonl").write_text(json.dumps({"step": step, "val_loss": 2.5}) + "\n")
    return root


@pytest.fixture
def run(tmp_path, tokenizer):
    model = random_model(small_config())
    return write_run(tmp_path / "run", model, tokenizer), model


# --- reading ------------------------------------------------------------------------------------------------------


def test_run_directory_resolves_to_the_latest_checkpoint(run):
    root, model = run
    for path in (root, root / "checkpoints", root / "checkpoints" / "step_00000003"):
        ckpt = read_checkpoint(path)
        assert ckpt.kind == "deepspeed" and ckpt.config == model.config
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in model.state_dict().items())
    assert ckpt.metadata["step"] == 3 and ckpt.metadata["tokens_trained"] == 3 * 4096
    assert ckpt.metadata["eval"]["val_loss"] == 2.5
    assert ckpt.tokenizer_dir == root / "checkpoints" / "step_00000003" / "tokenizer"


def test_run_directory_resolves_to_the_newest_complete_checkpoint_as_resume_does(run, tokenizer):
    """`latest` can lag one rename behind a crash; a `.tmp-` directory is a save cut short. Neither is followed."""
    root, _ = run
    newer = random_model(small_config(), seed=1)
    write_run(root, newer, tokenizer, step=5)
    (root / "checkpoints" / "latest").write_text("step_00000003")  # the pointer update was lost
    partial = root / "checkpoints" / ".tmp-step_00000007" / "engine"
    partial.mkdir(parents=True)
    torch.save({"module": {}}, partial / "mp_rank_00_model_states.pt")
    for path in (root, root / "checkpoints"):
        ckpt = read_checkpoint(path)
        assert ckpt.metadata["step"] == 5
        assert torch.equal(ckpt.state_dict["norm.weight"], newer.norm.weight)


def test_a_run_without_a_complete_checkpoint_is_refused(tmp_path):
    (tmp_path / "run" / "checkpoints" / ".tmp-step_00000001" / "engine").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        export_checkpoint(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the hybridlm format ------------------------------------------------------------------------------------------


def test_hybridlm_format_round_trip_gives_identical_logits(run, tmp_path, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root, model = run
    out = export_checkpoint(root, tmp_path / "out", format="hybridlm", dtype="fp32", shard_size="40KB")
    assert type(AutoConfig.from_pretrained(out)).__name__ == "HybridLMConfig"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "HybridLMForCausalLM" and isinstance(loaded.model, HybridLM)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Sharded, with an index naming every shard; the tokenizer loads from OUT and encodes as the original.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert AutoTokenizer.from_pretrained(out).encode("the lazy fox") == tokenizer.encode("the lazy fox")
    # Reading the export back gives the same tensors (the export is itself a valid source).
    again = read_checkpoint(out)
    assert again.kind == "hybridlm" and again.config == model.config
    assert all(torch.equal(again.state_dict[k], v) for k, v in model.state_dict().items())


def test_bf16_export_and_model_card(run, tmp_path):
    root, model = run
    out = export_checkpoint(root, tmp_path / "out", format="hybridlm")
    ckpt = read_checkpoint(out)
    assert all(t.dtype == torch.bfloat16 for t in ckpt.state_dict.values())
    assert torch.equal(ckpt.state_dict["embed_tokens.weight"], model.embed_tokens.weight.to(torch.bfloat16))
    card = (out / "README.md").read_text()
    counts = model.config.parameter_counts()
    assert f"{counts['total'] / 1e6:.2f}M total" in card and f"{counts['active'] / 1e6:.2f}M active" in card
    assert "tokens trained: 12,288" in card and "val_loss: 2.5" in card and "GGGA" in card


def test_parameter_counts_are_the_model_s_own_attention_biases_included():
    cfg = small_config(attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, bias=True))
    model = HybridLM(cfg)
    counts = cfg.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # A token uses top_k of the num_experts routed experts (SwiGLU: 3 matrices of hidden x intermediate each).
    m, moe_layers = cfg.moe, cfg.mlp_types.count("moe")
    idle = moe_layers * (m.num_experts - m.top_k) * 3 * cfg.hidden_size * m.intermediate_size
    assert counts["active"] == counts["total"] - idle


def test_hf_wrapper_generate_matches_ours(run, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from hybridlm.generate import generate

    root, model = run
    out = export_checkpoint(root, tmp_path / "out", format="hybridlm", dtype="fp32")
    wrapper = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = tokenizer(["the quick brown fox", "lazy"], return_tensors="pt", padding=True, padding_side="left")
    theirs = wrapper.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ours = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    assert torch.equal(theirs, ours)
    labels = batch["input_ids"][:1]
    loss = wrapper(labels, labels=labels).loss  # HF convention: labels are the inputs, shifted inside
    expected = torch.nn.functional.cross_entropy(model(labels).logits[0, :-1], labels[0, 1:])
    assert torch.allclose(loss, expected, atol=1e-5)


# --- import ---------------------------------------------------------------------------------------------------------


def test_load_pretrained_into_copies_weights_and_refuses_another_architecture(run, tmp_path):
    root, model = run
    target = random_model(dataclasses.replace(small_config(), activation_checkpointing=True), seed=5)
    meta = load_pretrained_into(target, root)
    assert meta["step"] == 3
    assert all(torch.equal(target.state_dict()[k], v) for k, v in model.state_dict().items())
    other = random_model(small_config(norm_eps=1e-5, layer_pattern="GGAA"))
    with pytest.raises(CheckpointError, match=r"(?s)model.layer_pattern.*model.norm_eps"):
        load_pretrained_into(other, root)


def test_init_from_compares_only_the_settings_the_model_uses(tmp_path, tokenizer):
    """A Qwen3.5-MoE checkpoint has no dense layer, so no intermediate_size to match; a GDN-only model has no
    attention settings. Settings the weights do use must match."""
    moe_only = small_config(mlp_pattern="M")
    root = write_run(tmp_path / "moe_only", random_model(moe_only), tokenizer)
    target = HybridLM(dataclasses.replace(moe_only, intermediate_size=5120))
    load_pretrained_into(target, root)
    assert torch.equal(target.norm.weight, read_checkpoint(root).state_dict["norm.weight"])
    gdn_only = small_config(layer_pattern="G")
    root = write_run(tmp_path / "gdn_only", random_model(gdn_only), tokenizer)
    load_pretrained_into(HybridLM(dataclasses.replace(gdn_only, attention=AttentionConfig(num_heads=8))), root)
    other_gdn = dataclasses.replace(gdn_only, gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8,
                                                                      head_v_dim=8, conv_kernel=2))
    with pytest.raises(CheckpointError, match=r"model.gdn.conv_kernel: ours 2, checkpoint 4"):
        load_pretrained_into(HybridLM(other_gdn), root)


def test_training_only_settings_are_the_fields_marked_so_in_the_config():
    assert training_only_fields(ModelConfig) == {
        "activation_checkpointing", "init_from", "initializer_range", "max_position_embeddings",
        "gdn.a_init_min", "gdn.a_init_max", "gdn.dt_init_min", "gdn.dt_init_max", "gdn.backend", "attention.backend",
        "moe.bias_update_rate", "moe.aux_loss_coef", "moe.aux_loss_scope", "moe.z_loss_coef", "moe.backend",
    }


@pytest.mark.parametrize("marked", [True, False])
def test_a_new_field_marked_training_only_is_ignored_by_the_import_check(marked):
    """Marking the field on the config is all it takes: the import check reads the marks, not a list of its own."""
    declared = training_only(0) if marked else dataclasses.field(default=0)
    extended = dataclasses.make_dataclass("ExtendedModelConfig", [("new_setting", int, declared)], bases=(ModelConfig,))
    ours, theirs = extended(**vars(small_config()), new_setting=1), extended(**vars(small_config()), new_setting=2)
    expected = [] if marked else ["model.new_setting: ours 1, checkpoint 2"]
    assert architecture_mismatches(ours, theirs) == expected


# --- refusals -------------------------------------------------------------------------------------------------------


def test_unfit_config_lists_every_mismatch(tmp_path, tokenizer):
    cfg = small_config(
        mlp_pattern="MD",
        zero_centered_norm=False,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=16, output_gate=False,
                                  qk_norm=False),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, score_func="sigmoid", selection_bias=True,
                      renormalize=False),
    )
    root = write_run(tmp_path / "run", random_model(cfg), tokenizer)
    with pytest.raises(ExportError) as error:
        export_checkpoint(root, tmp_path / "out", format="qwen3_5_moe")
    message = str(error.value)
    for needle in ("zero_centered_norm", "output_gate", "qk_norm=False", "sliding_window=16", "score_func='sigmoid'",
                   "selection_bias", "shared_expert_intermediate_size=0", "renormalize=False", "layers [1, 3] dense"):
        assert needle in message, needle
    assert not (tmp_path / "out").exists()
    # Qwen3-Next expresses dense layers and unnormalised top-k: those two are not listed there.
    next_problems = FORMATS["qwen3_next"].mismatches(cfg)
    assert len(next_problems) == 7 and not any("dense" in p or "renormalize" in p for p in next_problems)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_pattern_without_attention_is_refused_for_native_formats(tmp_path, tokenizer, fmt):
    """transformers' hybrid cache needs an attention layer: without one, model(ids) and generate fail there."""
    cfg = small_config(layer_pattern="G", mlp_pattern="M")
    problems = FORMATS[fmt].mismatches(cfg)
    assert len(problems) == 1 and "model.layer_pattern='G' has no attention layer" in problems[0]
    root = write_run(tmp_path / "run", random_model(cfg), tokenizer)
    with pytest.raises(ExportError, match="has no attention layer"):
        export_checkpoint(root, tmp_path / "out", format=fmt)
    assert not (tmp_path / "out").exists()
    assert export_checkpoint(root, tmp_path / "ours", format="hybridlm").is_dir()  # our own format has no such limit


def test_nan_or_inf_weights_are_refused(tmp_path, tokenizer):
    model = random_model(small_config())
    state = model.state_dict()
    state["layers.0.linear_attn.A_log"][1] = float("nan")
    state["norm.weight"][0] = float("inf")
    root = write_run(tmp_path / "run", model, tokenizer, state=state)
    with pytest.raises(CheckpointError, match=r"NaN or inf in \['layers.0.linear_attn.A_log', 'norm.weight'\]"):
        export_checkpoint(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_beyond_the_bf16_range_are_refused_after_the_cast(tmp_path, tokenizer):
    """Finite in fp32, inf once cast: the check runs on what would be written, and names the tensor."""
    model = random_model(small_config())
    state = model.state_dict()
    state["layers.1.mlp.up_proj.weight"][0, 0] = torch.finfo(torch.float32).max
    root = write_run(tmp_path / "run", model, tokenizer, state=state)
    with pytest.raises(ExportError, match=r"bfloat16 turns values of layers\.1\.mlp\.up_proj\.weight \(largest "
                                          r"\|value\| 3\.403e\+38\) into inf.*--dtype fp32"):
        export_checkpoint(root, tmp_path / "out", dtype="bf16")
    assert not (tmp_path / "out").exists()
    assert export_checkpoint(root, tmp_path / "fp32", dtype="fp32").is_dir()


def test_tensors_that_do_not_match_the_config_are_refused(tmp_path, tokenizer):
    model = random_model(small_config())
    state = model.state_dict()
    del state["layers.3.self_attn.k_norm.weight"]
    state["layers.1.mlp.up_proj.weight"] = torch.zeros(41, 32)
    state["layers.9.extra"] = torch.zeros(1)
    root = write_run(tmp_path / "run", model, tokenizer, state=state)
    with pytest.raises(CheckpointError) as error:
        export_checkpoint(root, tmp_path / "out")
    message = str(error.value)
    assert "missing layers.3.self_attn.k_norm.weight" in message
    assert "unexpected layers.9.extra" in message
    assert "layers.1.mlp.up_proj.weight has shape (41, 32), the config needs (40, 32)" in message


def test_missing_or_truncated_shard_is_refused(run, tmp_path):
    root, _ = run
    out = export_checkpoint(root, tmp_path / "sharded", dtype="fp32", shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shards[1].name} is truncated or corrupt"):
        export_checkpoint(out, tmp_path / "again")
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"shard\(s\) \['{shards[1].name}'\] listed in .* are missing"):
        read_checkpoint(out)
    assert not (tmp_path / "again").exists()


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def _rewrite_safetensors(directory: Path, edit) -> None:
    """Rewrite the single-file checkpoint in `directory` with edit(tensors) -> tensors."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def qwen3_next_export(tmp_path_factory, tokenizer):
    """A qwen3_next export of small_config (GDN + attention, MoE + dense layers), read-only: copy before editing."""
    root = tmp_path_factory.mktemp("qwen3_next")
    run_dir = write_run(root / "run", random_model(small_config()), tokenizer)
    return export_checkpoint(run_dir, root / "export", format="qwen3_next", dtype="fp32")


# (config.json edit, the message that must name it); small_config: 2 key heads x 8, 4 value heads x 8, 4 experts,
# layer 1 and 3 dense (mlp_only_layers [1, 3]).
NATIVE_REFUSALS = {
    "activation": (dict(hidden_act="gelu"), r"hidden_act='gelu'; hybridlm's MLPs use silu"),
    "rope_scaling": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
                     r"rope_parameters=.*'yarn'.* with scaling; hybridlm implements the default RoPE only"),
    "layer_type": (dict(layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]),
                   r"layer_types has \['sliding_attention'\]"),
    "model_type": (dict(model_type="llama"), r"model_type='llama'; readable types are"),
    "missing_key": (dict(linear_num_key_heads=None), r"config.json lacks \['linear_num_key_heads'\]"),
    "odd_rotary": (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.375}),
                   r"invalid|rotates 3 dims; RoPE needs an even"),
    "num_experts": (dict(num_experts=5),
                    r"(?s)missing \(6\): \['model.layers.0.mlp.experts.4.down_proj.weight'.*"
                    r"misshapen \(2\): \['model.layers.0.mlp.gate.weight \(4, 32\), config.json needs \(5, 32\)'"),
    "mlp_only_layers": (dict(mlp_only_layers=[1]), r"(?s)missing \(\d+\): \['model.layers.3.mlp.experts.0.down_proj"
                        r".*unexpected \(3\): \['model.layers.3.mlp.down_proj.weight'"),
    "gdn_heads": (dict(linear_num_key_heads=1),
                  r"(?s)misshapen \(6\): \['model.layers.0.linear_attn.in_proj_qkvz.weight \(96, 32\), config.json "
                  r"needs \(80, 32\)', 'model.layers.0.linear_attn.conv1d.weight \(64, 1, 4\), config.json needs"),
    "gdn_value_dim": (dict(linear_value_head_dim=12), r"(?s)misshapen \(\d+\): .*in_proj_qkvz.weight \(96, 32\)"),
}


@pytest.mark.parametrize("case", list(NATIVE_REFUSALS))
def test_native_checkpoints_that_we_cannot_import_are_refused(qwen3_next_export, tmp_path, case):
    edit, message = NATIVE_REFUSALS[case]
    source = shutil.copytree(qwen3_next_export, tmp_path / "source")
    _edit_config(source, **edit)
    with pytest.raises(CheckpointError, match=message):
        export_checkpoint(source, tmp_path / "out", format="hybridlm")
    assert not (tmp_path / "out").exists()


def test_a_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path, tokenizer):
    from safetensors import safe_open

    model = random_model(small_config(tie_embeddings=True))
    root = write_run(tmp_path / "run", model, tokenizer)
    export = export_checkpoint(root, tmp_path / "export", format="qwen3_next", dtype="fp32")
    with safe_open(export / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    # The embedding stored a second time as the head is the tied head: read as one tensor.
    _rewrite_safetensors(export, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    assert torch.equal(read_checkpoint(export).state_dict["embed_tokens.weight"], model.embed_tokens.weight)
    _rewrite_safetensors(export, lambda t: {**t, "lm_head.weight": t["lm_head.weight"] + 1})
    with pytest.raises(CheckpointError, match="ties the embeddings .* but its lm_head.weight differs"):
        read_checkpoint(export)


def test_hybridlm_exports_with_broken_tensors_are_refused(run, tmp_path):
    root, _ = run
    single = export_checkpoint(root, tmp_path / "single", dtype="fp32")
    _rewrite_safetensors(single, lambda t: {k.removeprefix("model."): v for k, v in t.items()})
    with pytest.raises(CheckpointError, match=r"hybridlm tensors must start with 'model.'; found \['embed_tokens.weight'"):
        export_checkpoint(single, tmp_path / "out")
    sharded = export_checkpoint(root, tmp_path / "sharded", dtype="fp32", shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.ghost"] = next(iter(index["weight_map"].values()))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensors \['model.layers.0.ghost'\] listed in the index are not in"):
        export_checkpoint(sharded, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_deepspeed_sources_without_their_parts_are_refused(run, tmp_path):
    root, _ = run
    save_dir = tmp_path / "deepspeed_save"  # DeepSpeed's own layout: latest -> tag directory
    save_dir.mkdir()
    (save_dir / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match=r"latest points to 'global_step9', but .*global_step9 does not exist"):
        export_checkpoint(save_dir, tmp_path / "out")
    (root / "checkpoints" / "step_00000003" / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="no config YAML with a `model:` section beside"):
        export_checkpoint(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_transformers_rewriting_the_layer_types_is_refused(run, tmp_path, monkeypatch):
    """A transformers version whose config class derives layer_types itself (ignoring ours) must not slip through."""
    from transformers import AutoConfig

    root, _ = run
    for_model = AutoConfig.for_model

    def derive_layer_types(model_type, **values):
        config = for_model(model_type, **values)
        config.layer_types = ["full_attention"] * len(config.layer_types)
        return config

    monkeypatch.setattr(AutoConfig, "for_model", derive_layer_types)
    with pytest.raises(ExportError, match=r"transformers rewrote layer_types for qwen3_next: \['full_attention'"):
        export_checkpoint(root, tmp_path / "out", format="qwen3_next")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_fail_before_any_work(run, tmp_path):
    root, _ = run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    cases = [
        (dict(format="gguf"), "format='gguf'"),
        (dict(dtype="fp16"), "dtype='fp16'"),
        (dict(shard_size="5 parsecs"), "shard_size='5 parsecs'"),
        (dict(push_to_hub="no-slash"), "ORG/NAME"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ExportError, match=match):
            export_checkpoint(root, tmp_path / "out", **kwargs)
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(root, tmp_path / "full")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        export_checkpoint(tmp_path / "full", tmp_path / "out")
    assert not (tmp_path / "out").exists() and (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_a_failure_while_writing_leaves_nothing_in_out(run, tmp_path, monkeypatch):
    root, _ = run

    def fail_midway(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hybridlm.export.card.model_card", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(root, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # neither OUT nor a staging directory


# --- CLI and Hub push -----------------------------------------------------------------------------------------------


def test_cli_exports_a_native_format(run, tmp_path, tokenizer):
    root, _ = run
    write_run(tmp_path / "run35", random_model(small_config(mlp_pattern="M")), tokenizer)
    assert cli_main(["export", str(tmp_path / "run35"), str(tmp_path / "out"), "--format", "qwen3_5_moe"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe_text" and config["architectures"] == ["Qwen3_5MoeForCausalLM"]
    with pytest.raises(SystemExit, match="does not fit --format qwen3_5_moe"):
        cli_main(["export", str(root), str(tmp_path / "out2"), "--format", "qwen3_5_moe"])


def test_cli_errors_are_one_clean_message(tmp_path, run):
    root, _ = run
    for argv, message in [
        (["export", str(tmp_path / "nowhere"), str(tmp_path / "out")], "hybridlm export: checkpoint path .* not exist"),
        (["generate", str(tmp_path / "nowhere"), "hi"], "hybridlm generate: checkpoint path .* does not exist"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert isinstance(exit_info.value.code, str)  # Python prints it to stderr and exits with status 1
        assert re.match(message, exit_info.value.code), exit_info.value.code
    proc = subprocess.run([sys.executable, "-m", "hybridlm.cli", "export", str(tmp_path / "nowhere"), "out"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("hybridlm export: checkpoint path") and proc.stderr.count("\n") == 1


SECRET = "hf_test_token_that_must_never_be_printed"


class FakeHub:
    """The Hub's HTTP API as huggingface_hub's upload path uses it, recording every request. Installed as the
    transport of huggingface_hub's own client (with its request hook), so all of its request code runs."""

    def __init__(self):
        self.requests = []
        self.failing_commits = 0  # how many commit requests to refuse first (403: huggingface_hub does not retry it)

    def __call__(self, request):
        import httpx2

        body = request.read()
        self.requests.append((request.method, request.url.path, dict(request.headers), body))
        path = request.url.path
        if path.endswith("/commit/main") and self.failing_commits:
            self.failing_commits -= 1
            return httpx2.Response(403, json={"error": "You have exceeded your storage quota"})
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/org/tiny", "name": "org/tiny"})
        if path == "/api/validate-yaml":  # the model card's metadata block
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == "/api/models/org/tiny/preupload/main":
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if path == "/api/models/org/tiny/commit/main":
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/org/tiny/commit/" + "a" * 40,
                                              "commitOid": "a" * 40, "success": True})
        # Anything else is refused; huggingface_hub's best-effort GET of its agent registry shrugs that off.
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})

    def committed_files(self) -> dict[str, bytes]:
        """path -> content of the files in the (NDJSON) commit request."""
        (_, _, _, body), = [r for r in self.requests if r[1].endswith("/commit/main")]
        files = {}
        for line in body.decode().splitlines():
            entry = json.loads(line)
            if entry["key"] == "file":
                files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
        return files


@pytest.fixture
def fake_hub(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils._http import hf_request_event_hook

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(hub), event_hooks={"request": [hf_request_event_hook]}))
    yield hub
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


@pytest.mark.parametrize("token_source", ["environment", "login_cache"])
def test_push_to_hub_over_http_never_shows_the_token(run, tmp_path, monkeypatch, capsys, caplog, fake_hub,
                                                     token_source):
    import huggingface_hub

    root, _ = run
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    if token_source == "environment":
        monkeypatch.setenv("HF_TOKEN", SECRET)
    else:  # what `hf auth login` leaves in HF_HOME
        monkeypatch.delenv("HF_TOKEN", raising=False)
        (hf_home / "token").write_text(SECRET)
    monkeypatch.setattr(huggingface_hub.constants, "HF_DEBUG", True)  # it also logs each request as a curl command
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    out = tmp_path / "out"
    assert cli_main(["export", str(root), str(out), "--push-to-hub", "org/tiny", "--private"]) == 0

    posts = [(path, headers, body) for method, path, headers, body in fake_hub.requests if method == "POST"]
    assert [path for path, _, _ in posts] == ["/api/repos/create", "/api/validate-yaml",
                                              "/api/models/org/tiny/preupload/main", "/api/models/org/tiny/commit/main"]
    assert all(headers["authorization"] == f"Bearer {SECRET}" for _, headers, _ in posts)
    create = json.loads(posts[0][2])
    assert create["name"] == "tiny" and create["organization"] == "org" and create["visibility"] == "private"
    # Every file of OUT, byte for byte, and nothing else; then the record of the push, which is not uploaded.
    written = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    record = json.loads(written.pop(PUSH_RECORD))
    assert record == {"repo_id": "org/tiny", "url": "https://huggingface.co/org/tiny", "commit": "a" * 40}
    assert fake_hub.committed_files() == written
    assert {"config.json", "README.md", "tokenizer.json", "model.safetensors"} <= written.keys()

    captured = capsys.readouterr()
    assert any(r.getMessage().startswith("Send: curl") for r in caplog.records)  # its request log was captured
    shown = captured.out + captured.err + caplog.text + "".join(str(r.args) for r in caplog.records)
    assert SECRET not in shown
    assert all(SECRET.encode() not in content for content in written.values())


def test_push_without_a_token_fails_before_exporting(run, tmp_path, monkeypatch):
    root, _ = run
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # no login cache
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "empty_hf_home" / "token"))
    with pytest.raises(ExportError, match="no Hugging Face token"):
        export_checkpoint(root, tmp_path / "out", push_to_hub="org/tiny")
    assert not (tmp_path / "out").exists()


def test_push_while_offline_is_refused_before_exporting_with_one_clear_line(run, tmp_path, monkeypatch):
    import huggingface_hub

    root, _ = run
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(root), str(tmp_path / "out"), "--push-to-hub", "org/tiny"])
    assert exit_info.value.code == ("hybridlm export: --push-to-hub org/tiny: HF_HUB_OFFLINE is set, so "
                                    "huggingface_hub makes no network request; unset HF_HUB_OFFLINE to push, or "
                                    "export without pushing")
    assert not (tmp_path / "out").exists()


def test_a_failed_push_is_retried_by_the_rerun_then_not_repeated(run, tmp_path, monkeypatch, fake_hub):
    """The trainer's end-of-training export: a rerun finds the export complete but unpushed (no push record) and
    pushes it; once pushed, a rerun does not upload again."""
    root, _ = run
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "export" / "hybridlm-step_00000003"
    fake_hub.failing_commits = 1
    with pytest.raises(ExportError, match=rf"(?s){re.escape(str(out))} is exported but was NOT pushed to org/tiny: "
                                          r"HfHubHTTPError: .*403.*storage quota.*Retry with `hf upload org/tiny"):
        export_and_push_once(root, out, push_to_hub="org/tiny", format="hybridlm")
    assert (out / "config.json").is_file() and not (out / PUSH_RECORD).exists()

    assert export_and_push_once(root, out, push_to_hub="org/tiny", format="hybridlm") == \
        "pushed to https://huggingface.co/org/tiny"
    written = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert json.loads(written.pop(PUSH_RECORD))["repo_id"] == "org/tiny"
    commits = [r for r in fake_hub.requests if r[1].endswith("/commit/main")]
    assert len(commits) == 2
    fake_hub.requests.remove(commits[0])  # the failed one; committed_files() reads the successful commit
    assert fake_hub.committed_files() == written

    fake_hub.requests.clear()
    assert export_and_push_once(root, out, push_to_hub="org/tiny", format="hybridlm") == \
        f"already pushed to org/tiny ({out / PUSH_RECORD})"
    assert fake_hub.requests == []
