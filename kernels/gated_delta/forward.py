"""Forward kernels of the chunked gated delta rule (chunk 64, see reference.py for the algebra).

1. `prepare_wy_kernel` (parallel over chunks x value heads): gate -> chunk-local log-decay cumsum G (fp32), beta,
   A = strictly-lower beta_i exp(G_i - G_j) k_i.k_j, its unit-triangular inverse Ainv = (I + A)^-1, and the WY pair
   w = Ainv (beta exp(G) k), u = Ainv (beta v).
2. `state_forward_kernel` (sequential over chunks, parallel over documents x value heads x V blocks): with the fp32
   state S in registers, v_new = u - w S, S <- exp(G_last) S + (exp(G_last - G) k)^T v_new; stores S per chunk.
3. `output_kernel` (parallel): o = scale (exp(G) q) S + scale (q k^T * decay) v_new.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    autotune,
    chunk_rows,
    config_grid,
    decay_matrix,
    load_beta,
    load_gate,
    load_heads,
    load_log_decay,
)


@triton.jit
def invert_unit_lower(A, BT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(I + A)^-1 for strictly lower triangular A [BT, BT], without powers of A beyond the third.

    The four 16 x 16 diagonal blocks are inverted together by forward substitution (row r of every block per step,
    each step one dot), then merged: with D the block-diagonal part, N = D^-1 (off-diagonal part) is nilpotent of
    order 4, so (I + A)^-1 = (I - N + N^2 - N^3) D^-1.
    """
    o_t = tl.arange(0, BT)
    same_block = (o_t[:, None] // 16) == (o_t[None, :] // 16)
    eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    A_diag = tl.where(same_block, A, 0.0)
    block_inverse = eye
    for r in range(1, 16):
        # Rows < r of each block are final and A_diag is strictly lower: row r = e_r - (A_diag @ inverse)_r.
        update = eye - tl.dot(A_diag, block_inverse, input_precision=DOT_PRECISION)
        block_inverse = tl.where((o_t % 16 == r)[:, None], update, block_inverse)
    N = tl.dot(block_inverse, tl.where(same_block, 0.0, A), input_precision=DOT_PRECISION)
    N2 = tl.dot(N, N, input_precision=DOT_PRECISION)
    series = eye - N + N2 - tl.dot(N, N2, input_precision=DOT_PRECISION)
    return tl.dot(series, block_inverse, input_precision=DOT_PRECISION)


@autotune(configs=config_grid({"BV": (32, 64)}), key=["H", "HV", "K", "V", "GATE_FROM_RAW", "BETA_FROM_RAW"])
@triton.jit(do_not_specialize=["H", "HV"])
def prepare_wy_kernel(
    k, v, g, beta, a, A_log, dt_bias, b,
    cu_seqlens, chunk_info,
    G_out, beta_out, Ainv_out, w_out, u_out,
    H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    GATE_FROM_RAW: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BETA_FROM_RAW: tl.constexpr, L2NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    rows, row_mask, _ = chunk_rows(cu_seqlens, chunk_info, i_c, BT)
    o_t = tl.arange(0, BT)
    dot_dtype = w_out.dtype.element_ty

    G = tl.cumsum(load_gate(g, a, A_log, dt_bias, rows, row_mask, i_hv, HV, GATE_FROM_RAW, HAS_DT_BIAS), 0)
    b_beta = load_beta(beta, b, rows, row_mask, i_hv, HV, BETA_FROM_RAW)
    tl.store(G_out + rows * HV + i_hv, G, mask=row_mask)
    tl.store(beta_out + rows * HV + i_hv, b_beta, mask=row_mask)

    b_k = load_heads(k, rows, row_mask, i_h, H, K, BK, L2NORM)
    kk = tl.dot(b_k.to(dot_dtype), tl.trans(b_k).to(dot_dtype), input_precision=DOT_PRECISION)
    A = b_beta[:, None] * kk * decay_matrix(G, True, BT)
    Ainv = invert_unit_lower(A, BT, DOT_PRECISION)
    tl.store(Ainv_out + (rows[:, None] * HV + i_hv) * BT + o_t[None, :], Ainv, mask=row_mask[:, None])

    Ainv_dot = Ainv.to(dot_dtype)
    o_k = tl.arange(0, BK)
    b_x = (b_k * (b_beta * tl.exp(G))[:, None]).to(dot_dtype)
    b_w = tl.dot(Ainv_dot, b_x, input_precision=DOT_PRECISION)
    tl.store(w_out + (rows[:, None] * HV + i_hv) * K + o_k[None, :], b_w.to(dot_dtype),
             mask=row_mask[:, None] & (o_k[None, :] < K))
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = row_mask[:, None] & (o_v[None, :] < V)
        offsets = (rows[:, None] * HV + i_hv) * V + o_v[None, :]
        b_v = tl.load(v + offsets, mask=m_v, other=0.0).to(tl.float32)
        b_u = tl.dot(Ainv_dot, (b_v * b_beta[:, None]).to(dot_dtype), input_precision=DOT_PRECISION)
        tl.store(u_out + offsets, b_u.to(dot_dtype), mask=m_v)


@autotune(configs=config_grid({"BV": (32, 64)}), key=["H", "HV", "K", "V"])
@triton.jit(do_not_specialize=["H", "HV"])
def state_forward_kernel(
    k, w, u, G, initial_state,
    cu_seqlens, chunk_offsets,
    chunk_states, v_new_out, final_state,
    H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, L2NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    dot_dtype = w.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    state_offsets = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL_STATE:
        S += tl.load(initial_state + i_nh * K * V + state_offsets, mask=m_kv, other=0.0).to(tl.float32)

    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        i_c = first_chunk + i_t
        rows = bos + i_t * BT + o_t
        row_mask = rows < eos
        tl.store(chunk_states + (i_c * HV + i_hv) * K * V + state_offsets, S.to(chunk_states.dtype.element_ty),
                 mask=m_kv)
        b_w = load_heads(w, rows, row_mask, i_hv, HV, K, BK, False)
        vu_offsets = (rows[:, None] * HV + i_hv) * V + o_v[None, :]
        m_tv = row_mask[:, None] & (o_v[None, :] < V)
        b_u = tl.load(u + vu_offsets, mask=m_tv, other=0.0).to(tl.float32)
        b_v_new = b_u - tl.dot(b_w.to(dot_dtype), S.to(dot_dtype), input_precision=DOT_PRECISION)
        tl.store(v_new_out + vu_offsets, b_v_new.to(v_new_out.dtype.element_ty), mask=m_tv)

        b_G, G_last = load_log_decay(G, rows, row_mask, tl.minimum(bos + i_t * BT + BT, eos) - 1, i_hv, HV)
        b_k = load_heads(k, rows, row_mask, i_h, H, K, BK, L2NORM)
        k_to_end = b_k * tl.where(row_mask, tl.exp(G_last - b_G), 0.0)[:, None]
        S = S * tl.exp(G_last) + tl.dot(tl.trans(k_to_end).to(dot_dtype), b_v_new.to(dot_dtype),
                                        input_precision=DOT_PRECISION)

    if STORE_FINAL_STATE:
        tl.store(final_state + i_nh * K * V + state_offsets, S, mask=m_kv)


@autotune(configs=config_grid({"BV": (32, 64)}), key=["H", "HV", "K", "V"])
@triton.jit(do_not_specialize=["H", "HV"])
def output_kernel(
    q, k, v_new, G, chunk_states,
    cu_seqlens, chunk_info,
    o, scale,
    H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    L2NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_v, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    rows, row_mask, last = chunk_rows(cu_seqlens, chunk_info, i_c, BT)
    dot_dtype = v_new.dtype.element_ty
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)

    b_q = load_heads(q, rows, row_mask, i_h, H, K, BK, L2NORM) * scale
    b_k = load_heads(k, rows, row_mask, i_h, H, K, BK, L2NORM)
    b_G, _ = load_log_decay(G, rows, row_mask, last, i_hv, HV)
    S = tl.load(chunk_states + (i_c * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :],
                mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.0)
    vu_offsets = (rows[:, None] * HV + i_hv) * V + o_v[None, :]
    m_tv = row_mask[:, None] & (o_v[None, :] < V)
    b_v_new = tl.load(v_new + vu_offsets, mask=m_tv, other=0.0)

    qk = tl.dot(b_q.to(dot_dtype), tl.trans(b_k).to(dot_dtype), input_precision=DOT_PRECISION)
    attention = qk * decay_matrix(b_G, False, BT)
    b_o = tl.dot((b_q * tl.exp(b_G)[:, None]).to(dot_dtype), S.to(dot_dtype), input_precision=DOT_PRECISION)
    b_o += tl.dot(attention.to(dot_dtype), b_v_new.to(dot_dtype), input_precision=DOT_PRECISION)
    tl.store(o + vu_offsets, b_o.to(o.dtype.element_ty), mask=m_tv)
