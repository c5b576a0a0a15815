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


# --- training through train.py: DeepSpeed ZeRO 2 on 2 gloo ranks ---------------------------------------------------

STEPS = 6


def _train_overrides(cache, ep: int) -> list[str]:
    from helpers.launch import tiny_run

    return tiny_run(cache) + [
        f"trainer.max_steps={STEPS}", "deepspeed=zero2", "deepspeed.micro_batch_size=2", "deepspeed.grad_accum_steps=2",
        f"parallel.expert_parallel_size={ep}", "trainer.kernel_check=false",
        # every balancing path: step-scoped aux loss over accumulated micro-batches, a selection bias, sigmoid
        # scores; clipping that engages (the norm must count every expert once)
        "model.moe.aux_loss_scope=step", "model.moe.selection_bias=true", "model.moe.bias_update_rate=0.01",
        "model.moe.score_func=sigmoid", "optim.grad_clip=0.2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory, data_cache):
    from helpers.launch import train

    root = tmp_path_factory.mktemp("ep")
    runs = {"ep1": root / "ep1", "ep2": root / "ep2", "ep2_resumed": root / "ep2_resumed"}
    train(runs["ep1"], _train_overrides(data_cache, 1), nproc=2)
    train(runs["ep2"], _train_overrides(data_cache, 2), nproc=2)
    train(runs["ep2_resumed"], _train_overrides(data_cache, 2) + ["trainer.stop_at_step=3"], nproc=2)
    train(runs["ep2_resumed"], _train_overrides(data_cache, 2), nproc=2)
    return runs


def test_expert_parallel_training_matches_data_parallel_and_resumes_bitwise(ep_runs):
    from helpers.launch import read_metrics

    ep1, ep2, resumed = (read_metrics(ep_runs[k]) for k in ("ep1", "ep2", "ep2_resumed"))
    assert sorted(ep2) == list(range(1, STEPS + 1))
    for step in ep2:
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert ep2[step][key] == pytest.approx(ep1[step][key], rel=1e-5), (step, key)
        assert resumed[step]["loss"] == ep2[step]["loss"], step  # bitwise
    assert max(ep2[s]["grad_norm"] for s in ep2) > 0.2  # clipping engaged


def test_expert_parallel_checkpoint_reads_back_the_full_experts(ep_runs):
    from hybridlm.export.checkpoint import read_checkpoint
    from hybridlm.model import HybridLM
    from hybridlm.parallel.checkpoint import check_resume_expert_parallel_size, read_expert_parallel_size

    sharded, plain = read_checkpoint(ep_runs["ep2"]), read_checkpoint(ep_runs["ep1"])
    engine_dir = sharded.source
    assert read_expert_parallel_size(engine_dir) == 2
    assert sharded.state_dict.keys() == plain.state_dict.keys()
    for name, tensor in plain.state_dict.items():
        assert sharded.state_dict[name].shape == tensor.shape, name  # the full [E, ...] experts
        torch.testing.assert_close(sharded.state_dict[name].float(), tensor.float(), rtol=1e-4, atol=1e-5, msg=name)
    HybridLM(sharded.config).load_state_dict(sharded.state_dict, strict=True)
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 but this run has .*expert_parallel_size=1"):
        check_resume_expert_parallel_size(engine_dir, 1)
