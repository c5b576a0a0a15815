"""`hybridlm plan` (hybridlm/parallel/plan.py): parameters, model-state bytes and all-to-all bytes per GPU for each
ZeRO stage x expert-parallel size, against counts worked out by hand; the 80B-A3B default config's totals; the
combinations training refuses are refused naming them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybridlm.cli import main as cli_main
from hybridlm.config import ConfigError, ModelConfig
from hybridlm.parallel.plan import plan_row, plan_table

# One attention layer with a MoE MLP, small enough to count on paper (tied embeddings, no output gate, no qk norm,
# no shared expert):
#   embeddings 10 x 4 = 40, final norm 4, the layer's two norms 2 x 4 = 8,
#   attention q, k, v 3 x (4 x 8) = 96 + o 8 x 4 = 32 -> 128, router 4 experts x 4 = 16,
#   experts 4 x (gate_up 2*2 x 4 = 16 + down 4 x 2 = 8) = 4 x 24 = 96
#   -> 292 in all, 96 in routed experts, 196 dense.
HAND = ModelConfig(
    vocab_size=10, hidden_size=4, num_layers=1, layer_pattern="A", mlp_pattern="M", tie_embeddings=True,
    attention=dict(num_heads=1, num_kv_heads=1, head_dim=8, output_gate=False, qk_norm=False),
    moe=dict(num_experts=4, top_k=2, intermediate_size=2, shared_expert_intermediate_size=0),
)  # fmt: skip
TOKENS_PER_RANK = 8
BF16, FP32 = 2, 4


def test_the_hand_count_is_the_model_s():
    from hybridlm.model import HybridLM

    with torch.device("meta"):
        model = HybridLM(HAND)
    assert sum(p.numel() for p in model.parameters()) == 292
    assert sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) == 96


@pytest.mark.parametrize(
    "gpus, ep, zero, dtype_bytes, dense, experts, state_bytes, all_to_all",
    [
        # ZeRO 0, EP 1: all 292 parameters at 2 (bf16 weights) + 2 (grads) + 4 (fp32 master) + 8 (Adam) = 16 bytes
        (4, 1, 0, BF16, 196, 96, 292 * 16, 0),
        # ZeRO 3, EP 1: everything partitioned over the 4 GPUs: 292 / 4 = 73 parameters x 16 bytes
        (4, 1, 3, BF16, 196, 96, 73 * 16, 0),
        # ZeRO 2, EP 2: 2 experts (48 parameters) per rank. Dense 196 x (2 + (2 + 12) / 4 GPUs) = 1078; experts
        # 48 x (2 + (2 + 12) / 2 replicas) = 432. All-to-all: 8 tokens x top_k 2 x hidden 4 x 2 bytes x 2 directions
        # x 2 (forward, backward) x 1 MoE layer = 512
        (4, 2, 2, BF16, 196, 48, 1078 + 432, 512),
        # ZeRO 1, EP 4: one expert (24 parameters) per rank and no replica of it. Dense 196 x (2 + 2 + 12 / 4) = 1372;
        # experts 24 x 16 = 384
        (4, 4, 1, BF16, 196, 24, 1372 + 384, 512),
        # fp32, ZeRO 2, EP 2: 4-byte weights and grads, no master copy, Adam 8. Dense 196 x (4 + (4 + 8) / 4) = 1372;
        # experts 48 x (4 + (4 + 8) / 2) = 480; all-to-all twice bf16's
        (4, 2, 2, FP32, 196, 48, 1372 + 480, 1024),
    ],
)  # fmt: skip
def test_plan_row_matches_the_hand_count(gpus, ep, zero, dtype_bytes, dense, experts, state_bytes, all_to_all):
    row = plan_row(HAND, gpus, ep, zero, TOKENS_PER_RANK, dtype_bytes)
    assert (row.dense_params, row.expert_params, row.experts_per_rank) == (dense, experts, 4 // ep)
    assert row.model_state_bytes == state_bytes
    assert row.all_to_all_bytes == all_to_all


def test_default_sweep_leaves_out_what_training_refuses_and_says_why():
    rows, refused = plan_table(HAND, 4, TOKENS_PER_RANK, BF16)
    assert [(r.zero_stage, r.expert_parallel_size) for r in rows] == [
        (0, 1), (1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (1, 4), (2, 4)]  # fmt: skip
    assert len(refused) == 2
    assert refused[0].startswith("ZeRO 0 with EP 2, 4:") and "use deepspeed=zero1 or deepspeed=zero2" in refused[0]
    assert refused[1].startswith("ZeRO 3 with EP 2, 4:") and "does not partition MoE" in refused[1]


@pytest.mark.parametrize(
    "gpus, ep, zero, message",
    [
        (4, 3, 2, r"expert_parallel_size=3 does not divide model\.moe\.num_experts=4.*\[1, 2, 4\]"),
        (6, 4, 2, r"expert_parallel_size=4 does not divide the world size 6"),
        (4, 2, 3, r"expert_parallel_size=2 with deepspeed\.zero_stage=3.*use deepspeed=zero2"),
        (4, 2, 0, r"expert_parallel_size=2 with deepspeed\.zero_stage=0"),
        (0, 1, 2, r"--gpus 0 must be >= 1"),
        (4, 1, 4, r"--zero \[4\]: ZeRO stages are \(0, 1, 2, 3\)"),
    ],
)
def test_impossible_combinations_are_refused_naming_them(gpus, ep, zero, message):
    with pytest.raises(ConfigError, match=message):
        plan_table(HAND, gpus, TOKENS_PER_RANK, BF16, [ep], [zero])


def test_qwen3_next_80b_a3b_default_config_totals(tmp_path, capsys):
    """transformers' Qwen3NextConfig() (Qwen3-Next-80B-A3B) through our importer, as `hybridlm plan DIR` reads a
    transformers directory: 79.7 B parameters, 3.9 B active, 48 MoE layers of 512 experts of 3 x 2048 x 512 =
    3,145,728 parameters each (77,309,411,328 in all)."""
    import json

    from transformers import Qwen3NextConfig

    from hybridlm.parallel.plan import load_plan_config

    (tmp_path / "config.json").write_text(json.dumps(Qwen3NextConfig().to_dict()))
    cfg = load_plan_config(str(tmp_path), ["trainer.seq_len=4096"])
    counts = cfg.model.parameter_counts()
    assert round(counts["total"] / 1e9, 1) == 79.7 and round(counts["active"] / 1e9, 1) == 3.9
    row = plan_row(cfg.model, 64, 8, 2, 8192, BF16)
    assert row.expert_params == 77_309_411_328 // 8 and row.experts_per_rank == 64
    assert row.dense_params == counts["total"] - 77_309_411_328
    assert cli_main(["plan", str(tmp_path), "--gpus", "64", "--ep", "8", "--zero", "2"]) == 0
    assert "79.674 B parameters (77.309 B in routed experts), 3.875 B active per token" in capsys.readouterr().out


def test_plan_command_prints_the_table_and_refuses_with_the_reason(capsys):
    args = ["plan", "model=tiny", "deepspeed.micro_batch_size=2", "trainer.seq_len=64", "--gpus", "4"]
    assert cli_main([*args, "--ep", "2", "--zero", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 GPUs, bf16, 128 tokens per rank per step (2 x 64 x 1 accum)" in out
    (row,) = [line for line in out.splitlines() if line.startswith("|") and line.split("|")[1].strip() == "2"]
    assert [cell.strip() for cell in row.split("|")[1:4]] == ["2", "2", "2"]  # ZeRO 2, EP 2, 2 of 4 experts a rank
    assert cli_main([*args, "--ep", "2", "--zero", "3"]) == 2
    assert "expert_parallel_size=2 with deepspeed.zero_stage=3" in capsys.readouterr().err


def test_plan_command_refuses_a_config_json_it_cannot_import(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert cli_main(["plan", str(tmp_path), "--gpus", "8"]) == 2
    assert "model_type 'llama' is not one our importer reads" in capsys.readouterr().err


def test_a_model_without_moe_layers_plans_data_parallel_only():
    dense = dataclasses.replace(HAND, mlp_pattern="D", intermediate_size=6)
    # the MoE MLP (router 16 + experts 96) replaced by a dense SwiGLU of 3 x 4 x 6 = 72: 292 - 112 + 72 = 252
    rows, refused = plan_table(dense, 4, TOKENS_PER_RANK, BF16)
    assert [(r.zero_stage, r.expert_parallel_size) for r in rows] == [(0, 1), (1, 1), (2, 1), (3, 1)] and not refused
    assert {(r.dense_params, r.expert_params, r.experts_per_rank, r.all_to_all_bytes) for r in rows} == {(252, 0, 0, 0)}
