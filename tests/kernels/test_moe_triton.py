"""Triton MoE kernels, each op and the whole routed path, against float64 PyTorch.

CPU: fp32 under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU), tiny sizes.
GPU (`-m gpu`): bf16 at moderate sizes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from test_moe_oracle import moe_loop, random_moe_inputs, rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

from hybridlm.kernels.moe import route, route_ref, sparse_moe  # noqa: E402
from hybridlm.kernels.moe.combine import combine, combine_weight_grad  # noqa: E402
from hybridlm.kernels.moe.grouped_gemm import (  # noqa: E402
    EPILOGUE_SWIGLU,
    EPILOGUE_SWIGLU_BACKWARD,
    expert_rows_gemm,
    expert_weight_grad,
)
from hybridlm.kernels.moe.permute import permute_by_expert  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
FP32_TOL = 1e-5


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def forward_backward(fn, inputs, seed=123, **kwargs):
    """(y, logits, counts, [dx, drouter, dgate_up, ddown]) with fixed random cotangents on y and the logits."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, logits, counts = fn(*leaves, **kwargs)[:3]
    generator = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y)
    dlogits = torch.randn(logits.shape, generator=generator, dtype=torch.float64).to(logits)
    torch.autograd.backward([y, logits], [dy, dlogits])
    return y.detach(), logits.detach(), counts, [leaf.grad for leaf in leaves]


# ---------------------------------------------------------------- router


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_router_forward_and_grad_to_logits(score_func, renormalize, top_k):
    num_experts = 6
    x, router_weight, _, _ = random_moe_inputs(45, 16, 8, num_experts, seed=top_k)
    bias = torch.linspace(-0.3, 0.3, num_experts) if score_func == "sigmoid" else None
    generator = torch.Generator().manual_seed(1)
    dweights = torch.randn(45, top_k, generator=generator, dtype=torch.float64)
    dscores = torch.randn(45, num_experts, generator=generator, dtype=torch.float64)

    def run(fn, x, router_weight, bias):
        x, router_weight = x.clone().requires_grad_(), router_weight.clone().requires_grad_()
        out = fn(x, router_weight, top_k, score_func, renormalize, bias)
        loss = (out.weights * dweights.to(out.weights)).sum() + (out.scores * dscores.to(out.scores)).sum()
        loss.backward()
        return out, x.grad, router_weight.grad

    x_dev, router_dev = on_device(x, router_weight)
    bias_dev = bias.to(DEVICE) if bias is not None else None
    out, dx, drouter = run(route, x_dev, router_dev, bias_dev)
    expected, dx_exp, drouter_exp = run(route_ref, x.double(), router_weight.double(), bias)
    assert out.expert_ids.dtype == torch.int32 and out.weights.dtype == torch.float32
    assert torch.equal(out.expert_ids.cpu(), expected.expert_ids)
    assert out.expert_counts.cpu().tolist() == expected.expert_counts.tolist()
    pairs = [(out.weights, expected.weights), (out.scores, expected.scores),
             (out.router_logits, expected.router_logits), (dx, dx_exp), (drouter, drouter_exp)]  # fmt: skip
    for actual, wanted in pairs:
        assert rel_err(actual.cpu(), wanted) <= FP32_TOL


# ---------------------------------------------------------------- permutation


@pytest.mark.parametrize(
    "num_pairs, num_experts, skew",
    [(45, 6, False), (3001, 8, False), (2500, 8, True), (7, 16, False)],
    ids=["small", "many-blocks", "one-expert-takes-most", "fewer-pairs-than-experts"],
)
def test_permutation_is_a_stable_sort_by_expert(num_pairs, num_experts, skew):
    generator = torch.Generator().manual_seed(num_pairs)
    ids = torch.randint(0, num_experts, (num_pairs,), generator=generator)
    ids[ids == 3] = 2  # expert 3 stays empty
    if skew:
        ids[torch.rand(num_pairs, generator=generator) < 0.9] = 5
    permutation = permute_by_expert(ids.to(torch.int32).to(DEVICE).view(-1, 1), num_experts)
    order = ids.argsort(stable=True)
    assert torch.equal(permutation.sorted_to_pair.cpu().long(), order)
    inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(num_pairs))
    assert torch.equal(permutation.pair_to_sorted.cpu().long(), inverse)
    assert permutation.expert_counts.cpu().tolist() == torch.bincount(ids, minlength=num_experts).tolist()


# ---------------------------------------------------------------- grouped GEMMs and combine

# Expert-sorted layout shared by the op tests: empty experts (1, 4), one heavy expert (2), 11 tokens x 5 slots.
OP_COUNTS = [5, 0, 37, 1, 0, 12]
OP_TOP_K, OP_TOKENS = 5, 11


