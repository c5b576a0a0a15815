"""Triton gated delta rule kernels against the float64 token-loop reference.

CPU: runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), fp32, small shapes.
GPU (`-m gpu`): bf16 and fp32 against the float64 reference and against fla's Triton kernel, T up to 8192.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.gated_delta_inputs import BF16_REL_TOL, DEVICE, FP16_REL_TOL, FP32_REL_TOL, make_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

from hybridlm.kernels.gated_delta import (  # noqa: E402
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)
from hybridlm.kernels.gated_delta.chunk import token_rows  # noqa: E402
from hybridlm.kernels.tolerances import rel_err  # noqa: E402

def with_model_init_gates(inputs, seed=0):
    """The model's own initial decay range at its widest: A = exp(A_log) = 16, a ~ N(0, 3), so g spans [-126, 0]
    and one token can wipe out the state while the next barely decays."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        inputs["A_log"].fill_(math.log(16.0))
        inputs["a"].copy_(3.0 * torch.randn(inputs["a"].shape, generator=gen))
        inputs["dt_bias"].zero_()
    return inputs


def with_decay_spikes(inputs):
    """Benign decays with a few very strong ones in the middle of chunks: the later decays of such a chunk are
    differences of large prefix sums."""
    g = inputs["g"]
    T, HV = g.shape[1], g.shape[2]
    with torch.no_grad():
        for t, h, value in [(3, 0, -1e3), (70, 0, -1e4), (10, HV - 1, -300.0), (T - 20, HV - 1, -5e3)]:
            g[0, t % T, h] = value
    return inputs


