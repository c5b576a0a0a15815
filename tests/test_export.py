"""Export: reading run / DeepSpeed checkpoints, the hybridlm format round trip, sharding, tokenizer, model card,
every refusal path, atomic output, the CLI and the Hub push (at the HTTP-client boundary, offline)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

import hybridlm  # noqa: F401 - registers the hybridlm model type with transformers
from hybridlm.cli import main as cli_main
from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.data.tokenizer import train_byte_level_bpe
from hybridlm.export import ExportError, export_checkpoint, load_pretrained_into
from hybridlm.export.checkpoint import read_checkpoint
from hybridlm.export.formats import FORMATS
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
    """A run directory laid out as the trainer writes it (hybridlm/train/checkpoint.py) for a ZeRO-0/1/2 engine:
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
    with pytest.raises(ExportError, match=r"(?s)model.layer_pattern.*model.norm_eps"):
        load_pretrained_into(other, root)


# --- refusals -------------------------------------------------------------------------------------------------------


def test_unfit_config_lists_every_mismatch(tmp_path, tokenizer):
    cfg = small_config(
        mlp_pattern="MD",
        zero_centered_norm=False,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=16, output_gate=False),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, score_func="sigmoid", selection_bias=True,
                      renormalize=False),
    )
    root = write_run(tmp_path / "run", random_model(cfg), tokenizer)
    with pytest.raises(ExportError) as error:
        export_checkpoint(root, tmp_path / "out", format="qwen3_5_moe")
    message = str(error.value)
    for needle in ("zero_centered_norm", "output_gate", "sliding_window=16", "score_func='sigmoid'",
                   "selection_bias", "shared_expert_intermediate_size=0", "renormalize=False", "layers [1, 3] dense"):
        assert needle in message, needle
    assert not (tmp_path / "out").exists()
    # Qwen3-Next expresses dense layers and unnormalised top-k: those two are not listed there.
    next_problems = FORMATS["qwen3_next"].mismatches(cfg)
    assert len(next_problems) == 6 and not any("dense" in p or "renormalize" in p for p in next_problems)


def test_nan_or_inf_weights_are_refused(tmp_path, tokenizer):
    model = random_model(small_config())
    state = model.state_dict()
    state["layers.0.linear_attn.A_log"][1] = float("nan")
    state["norm.weight"][0] = float("inf")
    root = write_run(tmp_path / "run", model, tokenizer, state=state)
    with pytest.raises(ExportError, match=r"NaN or inf in \['layers.0.linear_attn.A_log', 'norm.weight'\]"):
        export_checkpoint(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensors_that_do_not_match_the_config_are_refused(tmp_path, tokenizer):
    model = random_model(small_config())
    state = model.state_dict()
    del state["layers.3.self_attn.k_norm.weight"]
    state["layers.1.mlp.up_proj.weight"] = torch.zeros(41, 32)
    state["layers.9.extra"] = torch.zeros(1)
    root = write_run(tmp_path / "run", model, tokenizer, state=state)
    with pytest.raises(ExportError) as error:
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
    with pytest.raises(ExportError, match=rf"{shards[1].name} is truncated or corrupt"):
        export_checkpoint(out, tmp_path / "again")
    shards[1].unlink()
    with pytest.raises(ExportError, match=rf"shard\(s\) \['{shards[1].name}'\] listed in .* are missing"):
        read_checkpoint(out)
    assert not (tmp_path / "again").exists()


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
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ExportError, match="no checkpoint found"):
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


SECRET = "hf_test_token_that_must_never_be_printed"


def test_push_to_hub_uses_the_environment_token_and_never_prints_it(run, tmp_path, monkeypatch, capsys, caplog):
    from huggingface_hub import HfApi

    root, _ = run
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", self.token, kwargs["repo_id"], files))

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    caplog.set_level(logging.DEBUG)
    assert cli_main(["export", str(root), str(tmp_path / "out"), "--push-to-hub", "org/tiny", "--private"]) == 0
    (create, token, repo, kwargs), (upload, token2, repo2, files) = calls
    assert (create, upload, repo, repo2) == ("create_repo", "upload_folder", "org/tiny", "org/tiny")
    assert token == token2 == SECRET and kwargs["private"] is True
    assert {"config.json", "README.md", "tokenizer.json", "model.safetensors"} <= set(files)
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    assert all(SECRET not in p.read_text(errors="ignore") for p in (tmp_path / "out").iterdir())


def test_push_without_a_token_fails_before_exporting(run, tmp_path, monkeypatch):
    root, _ = run
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # no login cache
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "empty_hf_home" / "token"))
    with pytest.raises(ExportError, match="no Hugging Face token"):
        export_checkpoint(root, tmp_path / "out", push_to_hub="org/tiny")
    assert not (tmp_path / "out").exists()


# --- a real run -----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # trains one step with DeepSpeed on CPU (~1 min on 2 cores)
def test_a_trained_run_exports_as_qwen3_5_moe(tmp_path):
    """The user's path: `python train.py model=qwen3_5_moe_tiny ...` then `hybridlm export RUN OUT --format
    qwen3_5_moe`. ZeRO-2, so the fp32 masters are consolidated from the optimizer partitions."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=smoke", "model=qwen3_5_moe_tiny", "deepspeed=zero2", "trainer.max_steps=1",
        "optim.warmup_steps=0", "trainer.save_every=1", "trainer.eval_every=1000", "trainer.eval_batches=1",
        "trainer.seq_len=32", "deepspeed.micro_batch_size=1", f"trainer.out_dir={run_dir}",
    ]
    proc = subprocess.run([sys.executable, str(repo / "train.py"), *overrides], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step_dir = run_dir / "checkpoints" / "step_00000001"
    assert list((step_dir / "engine").glob("*zero_pp_rank_0_*optim_states.pt")), "expected ZeRO optimizer shards"

    out = tmp_path / "out"
    assert cli_main(["export", str(run_dir), str(out), "--format", "qwen3_5_moe", "--dtype", "fp32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe_text" and config["num_hidden_layers"] == 8
    # The trainer runs fp32 on CPU, so the module weights DeepSpeed saved are the masters the export must carry.
    module = torch.load(step_dir / "engine" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    exported = read_checkpoint(out).state_dict
    assert exported.keys() == module.keys()
    assert all(torch.equal(exported[k], module[k].float()) for k in module)
    card = (out / "README.md").read_text()
    assert "optimizer steps: 1" in card and "tokens trained: 32" in card
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).encode("def f(x):") == AutoTokenizer.from_pretrained(
        step_dir / "tokenizer").encode("def f(x):")
