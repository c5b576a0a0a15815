"""PyTorch reference of the routed sparse-MoE path against the float64 per-expert loop oracle."""

from __future__ import annotations

import pytest
import torch
from helpers.moe_oracle import forward_backward, moe_loop, random_moe_inputs

from hybridlm.kernels.moe import route_ref, sparse_moe_ref
from hybridlm.kernels.tolerances import max_rel_err

NUM_TOKENS, HIDDEN, INTERMEDIATE, NUM_EXPERTS = 37, 16, 12, 6
GRAD_NAMES = ("x", "router_weight", "gate_up", "down")


ROUTING_CASES = [
    pytest.param(dict(top_k=2, score_func="softmax", renormalize=True), id="softmax-k2-renorm"),
    pytest.param(dict(top_k=2, score_func="softmax", renormalize=False), id="softmax-k2-raw"),
    pytest.param(dict(top_k=1, score_func="softmax", renormalize=False), id="softmax-k1"),
    pytest.param(dict(top_k=NUM_EXPERTS, score_func="softmax", renormalize=True), id="softmax-kE"),
    pytest.param(dict(top_k=3, score_func="sigmoid", renormalize=True), id="sigmoid-k3-renorm"),
    pytest.param(dict(top_k=3, score_func="sigmoid", renormalize=False), id="sigmoid-k3-raw"),
    pytest.param(dict(top_k=NUM_EXPERTS, score_func="sigmoid", renormalize=False), id="sigmoid-kE"),
]


