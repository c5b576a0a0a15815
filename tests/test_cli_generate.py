"""`hybridlm generate CHECKPOINT PROMPT [PROMPT ...] --max-new-tokens N`: one line per prompt with its greedy
continuation, read from an export in our format or a native one (the tokenizer beside the weights)."""

from __future__ import annotations

import pytest
import torch

from hybridlm.cli import main as cli_main
from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.data.tokenizer import train_byte_level_bpe
from hybridlm.export import export_checkpoint
from hybridlm.checkpoint.reader import Checkpoint
from hybridlm.export.writer import write_model_dir
from hybridlm.generate import generate
from hybridlm.model import HybridLM

PROMPTS = ["the quick brown", "lazy"]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, tokenizer, {format: export dir}) of one random model that fits every format."""
    root = tmp_path_factory.mktemp("generate")
    tokenizer = train_byte_level_bpe(["the quick brown fox jumps over the lazy dog"] * 20, 300)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    cfg = ModelConfig(
        vocab_size=300, hidden_size=32, num_layers=2, layer_pattern="GA", mlp_pattern="M",
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=2, head_k_dim=8, head_v_dim=8),
        attention=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16, partial_rotary_factor=0.5),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, shared_expert_intermediate_size=16),
    )
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    ours = root / "hybridlm"
    ours.mkdir()
    write_model_dir(Checkpoint(cfg, model.state_dict(), ours, "test", root / "tokenizer"), ours, "hybridlm",
                    torch.float32, 10**9)
    native = export_checkpoint(ours, root / "qwen3_5_moe", format="qwen3_5_moe", dtype="fp32")
    return model, tokenizer, {"hybridlm": ours, "qwen3_5_moe": native}


@pytest.mark.parametrize("fmt", ["hybridlm", "qwen3_5_moe"])
def test_generate_prints_each_prompt_s_greedy_continuation(exported, capsys, fmt):
    model, tokenizer, exports = exported
    assert cli_main(["generate", str(exports[fmt]), *PROMPTS, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = []
    for prompt in PROMPTS:  # each prompt alone: the CLI's left-padded batch must not change a continuation
        ids = torch.tensor([tokenizer.encode(prompt)])
        new = generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        expected.append(f"{prompt!r} -> {tokenizer.decode(new.tolist(), skip_special_tokens=True)!r}")
    assert lines == expected


def test_generate_without_a_tokenizer_says_so(tmp_path, exported):
    model, _, _ = exported
    bare = tmp_path / "bare"
    bare.mkdir()
    write_model_dir(Checkpoint(model.config, model.state_dict(), bare, "test"), bare, "hybridlm", torch.float32,
                    10**9)
    with pytest.raises(SystemExit, match="no tokenizer found beside"):
        cli_main(["generate", str(bare), "hello"])
