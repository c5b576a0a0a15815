"""Backward kernels of the chunked gated delta rule, by recomputation (the forward's prepare and state passes are
rerun; only inputs are saved). Per chunk with start state S, end-state gradient dS' and P = (q k^T) * decay:
    dv_new = P^T do + (exp(G_last - G) k) dS'                       (state_backward_kernel, sequential, reverse)
    dS     = exp(G_last) dS' + (exp(G) q)^T do - w^T dv_new
then, in parallel over chunks (chunk_grads_kernel): dq, dk, dv, dg and dbeta through the output, the state update and
the WY representation (dAinv = dw X^T + du Y^T, dA = -Ainv^T dAinv Ainv^T), with dg the reverse cumsum of dG.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    autotune,
    chunk_rows,
    config_grid,
    decay_matrix,
    load_heads,
    load_log_decay,
    load_token_scalars,
    softplus,
)


@autotune(configs=config_grid({"BV": (32, 64)}), key=["H", "HV", "K", "V"])
@triton.jit(do_not_specialize=["H", "HV"])
def state_backward_kernel(
    q, k, w, G, do, d_final_state,
    cu_seqlens, chunk_offsets,
    d_chunk_states, dv_new_out, d_initial_state, scale,
    H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_D_FINAL_STATE: tl.constexpr, STORE_D_INITIAL_STATE: tl.constexpr, L2NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    dot_dtype = w.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    state_offsets = o_k[:, None] * V + o_v[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_D_FINAL_STATE:
        dS += tl.load(d_final_state + i_nh * K * V + state_offsets, mask=m_kv, other=0.0).to(tl.float32)

    for i_back in range(0, num_chunks):
        i_t = num_chunks - 1 - i_back
        i_c = first_chunk + i_t
        rows = bos + i_t * BT + o_t
        row_mask = rows < eos
        tl.store(d_chunk_states + (i_c * HV + i_hv) * K * V + state_offsets,
                 dS.to(d_chunk_states.dtype.element_ty), mask=m_kv)

        b_q = load_heads(q, rows, row_mask, i_h, H, K, BK, L2NORM) * scale
        b_k = load_heads(k, rows, row_mask, i_h, H, K, BK, L2NORM)
        b_w = load_heads(w, rows, row_mask, i_hv, HV, K, BK, False)
        b_G, G_last = load_log_decay(G, rows, row_mask, tl.minimum(bos + i_t * BT + BT, eos) - 1, i_hv, HV)
        vo_offsets = (rows[:, None] * HV + i_hv) * V + o_v[None, :]
        m_tv = row_mask[:, None] & (o_v[None, :] < V)
        b_do = tl.load(do + vo_offsets, mask=m_tv, other=0.0)

        attention = tl.dot(b_q.to(dot_dtype), tl.trans(b_k).to(dot_dtype), input_precision=DOT_PRECISION)
        attention = attention * decay_matrix(b_G, False, BT)
        k_to_end = b_k * tl.where(row_mask, tl.exp(G_last - b_G), 0.0)[:, None]
        b_dv_new = tl.dot(tl.trans(attention).to(dot_dtype), b_do.to(dot_dtype), input_precision=DOT_PRECISION)
        b_dv_new += tl.dot(k_to_end.to(dot_dtype), dS.to(dot_dtype), input_precision=DOT_PRECISION)
        tl.store(dv_new_out + vo_offsets, b_dv_new.to(dv_new_out.dtype.element_ty), mask=m_tv)

        q_from_start = b_q * tl.exp(b_G)[:, None]
        dS = dS * tl.exp(G_last)
        dS += tl.dot(tl.trans(q_from_start).to(dot_dtype), b_do.to(dot_dtype), input_precision=DOT_PRECISION)
        dS -= tl.dot(tl.trans(b_w).to(dot_dtype), b_dv_new.to(dot_dtype), input_precision=DOT_PRECISION)

    if STORE_D_INITIAL_STATE:
        tl.store(d_initial_state + i_nh * K * V + state_offsets, dS, mask=m_kv)


@autotune(configs=config_grid({"BV": (32, 64)}), key=["H", "HV", "K", "V", "GATE_FROM_RAW", "BETA_FROM_RAW"])
@triton.jit(do_not_specialize=["H", "HV"])
def chunk_grads_kernel(
    q, k, v, a, A_log, dt_bias, b,
    G, beta_act, Ainv, chunk_states, v_new, d_chunk_states, dv_new, do,
    cu_seqlens, chunk_info,
    dq_out, dk_out, dv_out, dgate_out, dbeta_out, dA_log_partial, scale,
    H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    GATE_FROM_RAW: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BETA_FROM_RAW: tl.constexpr, L2NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq, dk per value head (fp32, summed over head groups later), dv, d(gate input) and d(beta input) of one chunk.

    Writes dq/dk w.r.t. the scaled, normalised q and k that the kernels use; the host undoes scale and L2 norm.
    """
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    rows, row_mask, last = chunk_rows(cu_seqlens, chunk_info, i_c, BT)
    dot_dtype = v_new.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)

    b_q = load_heads(q, rows, row_mask, i_h, H, K, BK, L2NORM) * scale
    b_k = load_heads(k, rows, row_mask, i_h, H, K, BK, L2NORM)
    b_G, G_last = load_log_decay(G, rows, row_mask, last, i_hv, HV)
    b_beta = load_token_scalars(beta_act, rows, row_mask, i_hv, HV)
    b_Ainv = tl.load(Ainv + (rows[:, None] * HV + i_hv) * BT + o_t[None, :], mask=row_mask[:, None], other=0.0)
    Ainv_t = tl.trans(b_Ainv).to(dot_dtype)

    do_S = tl.zeros([BT, BK], dtype=tl.float32)  # do S^T
    d_attention = tl.zeros([BT, BT], dtype=tl.float32)  # do v_new^T
    v_new_dS = tl.zeros([BT, BK], dtype=tl.float32)  # v_new dS'^T
    dw = tl.zeros([BT, BK], dtype=tl.float32)  # -dv_new S^T
    dAinv = tl.zeros([BT, BT], dtype=tl.float32)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    S_dS = tl.zeros([BK], dtype=tl.float32)  # partial sums of S * dS'
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
        state_offsets = (i_c * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
        S = tl.load(chunk_states + state_offsets, mask=m_kv, other=0.0).to(dot_dtype)
        dS = tl.load(d_chunk_states + state_offsets, mask=m_kv, other=0.0).to(dot_dtype)
        vo_offsets = (rows[:, None] * HV + i_hv) * V + o_v[None, :]
        m_tv = row_mask[:, None] & (o_v[None, :] < V)
        b_do = tl.load(do + vo_offsets, mask=m_tv, other=0.0).to(dot_dtype)
        b_v_new = tl.load(v_new + vo_offsets, mask=m_tv, other=0.0).to(dot_dtype)
        b_dv_new = tl.load(dv_new + vo_offsets, mask=m_tv, other=0.0).to(dot_dtype)
        b_v = tl.load(v + vo_offsets, mask=m_tv, other=0.0).to(tl.float32)

        do_S += tl.dot(b_do, tl.trans(S), input_precision=DOT_PRECISION)
        d_attention += tl.dot(b_do, tl.trans(b_v_new), input_precision=DOT_PRECISION)
        v_new_dS += tl.dot(b_v_new, tl.trans(dS), input_precision=DOT_PRECISION)
        dw -= tl.dot(b_dv_new, tl.trans(S), input_precision=DOT_PRECISION)
        S_dS += tl.sum(S.to(tl.float32) * dS.to(tl.float32), 1)
        # u = Ainv (beta v): du = dv_new.
        dAinv += tl.dot(b_dv_new, tl.trans((b_v * b_beta[:, None]).to(dot_dtype)), input_precision=DOT_PRECISION)
        dY = tl.dot(Ainv_t, b_dv_new, input_precision=DOT_PRECISION)
        tl.store(dv_out + vo_offsets, (dY * b_beta[:, None]).to(dv_out.dtype.element_ty), mask=m_tv)
        dbeta += tl.sum(dY * b_v, 1)

    gamma = tl.exp(b_G)
    decay = decay_matrix(b_G, False, BT)
    qk = tl.dot(b_q.to(dot_dtype), tl.trans(b_k).to(dot_dtype), input_precision=DOT_PRECISION)
    d_qk = d_attention * decay
    dq = do_S * gamma[:, None] + tl.dot(d_qk.to(dot_dtype), b_k.to(dot_dtype), input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(d_qk).to(dot_dtype), b_q.to(dot_dtype), input_precision=DOT_PRECISION)
    to_end = tl.where(row_mask, tl.exp(G_last - b_G), 0.0)
    dk += v_new_dS * to_end[:, None]

    # dG: output's exp(G_i) S term, the decays inside the attention matrix, and the state update's decays.
    dG = tl.sum(b_q * do_S, 1) * gamma
    attention_terms = d_qk * qk
    dG += tl.sum(attention_terms, 1) - tl.sum(attention_terms, 0)
    state_terms = tl.sum(b_k * v_new_dS, 1) * to_end
    dG -= state_terms
    dG += tl.where(rows == last, tl.sum(state_terms, 0) + tl.exp(G_last) * tl.sum(S_dS, 0), 0.0)

    # WY: w = Ainv X with X = beta exp(G) k.
    b_x = b_k * (b_beta * gamma)[:, None]
    dX = tl.dot(Ainv_t, dw.to(dot_dtype), input_precision=DOT_PRECISION)
    dAinv += tl.dot(dw.to(dot_dtype), tl.trans(b_x).to(dot_dtype), input_precision=DOT_PRECISION)
    dA = -tl.dot(tl.dot(Ainv_t, dAinv.to(dot_dtype), input_precision=DOT_PRECISION).to(dot_dtype), Ainv_t,
                 input_precision=DOT_PRECISION)
    # A = beta_i (k_i . k_j) exp(G_i - G_j), strictly lower.
    kk = tl.dot(b_k.to(dot_dtype), tl.trans(b_k).to(dot_dtype), input_precision=DOT_PRECISION)
    dA_decay = dA * decay_matrix(b_G, True, BT)
    dbeta += tl.sum(dA_decay * kk, 1)
    d_kk = dA_decay * b_beta[:, None]
    dA_terms = d_kk * kk
    dG += tl.sum(dA_terms, 1) - tl.sum(dA_terms, 0)
    dk += tl.dot(d_kk.to(dot_dtype), b_k.to(dot_dtype), input_precision=DOT_PRECISION)
    dk += tl.dot(tl.trans(d_kk).to(dot_dtype), b_k.to(dot_dtype), input_precision=DOT_PRECISION)
    dk += dX * (b_beta * gamma)[:, None]
    x_terms = tl.sum(dX * b_k, 1) * gamma
    dbeta += x_terms
    dG += b_beta * x_terms

    m_tk = row_mask[:, None] & (o_k[None, :] < K)
    qk_offsets = (rows[:, None] * HV + i_hv) * K + o_k[None, :]
    tl.store(dq_out + qk_offsets, dq, mask=m_tk)
    tl.store(dk_out + qk_offsets, dk, mask=m_tk)

    # G is the chunk-local cumsum of the gate: d gate_i = sum_{t >= i} dG_t.
    dG = tl.where(row_mask, dG, 0.0)
    dgate = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG
    if GATE_FROM_RAW:
        x = load_token_scalars(a, rows, row_mask, i_hv, HV)
        if HAS_DT_BIAS:
            x += tl.load(dt_bias + i_hv).to(tl.float32)
        decay_rate = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        # g = -exp(A_log) softplus(x): dg/dA_log = g, dg/dx = -exp(A_log) sigmoid(x).
        tl.store(dA_log_partial + i_c * HV + i_hv, tl.sum(tl.where(row_mask, -dgate * decay_rate * softplus(x), 0.0), 0))
        dgate = -dgate * decay_rate / (1.0 + tl.exp(-x))
    tl.store(dgate_out + rows * HV + i_hv, dgate, mask=row_mask)
    if BETA_FROM_RAW:
        dbeta = dbeta * b_beta * (1.0 - b_beta)
    tl.store(dbeta_out + rows * HV + i_hv, dbeta, mask=row_mask)
