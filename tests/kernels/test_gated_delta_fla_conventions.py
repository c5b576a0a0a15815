"""fla 0.6's calling conventions on our Triton kernels (docs/kernels.md, "Swapping with fla"), each against the float64
token loop, and fla's own torch reference (fla/ops/gated_delta_rule/naive.py) where it covers the case.

fla's argument names mean what they mean in fla: `use_gate_in_kernel` (g is the raw gate, with A_log / dt_bias),
`use_beta_sigmoid_in_kernel` (beta is the raw logits), `allow_neg_eigval`, `state_v_first`, `cu_seqlens_cpu`,
`chunk_indices`, positional order, mixed q/k/v dtypes. Also the recurrent kernel's backward (RL, short sequences).
CPU: Triton interpreter, fp32, T <= 100.
"""

import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.gated_delta_inputs import BF16_REL_TOL, DEVICE, FP32_REL_TOL, make_inputs

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

from hybridlm.kernels.gated_delta import (  # noqa: E402
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_ref,
    naive_recurrent_gated_delta_rule,
)
from hybridlm.kernels.tolerances import rel_err  # noqa: E402


def fla_raw_inputs(T=70, H=1, HV=2, K=32, V=32, N=None, seed=0, dtype=torch.float32):
    """Leaves in fla's raw convention: g the raw gate (with A_log, dt_bias), beta the logits; q, k, v in `dtype`."""
    ours = make_inputs(1, T, H, HV, K, V, N=N, raw_gates=True, seed=seed, dtype=dtype)
    with torch.no_grad():
        ours["A_log"].fill_(math.log(4.0))  # decays up to exp(-4 softplus(a)) per token: a real test of the gate
    return {"q": ours["q"], "k": ours["k"], "v": ours["v"], "g": ours["a"], "beta": ours["b"],
            "A_log": ours["A_log"], "dt_bias": ours["dt_bias"], "initial_state": ours["initial_state"]}


def run(fn, inputs, dtype=None, **kwargs):
    """(o, final state, {leaf: grad}) for a fixed random projection of o and the final state."""
    leaves = {n: t.detach().to(dtype or t.dtype).requires_grad_() for n, t in inputs.items()}
    o, state = fn(**leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(7)
    do, d_state = (torch.randn(x.shape, generator=gen).to(x.device, x.dtype) for x in (o, state))
    grads = torch.autograd.grad((o * do).sum() + (state * d_state).sum(), list(leaves.values()))
    return o, state, dict(zip(leaves, grads))


def assert_same(ours, ref, tol=FP32_REL_TOL):
    for what, actual, expected in [("output", ours[0], ref[0]), ("final state", ours[1], ref[1])] + [
        (f"grad of {n}", ours[2][n], ref[2][n]) for n in ref[2]
    ]:
        err = rel_err(actual, expected)
        assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def activated(inputs, neg_eigval=False):
    """fla's raw leaves with the gate and beta computed in float64 outside any kernel (fla's naive_gdn_gate)."""
    x = {n: t.detach().double() for n, t in inputs.items()}
    g = -x["A_log"].exp() * F.softplus(x["g"] + x["dt_bias"])
    beta = torch.sigmoid(x["beta"]) * (2.0 if neg_eigval else 1.0)
    return dict(x, g=g, beta=beta)


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule])
def test_gate_and_beta_in_kernel_match_float64_and_the_alias_names(fn):
    """use_gate_in_kernel + use_beta_sigmoid_in_kernel: output, state and every gradient (raw g, A_log, dt_bias, beta
    logits) against the float64 loop differentiated through the activations; ours (a, b) give the same."""
    inputs = fla_raw_inputs()
    flags = dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_qk_l2norm_in_kernel=True)
    ours = run(fn, inputs, **flags)
    assert_same(ours, run(naive_recurrent_gated_delta_rule, inputs, dtype=torch.float64, **flags))
    aliased = {**{n: t for n, t in inputs.items() if n not in ("g", "beta")}, "a": inputs["g"], "b": inputs["beta"]}
    o_alias, state_alias, _ = run(fn, aliased, use_qk_l2norm_in_kernel=True)
    assert torch.equal(o_alias, ours[0]) and torch.equal(state_alias, ours[1])

    # The float64 oracle's own fla flags against activations computed by hand (fla's formula, no lower bound).
    x = {n: t for n, t in activated(inputs).items() if n not in ("A_log", "dt_bias")}
    o_ref, _ = naive_recurrent_gated_delta_rule(**x, use_qk_l2norm_in_kernel=True)
    assert rel_err(ours[0], o_ref) <= FP32_REL_TOL


