# Cites: Gated DeltaNet (arXiv 2412.06464); DeltaNet's chunked WY/UT form (arXiv 2406.06484).
"""Plain PyTorch gated delta rule: the test oracle and the CPU path of the model.

Recurrence, per value head (S is K x V, state in at least fp32):
    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T
    o_t = scale * S_t^T q_t

Layout and semantics follow fla 0.6: q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of H (value head j reads
q/k head j // (HV // H)); g, beta [B, T, HV]; states [N, HV, K, V]. Everything is differentiable by autograd.

Raw gates: fla's `use_gate_in_kernel=True` (g raw, with A_log, dt_bias) / `use_beta_sigmoid_in_kernel=True` (beta
raw), or ours `a, A_log, dt_bias` instead of g, giving g = -exp(A_log) * softplus(a + dt_bias), and `b` instead of
beta, giving beta = sigmoid(b).
"""

from __future__ import annotations

import torch

from .inputs import (
    check_gated_delta_inputs,
    gate_from_raw,
    kv_state,
    l2_normalize,
    reject_unsupported_fla_arguments,
    resolve_fla_conventions,
    sequence_bounds,
)

CHUNK_SIZE = 64

# A segment function runs the rule over one stretch of tokens without document breaks:
# (q, k, v [B, T, HV, *] with q scaled and heads expanded, g, beta [B, T, HV], state [B, HV, K, V]) -> (o, state).
_Segment = tuple[torch.Tensor, torch.Tensor]


def _prepared_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel, a, A_log, dt_bias, b):
    """Check arguments, compute the fused gate / beta / L2 norm, expand q and k to the value heads, cast up."""
    dims = check_gated_delta_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, a, A_log, dt_bias, b)
    dtype = torch.promote_types(torch.result_type(q, v), torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = gate_from_raw(a, A_log, dt_bias, dtype) if g is None else g.to(dtype)
    beta = torch.sigmoid(b.to(dtype)) if beta is None else beta.to(dtype)
    if use_qk_l2norm_in_kernel:
        q, k = l2_normalize(q), l2_normalize(k)
    group = dims.value_heads_per_qk_head
    if group > 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    q = q * dims.scale
    if initial_state is None:
        state = q.new_zeros(dims.num_states, dims.num_v_heads, dims.head_k_dim, dims.head_v_dim)
    else:
        state = initial_state.to(dtype)
    return dims, q, k, v, g, beta, state


def _run_per_document(segment_fn, q, k, v, g, beta, state, cu_seqlens, seq_len):
    """Apply `segment_fn` to the whole batch, or document by document (state reset per document) with cu_seqlens."""
    if cu_seqlens is None:
        return segment_fn(q, k, v, g, beta, state)
    outputs, finals = [], []
    for n, (start, end) in enumerate(sequence_bounds(cu_seqlens, seq_len)):
        window = slice(start, end)
        o_n, state_n = segment_fn(
            q[:, window], k[:, window], v[:, window], g[:, window], beta[:, window], state[n : n + 1]
        )
        outputs.append(o_n)
        finals.append(state_n)
    return torch.cat(outputs, dim=1), torch.cat(finals, dim=0)


def _recurrent_segment(q, k, v, g, beta, state) -> _Segment:
    """Token by token recurrence, vectorised over batch and heads."""
    outputs = []
    for t in range(q.shape[1]):
        state = state * torch.exp(g[:, t])[..., None, None]
        residual = v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * residual)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    if not outputs:
        return v.new_zeros(v.shape), state
    return torch.stack(outputs, dim=1), state


def _split_chunks(x: torch.Tensor, num_chunks: int, chunk_size: int) -> torch.Tensor:
    """[B, T, HV, *rest] -> [num_chunks, B, HV, chunk_size, *rest], zero padded at the end of T.

    Chunk-major and contiguous, so the per-chunk loop reads contiguous blocks and `unbind(0)` has a cheap backward.
    """
    pad = num_chunks * chunk_size - x.shape[1]
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    x = x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:]).movedim(3, 2)  # [B, NC, HV, C, *rest]
    return x.movedim(1, 0).contiguous()


