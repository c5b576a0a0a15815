"""Triton MoE kernels, each op and the whole routed path, against float64 PyTorch.

CPU: fp32 under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU), tiny sizes.
GPU (`-m gpu`): bf16 at moderate sizes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers.moe_oracle import forward_backward, moe_loop, random_moe_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

from hybridlm.evaluate.memory import saved_for_backward  # noqa: E402
from hybridlm.kernels.moe import route, route_ref, sparse_moe  # noqa: E402
from hybridlm.kernels.moe.combine import combine, swiglu_routing_weight_grad  # noqa: E402
from hybridlm.kernels.moe.grouped_gemm import (  # noqa: E402
    EPILOGUE_SWIGLU,
    EPILOGUE_SWIGLU_BACKWARD,
    expert_rows_gemm,
    expert_weight_grad,
)
from hybridlm.kernels.moe.permute import permute_by_expert  # noqa: E402
from hybridlm.kernels.tolerances import MOE_CHOICE_FLIP_FRACTION, MOE_MAX_REL_TOL, max_rel_err  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
FP32_TOL = MOE_MAX_REL_TOL[torch.float32]


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


GRAD_NAMES = ("x", "router_weight", "gate_up", "down")


# ---------------------------------------------------------------- router


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_router_forward_and_grad_to_logits(score_func, renormalize, top_k):
    num_experts = 6
    x, router_weight, _, _ = random_moe_inputs(45, 16, 8, num_experts, seed=top_k)
    bias = torch.linspace(-0.3, 0.3, num_experts) if score_func == "sigmoid" else None
    generator = torch.Generator().manual_seed(1)
    # Cotangents of weights, scores, logsumexp and probability sums: every differentiable router output.
    cotangents = [torch.randn(*shape, generator=generator, dtype=torch.float64)
                  for shape in [(45, top_k), (45, num_experts), (45,), (num_experts,)]]  # fmt: skip

    def run(fn, x, router_weight, bias):
        x, router_weight = x.clone().requires_grad_(), router_weight.clone().requires_grad_()
        out = fn(x, router_weight, top_k, score_func, renormalize, bias)
        outputs = [out.weights, out.scores, *out.loss_stats]
        sum(((t * c.to(t)).sum() for t, c in zip(outputs, cotangents))).backward()
        return out, x.grad, router_weight.grad

    x_dev, router_dev = on_device(x, router_weight)
    bias_dev = bias.to(DEVICE) if bias is not None else None
    out, dx, drouter = run(route, x_dev, router_dev, bias_dev)
    expected, dx_exp, drouter_exp = run(route_ref, x.double(), router_weight.double(), bias)
    assert out.expert_ids.dtype == torch.int32 and out.weights.dtype == torch.float32
    assert torch.equal(out.expert_ids.cpu(), expected.expert_ids)
    assert out.expert_counts.cpu().tolist() == expected.expert_counts.tolist()
    pairs = [(out.weights, expected.weights), (out.scores, expected.scores),
             (out.router_logits, expected.router_logits), (out.loss_stats.logsumexp, expected.loss_stats.logsumexp),
             (out.loss_stats.probability_sums, expected.loss_stats.probability_sums),
             (dx, dx_exp), (drouter, drouter_exp)]  # fmt: skip
    for actual, wanted in pairs:
        assert max_rel_err(actual.cpu(), wanted) <= FP32_TOL


def test_router_gemm_keeps_16bit_x_and_gives_fp32_logits():
    """The router GEMM saves x as it is (no fp32 copy of it) and its gradients match float64 to bf16 accuracy.
    On CPU the bf16 operands are multiplied on transient fp32 copies; on CUDA by cuBLAS with an fp32 output."""
    x, router_weight, _, _ = random_moe_inputs(45, 16, 8, 6, dtype=torch.bfloat16, seed=4)
    x_dev, router_dev = (t.to(DEVICE).clone().requires_grad_() for t in (x, router_weight))
    out, saved = saved_for_backward(lambda: route(x_dev, router_dev, 2), [x_dev, router_dev])
    assert out.router_logits.dtype == torch.float32
    # Only the fp32 logits [T, E] and the int32 expert ids [T, k] are new; x and the weight are kept as given.
    assert sorted(saved.values()) == sorted([45 * 6 * 4, 45 * 2 * 4])
    dlogits = torch.randn(45, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out.router_logits.backward(dlogits.float().to(DEVICE))
    assert x_dev.grad.dtype == torch.bfloat16 and router_dev.grad.dtype == torch.bfloat16
    x64, router64 = (t.detach().double().requires_grad_() for t in (x, router_weight))
    logits = x64 @ router64.T
    logits.backward(dlogits)
    assert max_rel_err(out.router_logits.cpu(), logits.detach()) <= 1e-6  # exact bf16 products, fp32 sums
    assert max_rel_err(x_dev.grad.cpu(), x64.grad) <= 1e-2 and max_rel_err(router_dev.grad.cpu(), router64.grad) <= 1e-2


def test_sparse_moe_saves_neither_activation_nor_expert_outputs():
    """Saved for backward besides the inputs: logits, routing, permutation and the SwiGLU pre-activation only."""
    tokens, top_k = 33, 2
    inputs = on_device(*random_moe_inputs(tokens, HIDDEN, INTERMEDIATE, NUM_EXPERTS))
    leaves = [t.requires_grad_() for t in inputs]
    _, saved = saved_for_backward(lambda: sparse_moe(*leaves, top_k=top_k), leaves)
    pairs, fp32, int32 = tokens * top_k, 4, 4
    expected = [
        tokens * NUM_EXPERTS * fp32,  # logits [T, E]
        pairs * int32,  # expert ids [T, k]
        pairs * fp32,  # routing weights [T, k]
        pairs * int32,  # sorted_to_pair [T*k]
        pairs * int32,  # pair_to_sorted [T*k]
        NUM_EXPERTS * int32,  # expert counts [E]
        pairs * 2 * INTERMEDIATE * fp32,  # SwiGLU pre-activation [T*k, 2I]; no act [T*k, I], no outputs [T*k, H]
    ]
    assert sorted(saved.values()) == sorted(expected)


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
    assert max_rel_err(out.cpu(), expected) <= FP32_TOL


def test_expert_rows_gemm_swiglu_forward_and_backward():
    sorted_to_pair, pair_weights, generator = op_layout(1)
    hidden, intermediate = 40, 20
    x = torch.randn(OP_TOKENS, hidden, generator=generator, dtype=torch.float64).float()
    gate_up = torch.randn(len(OP_COUNTS), 2 * intermediate, hidden, generator=generator, dtype=torch.float64).float()
    down = torch.randn(len(OP_COUNTS), hidden, intermediate, generator=generator, dtype=torch.float64).float()
    pre, act = run_rows_gemm(x, gate_up, True, sorted_to_pair, gather=True, epilogue=EPILOGUE_SWIGLU)
    pre_exp = rows_gemm_expected(x.double(), gate_up.double(), True, sorted_to_pair, True, None)
    gate, up = pre_exp.split(intermediate, dim=1)
    assert max_rel_err(pre.cpu(), pre_exp) <= FP32_TOL
    assert max_rel_err(act.cpu(), F.silu(gate) * up) <= FP32_TOL

    # Backward epilogue: d(act) = w * dy[token] @ down_e, then through silu(gate) * up.
    dy = torch.randn(OP_TOKENS, hidden, generator=generator, dtype=torch.float64).float()
    (dpre,) = run_rows_gemm(dy, down, False, sorted_to_pair, gather=True, pair_weights=pair_weights,
                            epilogue=EPILOGUE_SWIGLU_BACKWARD, pre_activation=pre)  # fmt: skip
    gate, up = (t.double().requires_grad_() for t in pre.cpu().split(intermediate, dim=1))
    dact = rows_gemm_expected(dy.double(), down.double(), False, sorted_to_pair, True, pair_weights.float().double())
    dgate, dup = torch.autograd.grad(F.silu(gate) * up, (gate, up), dact)
    assert max_rel_err(dpre.cpu(), torch.cat([dgate, dup], dim=1)) <= FP32_TOL

    # The routing-weight gradient from the unweighted backward: dL/dw = <dy[token] @ down_e, act> per pair.
    (dpre_unweighted,) = run_rows_gemm(dy, down, False, sorted_to_pair, gather=True,
                                       epilogue=EPILOGUE_SWIGLU_BACKWARD, pre_activation=pre)  # fmt: skip
    pair_to_sorted = torch.empty_like(sorted_to_pair).index_copy_(0, sorted_to_pair, torch.arange(len(sorted_to_pair)))
    dweights = swiglu_routing_weight_grad(dpre_unweighted, pre, pair_to_sorted.to(torch.int32).to(DEVICE), OP_TOP_K)
    dact = rows_gemm_expected(dy.double(), down.double(), False, sorted_to_pair, True, None)
    by_sorted_row = (dact * (F.silu(gate) * up)).sum(dim=1)
    assert dweights.dtype == torch.float32 and dweights.shape == (OP_TOKENS, OP_TOP_K)
    assert max_rel_err(dweights.cpu(), by_sorted_row[pair_to_sorted].view(OP_TOKENS, OP_TOP_K)) <= FP32_TOL


@pytest.mark.parametrize(
    "gather_left, scaled, gather_right, right_swiglu",
    [(False, False, True, False), (True, True, False, False), (True, True, False, True)],
    ids=["d_gate_up", "d_down", "d_down-recomputed-act"],
)
def test_expert_weight_grad(gather_left, scaled, gather_right, right_swiglu):
    sorted_to_pair, pair_weights, generator = op_layout(2)
    num_rows, n, k = sum(OP_COUNTS), 36, 40
    left = torch.randn(OP_TOKENS if gather_left else num_rows, n, generator=generator, dtype=torch.float64).float()
    right_width = 2 * k if right_swiglu else k  # a pre-activation [gate | up] when the activation is recomputed
    right = torch.randn(OP_TOKENS if gather_right else num_rows, right_width, generator=generator,
                        dtype=torch.float64).float()  # fmt: skip
    counts = torch.tensor(OP_COUNTS, dtype=torch.int32)
    left_d, right_d, counts_d, order_d = on_device(left, right, counts, sorted_to_pair.to(torch.int32))
    out = expert_weight_grad(left_d, right_d, counts_d, order_d, OP_TOP_K, gather_left=gather_left,
                             left_pair_weights=pair_weights.float().to(DEVICE) if scaled else None,
                             gather_right=gather_right, right_swiglu=right_swiglu)  # fmt: skip
    left_rows = left.double()[sorted_to_pair // OP_TOP_K] if gather_left else left.double()
    if scaled:
        left_rows = left_rows * pair_weights.float().double()[sorted_to_pair][:, None]
    right_rows = right.double()[sorted_to_pair // OP_TOP_K] if gather_right else right.double()
    if right_swiglu:
        right_rows = F.silu(right_rows[:, :k]) * right_rows[:, k:]
    expected = torch.zeros(len(OP_COUNTS), n, k, dtype=torch.float64)
    for expert, rows in expert_slices():
        expected[expert] = left_rows[rows].T @ right_rows[rows]
    assert max_rel_err(out.cpu(), expected) <= FP32_TOL
    assert not out[[1, 4]].any(), "experts without rows must get a zero gradient"


def test_combine():
    sorted_to_pair, pair_weights, generator = op_layout(3)
    hidden = 300  # more than one column block
    rows = torch.randn(sum(OP_COUNTS), hidden, generator=generator, dtype=torch.float64).float()
    weights = pair_weights.float()
    pair_to_sorted = torch.empty_like(sorted_to_pair).index_copy_(0, sorted_to_pair, torch.arange(len(sorted_to_pair)))
    rows_d, weights_d, pos_d = on_device(rows, weights, pair_to_sorted.to(torch.int32))
    by_pair = rows.double()[pair_to_sorted].view(OP_TOKENS, OP_TOP_K, hidden)
    out = combine(rows_d, pos_d, OP_TOP_K, weights_d, torch.float32)
    assert max_rel_err(out.cpu(), (by_pair * weights.double().view(OP_TOKENS, OP_TOP_K, 1)).sum(1)) <= FP32_TOL
    assert max_rel_err(combine(rows_d, pos_d, OP_TOP_K, None, torch.float32).cpu(), by_pair.sum(1)) <= FP32_TOL


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
    out = forward_backward(
        sparse_moe, on_device(*inputs), selection_bias=bias.to(DEVICE) if bias is not None else None, **kwargs
    )
    expected = forward_backward(moe_loop, [t.double() for t in inputs], selection_bias=bias, **kwargs)
    assert out.y.dtype == torch.float32 and out.logits.dtype == torch.float32 and out.counts.dtype == torch.int64
    assert out.counts.cpu().tolist() == expected.counts.tolist()
    if case.get("empty"):
        assert all(out.counts[e] == 0 for e in case["empty"])
    if case.get("heavy") is not None:
        assert out.counts[case["heavy"]] >= 0.75 * case["num_tokens"]
    outputs = zip([out.y, out.logits, *out.loss_stats], [expected.y, expected.logits, *expected.loss_stats])
    for actual, wanted in outputs:
        assert max_rel_err(actual.cpu(), wanted) <= FP32_TOL
    for name, grad, grad_exp in zip(GRAD_NAMES, out.grads, expected.grads):
        assert max_rel_err(grad.cpu(), grad_exp) <= FP32_TOL, f"d{name}"


def assert_bitwise_equal(first, second):
    for a, b in zip([*first[:3], *first.loss_stats, *first.grads], [*second[:3], *second.loss_stats, *second.grads]):
        assert torch.equal(a, b)


def test_repeats_are_bitwise_identical():
    """On CPU this cannot fail: the interpreter runs programs one after another. It guards the plumbing (no
    random or uninitialised state between calls); test_bf16_repeats_are_bitwise_identical_on_gpu is the real check."""
    inputs, bias, kwargs = path_inputs(PATH_CASES[3].values[0])
    inputs, bias = on_device(*inputs), bias.to(DEVICE)
    first = forward_backward(sparse_moe, inputs, selection_bias=bias, **kwargs)
    second = forward_backward(sparse_moe, inputs, selection_bias=bias, **kwargs)
    assert_bitwise_equal(first, second)


def test_zero_tokens():
    x, router_weight, gate_up, down = on_device(*random_moe_inputs(0, HIDDEN, INTERMEDIATE, NUM_EXPERTS))
    x.requires_grad_()
    y, logits, counts, (logsumexp, probability_sums) = sparse_moe(x, router_weight, gate_up, down, top_k=2)
    assert y.shape == (0, HIDDEN) and logits.shape == (0, NUM_EXPERTS) and not counts.any()
    assert logsumexp.shape == (0,) and probability_sums.shape == (NUM_EXPERTS,) and not probability_sums.any()
    (y.sum() + logits.sum() + logsumexp.sum() + probability_sums.sum()).backward()
    assert x.grad.shape == x.shape


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
    out = forward_backward(sparse_moe, [t.cuda() for t in inputs], selection_bias=bias, **kwargs)
    expected = forward_backward(
        moe_loop, [t.double() for t in inputs], selection_bias=bias.cpu() if bias is not None else None, **kwargs
    )
    assert out.y.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    # bf16 rounding of logits can flip near-tied choices; nearly all must agree.
    assert (out.counts.cpu() - expected.counts).abs().sum() <= MOE_CHOICE_FLIP_FRACTION * expected.counts.sum()
    for actual, wanted in zip([out.y, *out.loss_stats], [expected.y, *expected.loss_stats]):
        assert max_rel_err(actual.cpu(), wanted) <= MOE_MAX_REL_TOL[torch.bfloat16]
    for name, grad, grad_exp in zip(GRAD_NAMES, out.grads, expected.grads):
        assert max_rel_err(grad.cpu(), grad_exp) <= MOE_MAX_REL_TOL[torch.bfloat16], f"d{name}"


@pytest.mark.gpu
def test_bf16_repeats_are_bitwise_identical_on_gpu():
    case = dict(num_tokens=4096, top_k=8, score_func="softmax", renormalize=True)
    inputs, _, kwargs = path_inputs(case, dtype=torch.bfloat16, sizes=(512, 256, 64))
    inputs = [t.cuda() for t in inputs]
    first = forward_backward(sparse_moe, inputs, **kwargs)
    second = forward_backward(sparse_moe, inputs, **kwargs)
    assert_bitwise_equal(first, second)