def outputs_and_grads(fn, inputs, dtype=None, **kwargs):
    """(o, final state, {input: grad}) for a fixed random projection of o and the final state, optionally in `dtype`."""
    cast = {n: t.detach().to(dtype or t.dtype).requires_grad_() for n, t in inputs.items()}
    o, final_state = fn(**cast, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(99)
    do = torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
    d_state = torch.randn(final_state.shape, generator=gen).to(final_state.device, final_state.dtype)
    grads = torch.autograd.grad((o * do).sum() + (final_state * d_state).sum(), list(cast.values()))
    return o.detach(), final_state.detach(), dict(zip(cast, grads))


def assert_matches_reference(inputs, tol=FP32_REL_TOL, reference=naive_recurrent_gated_delta_rule, **kwargs):
    ours = outputs_and_grads(chunk_gated_delta_rule, inputs, **kwargs)
    ref = outputs_and_grads(reference, inputs, dtype=torch.float64, **kwargs)
    assert ours[0].dtype == inputs["q"].dtype and ours[1].dtype == torch.float32
    for what, actual, expected in [("output", ours[0], ref[0]), ("final state", ours[1], ref[1])] + [
        (f"grad of {n}", ours[2][n], ref[2][n]) for n in ref[2]
    ]:
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"
        err = rel_err(actual, expected)
        assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize(
    "B, T, H, HV, K, V",
    [
        (2, 100, 1, 2, 32, 32),  # batch, grouped value heads, T not a multiple of 64
        (1, 150, 2, 4, 32, 64),  # two q/k heads (group sums), K != V, three chunks
        (1, 64, 1, 1, 128, 128),  # large head dims, one full chunk
        (1, 70, 1, 2, 64, 64),  # K = V = 64
        (1, 64, 1, 1, 256, 256),  # K = V = 256: the state kernels hold 256 rows, the others loop over 4 K blocks
    ],
)
def test_chunk_matches_float64_reference(B, T, H, HV, K, V):
    assert_matches_reference(make_inputs(B, T, H, HV, K, V))


def test_model_init_gates_match_reference():
    """fp32 target 1e-5 on the output and every gradient (dA_log, d_dt_bias, da included) with the decays the model
    starts from; chunk-local log decays in fp32 missed it by 40x for dA_log."""
    inputs = with_model_init_gates(make_inputs(1, 128, 1, 2, 32, 32, raw_gates=True, seed=3))
    assert_matches_reference(inputs, use_qk_l2norm_in_kernel=True)


def test_decay_spikes_inside_chunks_match_reference():
    assert_matches_reference(with_decay_spikes(make_inputs(1, 128, 1, 2, 32, 32, seed=4)))


def test_raw_gate_without_dt_bias_matches_reference():
    assert_matches_reference(make_inputs(1, 70, 1, 2, 32, 32, raw_gates=True, dt_bias=False))


def test_fp16_inputs_match_reference():
    """fp16 q, k, v: fp16 dots, fp32 state and accumulation (measured 4.5e-4 on the CPU interpreter)."""
    inputs = make_inputs(1, 70, 1, 2, 32, 32, dtype=torch.float16)
    assert_matches_reference(inputs, tol=FP16_REL_TOL)


def test_fused_gate_beta_and_l2norm_match_reference():
    inputs = make_inputs(1, 80, 2, 4, 32, 32, raw_gates=True)
    with torch.no_grad():
        inputs["k"].mul_(2.5)  # un-normalised keys: the kernel's L2 norm must handle them
    assert_matches_reference(inputs, use_qk_l2norm_in_kernel=True, scale=0.4)


def test_varlen_matches_reference_and_separate_calls():
    cu_seqlens = torch.tensor([0, 30, 30, 130, 150], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, 150, 1, 2, 32, 32, N=4)
    assert_matches_reference(inputs, cu_seqlens=cu_seqlens)

    tensors = {n: t.detach() for n, t in inputs.items()}
    o, final_state = chunk_gated_delta_rule(**tensors, cu_seqlens=cu_seqlens, output_final_state=True)
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        per_doc = {name: t[:, start:end] for name, t in tensors.items() if name != "initial_state"}
        o_n, state_n = chunk_gated_delta_rule(
            **per_doc, initial_state=tensors["initial_state"][n : n + 1], output_final_state=True
        )
        if end > start:
            assert rel_err(o[:, start:end], o_n) <= 1e-6, f"document {n} output"
        assert rel_err(final_state[n : n + 1], state_n) <= 1e-6, f"document {n} final state"


def test_strided_qkv_views_need_no_copy_and_give_the_same_result():
    """q, k, v as the layer makes them: head-contiguous views of one [B, T, 2 K H + V HV] projection."""
    inputs = make_inputs(2, 70, 1, 2, 32, 16)
    B, T, H, K = inputs["q"].shape
    HV, V = inputs["v"].shape[2:]
    with torch.no_grad():
        packed = torch.cat([inputs[n].flatten(2) for n in ("q", "k", "v")], dim=-1)
    packed.requires_grad_()
    q, k, v = packed.split((H * K, H * K, HV * V), dim=-1)
    views = dict(inputs, q=q.view(B, T, H, K), k=k.view(B, T, H, K), v=v.view(B, T, HV, V))
    assert not views["q"].is_contiguous()
    assert all(token_rows(views[n])[0] is views[n] for n in ("q", "k", "v"))
    strided = outputs_and_grads(chunk_gated_delta_rule, views)
    contiguous = outputs_and_grads(chunk_gated_delta_rule, inputs)
    assert torch.equal(strided[0], contiguous[0]) and torch.equal(strided[1], contiguous[1])
    for name in contiguous[2]:
        assert torch.equal(strided[2][name], contiguous[2][name]), f"grad of {name}"


@pytest.mark.parametrize(
    "g_value, beta_value",
    [(0.0, 1.0), (0.0, 0.0), (-1e4, 1.0), (-1e4, 0.0), (-1e-7, 0.5)],
    ids=["no-decay-full-write", "no-decay-no-write", "huge-decay-full-write", "huge-decay-no-write", "tiny-decay"],
)
def test_extreme_gates_stay_finite_and_correct(g_value, beta_value):
    inputs = make_inputs(1, 70, 1, 1, 32, 32)
    with torch.no_grad():
        inputs["g"].fill_(g_value)
        inputs["beta"].fill_(beta_value)
    assert_matches_reference(inputs)


def test_without_state_returns_none_and_no_state_grad():
    inputs = {n: t.detach() for n, t in make_inputs(1, 40, 1, 1, 32, 32, with_state=False).items()}
    o, final_state = chunk_gated_delta_rule(**inputs)
    assert final_state is None
    o_ref, _ = naive_recurrent_gated_delta_rule(**{n: t.double() for n, t in inputs.items()})
    assert rel_err(o, o_ref) <= FP32_REL_TOL


def test_recurrent_decode_continues_chunked_prefill():
    """Prefill with the chunked kernel, then decode token by token with the recurrent kernel (varlen, fused gates)."""
    cu_seqlens = torch.tensor([0, 70, 135], dtype=torch.int32, device=DEVICE)
    prompt_lens, decode_steps = [67, 62], 3
    inputs = {n: t.detach() for n, t in make_inputs(1, 135, 1, 2, 32, 32, N=2, raw_gates=True).items()}
    kwargs = dict(use_qk_l2norm_in_kernel=True)
    o_full, state_full = chunk_gated_delta_rule(**inputs, cu_seqlens=cu_seqlens, output_final_state=True, **kwargs)

    per_token = {n: t for n, t in inputs.items() if n not in ("initial_state", "A_log", "dt_bias")}
    shared = {"A_log": inputs["A_log"], "dt_bias": inputs["dt_bias"]}

    def take(positions):
        return {n: t[:, positions] for n, t in per_token.items()}

    starts = cu_seqlens[:-1].tolist()
    prompt = [p for s, n in zip(starts, prompt_lens) for p in range(s, s + n)]
    prompt_cu = torch.tensor([0, prompt_lens[0], sum(prompt_lens)], dtype=torch.int32, device=DEVICE)
    _, state = chunk_gated_delta_rule(**take(prompt), **shared, initial_state=inputs["initial_state"],
                                      cu_seqlens=prompt_cu, output_final_state=True, **kwargs)
    step_cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    for step in range(decode_steps):
        positions = [s + n + step for s, n in zip(starts, prompt_lens)]
        o_step, state = fused_recurrent_gated_delta_rule(
            **take(positions), **shared, initial_state=state, cu_seqlens=step_cu, output_final_state=True, **kwargs
        )
        assert rel_err(o_step, o_full[:, positions]) <= FP32_REL_TOL, f"decode step {step}"
    assert rel_err(state, state_full) <= FP32_REL_TOL


def test_recurrent_matches_reference_with_batch():
    inputs = {n: t.detach() for n, t in make_inputs(2, 9, 2, 4, 32, 16, raw_gates=True).items()}
    o, state = fused_recurrent_gated_delta_rule(**inputs, output_final_state=True)
    o_ref, state_ref = naive_recurrent_gated_delta_rule(**{n: t.double() for n, t in inputs.items()},
                                                        output_final_state=True)
    assert rel_err(o, o_ref) <= FP32_REL_TOL and rel_err(state, state_ref) <= FP32_REL_TOL


def test_triton_path_rejects_what_it_cannot_run():
    inputs = make_inputs(1, 8, 1, 1, 32, 32)
    detached = {n: t.detach() for n, t in inputs.items()}
    with pytest.raises(ValueError, match="float64"):
        chunk_gated_delta_rule(**{**detached, "q": detached["q"].double()})
    with pytest.raises(ValueError, match="not both"):
        chunk_gated_delta_rule(**detached, a=detached["g"], A_log=torch.zeros(1, device=DEVICE))


# --- GPU --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
# fp16 carries 3 more mantissa bits than bf16: the bf16 bound holds for it with room.
@pytest.mark.parametrize("dtype, tol", [(torch.float32, FP32_REL_TOL), (torch.bfloat16, BF16_REL_TOL),
                                        (torch.float16, BF16_REL_TOL)])
@pytest.mark.parametrize("T, HV, K", [(1000, 4, 64), (2048, 4, 128), (8192, 2, 128)])
def test_gpu_matches_float64_reference(dtype, tol, T, HV, K):
    inputs = make_inputs(1, T, 2, HV, K, K, dtype=dtype, raw_gates=True)
    # The float64 chunked reference equals the token loop to 1e-10 (test_gated_delta_reference.py) and is faster.
    assert_matches_reference(inputs, tol=tol, reference=chunk_gated_delta_rule_ref, use_qk_l2norm_in_kernel=True)


@pytest.mark.gpu
def test_gpu_head_dim_256_and_varlen():
    cu_seqlens = torch.tensor([0, 100, 1100, 4096], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, 4096, 1, 2, 256, 256, N=3, dtype=torch.bfloat16)
    assert_matches_reference(inputs, tol=BF16_REL_TOL, reference=chunk_gated_delta_rule_ref, cu_seqlens=cu_seqlens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_agrees_with_fla(dtype):
    """Against fla 0.6's Triton kernel: both approximate the same float64 result; bound their difference."""
    os.environ.setdefault("FLA_FLASH_QLA", "0")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    inputs = make_inputs(2, 4096, 4, 8, 128, 128, dtype=dtype)
    ours = outputs_and_grads(chunk_gated_delta_rule, inputs, use_qk_l2norm_in_kernel=True)
    theirs = outputs_and_grads(fla_chunk, inputs, use_qk_l2norm_in_kernel=True)
    tol = BF16_REL_TOL if dtype == torch.bfloat16 else 1e-3  # fla uses tf32 dots for fp32 inputs
    assert rel_err(ours[0], theirs[0]) <= tol and rel_err(ours[1], theirs[1]) <= tol
    for n in theirs[2]:
        assert rel_err(ours[2][n], theirs[2][n]) <= tol, f"grad of {n}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, FP32_REL_TOL), (torch.bfloat16, BF16_REL_TOL)])
@pytest.mark.parametrize("K", [128, 256])
def test_gpu_decode_matches_float64_reference(dtype, tol, K):
    """The decode kernel: a few tokens per document against a state (varlen, raw gates, L2 norm), vs the float64 loop.
    bf16 bound: inputs and output rounded to bf16 (2^-8), state and arithmetic in fp32."""
    cu_seqlens = torch.tensor([0, 1, 4, 6], dtype=torch.int32, device=DEVICE)
    inputs = {n: t.detach() for n, t in make_inputs(1, 6, 2, 4, K, K, N=3, dtype=dtype, raw_gates=True).items()}
    kwargs = dict(cu_seqlens=cu_seqlens, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, state = fused_recurrent_gated_delta_rule(**inputs, **kwargs)
    o_ref, state_ref = naive_recurrent_gated_delta_rule(**{n: t.double() for n, t in inputs.items()}, **kwargs)
    assert rel_err(o, o_ref) <= tol and rel_err(state, state_ref) <= tol


def _fla_from_raw_gates(q, k, v, a, A_log, dt_bias, b, **kwargs):
    """fla's chunked kernel given g and beta the way its own layer computes them (g in fp32)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return fla_chunk(q, k, v, g, torch.sigmoid(b.float()).to(q.dtype), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_varlen_fused_gates_agree_with_fla(dtype):
    """Packed documents of lengths that are not multiples of 64, gates computed in our kernels from the raw a, A_log,
    dt_bias, b; fla gets g and beta precomputed. Bound as test_gpu_agrees_with_fla (fla's fp32 dots are tf32)."""
    os.environ.setdefault("FLA_FLASH_QLA", "0")
    lengths = [100, 1000, 37, 2959]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, sum(lengths), 2, 4, 128, 128, N=len(lengths), dtype=dtype, raw_gates=True)
    kwargs = dict(cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)
    ours = outputs_and_grads(chunk_gated_delta_rule, inputs, **kwargs)
    theirs = outputs_and_grads(_fla_from_raw_gates, inputs, **kwargs)
    tol = BF16_REL_TOL if dtype == torch.bfloat16 else 1e-3
    assert rel_err(ours[0], theirs[0]) <= tol and rel_err(ours[1], theirs[1]) <= tol
    for n in theirs[2]:
        assert rel_err(ours[2][n], theirs[2][n]) <= tol, f"grad of {n}"


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_state_offsets_past_2_to_the_31():
    """num_chunks * HV * K * V > 2^31 (266,240 tokens, HV=32, K=V=128): the last document's per-chunk states sit past
    2^31 elements. Its output and gradients must equal those of a call on that document alone (bf16 kernels, same
    configs, so to round-off of the fp32 accumulation order at most)."""
    T, tail = 266_240, 4096
    cu_seqlens = torch.tensor([0, T - tail, T], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, T, 1, 128, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    k = F.normalize(torch.randn(1, T, 1, 128, device=DEVICE, generator=gen), dim=-1).to(torch.bfloat16)
    v = torch.randn(1, T, 32, 128, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(1, T, 32, device=DEVICE, generator=gen) + 2.0)
    beta = torch.sigmoid(torch.randn(1, T, 32, device=DEVICE, generator=gen))
    do = torch.zeros_like(v)
    do[:, T - tail:] = torch.randn(1, tail, 32, 128, device=DEVICE, generator=gen, dtype=torch.bfloat16)

    def run(window, cu):
        leaves = [x[:, window].detach().requires_grad_() for x in (q, k, v, g, beta)]
        o, _ = chunk_gated_delta_rule(*leaves, cu_seqlens=cu)
        grads = torch.autograd.grad(o, leaves, do[:, window])
        return o[:, -tail:], [grad[:, -tail:] for grad in grads]

    o_packed, grads_packed = run(slice(None), cu_seqlens)
    o_alone, grads_alone = run(slice(T - tail, T), None)
    assert rel_err(o_packed, o_alone) <= 1e-6
    for name, packed, alone in zip("q k v g beta".split(), grads_packed, grads_alone):
        assert rel_err(packed, alone) <= 1e-6, f"grad of {name}"