def _chunk_segment(q, k, v, g, beta, state, chunk_size: int = CHUNK_SIZE) -> _Segment:
    """Chunked WY/UT form: all intra-chunk work batched over chunks, then a sequential pass over chunk states.

    Within a chunk starting from state S0, with G_i = g_1 + ... + g_i (log space) and decay_ij = exp(G_i - G_j):
        u_i = beta_i v_i - beta_i exp(G_i) k_i^T S0 - sum_{j<i} beta_i decay_ij (k_i . k_j) u_j
    i.e. (I + A) u = beta v - (beta exp(G) k) S0 with A strictly lower triangular, so u = u_pre - W S0, and
        o_i = exp(G_i) q_i^T S0 + sum_{j<=i} decay_ij (q_i . k_j) u_j
        S_end = exp(G_last) S0 + sum_j exp(G_last - G_j) k_j u_j^T.
    Padded tokens (k = 0, beta = 0, g = 0) leave the state untouched. Every exponent is <= 0: the decay matrix is
    built from differences with the upper triangle masked to -inf before exp.
    """
    seq_len, head_v_dim = v.shape[1], v.shape[3]
    num_chunks = -(-seq_len // chunk_size)
    if num_chunks == 0:
        return v.new_zeros(v.shape), state
    q, k, v = (_split_chunks(x, num_chunks, chunk_size) for x in (q, k, v))  # [NC, B, HV, C, D]
    g, beta = (_split_chunks(x, num_chunks, chunk_size) for x in (g, beta))  # [NC, B, HV, C]

    # Log decays restart at every chunk. The prefix sums and their differences are taken in fp64: after one strongly
    # decaying token the later decays of the chunk are differences of two large sums, which fp32 cannot resolve.
    log_decay = g.to(torch.float64).cumsum(-1)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    pair_log_decay = (log_decay[..., :, None] - log_decay[..., None, :]).to(q.dtype)
    pair_decay = torch.exp(pair_log_decay.masked_fill(~causal, float("-inf")))  # [NC, B, HV, C, C], 0 above diagonal
    decay_from_start = torch.exp(log_decay.to(q.dtype))[..., None]  # exp(G_i)
    decay_to_end = torch.exp((log_decay[..., -1:] - log_decay).to(q.dtype))[..., None]  # exp(G_last - G_j)
    chunk_decay = torch.exp(log_decay[..., -1].to(q.dtype))[..., None, None]  # exp(G_last), [NC, B, HV, 1, 1]

    beta_col = beta[..., None]
    interaction = (beta_col * (k @ k.transpose(-1, -2)) * pair_decay).tril(-1)
    unit_lower = interaction + torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta_col * v, beta_col * decay_from_start * k], dim=-1)
    solved = torch.linalg.solve_triangular(unit_lower, rhs, upper=False, unitriangular=True)
    u_pre, w = solved[..., :head_v_dim], solved[..., head_v_dim:]

    attention = (q @ k.transpose(-1, -2)) * pair_decay
    q_from_start = q * decay_from_start
    k_to_end = (k * decay_to_end).transpose(-1, -2)

    outputs = []
    per_chunk = zip(*(x.unbind(0) for x in (u_pre, w, q_from_start, attention, k_to_end, chunk_decay)))
    for u_pre_c, w_c, q_from_start_c, attention_c, k_to_end_c, chunk_decay_c in per_chunk:
        u = u_pre_c - w_c @ state
        outputs.append(q_from_start_c @ state + attention_c @ u)
        state = chunk_decay_c * state + k_to_end_c @ u
    o = torch.cat(outputs, dim=2)[:, :, :seq_len]  # [B, HV, T, V]
    return o.movedim(1, 2), state


def _gated_delta_rule(segment_fn, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                      use_qk_l2norm_in_kernel, a, A_log, dt_bias, b, state_v_first=False, output_dtype=None,
                      **fla_flags):
    g, beta, a, b = resolve_fla_conventions(g, beta, a, A_log, dt_bias, b, **fla_flags)
    dims, qc, kc, vc, gc, betac, state = _prepared_inputs(
        q, k, v, g, beta, scale, kv_state(initial_state, state_v_first), cu_seqlens, use_qk_l2norm_in_kernel, a,
        A_log, dt_bias, b,
    )
    o, final_state = _run_per_document(segment_fn, qc, kc, vc, gc, betac, state, cu_seqlens, dims.seq_len)
    return o.to(output_dtype or q.dtype), (kv_state(final_state, state_v_first) if output_final_state else None)


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule: the oracle every other implementation is tested against.

    Arguments as fla 0.6's `chunk_gated_delta_rule` (see kernels/gated_delta/chunk.py). Computes in the inputs'
    dtype promoted to at least fp32 (tests pass float64). Returns (o in q's dtype, final_state [N, HV, K, V] in
    the compute dtype, or None unless output_final_state).
    """
    return _gated_delta_rule(_recurrent_segment, q, k, v, g, beta, scale, initial_state, output_final_state,
                             cu_seqlens, use_qk_l2norm_in_kernel, a, A_log, dt_bias, b, state_v_first,
                             use_gate_in_kernel=use_gate_in_kernel, allow_neg_eigval=allow_neg_eigval,
                             use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel)  # fmt: skip


def chunk_gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (64 tokens) gated delta rule in plain PyTorch: the model's CPU path. Same contract as the naive one."""
    return _gated_delta_rule(_chunk_segment, q, k, v, g, beta, scale, initial_state, output_final_state,
                             cu_seqlens, use_qk_l2norm_in_kernel, a, A_log, dt_bias, b, state_v_first,
                             use_gate_in_kernel=use_gate_in_kernel, allow_neg_eigval=allow_neg_eigval,
                             use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel)  # fmt: skip


def fused_recurrent_gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding feeds one or a few tokens against a state: the token loop is already the right algorithm there.
    Arguments and results as fla 0.6's `fused_recurrent_gated_delta_rule` (o in v's dtype; g, beta optional)."""
    reject_unsupported_fla_arguments(gk=gk, gv=gv)
    if g is None and a is None:
        g = v.new_zeros(v.shape[:3], dtype=torch.float32)
    if beta is None and b is None:
        beta = v.new_ones(v.shape[:3], dtype=torch.float32)
    return _gated_delta_rule(_recurrent_segment, q, k, v, g, beta, scale, initial_state, output_final_state,
                             cu_seqlens, use_qk_l2norm_in_kernel, a, A_log, dt_bias, b, state_v_first, v.dtype,
                             use_gate_in_kernel=use_gate_in_kernel, allow_neg_eigval=allow_neg_eigval,
                             use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel)  # fmt: skip
