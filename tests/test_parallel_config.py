"""The `parallel` config section: expert-parallel sizes the model and the world size allow, refused otherwise with
the values and the fix, before any work."""

from __future__ import annotations

import pytest
from test_configs import load

from hybridlm.config import ConfigError


def test_parallel_defaults_compose():
    cfg = load()
    assert (cfg.parallel.expert_parallel_size, cfg.parallel.context_parallel_size) == (1, 1)


def test_expert_parallel_size_must_divide_the_experts():
    cfg = load("model=tiny", "model.moe.num_experts=8", "parallel.expert_parallel_size=4")
    assert cfg.parallel.expert_parallel_size == 4
    with pytest.raises(ConfigError, match=r"expert_parallel_size=3 does not divide model\.moe\.num_experts=8.*"
                                          r"\[1, 2, 4, 8\]"):
        load("model.moe.num_experts=8", "parallel.expert_parallel_size=3")
    with pytest.raises(ConfigError, match=r"expert_parallel_size=0 must be >= 1"):
        load("parallel.expert_parallel_size=0")


def test_models_without_moe_layers_ignore_expert_parallelism():
    cfg = load("model.mlp_pattern=D", "model.moe.num_experts=8", "parallel.expert_parallel_size=3")
    assert cfg.parallel.expert_parallel_size_for(cfg.model) == 1
    cfg.parallel.check_world_size(cfg.model, 5)  # nothing to shard: any world size


def test_expert_parallelism_under_zero3_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"zero_stage=3.*use deepspeed=zero2"):
        load("deepspeed=zero3", "parallel.expert_parallel_size=2")
    assert load("deepspeed=zero3", "model.mlp_pattern=D", "parallel.expert_parallel_size=2")
    with pytest.raises(ConfigError, match=r"zero_stage=0.*clip_grad_norm_.*use deepspeed=zero1 or deepspeed=zero2"):
        load("deepspeed=zero0", "parallel.expert_parallel_size=2")


def test_world_size_must_be_a_multiple_of_the_expert_parallel_size():
    cfg = load("model.moe.num_experts=8", "parallel.expert_parallel_size=4")
    cfg.parallel.check_world_size(cfg.model, 8)
    with pytest.raises(ConfigError, match=r"expert_parallel_size=4 does not divide the world size 6.*multiple of 4"):
        cfg.parallel.check_world_size(cfg.model, 6)


def test_context_parallel_sizes_the_run_allows():
    cfg = load("parallel.context_parallel_size=2", "trainer.seq_len=256")
    assert cfg.parallel.context_parallel_size == 2
    cfg.parallel.check_world_size(cfg.model, 4)
    assert cfg.parallel.data_parallel_size(4) == 2
    with pytest.raises(ConfigError, match=r"context_parallel_size=0 must be >= 1"):
        load("parallel.context_parallel_size=0")


def test_context_parallel_refusals_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"trainer\.seq_len=192 is not a multiple of "
                                          r"parallel\.context_parallel_size=2 x 64.*multiple of 128"):
        load("parallel.context_parallel_size=2", "trainer.seq_len=192")
    cfg = load("parallel.context_parallel_size=4", "trainer.seq_len=256")
    with pytest.raises(ConfigError, match=r"context_parallel_size=4 does not divide the world size 6.*multiple of 4"):
        cfg.parallel.check_world_size(cfg.model, 6)
    with pytest.raises(ConfigError, match=r"context_parallel_size=2 with parallel\.expert_parallel_size=2.*set one"):
        load("parallel.context_parallel_size=2", "parallel.expert_parallel_size=2", "trainer.seq_len=128")
    with pytest.raises(ConfigError, match=r"head_k_dim \+ head_v_dim = 128 \+ 256 .*at most 256.*backend=torch"):
        load("parallel.context_parallel_size=2", "trainer.seq_len=128", "model.gdn.head_k_dim=128",
             "model.gdn.head_v_dim=256")
    assert load("parallel.context_parallel_size=2", "trainer.seq_len=128", "model.gdn.head_k_dim=128",
                "model.gdn.head_v_dim=256", "model.gdn.backend=torch")


def test_context_parallel_layers_refuse_what_they_cannot_shard():
    import torch

    from hybridlm.config import ModelConfig
    from hybridlm.model import HybridLM
    from hybridlm.parallel.context import ContextParallelGroup, context_parallel_gated_delta_rule, shard_layout

    cp = ContextParallelGroup(group=None, size=2, rank=0)  # nothing below reaches a collective
    with pytest.raises(ValueError, match=r"T=99 tokens do not split over context_parallel_size=2.*multiple of 2"):
        shard_layout(None, 1, 99, cp)
    with pytest.raises(ValueError, match=r"cu_seqlens=\[0, 50, 40\] must rise strictly"):
        shard_layout(torch.tensor([0, 50, 40]), 1, 40, cp)
    shard = shard_layout(torch.tensor([0, 10, 128]), 1, 128, cp)
    q = torch.zeros(1, 64, 1, 16)
    with pytest.raises(ValueError, match=r"got initial_state=.*zero state"):
        context_parallel_gated_delta_rule(q, q, q, shard, initial_state=torch.zeros(2, 1, 16, 16))
    model = HybridLM(ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, layer_pattern="A", mlp_pattern="D"))
    with pytest.raises(ValueError, match=r"context=.*pass no cu_seqlens"):
        model(torch.zeros(1, 64, dtype=torch.long), cu_seqlens=torch.tensor([0, 64]), context=shard)
