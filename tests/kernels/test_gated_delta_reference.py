"""The plain PyTorch gated delta rule references against each other and against closed forms, in float64.

The token loop (`naive_recurrent_gated_delta_rule`) is the oracle; it is itself checked against fla's independent
naive recurrence and against cases with a closed-form answer. The chunked reference must match it to float64 round-off.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm.kernels.gated_delta import (
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule_ref,
    naive_recurrent_gated_delta_rule,
)
from hybridlm.kernels.tolerances import rel_err

# float64 chunked vs token loop: only round-off differs, so the bound is tight.
FLOAT64_REL_TOL = 1e-10


def make_inputs(B, T, H, HV, K, V, *, N=None, dtype=torch.float64, seed=0, with_state=True):
    """Random leaf tensors in the regime the model runs in: unit-norm keys, decays in (-inf, 0), beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    inputs = {
        "q": randn(B, T, H, K),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, HV, V),
        "g": F.logsigmoid(randn(B, T, HV) + 2.0),
        "beta": torch.sigmoid(randn(B, T, HV)),
    }
    if with_state:
        inputs["initial_state"] = randn(N or B, HV, K, V) * 0.5
    return {name: t.requires_grad_() for name, t in inputs.items()}


def run_with_grads(fn, inputs, **kwargs):
    """Forward with a final state, then gradients of a random projection of both outputs w.r.t. every input."""
    for t in inputs.values():
        t.grad = None
    o, final_state = fn(**inputs, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (final_state * torch.randn(final_state.shape, generator=gen, dtype=final_state.dtype)).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return o.detach(), final_state.detach(), dict(zip(inputs, grads))


def assert_close(actual, expected, tol=FLOAT64_REL_TOL, what=""):
    err = rel_err(actual, expected)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def assert_same_results(result, expected, tol=FLOAT64_REL_TOL):
    (o, s, grads), (o_ref, s_ref, grads_ref) = result, expected
    assert_close(o, o_ref, tol, "output")
    assert_close(s, s_ref, tol, "final state")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], tol, f"grad of {name}")


@pytest.mark.parametrize(
    "B, T, H, HV, K, V, with_state",
    [
        (1, 64, 1, 1, 8, 8, False),  # exactly one chunk, zero initial state
        (2, 100, 2, 4, 16, 24, True),  # T not a multiple of 64, grouped value heads, K != V
        (1, 150, 1, 3, 32, 16, True),  # three chunks, partial last one
        (2, 7, 2, 2, 8, 8, True),  # shorter than a chunk
    ],
)
def test_chunk_matches_naive(B, T, H, HV, K, V, with_state):
    inputs = make_inputs(B, T, H, HV, K, V, with_state=with_state)
    assert_same_results(
        run_with_grads(chunk_gated_delta_rule_ref, inputs), run_with_grads(naive_recurrent_gated_delta_rule, inputs)
    )


def test_chunk_matches_naive_with_l2norm_and_custom_scale():
    inputs = make_inputs(1, 80, 2, 4, 16, 16)
    with torch.no_grad():
        inputs["k"].mul_(3.0)  # un-normalised keys: the in-kernel L2 norm must fix them
    kwargs = dict(use_qk_l2norm_in_kernel=True, scale=0.3)
    assert_same_results(
        run_with_grads(chunk_gated_delta_rule_ref, inputs, **kwargs),
        run_with_grads(naive_recurrent_gated_delta_rule, inputs, **kwargs),
    )


def test_l2norm_in_kernel_equals_normalising_first():
    inputs = make_inputs(1, 40, 1, 2, 8, 8)
    o, s = chunk_gated_delta_rule_ref(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    normalised = dict(inputs)
    for name in ("q", "k"):
        x = inputs[name]
        normalised[name] = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(**normalised, output_final_state=True)
    assert_close(o, o_ref, what="output")
    assert_close(s, s_ref, what="final state")


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule_ref, naive_recurrent_gated_delta_rule])
def test_varlen_equals_separate_calls(fn):
    lengths = [37, 0, 130, 64, 1]  # includes an empty document and one of exactly one chunk
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    inputs = make_inputs(1, sum(lengths), 2, 4, 16, 8, N=len(lengths))
    packed = run_with_grads(fn, inputs, cu_seqlens=cu_seqlens)

    def separately(**tensors):
        outputs, finals = [], []
        for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            per_doc = {name: t[:, start:end] for name, t in tensors.items() if name != "initial_state"}
            o, s = fn(**per_doc, initial_state=tensors["initial_state"][n : n + 1], output_final_state=True)
            outputs.append(o)
            finals.append(s)
        return torch.cat(outputs, dim=1), torch.cat(finals, dim=0)

    assert_same_results(packed, run_with_grads(lambda output_final_state, **t: separately(**t), inputs))
    # An empty document passes its initial state through unchanged.
    assert torch.equal(packed[1][1], inputs["initial_state"][1].detach())