def test_allow_neg_eigval_is_two_sigmoid_of_the_logits():
    inputs = {n: t for n, t in fla_raw_inputs().items() if n not in ("A_log", "dt_bias")}
    with torch.no_grad():
        inputs["g"] = F.logsigmoid(inputs["g"] + 2.0)
    flags = dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    ours = run(chunk_gated_delta_rule, inputs, **flags)
    assert_same(ours, run(naive_recurrent_gated_delta_rule, inputs, dtype=torch.float64, **flags))
    x = {n: t.detach().double() for n, t in inputs.items()}
    o_ref, _ = naive_recurrent_gated_delta_rule(**dict(x, beta=2 * torch.sigmoid(x["beta"])))
    assert rel_err(ours[0], o_ref) <= FP32_REL_TOL
    with pytest.raises(ValueError, match="use_beta_sigmoid_in_kernel"):
        chunk_gated_delta_rule(**{n: t.detach() for n, t in inputs.items()}, allow_neg_eigval=True)


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule])
def test_state_v_first_transposes_both_states(fn):
    inputs = {n: t.detach() for n, t in make_inputs(1, 40, 1, 2, 32, 16).items()}
    o, state = fn(**inputs, output_final_state=True)
    vk = dict(inputs, initial_state=inputs["initial_state"].transpose(-1, -2).contiguous())
    o_vk, state_vk = fn(**vk, output_final_state=True, state_v_first=True)
    assert state_vk.shape == (1, 2, 16, 32)
    assert torch.equal(o_vk, o) and torch.equal(state_vk, state.transpose(-1, -2))


def test_cu_seqlens_cpu_and_fla_chunk_indices_give_the_cu_seqlens_result():
    from fla.ops.utils.index import prepare_chunk_indices

    cu_seqlens = torch.tensor([0, 30, 100, 150], dtype=torch.long, device=DEVICE)
    inputs = {n: t.detach() for n, t in make_inputs(1, 150, 1, 2, 32, 32, N=3).items()}
    o, state = chunk_gated_delta_rule(**inputs, cu_seqlens=cu_seqlens, output_final_state=True)
    for extra in (dict(cu_seqlens_cpu=cu_seqlens.cpu()), dict(chunk_indices=prepare_chunk_indices(cu_seqlens, 64))):
        o_x, state_x = chunk_gated_delta_rule(**inputs, cu_seqlens=cu_seqlens, output_final_state=True, **extra)
        assert torch.equal(o_x, o) and torch.equal(state_x, state), extra


def test_mixed_dtypes_compute_in_the_widest_and_return_fla_s_dtypes():
    """q, k fp32 with v fp16 (fla's test_fused_recurrent mix): computed in fp32, so the fp16 values of v give the
    float64 result to fp32 round-off; o in q's dtype (chunk) or v's (recurrent), as fla returns it; each gradient
    in its input's dtype."""
    inputs = make_inputs(1, 70, 1, 2, 32, 32)
    inputs["v"] = inputs["v"].detach().half().requires_grad_()
    ref = run(naive_recurrent_gated_delta_rule, inputs, dtype=torch.float64)
    for fn, o_dtype in [(chunk_gated_delta_rule, torch.float32), (fused_recurrent_gated_delta_rule, torch.float16)]:
        o, state, grads = run(fn, inputs)
        assert o.dtype == o_dtype and state.dtype == torch.float32
        assert all(grads[n].dtype == inputs[n].dtype for n in grads)
        # fp16 results (o; dv; every gradient of the recurrent call, whose do is fp16 too): a rounding of 2^-11.
        tol = FP32_REL_TOL if o_dtype == torch.float32 else 1e-3
        assert rel_err(o, ref[0]) <= tol and rel_err(state, ref[1]) <= FP32_REL_TOL
        for n in ref[2]:
            assert rel_err(grads[n], ref[2][n]) <= (1e-3 if n == "v" else tol), f"{fn.__name__}: grad of {n}"


def test_recurrent_backward_matches_float64_varlen_raw_gates_and_state():
    """Training through fused_recurrent_gated_delta_rule: every gradient, packed documents, raw gates, L2 norm, an
    initial state and a loss on the final state, against the float64 loop."""
    cu_seqlens = torch.tensor([0, 5, 5, 21, 24], dtype=torch.int32, device=DEVICE)
    inputs = fla_raw_inputs(T=24, H=2, HV=4, N=4)
    flags = dict(cu_seqlens=cu_seqlens, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                 use_qk_l2norm_in_kernel=True, scale=0.3)  # fmt: skip
    assert_same(run(fused_recurrent_gated_delta_rule, inputs, **flags),
                run(fused_recurrent_gated_delta_rule_ref, inputs, dtype=torch.float64, **flags))  # fmt: skip


