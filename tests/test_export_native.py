"""Native formats against transformers' own Qwen3NextForCausalLM / Qwen3_5MoeForCausalLM, the independent oracles.

transformers runs in subprocesses with fla hidden (`sys.modules["fla"] = None`), so it takes its plain PyTorch
paths on CPU and never imports hybridlm. Two subprocesses serve every test of this module:
  1. build random transformers models and save them (import direction), load our exports (export direction), and
     return logits of both on the same random tokens;
  2. load the re-exports of the imported models and compare every tensor with the originals, bitwise.
Tolerance: fp32 on CPU, max |logit difference| <= 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.export import export_checkpoint
from hybridlm.export.checkpoint import Checkpoint, read_checkpoint
from hybridlm.export.writer import write_model_dir
from hybridlm.model import HybridLM

pytestmark = pytest.mark.slow  # two transformers subprocesses, ~60 s together on 2 cores

TOLERANCE = 1e-4
VOCAB = 211
LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")

ORACLE = r"""
import json, sys
sys.modules["fla"] = None  # transformers would otherwise send CPU tensors to fla's GPU kernels
import torch
from transformers import AutoConfig, AutoModelForCausalLM

job = json.load(open(sys.argv[1]))
ids = torch.load(job["ids"])
results = {}
for spec in job.get("create", []):
    torch.manual_seed(spec["seed"])
    config = AutoConfig.for_model(spec["model_type"], **spec["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # every tensor random, norms and decay parameters included
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.1 if param.dim() == 1 else 0.02))
    model.save_pretrained(spec["out"])
    with torch.no_grad():
        results[spec["out"]] = {"logits": model(ids).logits, "class": type(model).__name__}
for spec in job.get("load", []):
    model, info = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32, output_loading_info=True)
    model.eval()
    result = {"class": type(model).__name__, "info": {k: sorted(map(str, v)) for k, v in info.items()}}
    with torch.no_grad():
        result["logits"] = model(ids).logits
    if spec.get("compare_to"):
        original = AutoModelForCausalLM.from_pretrained(spec["compare_to"], dtype=torch.float32).state_dict()
        mine = model.state_dict()
        result["differing"] = sorted(k for k in original if k not in mine or not torch.equal(original[k], mine[k]))
        result["extra"] = sorted(set(mine) - set(original))
    results[spec["path"]] = result
torch.save(results, job["result"])
"""


def run_oracle(job: dict, workdir: Path) -> dict:
    job_path = workdir / f"job_{len(list(workdir.glob('job_*')))}.json"
    job["result"] = str(job_path.with_suffix(".pt"))
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-c", ORACLE, str(job_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(job["result"])


def ours_config(fmt: str) -> ModelConfig:
    """Linear attention, full attention and MoE layers; dense layers where the target has them."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        num_layers=4,
        layer_pattern="GGAG",
        intermediate_size=40,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=12),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, partial_rotary_factor=0.25),
    )
    if fmt == "qwen3_next":  # dense layer 1 (mlp_only_layers), unnormalised top-k, attention biases
        return ModelConfig(
            mlp_pattern="MDMM",
            attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6,
                                      partial_rotary_factor=0.25, bias=True),
            moe=MoEConfig(num_experts=6, top_k=2, intermediate_size=20, shared_expert_intermediate_size=24,
                          renormalize=False),
            **{k: v for k, v in common.items() if k != "attention"},
        )
    return ModelConfig(  # Qwen3.5-MoE: every layer MoE; tied embeddings
        mlp_pattern="M",
        tie_embeddings=True,
        moe=MoEConfig(num_experts=6, top_k=3, intermediate_size=20, shared_expert_intermediate_size=24),
        **common,
    )


HF_CONFIGS = {
    "qwen3_next": dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                             "partial_rotary_factor": 0.25},
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=20, shared_expert_intermediate_size=24,
        mlp_only_layers=[2], norm_topk_prob=True,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    ),
    "qwen3_5_moe_text": dict(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                      "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        num_experts=5, num_experts_per_tok=2, moe_intermediate_size=20, shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    ),
}
IMPORT_FORMAT = {"qwen3_next": "qwen3_next", "qwen3_5_moe_text": "qwen3_5_moe"}