def test_varlen_chunk_matches_naive():
    cu_seqlens = torch.tensor([0, 70, 75, 200], dtype=torch.int64)
    inputs = make_inputs(1, 200, 1, 2, 16, 16, N=3)
    assert_same_results(
        run_with_grads(chunk_gated_delta_rule_ref, inputs, cu_seqlens=cu_seqlens),
        run_with_grads(naive_recurrent_gated_delta_rule, inputs, cu_seqlens=cu_seqlens),
    )


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule_ref, naive_recurrent_gated_delta_rule])
@pytest.mark.parametrize("with_dt_bias", [True, False])
def test_fused_gate_and_beta_equal_precomputed(fn, with_dt_bias):
    B, T, H, HV, K, V = 1, 70, 1, 2, 8, 8
    inputs = make_inputs(B, T, H, HV, K, V)
    del inputs["g"], inputs["beta"]
    gen = torch.Generator().manual_seed(7)
    raw = {
        "a": torch.randn(B, T, HV, generator=gen, dtype=torch.float64),
        "A_log": torch.randn(HV, generator=gen, dtype=torch.float64),
        "b": torch.randn(B, T, HV, generator=gen, dtype=torch.float64),
    }
    if with_dt_bias:
        raw["dt_bias"] = torch.randn(HV, generator=gen, dtype=torch.float64)
    raw = {name: t.requires_grad_() for name, t in raw.items()}

    fused = run_with_grads(fn, {**inputs, **raw})

    def precomputed(a, A_log, b, dt_bias=None, **rest):
        g = -A_log.exp() * F.softplus(a + (dt_bias if dt_bias is not None else 0.0))
        return fn(**rest, g=g, beta=torch.sigmoid(b))

    assert_same_results(fused, run_with_grads(precomputed, {**inputs, **raw}))


def test_naive_matches_fla_naive_recurrence():
    """fla's own token loop (fp32 inside, argument order beta, g) is an independent check of our oracle's semantics."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule as fla_naive

    inputs = {name: t.detach() for name, t in make_inputs(2, 50, 3, 3, 16, 8).items()}
    o, s = naive_recurrent_gated_delta_rule(**inputs, output_final_state=True, scale=0.2)
    o_fla, s_fla = fla_naive(
        inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["g"],
        scale=0.2, initial_state=inputs["initial_state"], output_final_state=True,
    )
    # fla computes in fp32: agreement to fp32 round-off.
    assert_close(o, o_fla, 1e-5, "output vs fla")
    assert_close(s, s_fla, 1e-5, "final state vs fla")


def test_grouped_value_heads_read_their_qk_head():
    """Value head j uses q/k head j // (HV // H): same as repeating q and k per group with HV == H."""
    inputs = {name: t.detach() for name, t in make_inputs(1, 30, 2, 6, 8, 8).items()}
    o, s = chunk_gated_delta_rule_ref(**inputs, output_final_state=True)
    expanded = dict(inputs, q=inputs["q"].repeat_interleave(3, dim=2), k=inputs["k"].repeat_interleave(3, dim=2))
    o_ref, s_ref = naive_recurrent_gated_delta_rule(**expanded, output_final_state=True)
    assert_close(o, o_ref, what="output")
    assert_close(s, s_ref, what="final state")