def test_recurrent_backward_with_one_output_used_and_without_g_or_beta():
    """fla's recurrent defaults (g omitted: no decay; beta omitted: 1); a loss on o alone and on the state alone."""
    inputs = {n: t for n, t in make_inputs(2, 6, 1, 1, 16, 16).items() if n not in ("g", "beta")}
    ref_inputs = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    o, state = fused_recurrent_gated_delta_rule(**inputs, output_final_state=True)
    o_ref, state_ref = fused_recurrent_gated_delta_rule_ref(**ref_inputs, output_final_state=True)
    for ours, ref in [(o, o_ref), (state, state_ref)]:
        grads = torch.autograd.grad(ours.square().sum(), list(inputs.values()), retain_graph=True)
        grads_ref = torch.autograd.grad(ref.square().sum(), list(ref_inputs.values()), retain_graph=True,
                                        allow_unused=True)  # fmt: skip
        for n, grad, grad_ref in zip(inputs, grads, grads_ref):
            if grad_ref is None:  # q does not reach the final state
                assert not grad.any(), n
            else:
                assert rel_err(grad, grad_ref) <= FP32_REL_TOL, n


def test_agrees_with_fla_torch_reference():
    """fla's own token loop (naive.py: fp32, beta before g, no grouped heads) against both kernels, called as fla's
    test_gdn.py calls them (q/k normalised in the kernel)."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule as fla_naive

    inputs = {n: t.detach() for n, t in make_inputs(2, 70, 2, 2, 32, 32).items()}
    q, k = F.normalize(inputs["q"], dim=-1), F.normalize(inputs["k"], dim=-1)
    o_fla, state_fla = fla_naive(q, k, inputs["v"], inputs["beta"], inputs["g"], scale=0.5,
                                 initial_state=inputs["initial_state"], output_final_state=True)  # fmt: skip
    for fn in (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule):
        o, state = fn(**inputs, scale=0.5, output_final_state=True, use_qk_l2norm_in_kernel=True)
        # F.normalize (fla's test) clamps the norm and our kernels add 1e-6 under the root: 1e-6 apart at unit norm.
        assert rel_err(o, o_fla) <= 1e-5 and rel_err(state, state_fla) <= 1e-5, fn.__name__


def test_positional_parameters_are_fla_s():
    """A caller passing arguments by position gets fla's meaning (fla 0.6 installed: its signatures)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

    def positional(fn):
        return [p.name for p in inspect.signature(inspect.unwrap(fn)).parameters.values()
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]  # fmt: skip

    assert positional(chunk_gated_delta_rule) == positional(fla_chunk)
    assert positional(fused_recurrent_gated_delta_rule) == positional(fla_recurrent)


def test_unsupported_fla_arguments_are_refused_by_name():
    inputs = {n: t.detach() for n, t in make_inputs(1, 8, 1, 1, 16, 16).items()}
    with pytest.raises(ValueError, match="chunk_size=32 is not supported"):
        chunk_gated_delta_rule(**inputs, chunk_size=32)
    with pytest.raises(ValueError, match="cp_context"):
        chunk_gated_delta_rule(**inputs, cp_context=object())
    for name in ("gk", "gv"):
        with pytest.raises(ValueError, match=f"{name}=... is not supported"):
            fused_recurrent_gated_delta_rule(**inputs, **{name: inputs["g"]})
    with pytest.raises(ValueError, match="A_log"):
        chunk_gated_delta_rule(**inputs, use_gate_in_kernel=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fla_conventions_agree_with_fla_and_the_recurrent_backward_with_float64(dtype):
    """On a GPU: fla's flags on our chunked kernel against fla's own kernel given the same flags (fla's fp32 dots are
    tf32: 1e-3), and training through our recurrent kernel against the float64 loop."""
    import os

    os.environ.setdefault("FLA_FLASH_QLA", "0")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    cu_seqlens = torch.tensor([0, 100, 1100, 2048], dtype=torch.long, device=DEVICE)
    inputs = fla_raw_inputs(T=2048, H=2, HV=4, K=128, V=128, N=3, dtype=dtype)
    flags = dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_qk_l2norm_in_kernel=True,
                 cu_seqlens=cu_seqlens)  # fmt: skip
    tol = BF16_REL_TOL if dtype == torch.bfloat16 else 1e-3
    assert_same(run(chunk_gated_delta_rule, inputs, **flags), run(fla_chunk, inputs, **flags), tol=tol)

    short = fla_raw_inputs(T=24, H=2, HV=4, K=128, V=128, N=4, dtype=dtype)
    flags["cu_seqlens"] = torch.tensor([0, 5, 5, 21, 24], dtype=torch.long, device=DEVICE)
    assert_same(run(fused_recurrent_gated_delta_rule, short, **flags),
                run(fused_recurrent_gated_delta_rule_ref, short, dtype=torch.float64, **flags),
                tol=BF16_REL_TOL if dtype == torch.bfloat16 else FP32_REL_TOL)  # fmt: skip
