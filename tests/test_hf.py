"""`import hybridlm` registers the hybridlm model type with AutoConfig / AutoModelForCausalLM, lazily: it imports
neither transformers nor torch itself, and registration works whichever of the two is imported first. A program that
imports nothing of ours loads the export with `trust_remote_code=True` (the export's `auto_map` shims). Each case runs
in a fresh interpreter, where the import order is under the test's control."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.checkpoint.reader import Checkpoint
from hybridlm.export.writer import write_model_dir
from hybridlm.model import HybridLM

LOAD_AND_SCORE = """
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(path, **load_options)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load_options).eval()
with torch.no_grad():
    logits = model(torch.arange(12)[None] % config.vocab_size).logits
torch.save({"config": type(config).__name__, "model": type(model).__name__, "logits": logits}, result)
"""


def run_python(code: str, workdir: Path) -> None:
    """Run `code` in a fresh interpreter in `workdir`, where transformers also copies trust_remote_code modules."""
    env = dict(os.environ, HF_MODULES_CACHE=str(workdir / "hf_modules"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=workdir,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=2, layer_pattern="GA", mlp_pattern="MD", intermediate_size=32,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=2, head_k_dim=8, head_v_dim=8),
        attention=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16, partial_rotary_factor=0.5),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, shared_expert_intermediate_size=16),
    )
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    write_model_dir(Checkpoint(cfg, model.state_dict(), directory, "test"), directory, "hybridlm", torch.float32, 10**9)
    with torch.no_grad():
        expected = model(torch.arange(12)[None] % 64).logits
    return directory, expected


def test_import_hybridlm_stays_light(tmp_path):
    run_python(
        "import sys, hybridlm\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, f'import hybridlm imported {heavy}'\n",
        tmp_path,
    )


@pytest.mark.parametrize("first", ["hybridlm", "transformers"])
def test_auto_classes_load_the_export_whichever_is_imported_first(exported, tmp_path, first):
    directory, expected = exported
    result = tmp_path / "result.pt"
    prelude = "import hybridlm\n"
    if first == "transformers":
        prelude = "import transformers.models.auto.modeling_auto\nimport hybridlm\n"
    run_python(f"import torch\n{prelude}path, result = {str(directory)!r}, {str(result)!r}\nload_options = {{}}\n"
               f"{LOAD_AND_SCORE}", tmp_path)
    out = torch.load(result)
    assert (out["config"], out["model"]) == ("HybridLMConfig", "HybridLMForCausalLM")
    assert torch.equal(out["logits"], expected)


def test_trust_remote_code_loads_the_export_without_importing_hybridlm(exported, tmp_path):
    """What `lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True` does: the auto_map shims import
    our classes from the installed package (they hold no model code of their own)."""
    directory, expected = exported
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_hybridlm.HybridLMConfig",
                        "AutoModelForCausalLM": "modeling_hybridlm.HybridLMForCausalLM"}
    assert "class " not in (directory / "modeling_hybridlm.py").read_text()  # a shim, not a copy
    result = tmp_path / "result.pt"
    run_python(
        f"import sys, torch\npath, result = {str(directory)!r}, {str(result)!r}\n"
        "assert not any(m.startswith('hybridlm') for m in sys.modules)\n"
        "from transformers import AutoConfig\n"
        "try:\n    AutoConfig.from_pretrained(path)\nexcept ValueError as error:\n    refusal = str(error)\n"
        f"load_options = {{'trust_remote_code': True}}\n{LOAD_AND_SCORE}"
        "torch.save({**torch.load(result), 'refusal': refusal}, result)\n"
        f"model.save_pretrained({str(tmp_path / 'saved')!r})\n",
        tmp_path,
    )
    out = torch.load(result)
    assert (out["config"], out["model"]) == ("HybridLMConfig", "HybridLMForCausalLM")
    assert torch.equal(out["logits"], expected)
    # Without the opt-in (and without `import hybridlm`) transformers refuses, saying how to opt in.
    assert "trust_remote_code=True" in out["refusal"]
    # A save of the loaded model carries the same shims, not a copy of our configuration module.
    saved = tmp_path / "saved"
    assert json.loads((saved / "config.json").read_text())["auto_map"] == auto_map
    assert sorted(p.name for p in saved.glob("*.py")) == ["configuration_hybridlm.py", "modeling_hybridlm.py"]


def test_transformers_generate_decodes_through_our_cache(exported):
    """transformers' generate hands the cache back under this version's name (`cache`; `past_key_values` before
    5.24): the prompt runs once, then one token per step."""
    from transformers import AutoModelForCausalLM

    directory, _ = exported
    wrapper = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    lengths, kept, forward = [], [], wrapper.model.forward

    def counting_forward(input_ids, **kwargs):
        lengths.append(input_ids.shape[1])
        out = forward(input_ids, **kwargs)
        kept.append(out.logits.shape[1])
        return out

    wrapper.model.forward = counting_forward
    prompt = torch.arange(7)[None]
    out = wrapper.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
    assert out.shape == (1, 11) and lengths == [7, 1, 1, 1]
    assert kept == [1, 1, 1, 1]  # the prompt's logits are computed for its last position only


def test_from_pretrained_starts_the_moe_step_counts_at_zero(tmp_path):
    """The selection bias is loaded; the step's expert counts (an unsaved buffer, garbage after transformers builds
    on the meta device) start at zero, so fine-tuning the loaded wrapper balances its own counts."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=1, layer_pattern="G", mlp_pattern="M",
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=2, head_k_dim=8, head_v_dim=8),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, score_func="sigmoid", selection_bias=True,
                      aux_loss_scope="step"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = HybridLM(cfg)
    with torch.no_grad():
        model.layers[0].mlp.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 0.125]))
    write_model_dir(Checkpoint(cfg, model.state_dict(), tmp_path, "test"), tmp_path, "hybridlm", torch.float32, 10**9)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).model.layers[0].mlp
    assert torch.equal(moe.expert_bias, model.layers[0].mlp.expert_bias)
    assert moe.counts_since_step.dtype == torch.int64 and not moe.counts_since_step.any()