# --- numerics edge cases -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_very_negative_decay_resets_state_every_token(dtype):
    """With g = -1e4 the old state is forgotten: S_t = beta_t k_t v_t^T, so o_t = scale * beta_t (q_t . k_t) v_t."""
    B, T, H, HV, K, V = 1, 100, 1, 2, 8, 8
    inputs = make_inputs(B, T, H, HV, K, V, dtype=dtype)
    with torch.no_grad():
        inputs["g"].fill_(-1e4)
    for fn in (chunk_gated_delta_rule_ref, naive_recurrent_gated_delta_rule):
        o, s, grads = run_with_grads(fn, inputs)
        q, k, v, beta = (inputs[n].detach() for n in ("q", "k", "v", "beta"))
        scale = K**-0.5
        expected_o = scale * beta[..., None] * (q * k).sum(-1, keepdim=True) * v
        expected_s = beta[0, -1, :, None, None] * k[0, -1, 0][None, :, None] * v[0, -1][:, None, :]
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert_close(o, expected_o, tol, f"{fn.__name__} output")
        assert_close(s, expected_s[None], tol, f"{fn.__name__} final state")
        assert all(torch.isfinite(gr).all() for gr in grads.values()), f"{fn.__name__}: non-finite gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_decay_and_full_update_stay_finite_and_agree(dtype):
    """g = 0 (decay exactly 1) with beta = 1 (full overwrite) for 200 tokens: no NaN/inf, chunked == token loop."""
    inputs = make_inputs(1, 200, 1, 2, 16, 16, dtype=dtype)
    with torch.no_grad():
        inputs["g"].zero_()
        inputs["beta"].fill_(1.0)
    chunked = run_with_grads(chunk_gated_delta_rule_ref, inputs)
    naive = run_with_grads(naive_recurrent_gated_delta_rule, inputs)
    assert_same_results(chunked, naive, 1e-10 if dtype == torch.float64 else 1e-4)


def _fp32_chunk_vs_float64_loop(inputs, tol=1e-5):
    """The fp32 chunked reference (the model's CPU path) against the float64 token loop: the issue's fp32 target."""
    fp32 = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}

    def chunked_fp32(**kwargs):  # results in float64, so both runs draw the same random projection
        return tuple(x.double() for x in chunk_gated_delta_rule_ref(**kwargs))

    result = run_with_grads(chunked_fp32, fp32, use_qk_l2norm_in_kernel=True)
    assert_same_results(result, run_with_grads(naive_recurrent_gated_delta_rule, inputs, use_qk_l2norm_in_kernel=True),
                        tol)


def test_fp32_chunked_with_model_init_gates_matches_float64():
    """A = exp(A_log) = 16 and a ~ N(0, 3) (the model's widest initial decays, g in [-126, 0]): with fp32 prefix sums
    of the log decay dA_log was off by 3e-4."""
    inputs = make_inputs(1, 160, 1, 2, 16, 16)
    del inputs["g"]
    gen = torch.Generator().manual_seed(5)
    inputs.update(a=(3.0 * torch.randn(1, 160, 2, generator=gen, dtype=torch.float64)).requires_grad_(),
                  A_log=torch.full((2,), math.log(16.0), dtype=torch.float64, requires_grad=True),
                  dt_bias=torch.zeros(2, dtype=torch.float64, requires_grad=True))
    _fp32_chunk_vs_float64_loop(inputs)


def test_fp32_chunked_with_decay_spikes_matches_float64():
    """Single tokens with g = -300 ... -1e4 inside chunks of ordinary decays."""
    inputs = make_inputs(1, 160, 1, 2, 16, 16)
    with torch.no_grad():
        for t, h, value in [(3, 0, -1e3), (70, 0, -1e4), (10, 1, -300.0), (140, 1, -5e3)]:
            inputs["g"][0, t, h] = value
    _fp32_chunk_vs_float64_loop(inputs)


def test_tiny_decays_match_naive():
    """g ~ -1e-7 (decay within round-off of 1): the log-space cumsum must not lose the difference."""
    inputs = make_inputs(1, 128, 1, 1, 8, 8)
    with torch.no_grad():
        inputs["g"].mul_(1e-7 / inputs["g"].abs().max())
    assert_same_results(
        run_with_grads(chunk_gated_delta_rule_ref, inputs), run_with_grads(naive_recurrent_gated_delta_rule, inputs)
    )