def random_model(cfg: ModelConfig, seed: int) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    with torch.no_grad():  # norms away from their (trivial) initial values
        for name, param in model.named_parameters():
            if param.dim() == 1 and "A_log" not in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    work = tmp_path_factory.mktemp("native")
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")

    ours, exports = {}, {}
    for seed, fmt in enumerate(("qwen3_next", "qwen3_5_moe")):
        model = random_model(ours_config(fmt), seed)
        source = work / f"ours_{fmt}"
        source.mkdir()
        write_model_dir(Checkpoint(model.config, model.state_dict(), source, "test"), source, "hybridlm",
                        torch.float32, 10**9)
        # A small shard size so the export is sharded with an index.
        exports[fmt] = export_checkpoint(source, work / f"export_{fmt}", format=fmt, dtype="fp32", shard_size="30KB")
        with torch.no_grad():
            ours[fmt] = model(ids).logits

    created = {mt: str(work / f"hf_{mt}") for mt in HF_CONFIGS}
    first = run_oracle(
        {
            "ids": str(work / "ids.pt"),
            "create": [
                {"model_type": mt, "config": cfg, "out": created[mt], "seed": 7} for mt, cfg in HF_CONFIGS.items()
            ],
            "load": [{"path": str(path)} for path in exports.values()],
        },
        work,
    )

    imported, reexports = {}, {}
    for mt, path in created.items():
        ckpt = read_checkpoint(path)
        model = ckpt.build_model()
        with torch.no_grad():
            imported[mt] = model(ids).logits
        source = work / f"imported_{mt}"
        source.mkdir()
        write_model_dir(ckpt, source, "hybridlm", torch.float32, 10**9)
        reexports[mt] = export_checkpoint(source, work / f"reexport_{mt}", format=IMPORT_FORMAT[mt], dtype="fp32")
    second = run_oracle(
        {"ids": str(work / "ids.pt"),
         "load": [{"path": str(reexports[mt]), "compare_to": created[mt]} for mt in HF_CONFIGS]},
        work,
    )
    return dict(ours=ours, exports=exports, first=first, created=created, imported=imported, reexports=reexports,
                second=second)


@pytest.mark.parametrize("fmt, cls", [("qwen3_next", "Qwen3NextForCausalLM"), ("qwen3_5_moe", "Qwen3_5MoeForCausalLM")])
def test_export_loads_in_plain_transformers_with_the_same_logits(oracle, fmt, cls):
    result = oracle["first"][str(oracle["exports"][fmt])]
    assert result["class"] == cls
    assert not any(result["info"].get(k) for k in LOADING_PROBLEMS), result["info"]
    diff = (result["logits"] - oracle["ours"][fmt]).abs().max().item()
    assert diff <= TOLERANCE, f"{fmt}: max |logit diff| {diff:.2e} > {TOLERANCE}"


def test_export_is_sharded_with_an_index(oracle):
    for path in oracle["exports"].values():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and all((path / s).is_file() for s in shards)


def test_qwen3_next_export_keeps_the_released_per_expert_layout(oracle):
    names = json.loads((oracle["exports"]["qwen3_next"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in names
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names  # the dense layer
    config = json.loads((oracle["exports"]["qwen3_next"] / "config.json").read_text())
    assert config["mlp_only_layers"] == [1] and config["norm_topk_prob"] is False


@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_import_gives_transformers_logits(oracle, model_type):
    expected = oracle["first"][oracle["created"][model_type]]["logits"]
    diff = (oracle["imported"][model_type] - expected).abs().max().item()
    assert diff <= TOLERANCE, f"{model_type}: max |logit diff| {diff:.2e} > {TOLERANCE}"


@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_import_then_export_reproduces_every_tensor_bitwise(oracle, model_type):
    result = oracle["second"][str(oracle["reexports"][model_type])]
    assert result["differing"] == [] and result["extra"] == []
    assert not any(result["info"].get(k) for k in LOADING_PROBLEMS), result["info"]
