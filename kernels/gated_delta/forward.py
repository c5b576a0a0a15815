# Cites: Gated DeltaNet (arXiv 2412.06464) in DeltaNet's chunked WY/UT form (arXiv 2406.06484).
"""Forward kernels of the chunked gated delta rule (chunk 64, see reference.py for the algebra).

1. `prepare_wy_kernel` (parallel over chunks x value heads): gate -> chunk-local log-decay cumsum G (fp64), beta,
   A = strictly-lower beta_i exp(G_i - G_j) k_i.k_j, its unit-triangular inverse Ainv = (I + A)^-1, and the WY pair
   w = Ainv (beta exp(G) k), u = Ainv (beta v); with the L2 norm, also 1/|k| (and 1/|q| for the backward).
2. `state_forward_kernel` (sequential over chunks, parallel over documents x value heads x V blocks): with the fp32
   state S in registers, v_new = u - w S, S <- exp(G_last) S + (exp(G_last - G) k)^T v_new; stores S per chunk.
3. `output_kernel` (parallel): o = scale (exp(G) q) S + scale (q k^T * decay) v_new.

q and k are used raw in every dot: the L2 norm and the scale are per-row factors, applied to the dot results.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    autotune,
    chunk_and_block,
    chunk_rows,
    config_grid,
    decay_between,
    decay_matrix,
    document_bounds,
    load_beta,
    load_gate,
    load_log_decay,
    many_warps_before_hopper,
    load_rnorm,
    load_rows_clamped,
    load_tile,
    rnorm_from_squares,
    state_fits,
    state_tile,
    store_state_tile,
    store_tile,
    wide_or_many_warps,
)


@triton.jit
def invert_unit_lower(A, BT: tl.constexpr, PRECISION: tl.constexpr):
    """(I + A)^-1 for strictly lower triangular A [BT, BT] (fp32).

    The four 16 x 16 diagonal blocks D are inverted by forward substitution in exact fp32 vector arithmetic, all four
    at once: rows r, 16 + r, 32 + r, 48 + r have disjoint column blocks, so one [BT] vector carries all four. Then
    with N = D^-1 (off-diagonal part), nilpotent of order 4, (I + A)^-1 = (I - N + N^2 - N^3) D^-1: four dots.
    """
    o_t = tl.arange(0, BT)
    same_block = (o_t[:, None] // 16) == (o_t[None, :] // 16)
    A_diag = tl.where(same_block, A, 0.0)
    eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    block_inverse = eye
    for r in range(1, 16):
        row_r = (o_t % 16) == r
        a_r = tl.sum(tl.where(row_r[:, None], A_diag, 0.0), 0)  # a_r[j] = A[16 * block(j) + r, j]
        # Rows < r of every block are final and A is strictly lower: row r = e_r - A_r (rows < r of the inverse).
        update = -tl.sum(a_r[:, None] * block_inverse, 0)
        block_inverse = tl.where(row_r[:, None] & same_block, block_inverse + update[None, :], block_inverse)
    N = tl.dot(block_inverse, tl.where(same_block, 0.0, A), input_precision=PRECISION)
    N2 = tl.dot(N, N, input_precision=PRECISION)
    series = eye - N + N2 - tl.dot(N2, N, input_precision=PRECISION)
    return tl.dot(series, block_inverse, input_precision=PRECISION)


@autotune(configs=config_grid({"BV": (64, 32)}), key=["H", "HV", "K", "V", "GATE_FROM_RAW", "L2NORM"],
          allowed=many_warps_before_hopper)
@triton.jit(do_not_specialize=["T", "NT", "H", "HV"])
def prepare_wy_kernel(
    q, k, v, g, beta, a, A_log, dt_bias, b,
    cu_seqlens, chunk_indices,
    G_out, Ainv_out, w_out, u_out, q_rnorm_out, k_rnorm_out,
    stride_q, stride_k, stride_v, T, NT, H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    GATE_FROM_RAW: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BETA_FROM_RAW: tl.constexpr, L2NORM: tl.constexpr,
    FOR_BACKWARD: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    group = HV // H
    i_h = i_hv // group
    rows, row_mask, _ = chunk_rows(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    dot_dtype = w_out.dtype.element_ty

    gate = load_gate(g, a, A_log, dt_bias, rows, row_mask, i_hv, HV, GATE_FROM_RAW, HAS_DT_BIAS)
    G = tl.cumsum(gate.to(tl.float64), 0)
    b_beta = load_beta(beta, b, rows, row_mask, i_hv, HV, BETA_FROM_RAW)
    tl.store(G_out + rows * HV + i_hv, G, mask=row_mask)

    kk = tl.zeros([BT, BT], dtype=tl.float32)
    k_squares = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_k = load_tile(k, rows, row_mask, stride_k, i_h, K, i_k * BK + tl.arange(0, BK), BK)
        kk += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
        if L2NORM:
            k_squares += tl.sum(b_k.to(tl.float32) * b_k.to(tl.float32), 1)
    if L2NORM:
        k_rnorm = rnorm_from_squares(k_squares)
    else:
        k_rnorm = tl.full([BT], 1.0, tl.float32)
    # The group's first value head writes the per-q/k-head norms.
    if L2NORM and i_hv % group == 0:
        tl.store(k_rnorm_out + rows * H + i_h, k_rnorm, mask=row_mask)
        if FOR_BACKWARD:
            q_squares = tl.zeros([BT], dtype=tl.float32)
            for i_k in range(0, tl.cdiv(K, BK)):
                b_q = load_tile(q, rows, row_mask, stride_q, i_h, K, i_k * BK + tl.arange(0, BK), BK).to(tl.float32)
                q_squares += tl.sum(b_q * b_q, 1)
            tl.store(q_rnorm_out + rows * H + i_h, rnorm_from_squares(q_squares), mask=row_mask)

    A = (b_beta * k_rnorm)[:, None] * kk * k_rnorm[None, :] * decay_matrix(G, True, BT)
    Ainv = invert_unit_lower(A, BT, DOT_PRECISION)
    if FOR_BACKWARD:  # the forward needs only w and u
        tl.store(Ainv_out + (rows[:, None] * HV + i_hv) * BT + o_t[None, :], Ainv, mask=row_mask[:, None])

    Ainv_dot = Ainv.to(dot_dtype)
    x_scale = b_beta * tl.exp(G.to(tl.float32)) * k_rnorm
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_tile(k, rows, row_mask, stride_k, i_h, K, o_k, BK).to(tl.float32)
        b_w = tl.dot(Ainv_dot, (b_k * x_scale[:, None]).to(dot_dtype), input_precision=DOT_PRECISION)
        store_tile(w_out, b_w, rows, row_mask, HV, i_hv, K, o_k, BK)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_v = load_tile(v, rows, row_mask, stride_v, i_hv, V, o_v, BV).to(tl.float32)
        b_u = tl.dot(Ainv_dot, (b_v * b_beta[:, None]).to(dot_dtype), input_precision=DOT_PRECISION)
        store_tile(u_out, b_u, rows, row_mask, HV, i_hv, V, o_v, BV)


@autotune(configs=config_grid({"BV": (32, 64, 16)}), key=["H", "HV", "K", "V", "L2NORM"], allowed=state_fits(32))
@triton.jit(do_not_specialize=["T", "NT", "H", "HV"])
def state_forward_kernel(
    k, w, u, G, k_rnorm, initial_state,
    cu_seqlens, chunk_offsets,
    chunk_states, v_new_out, final_state,
    stride_k, T, NT, H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, eos, first_chunk = document_bounds(i_n, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    dot_dtype = w.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL_STATE:
        S += state_tile(initial_state, i_nh, K, V, o_k, o_v, BK, BV).to(tl.float32)

    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        i_c = first_chunk + i_t
        rows = bos + i_t * BT + o_t
        row_mask = rows < eos
        last = tl.minimum(bos + i_t * BT + BT, eos) - 1
        store_state_tile(chunk_states, i_c * HV + i_hv, S, K, V, o_k, o_v, BK, BV)
        # Rows past the document: v_new is not stored there, and their exp(G_last - G) factor below is 0.
        b_w = load_rows_clamped(w, rows, last, HV * K, i_hv, K, o_k, BK)
        b_u = load_tile(u, rows, row_mask, HV * V, i_hv, V, o_v, BV).to(tl.float32)
        b_v_new = b_u - tl.dot(b_w, S.to(dot_dtype), input_precision=DOT_PRECISION)
        store_tile(v_new_out, b_v_new, rows, row_mask, HV, i_hv, V, o_v, BV)

        b_G, G_last = load_log_decay(G, rows, row_mask, last, i_hv, HV)
        b_k = load_rows_clamped(k, rows, last, stride_k, i_h, K, o_k, BK)
        # (diag(f) k)^T v_new = k^T (diag(f) v_new): the row factor goes on the smaller tile.
        to_end = tl.where(row_mask, decay_between(G_last, b_G), 0.0) * load_rnorm(k_rnorm, rows, row_mask, i_h, H,
                                                                                    L2NORM, BT)
        S = S * tl.exp(G_last.to(tl.float32))
        S += tl.dot(tl.trans(b_k), (b_v_new * to_end[:, None]).to(dot_dtype), input_precision=DOT_PRECISION)

    if STORE_FINAL_STATE:
        store_state_tile(final_state, i_nh, S, K, V, o_k, o_v, BK, BV)


@autotune(configs=config_grid({"BV": (64, 32)}), key=["H", "HV", "K", "V", "L2NORM"], allowed=wide_or_many_warps)
@triton.jit(do_not_specialize=["T", "NT", "H", "HV"])
def output_kernel(
    q, k, v_new, G, k_rnorm, chunk_states,
    cu_seqlens, chunk_indices,
    o, scale,
    stride_q, stride_k, T, NT, H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_c, i_v = chunk_and_block(tl.program_id(0).to(tl.int64), tl.cdiv(V, BV))
    i_hv = tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    rows, row_mask, last = chunk_rows(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN, BT)
    dot_dtype = v_new.dtype.element_ty
    o_v = i_v * BV + tl.arange(0, BV)

    qk = tl.zeros([BT, BT], dtype=tl.float32)
    qS = tl.zeros([BT, BV], dtype=tl.float32)
    q_squares = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_q = load_tile(q, rows, row_mask, stride_q, i_h, K, o_k, BK)
        b_k = load_tile(k, rows, row_mask, stride_k, i_h, K, o_k, BK)
        S = state_tile(chunk_states, i_c * HV + i_hv, K, V, o_k, o_v, BK, BV)
        qk += tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        qS += tl.dot(b_q, S, input_precision=DOT_PRECISION)
        if L2NORM:
            q_squares += tl.sum(b_q.to(tl.float32) * b_q.to(tl.float32), 1)
    q_factor = tl.full([BT], scale, tl.float32)
    if L2NORM:
        q_factor = q_factor * rnorm_from_squares(q_squares)
    b_G, _ = load_log_decay(G, rows, row_mask, last, i_hv, HV)
    k_factor = load_rnorm(k_rnorm, rows, row_mask, i_h, H, L2NORM, BT)
    attention = qk * q_factor[:, None] * k_factor[None, :] * decay_matrix(b_G, False, BT)
    b_v_new = load_tile(v_new, rows, row_mask, HV * V, i_hv, V, o_v, BV)
    b_o = qS * (q_factor * tl.exp(b_G.to(tl.float32)))[:, None]
    b_o += tl.dot(attention.to(dot_dtype), b_v_new, input_precision=DOT_PRECISION)
    store_tile(o, b_o, rows, row_mask, HV, i_hv, V, o_v, BV)