def op_layout(seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_rows = sum(OP_COUNTS)
    sorted_to_pair = torch.randperm(num_rows, generator=generator)
    pair_weights = torch.rand(num_rows, generator=generator, dtype=torch.float64)
    return sorted_to_pair, pair_weights, generator


def expert_slices():
    start = 0
    for expert, count in enumerate(OP_COUNTS):
        yield expert, slice(start, start + count)
        start += count


def rows_gemm_expected(a, weight, transpose_weight, sorted_to_pair, gather, pair_weights):
    a_rows = a[sorted_to_pair // OP_TOP_K] if gather else a
    out = torch.zeros(a_rows.shape[0], weight.shape[1] if transpose_weight else weight.shape[2], dtype=torch.float64)
    for expert, rows in expert_slices():
        out[rows] = a_rows[rows] @ (weight[expert].T if transpose_weight else weight[expert])
    if pair_weights is not None:
        out = out * pair_weights[sorted_to_pair][:, None]
    return out


def run_rows_gemm(a, weight, transpose_weight, sorted_to_pair, **kwargs):
    counts = torch.tensor(OP_COUNTS, dtype=torch.int32)
    args = on_device(a.float(), weight.float(), counts, sorted_to_pair.to(torch.int32))
    extra = {name: t.float().to(DEVICE) for name, t in kwargs.items() if torch.is_tensor(t)}
    return expert_rows_gemm(args[0], args[1], transpose_weight, args[2], args[3], OP_TOP_K,
                            **{**kwargs, **extra})  # fmt: skip


@pytest.mark.parametrize("transpose_weight", [True, False])
@pytest.mark.parametrize("gather, scaled", [(False, False), (True, False), (True, True)])
def test_expert_rows_gemm_plain(transpose_weight, gather, scaled):
    sorted_to_pair, pair_weights, generator = op_layout()
    num_rows, inner, n = sum(OP_COUNTS), 40, 36  # neither a multiple of the interpreter's blocks
    a = torch.randn(OP_TOKENS if gather else num_rows, inner, generator=generator, dtype=torch.float64)
    shape = (len(OP_COUNTS), n, inner) if transpose_weight else (len(OP_COUNTS), inner, n)
    weight = torch.randn(*shape, generator=generator, dtype=torch.float64)
    scale = pair_weights if scaled else None
    (out,) = run_rows_gemm(a, weight, transpose_weight, sorted_to_pair, gather=gather, pair_weights=scale)
    expected = rows_gemm_expected(a.float().double(), weight.float().double(), transpose_weight, sorted_to_pair,
                                  gather, scale.float().double() if scaled else None)  # fmt: skip
    assert rel_err(out.cpu(), expected) <= FP32_TOL


def test_expert_rows_gemm_swiglu_forward_and_backward():
    sorted_to_pair, pair_weights, generator = op_layout(1)
    hidden, intermediate = 40, 20
    x = torch.randn(OP_TOKENS, hidden, generator=generator, dtype=torch.float64).float()
    gate_up = torch.randn(len(OP_COUNTS), 2 * intermediate, hidden, generator=generator, dtype=torch.float64).float()
    down = torch.randn(len(OP_COUNTS), hidden, intermediate, generator=generator, dtype=torch.float64).float()
    pre, act = run_rows_gemm(x, gate_up, True, sorted_to_pair, gather=True, epilogue=EPILOGUE_SWIGLU)
    pre_exp = rows_gemm_expected(x.double(), gate_up.double(), True, sorted_to_pair, True, None)
    gate, up = pre_exp.split(intermediate, dim=1)
    assert rel_err(pre.cpu(), pre_exp) <= FP32_TOL
    assert rel_err(act.cpu(), F.silu(gate) * up) <= FP32_TOL

    # Backward epilogue: d(act) = w * dy[token] @ down_e, then through silu(gate) * up.
    dy = torch.randn(OP_TOKENS, hidden, generator=generator, dtype=torch.float64).float()
    (dpre,) = run_rows_gemm(dy, down, False, sorted_to_pair, gather=True, pair_weights=pair_weights,
                            epilogue=EPILOGUE_SWIGLU_BACKWARD, pre_activation=pre)  # fmt: skip
    gate, up = (t.double().requires_grad_() for t in pre.cpu().split(intermediate, dim=1))
    dact = rows_gemm_expected(dy.double(), down.double(), False, sorted_to_pair, True, pair_weights.float().double())
    dgate, dup = torch.autograd.grad(F.silu(gate) * up, (gate, up), dact)
    assert rel_err(dpre.cpu(), torch.cat([dgate, dup], dim=1)) <= FP32_TOL


@pytest.mark.parametrize("gather_left, scaled, gather_right", [(False, False, True), (True, True, False)])
def test_expert_weight_grad(gather_left, scaled, gather_right):
    sorted_to_pair, pair_weights, generator = op_layout(2)
    num_rows, n, k = sum(OP_COUNTS), 36, 40
    left = torch.randn(OP_TOKENS if gather_left else num_rows, n, generator=generator, dtype=torch.float64).float()
    right = torch.randn(OP_TOKENS if gather_right else num_rows, k, generator=generator, dtype=torch.float64).float()
    counts = torch.tensor(OP_COUNTS, dtype=torch.int32)
    left_d, right_d, counts_d, order_d = on_device(left, right, counts, sorted_to_pair.to(torch.int32))
    out = expert_weight_grad(left_d, right_d, counts_d, order_d, OP_TOP_K, gather_left=gather_left,
                             left_pair_weights=pair_weights.float().to(DEVICE) if scaled else None,
                             gather_right=gather_right)  # fmt: skip
    left_rows = left.double()[sorted_to_pair // OP_TOP_K] if gather_left else left.double()
    if scaled:
        left_rows = left_rows * pair_weights.float().double()[sorted_to_pair][:, None]
    right_rows = right.double()[sorted_to_pair // OP_TOP_K] if gather_right else right.double()
    expected = torch.zeros(len(OP_COUNTS), n, k, dtype=torch.float64)
    for expert, rows in expert_slices():
        expected[expert] = left_rows[rows].T @ right_rows[rows]
    assert rel_err(out.cpu(), expected) <= FP32_TOL
    assert not out[[1, 4]].any(), "experts without rows must get a zero gradient"


def test_combine_and_weight_grad():
    sorted_to_pair, pair_weights, generator = op_layout(3)
    hidden = 300  # more than one column block
    rows = torch.randn(sum(OP_COUNTS), hidden, generator=generator, dtype=torch.float64).float()
    weights = pair_weights.float()
    pair_to_sorted = torch.empty_like(sorted_to_pair).index_copy_(0, sorted_to_pair, torch.arange(len(sorted_to_pair)))
    rows_d, weights_d, pos_d = on_device(rows, weights, pair_to_sorted.to(torch.int32))
    by_pair = rows.double()[pair_to_sorted].view(OP_TOKENS, OP_TOP_K, hidden)
    out = combine(rows_d, pos_d, OP_TOP_K, weights_d, torch.float32)
    assert rel_err(out.cpu(), (by_pair * weights.double().view(OP_TOKENS, OP_TOP_K, 1)).sum(1)) <= FP32_TOL
    assert rel_err(combine(rows_d, pos_d, OP_TOP_K, None, torch.float32).cpu(), by_pair.sum(1)) <= FP32_TOL
    dout = torch.randn(OP_TOKENS, hidden, generator=generator, dtype=torch.float64).float()
    dweights = combine_weight_grad(rows_d, pos_d, OP_TOP_K, dout.to(DEVICE))
    assert rel_err(dweights.cpu(), torch.einsum("th,tkh->tk", dout.double(), by_pair)) <= FP32_TOL


# ---------------------------------------------------------------- whole path

PATH_CASES = [
    pytest.param(dict(num_tokens=37, top_k=2, score_func="softmax", renormalize=True), id="softmax-k2"),
    pytest.param(dict(num_tokens=50, top_k=1, score_func="softmax", renormalize=False), id="k1"),
    pytest.param(dict(num_tokens=23, top_k=6, score_func="softmax", renormalize=True), id="k=E"),
    pytest.param(dict(num_tokens=41, top_k=3, score_func="sigmoid", renormalize=True, bias=True), id="sigmoid-bias"),
    pytest.param(
        dict(num_tokens=33, top_k=2, score_func="sigmoid", renormalize=True, empty=(1, 4)), id="empty-experts"
    ),
    pytest.param(dict(num_tokens=64, top_k=1, score_func="sigmoid", renormalize=False, heavy=2), id="imbalanced"),
]
HIDDEN, INTERMEDIATE, NUM_EXPERTS = 40, 24, 6


def path_inputs(case, dtype=torch.float32, sizes=(HIDDEN, INTERMEDIATE, NUM_EXPERTS)):
    hidden, intermediate, num_experts = sizes
    inputs = random_moe_inputs(case["num_tokens"], hidden, intermediate, num_experts, dtype=dtype, seed=case["top_k"])
    bias = None
    if case.get("bias"):
        bias = torch.linspace(-0.3, 0.3, num_experts)
    if case.get("empty"):
        bias = torch.zeros(num_experts)
        bias[list(case["empty"])] = -10.0
    if case.get("heavy") is not None:
        bias = torch.zeros(num_experts)
        bias[case["heavy"]] = 0.7
    kwargs = dict(top_k=case["top_k"], score_func=case["score_func"], renormalize=case["renormalize"])
    return inputs, bias, kwargs


@pytest.mark.parametrize("case", PATH_CASES)
def test_sparse_moe_matches_float64_loop(case):
    inputs, bias, kwargs = path_inputs(case)
    y, logits, counts, grads = forward_backward(
        sparse_moe, on_device(*inputs), selection_bias=bias.to(DEVICE) if bias is not None else None, **kwargs
    )
    y_exp, logits_exp, counts_exp, grads_exp = forward_backward(
        moe_loop, [t.double() for t in inputs], selection_bias=bias, **kwargs
    )
    assert y.dtype == torch.float32 and logits.dtype == torch.float32 and counts.dtype == torch.int64
    assert counts.cpu().tolist() == counts_exp.tolist()
    if case.get("empty"):
        assert all(counts[e] == 0 for e in case["empty"])
    if case.get("heavy") is not None:
        assert counts[case["heavy"]] >= 0.75 * case["num_tokens"]
    assert rel_err(y.cpu(), y_exp) <= FP32_TOL
    assert rel_err(logits.cpu(), logits_exp) <= FP32_TOL
    for name, grad, grad_exp in zip(("x", "router_weight", "gate_up", "down"), grads, grads_exp):
        assert rel_err(grad.cpu(), grad_exp) <= FP32_TOL, f"d{name}"


def test_repeats_are_bitwise_identical():
    inputs, bias, kwargs = path_inputs(PATH_CASES[3].values[0])
    inputs, bias = on_device(*inputs), bias.to(DEVICE)
    first = forward_backward(sparse_moe, inputs, selection_bias=bias, **kwargs)
    second = forward_backward(sparse_moe, inputs, selection_bias=bias, **kwargs)
    for a, b in zip(first[:3] + tuple(first[3]), second[:3] + tuple(second[3])):
        assert torch.equal(a, b)


def test_zero_tokens():
    x, router_weight, gate_up, down = on_device(*random_moe_inputs(0, HIDDEN, INTERMEDIATE, NUM_EXPERTS))
    x.requires_grad_()
    y, logits, counts = sparse_moe(x, router_weight, gate_up, down, top_k=2)
    assert y.shape == (0, HIDDEN) and logits.shape == (0, NUM_EXPERTS) and not counts.any()


def test_float64_is_rejected_with_a_pointer_to_the_reference():
    inputs = on_device(*random_moe_inputs(4, HIDDEN, INTERMEDIATE, NUM_EXPERTS, dtype=torch.float64))
    with pytest.raises(TypeError, match="sparse_moe_ref"):
        sparse_moe(*inputs, top_k=2)


# ---------------------------------------------------------------- GPU, bf16

GPU_SIZES = (256, 128, 16)  # hidden, intermediate, experts


@pytest.mark.gpu
@pytest.mark.parametrize("case", PATH_CASES)
def test_sparse_moe_bf16_on_gpu(case):
    case = dict(case, num_tokens=4 * case["num_tokens"] + 3)
    inputs, bias, kwargs = path_inputs(case, dtype=torch.bfloat16, sizes=GPU_SIZES)
    bias = bias.cuda() if bias is not None else None
    y, logits, counts, grads = forward_backward(sparse_moe, [t.cuda() for t in inputs], selection_bias=bias, **kwargs)
    y_exp, _, counts_exp, grads_exp = forward_backward(
        moe_loop, [t.double() for t in inputs], selection_bias=bias.cpu() if bias is not None else None, **kwargs
    )
    assert y.dtype == torch.bfloat16 and logits.dtype == torch.float32
    # bf16 rounding of logits can flip near-tied choices; nearly all must agree.
    assert (counts.cpu() - counts_exp).abs().sum() <= 0.02 * counts_exp.sum()
    assert rel_err(y.cpu(), y_exp) <= 5e-2
    for name, grad, grad_exp in zip(("x", "router_weight", "gate_up", "down"), grads, grads_exp):
        assert rel_err(grad.cpu(), grad_exp) <= 5e-2, f"d{name}"


@pytest.mark.gpu
def test_bf16_repeats_are_bitwise_identical_on_gpu():
    case = dict(num_tokens=4096, top_k=8, score_func="softmax", renormalize=True)
    inputs, _, kwargs = path_inputs(case, dtype=torch.bfloat16, sizes=(512, 256, 64))
    inputs = [t.cuda() for t in inputs]
    first = forward_backward(sparse_moe, inputs, **kwargs)
    second = forward_backward(sparse_moe, inputs, **kwargs)
    for a, b in zip(first[:3] + tuple(first[3]), second[:3] + tuple(second[3])):
        assert torch.equal(a, b)