def selection_bias_for(case):
    # Large enough to reorder the sigmoid choice for many tokens.
    return torch.linspace(-0.3, 0.3, NUM_EXPERTS) if case["score_func"] == "sigmoid" else None


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_float64_matches_loop_forward_and_grads(case):
    inputs = random_moe_inputs(NUM_TOKENS, HIDDEN, INTERMEDIATE, NUM_EXPERTS, dtype=torch.float64)
    kwargs = dict(case, selection_bias=selection_bias_for(case))
    out = forward_backward(sparse_moe_ref, inputs, **kwargs)
    expected = forward_backward(moe_loop, inputs, **kwargs)
    assert out.counts.tolist() == expected.counts.tolist()
    outputs = zip([out.y, out.logits, *out.loss_stats], [expected.y, expected.logits, *expected.loss_stats])
    for actual, wanted in outputs:
        torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-12)
    for name, grad, grad_exp in zip(GRAD_NAMES, out.grads, expected.grads):
        torch.testing.assert_close(grad, grad_exp, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_float32_within_1e5_of_float64_loop(case):
    inputs = random_moe_inputs(NUM_TOKENS, HIDDEN, INTERMEDIATE, NUM_EXPERTS, dtype=torch.float32, seed=3)
    kwargs = dict(case, selection_bias=selection_bias_for(case))
    out = forward_backward(sparse_moe_ref, inputs, **kwargs)
    expected = forward_backward(moe_loop, [t.double() for t in inputs], **kwargs)
    assert out.y.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert all(stat.dtype == torch.float32 for stat in out.loss_stats)
    assert out.counts.tolist() == expected.counts.tolist()
    for actual, wanted in zip([out.y, *out.loss_stats], [expected.y, *expected.loss_stats]):
        assert max_rel_err(actual, wanted) <= 1e-5
    for name, grad, grad_exp in zip(GRAD_NAMES, out.grads, expected.grads):
        assert grad.dtype == torch.float32
        assert max_rel_err(grad, grad_exp) <= 1e-5, name


def test_empty_experts_get_zero_grads_and_match_loop():
    x, router_weight, gate_up, down = random_moe_inputs(NUM_TOKENS, HIDDEN, INTERMEDIATE, NUM_EXPERTS, torch.float64)
    # Experts 1 and 4 score far below the others for every token.
    bias = torch.zeros(NUM_EXPERTS, dtype=torch.float64)
    bias[[1, 4]] = -10.0
    inputs = (x, router_weight, gate_up, down)
    kwargs = dict(top_k=2, score_func="sigmoid", renormalize=True, selection_bias=bias)
    out = forward_backward(sparse_moe_ref, inputs, **kwargs)
    expected = forward_backward(moe_loop, inputs, **kwargs)
    assert out.counts[1] == 0 and out.counts[4] == 0 and out.counts.sum() == 2 * NUM_TOKENS
    torch.testing.assert_close(out.y, expected.y, rtol=1e-12, atol=1e-12)
    for grad, grad_exp in zip(out.grads, expected.grads):
        torch.testing.assert_close(grad, grad_exp, rtol=1e-10, atol=1e-12)
    gate_up_grad, down_grad = out.grads[2], out.grads[3]
    assert not gate_up_grad[[1, 4]].any() and not down_grad[[1, 4]].any()
    assert gate_up_grad[[0, 2, 3, 5]].abs().amax(dim=(1, 2)).min() > 0


def test_heavy_imbalance_one_expert_takes_most_tokens():
    inputs = random_moe_inputs(64, HIDDEN, INTERMEDIATE, NUM_EXPERTS, torch.float64, seed=5)
    bias = torch.zeros(NUM_EXPERTS, dtype=torch.float64)
    bias[2] = 0.45
    kwargs = dict(top_k=1, score_func="sigmoid", renormalize=False, selection_bias=bias)
    out = forward_backward(sparse_moe_ref, inputs, **kwargs)
    expected = forward_backward(moe_loop, inputs, **kwargs)
    assert out.counts[2] >= 48 and out.counts.tolist() == expected.counts.tolist()
    torch.testing.assert_close(out.y, expected.y, rtol=1e-12, atol=1e-12)
    for grad, grad_exp in zip(out.grads, expected.grads):
        torch.testing.assert_close(grad, grad_exp, rtol=1e-10, atol=1e-12)


def test_selection_bias_changes_choice_not_weights():
    x, router_weight, _, _ = random_moe_inputs(NUM_TOKENS, HIDDEN, INTERMEDIATE, NUM_EXPERTS, torch.float32)
    bias = torch.linspace(-0.3, 0.3, NUM_EXPERTS)
    for renormalize in (False, True):
        plain = route_ref(x, router_weight, 2, "sigmoid", renormalize)
        biased = route_ref(x, router_weight, 2, "sigmoid", renormalize, selection_bias=bias)
        assert (plain.expert_ids != biased.expert_ids).any(), "bias too small to change any choice"
        torch.testing.assert_close(biased.router_logits, plain.router_logits)
        torch.testing.assert_close(biased.scores, plain.scores)
        expected = plain.scores.gather(1, biased.expert_ids.long())
        if renormalize:
            expected = expected / expected.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(biased.weights, expected, rtol=1e-6, atol=0)
        # Choice follows the biased scores, best first.
        biased_choice = (plain.scores + bias).gather(1, biased.expert_ids.long())
        assert (biased_choice[:, 0] >= biased_choice[:, 1]).all()


def test_route_output_dtypes_and_counts():
    x, router_weight, _, _ = random_moe_inputs(NUM_TOKENS, HIDDEN, INTERMEDIATE, NUM_EXPERTS, torch.bfloat16)
    routing = route_ref(x, router_weight, 3)
    assert routing.weights.dtype == torch.float32 and routing.weights.shape == (NUM_TOKENS, 3)
    assert routing.expert_ids.dtype == torch.int32 and routing.expert_ids.shape == (NUM_TOKENS, 3)
    assert routing.router_logits.dtype == torch.float32 and routing.router_logits.shape == (NUM_TOKENS, NUM_EXPERTS)
    assert routing.expert_counts.dtype == torch.int64
    logsumexp, probability_sums = routing.loss_stats
    assert logsumexp.dtype == probability_sums.dtype == torch.float32
    assert logsumexp.shape == (NUM_TOKENS,) and probability_sums.shape == (NUM_EXPERTS,)
    torch.testing.assert_close(probability_sums.sum(), torch.tensor(float(NUM_TOKENS)))  # softmax rows sum to 1
    expected_counts = torch.bincount(routing.expert_ids.flatten().long(), minlength=NUM_EXPERTS)
    assert routing.expert_counts.tolist() == expected_counts.tolist()
    # Every token chooses k distinct experts.
    assert (routing.expert_ids.sort(dim=-1).values.diff(dim=-1) > 0).all()


def test_bfloat16_close_to_float64_loop():
    inputs = random_moe_inputs(NUM_TOKENS, HIDDEN, INTERMEDIATE, NUM_EXPERTS, torch.bfloat16, seed=7)
    y, logits, counts, _ = sparse_moe_ref(*inputs, top_k=2)
    expected = moe_loop(*inputs, top_k=2)
    assert y.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert counts.tolist() == expected.expert_counts.tolist()
    assert max_rel_err(y, expected.y) <= 3e-2


def test_zero_tokens():
    x, router_weight, gate_up, down = random_moe_inputs(0, HIDDEN, INTERMEDIATE, NUM_EXPERTS)
    y, logits, counts, (logsumexp, probability_sums) = sparse_moe_ref(x, router_weight, gate_up, down, top_k=2)
    assert y.shape == (0, HIDDEN) and logits.shape == (0, NUM_EXPERTS) and not counts.any()
    assert logsumexp.shape == (0,) and probability_sums.shape == (NUM_EXPERTS,) and not probability_sums.any()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(2, 3, HIDDEN)), "x must be"),
        (dict(router_weight=torch.zeros(NUM_EXPERTS, HIDDEN + 1)), "router_weight must be"),
        (dict(gate_up=torch.zeros(NUM_EXPERTS, 2 * INTERMEDIATE + 1, HIDDEN)), "gate_up must be"),
        (dict(down=torch.zeros(NUM_EXPERTS, HIDDEN, INTERMEDIATE + 1)), "down must be"),
        (dict(down=torch.zeros(NUM_EXPERTS, HIDDEN, INTERMEDIATE, dtype=torch.float64)), "cast the expert weights"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=NUM_EXPERTS + 1), "top_k"),
        (dict(score_func="relu"), "score_func"),
        (dict(selection_bias=torch.zeros(NUM_EXPERTS + 1)), "selection_bias"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    x, router_weight, gate_up, down = random_moe_inputs(4, HIDDEN, INTERMEDIATE, NUM_EXPERTS)
    kwargs = dict(x=x, router_weight=router_weight, gate_up=gate_up, down=down, top_k=2)
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        sparse_moe_ref(**kwargs)
