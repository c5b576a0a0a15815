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


def test_context_parallelism_is_refused_until_implemented():
    with pytest.raises(ConfigError, match=r"context_parallel_size=2.*not implemented yet"):
        load("parallel.context_parallel_size=2")
