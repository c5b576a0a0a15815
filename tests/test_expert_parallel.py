"""Expert parallelism (issue 16) on 2 gloo ranks: a MoE layer whose experts are sharded over the ranks, with
tokens dispatched by all-to-all, gives EP=1's output, router statistics and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.distributed import run_distributed_test

from hybridlm.config import MoEConfig
from hybridlm.layers.moe import SparseMoE

HIDDEN = 16
CASES = {
    # name: (MoEConfig overrides, bias on expert 0..E-1 or None, tokens per rank)
    "softmax_top2_shared": (dict(top_k=2, shared_expert_intermediate_size=8), None, (7, 5)),
    "sigmoid_top3_bias": (dict(top_k=3, score_func="sigmoid", selection_bias=True), [0.3, -0.2, 0.1, 0, 0, 0.2, 0, 0],
                          (6, 9)),
    # Every token chooses experts 0 and 1 (rank 0's): rank 1's experts receive nothing, rank 1 sends everything.
    "skewed_empty_rank": (dict(top_k=2, selection_bias=True), [50, 50, 0, 0, 0, 0, 0, 0], (4, 6)),
    # A rank with no tokens at all.
    "no_tokens_on_a_rank": (dict(top_k=2), None, (5, 0)),
    # Our Triton kernels (the CPU interpreter here) for the local experts, fp32.
    "triton_fp32": (dict(top_k=2, backend="triton", shared_expert_intermediate_size=8), None, (6, 4)),
}


def _layers_worker(rank: int, world_size: int) -> dict:
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as hybridlm.train.engine: no JIT build on CPU
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)  # its groups need it
    return {case: _layer_case(rank, world_size, case) for case in CASES}


def _layer_case(rank: int, world_size: int, case: str) -> dict:
    from hybridlm.parallel.config import ParallelConfig
    from hybridlm.config import ModelConfig
    from hybridlm.parallel.expert import shard_experts
    from hybridlm.parallel.groups import build_parallel_groups

    overrides, bias, tokens_per_rank = CASES[case]
    cfg = MoEConfig(num_experts=8, intermediate_size=12, aux_loss_coef=0.01, z_loss_coef=0.001, **overrides)
    torch.manual_seed(0)
    dtype = torch.float32 if cfg.backend == "triton" else torch.float64
    full = SparseMoE(HIDDEN, cfg).to(dtype)
    for param in full.parameters():
        torch.nn.init.normal_(param, std=0.3)
    if bias is not None:
        full.expert_bias.copy_(torch.tensor(bias, dtype=torch.float32))
    full.train()
    sharded = copy.deepcopy(full)
    model_cfg = ModelConfig(hidden_size=HIDDEN, moe=cfg)
    groups = build_parallel_groups(ParallelConfig(expert_parallel_size=world_size), model_cfg)
    shard_experts(sharded, groups.expert)

    torch.manual_seed(100 + rank)
    x = torch.randn(tokens_per_rank[rank], HIDDEN, dtype=dtype)
    probe = torch.randn_like(x)
    results = {}
    for name, layer in (("full", full), ("sharded", sharded)):
        xr = x.clone().requires_grad_(True)
        y, stats = layer(xr)
        loss = (y * probe).sum() + stats.aux_loss + stats.z_loss
        loss.backward()
        results[name] = dict(
            y=y.detach(), aux=stats.aux_loss.detach(), z=stats.z_loss.detach(), counts=stats.expert_counts,
            dx=xr.grad, grads={n: p.grad.clone() for n, p in layer.named_parameters()},
            shapes={n: tuple(p.shape) for n, p in layer.named_parameters()},
        )  # fmt: skip
    # The owner of an expert accumulates every rank's contribution; EP=1 ranks each hold their own.
    for key in ("experts.gate_up_proj", "experts.down_proj"):
        total = results["full"]["grads"][key].clone()
        torch.distributed.all_reduce(total)
        first = groups.expert.first_expert
        results["full"]["grads"][key] = total[first:first + groups.expert.num_local_experts]
    return results


@pytest.fixture(scope="module")
def layer_results():
    by_rank = run_distributed_test(_layers_worker, 2)
    return {case: [by_rank[rank][case] for rank in range(2)] for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_sharded_moe_layer_matches_all_experts_on_every_rank(layer_results, case):
    # float64 cases agree to rounding; the fp32 Triton case within the 1e-5
    tol = dict(rtol=1e-5, atol=1e-6) if case == "triton_fp32" else dict(rtol=1e-10, atol=1e-12)
    for rank, result in enumerate(layer_results[case]):
        full, sharded = result["full"], result["sharded"]
        torch.testing.assert_close(sharded["y"], full["y"], **tol)
        torch.testing.assert_close(sharded["dx"], full["dx"], **tol)
        for key in ("aux", "z"):
            torch.testing.assert_close(sharded[key], full[key], **tol)
        assert torch.equal(sharded["counts"], full["counts"])
        assert sharded["grads"].keys() == full["grads"].keys()
        for name, grad in full["grads"].items():
            torch.testing.assert_close(sharded["grads"][name], grad, **tol, msg=name)
        # Each rank holds exactly its 4 of the 8 experts.
        assert sharded["shapes"]["experts.gate_up_proj"] == (4, 24, HIDDEN)
        assert sharded["shapes"]["experts.down_proj"] == (4, HIDDEN, 12)
        assert full["shapes"]["experts.gate_up_proj"] == (8, 24, HIDDEN)
    if case == "skewed_empty_rank":  # the case did leave rank 1's experts without tokens
        assert layer_results[case][0]["full"]["counts"][4:].sum() == 0
