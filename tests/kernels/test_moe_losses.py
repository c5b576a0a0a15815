"""The MoE layer's router losses: transformers' load-balancing form, z-loss from the router's own stats, the
data-parallel ("global batch") semantics on 2 gloo ranks, and when the expert counts are all-reduced."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers.distributed import run_distributed_test

from hybridlm.config import MoEConfig
from hybridlm.kernels.tolerances import max_rel_err
from hybridlm.layers.moe import SparseMoE

HIDDEN = 16
TRITON_AVAILABLE = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def make_layer(dtype=torch.float64, seed=0, **moe) -> SparseMoE:
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 2, "intermediate_size": 8, "aux_loss_coef": 1e-3, **moe})
    torch.manual_seed(seed)
    layer = SparseMoE(HIDDEN, cfg).to(dtype)
    with torch.no_grad():
        layer.gate.weight.normal_(std=0.5)  # well spread routing: no near-ties between experts
        layer.experts.gate_up_proj.normal_(std=HIDDEN**-0.5)
        layer.experts.down_proj.normal_(std=cfg.intermediate_size**-0.5)
    return layer.train()


def tokens(num_tokens, dtype=torch.float64, seed=1):
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def router_loss_grads(layer, x):
    """(aux loss, z loss, d aux / d router weight, d z / d router weight, expert counts) of one forward."""
    _, stats = layer(x)
    aux_grad, z_grad = (torch.autograd.grad(loss, layer.gate.weight, retain_graph=True)[0]
                        for loss in (stats.aux_loss, stats.z_loss))  # fmt: skip
    return stats.aux_loss.detach(), stats.z_loss.detach(), aux_grad, z_grad, stats.expert_counts


BACKENDS = [
    pytest.param("torch", torch.float64, 1e-6, id="torch-fp64"),
    pytest.param(
        "triton", torch.float32, 1e-5, id="triton-fp32",
        marks=pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs CUDA or TRITON_INTERPRET=1"),
    ),
]  # fmt: skip


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_losses_match_transformers_and_logsumexp_of_the_logits(backend, dtype, tol, top_k):
    """The aux loss is transformers' load_balancing_loss_func (Mixtral / Qwen3-Next) on the same logits, value and
    router gradient; the z-loss is mean(logsumexp(logits)^2). Both from the router's stats, checked against the
    formulas on logits recomputed here in float64 (transformers' function sums in fp32, hence tol >= 1e-6)."""
    # Imported here: the 2-rank test's worker processes import this module and need not load transformers.
    from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func

    layer = make_layer(dtype, top_k=top_k, backend=backend)
    x = tokens(53, dtype)
    aux, z, aux_grad, z_grad, counts = router_loss_grads(layer, x)

    router_weight = layer.gate.weight.detach().double().requires_grad_()
    logits = x.double() @ router_weight.T
    expected_aux = load_balancing_loss_func((logits,), num_experts=6, top_k=top_k)
    expected_z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    expected_aux_grad, = torch.autograd.grad(expected_aux, router_weight, retain_graph=True)
    expected_z_grad, = torch.autograd.grad(expected_z, router_weight)
    assert counts.tolist() == torch.bincount(logits.topk(top_k).indices.flatten(), minlength=6).tolist()
    for actual, expected in [(aux, expected_aux), (z, expected_z), (z_grad, expected_z_grad)]:
        assert max_rel_err(actual, expected.detach()) <= tol
    if top_k < 6:
        assert max_rel_err(aux_grad, expected_aux_grad) <= tol
    else:  # every expert takes every token: f_e = 1, so the loss is E * sum_e P_e = E = top_k at any router
        torch.testing.assert_close(aux.double(), torch.tensor(6.0, dtype=torch.float64), rtol=tol, atol=0)
        assert aux_grad.abs().max() <= tol * layer.gate.weight.abs().max()


def test_sigmoid_aux_uses_normalised_sigmoid_scores():
    layer = make_layer(score_func="sigmoid")
    x = tokens(29)
    aux, _, _, _, counts = router_loss_grads(layer, x)
    scores = (x @ layer.gate.weight.T).sigmoid()
    probs = scores / scores.sum(dim=-1, keepdim=True)
    expected = 6 * ((counts.double() / 29) * probs.mean(dim=0)).sum()
    torch.testing.assert_close(aux, expected.detach(), rtol=1e-12, atol=0)


# --- when the expert counts are all-reduced -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "train, moe, reduced",
    [
        (True, dict(aux_loss_coef=1e-3), True),
        (True, dict(aux_loss_coef=0.0, score_func="sigmoid", selection_bias=True), True),
        (True, dict(aux_loss_coef=0.0), False),
        (False, dict(aux_loss_coef=1e-3), False),
        (False, dict(aux_loss_coef=0.0, score_func="sigmoid", selection_bias=True), False),
    ],
    ids=["train-aux", "train-bias", "train-no-balancing", "eval-aux", "eval-bias"],
)
def test_counts_are_all_reduced_only_when_training_needs_them(monkeypatch, train, moe, reduced):
    """Pretends to be rank 0 of 2 whose peer routed exactly the same: an all-reduce then doubles the counts."""
    calls = []

    def fake_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    layer = make_layer(**moe).train(train)
    with torch.set_grad_enabled(train):
        counts = layer(tokens(10))[1].expert_counts
    assert layer.counts_are_global() is reduced
    assert len(calls) == int(reduced) and counts.sum().item() == 10 * 2 * (2 if reduced else 1)


# --- the global batch on 2 gloo ranks ------------------------------------------------------------------------------

TOKENS_PER_RANK = 24


def _rank_router_loss_grads(rank: int, world_size: int):
    x = tokens(world_size * TOKENS_PER_RANK)[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK]
    aux, _, aux_grad, _, counts = router_loss_grads(make_layer(), x)
    # What data-parallel training does with the gradients and what the trainer logs as the loss.
    dist.all_reduce(aux_grad)
    dist.all_reduce(aux)
    return aux / world_size, aux_grad / world_size, counts


def test_aux_loss_on_two_ranks_equals_one_process_on_their_concatenated_tokens():
    """2 gloo ranks x T tokens: the rank-averaged aux loss and router-weight gradient, and the (global) counts, equal
    a single process's on the 2T tokens. Guards the all-reduce of the counts: without it each rank's f_e would
    cover only its own tokens."""
    results = run_distributed_test(_rank_router_loss_grads, world_size=2)
    aux, _, aux_grad, _, counts = router_loss_grads(make_layer(), tokens(2 * TOKENS_PER_RANK))
    for rank_aux, rank_grad, rank_counts in results:
        assert rank_counts.tolist() == counts.tolist()
        torch.testing.assert_close(rank_aux, aux, rtol=1e-12, atol=0)
        torch.testing.assert_close(rank_grad, aux_grad, rtol=1e-10, atol=1e-14)
    # Each rank on its own counts (no all-reduce) would give a clearly different gradient: the test can fail.
    halves = tokens(2 * TOKENS_PER_RANK).split(TOKENS_PER_RANK)
    local_grad = sum(router_loss_grads(make_layer(), half)[2] for half in halves) / 2
    assert max_rel_err(local_grad, aux_grad) > 1e-3