def test_zero_beta_only_decays_the_state():
    """beta = 0 writes nothing: S_t = exp(G_t) S_0 and o_t = scale * exp(G_t) S_0^T q_t."""
    inputs = {name: t.detach() for name, t in make_inputs(1, 90, 1, 2, 8, 8).items()}
    inputs["beta"] = torch.zeros_like(inputs["beta"])
    total_decay = inputs["g"].cumsum(1).exp()  # [1, T, HV]
    expected_o = 8**-0.5 * total_decay[..., None] * torch.einsum(
        "hkv,bthk->bthv", inputs["initial_state"][0], inputs["q"].expand(-1, -1, 2, -1)
    )
    expected_s = total_decay[0, -1, :, None, None] * inputs["initial_state"]
    for fn in (chunk_gated_delta_rule_ref, naive_recurrent_gated_delta_rule):
        o, s = fn(**inputs, output_final_state=True)
        assert_close(o, expected_o, what=f"{fn.__name__} output")
        assert_close(s, expected_s, what=f"{fn.__name__} final state")


# --- dtypes, decode, and argument checks -----------------------------------------------------------------------------


def test_low_precision_inputs_give_output_in_q_dtype_and_fp32_state():
    inputs = {name: t.detach().to(torch.bfloat16) for name, t in make_inputs(1, 70, 1, 2, 16, 16).items()}
    reference = {name: t.double() for name, t in inputs.items()}
    o, s = chunk_gated_delta_rule_ref(**inputs, output_final_state=True)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(**reference, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_close(o, o_ref, 1e-2, "bf16 output")  # computed in fp32, rounded to bf16 at the end
    assert_close(s, s_ref, 1e-5, "fp32 state")


def test_decode_continues_a_chunked_prefill():
    """Prefill T tokens with the chunked reference, then decode the next tokens one by one against the state."""
    inputs = {name: t.detach() for name, t in make_inputs(2, 67, 1, 2, 8, 8).items()}
    o_full, s_full = naive_recurrent_gated_delta_rule(**inputs, output_final_state=True)
    prefill = 64
    head = {n: t[:, :prefill] for n, t in inputs.items() if n != "initial_state"}
    _, state = chunk_gated_delta_rule_ref(**head, initial_state=inputs["initial_state"], output_final_state=True)
    for t in range(prefill, 67):
        step = {n: x[:, t : t + 1] for n, x in inputs.items() if n != "initial_state"}
        o_t, state = fused_recurrent_gated_delta_rule_ref(**step, initial_state=state, output_final_state=True)
        assert_close(o_t, o_full[:, t : t + 1], what=f"decoded token {t}")
    assert_close(state, s_full, what="state after decoding")


def test_final_state_is_none_unless_requested():
    inputs = {name: t.detach() for name, t in make_inputs(1, 10, 1, 1, 4, 4).items()}
    assert chunk_gated_delta_rule_ref(**inputs)[1] is None
    assert naive_recurrent_gated_delta_rule(**inputs)[1] is None


def _bad_call(**overrides):
    inputs = {name: t.detach() for name, t in make_inputs(1, 10, 2, 4, 8, 8).items()}
    inputs.update(overrides)
    inputs = {name: t for name, t in inputs.items() if t is not None}
    chunk_gated_delta_rule_ref(**inputs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(a=torch.zeros(1, 10, 4), A_log=torch.zeros(4)), "not both"),
        (dict(g=None), "no decay given"),
        (dict(g=None, a=torch.zeros(1, 10, 4)), "no decay given"),
        (dict(beta=None), "exactly one of beta"),
        (dict(b=torch.zeros(1, 10, 4)), "exactly one of beta"),
        (dict(v=torch.zeros(1, 10, 3, 8), g=torch.zeros(1, 10, 3), beta=torch.zeros(1, 10, 3),
              initial_state=None), "multiple of H"),
        (dict(k=torch.zeros(1, 10, 2, 4)), "k has shape"),
        (dict(g=torch.zeros(1, 10, 2)), "g has shape"),
        (dict(initial_state=torch.zeros(2, 4, 8, 8)), "initial_state has shape"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9])), "rise from 0 to T=10"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 10])), "rise from 0 to T=10"),
        (dict(cu_seqlens=torch.tensor([0.0, 10.0])), "int32 or torch.int64"),
        (dict(q=torch.zeros(1, 10, 2, 8, dtype=torch.int64)), "floating point"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(**overrides)


def test_varlen_needs_batch_of_one():
    inputs = {name: t.detach() for name, t in make_inputs(2, 10, 1, 1, 4, 4).items()}
    with pytest.raises(ValueError, match="needs B == 1"):
        chunk_gated_delta_rule_ref(**inputs, cu_seqlens=torch.tensor([0, 10]))
