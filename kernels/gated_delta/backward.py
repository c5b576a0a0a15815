# Cites: Gated DeltaNet (arXiv 2412.06464) in DeltaNet's chunked WY/UT form (arXiv 2406.06484).
"""Backward kernels of the chunked gated delta rule, by recomputation: the forward's prepare and state passes are rerun
(only inputs are saved), then, per chunk with start state S, end-state gradient dS' and P = (q k^T) * decay:

1. `local_dv_kernel` (parallel): dv_new = P^T do, the part that needs no state.
2. `state_backward_kernel` (sequential, reverse): dv_new += (exp(G_last - G) k) dS';
   dS = exp(G_last) dS' + (exp(G) q)^T do - w^T dv_new. Stores dS' per chunk.
3. `output_grads_kernel` (parallel over K blocks x chunks x value heads): dq, the output and state-update parts of dk,
   dw = -dv_new S^T, and this K block's share of d gate.
4. `wy_backward_kernel` (parallel over chunks x value heads): through u = Ainv (beta v), w = Ainv (beta exp(G) k) and
   Ainv = (I + A)^-1 (dA = -Ainv^T dAinv Ainv^T): dv, dbeta, the rest of dk and d gate, and the raw gate / beta
   backward.
5. `qk_grads_kernel` (parallel over tokens x q/k heads): sums dq, dk over each group of value heads, applies the scale
   and the L2-norm backward, writes them in the input dtype.

dq and dk are first taken w.r.t. the scaled, normalised q and k the forward uses (q_hat = scale q / |q|,
k_hat = k / |k|); every dot still reads raw q and k, with the per-row factors applied to the results. d gate is
assembled term by term without cancelling totals (see grad_through_* in triton_common.py): that, and the fp64 log
decays, keep the fp32 gate gradients at the token loop's accuracy.
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
    fewest_spills_before_hopper,
    grad_through_decays,
    grad_through_prefix,
    grad_through_suffix,
    load_beta,
    load_log_decay,
    load_rnorm,
    load_rows_clamped,
    load_tile,
    raw_gate_input,
    softplus,
    state_fits,
    state_tile,
    store_state_tile,
    store_tile,
    wide_or_many_warps,
)


@triton.jit
def q_row_factor(q_rnorm, rows, row_mask, i_h, H, scale, L2NORM: tl.constexpr, BT: tl.constexpr):
    """scale / |q| per row: q_hat = q * factor."""
    return load_rnorm(q_rnorm, rows, row_mask, i_h, H, L2NORM, BT) * scale


@autotune(configs=config_grid({"BV": (64, 32)}), key=["H", "HV", "K", "V", "L2NORM"], allowed=wide_or_many_warps)
@triton.jit(do_not_specialize=["T", "NT", "H", "HV"])
def local_dv_kernel(
    q, k, G, q_rnorm, k_rnorm, do,
    cu_seqlens, chunk_indices,
    dv_new_out, scale,
    stride_q, stride_k, T, NT, H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_c, i_v = chunk_and_block(tl.program_id(0).to(tl.int64), tl.cdiv(V, BV))
    i_hv = tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    rows, row_mask, last = chunk_rows(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN, BT)
    dot_dtype = do.dtype.element_ty
    o_v = i_v * BV + tl.arange(0, BV)

    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_q = load_tile(q, rows, row_mask, stride_q, i_h, K, o_k, BK)
        b_k = load_tile(k, rows, row_mask, stride_k, i_h, K, o_k, BK)
        qk += tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    b_G, _ = load_log_decay(G, rows, row_mask, last, i_hv, HV)
    q_factor = q_row_factor(q_rnorm, rows, row_mask, i_h, H, scale, L2NORM, BT)
    k_factor = load_rnorm(k_rnorm, rows, row_mask, i_h, H, L2NORM, BT)
    attention = qk * q_factor[:, None] * k_factor[None, :] * decay_matrix(b_G, False, BT)
    b_do = load_tile(do, rows, row_mask, HV * V, i_hv, V, o_v, BV)
    b_dv = tl.dot(tl.trans(attention).to(dot_dtype), b_do, input_precision=DOT_PRECISION)
    store_tile(dv_new_out, b_dv, rows, row_mask, HV, i_hv, V, o_v, BV)


# dv_new holds the local part on entry and is updated in place: the autotuner must restore it between trials. Without
# pipelining (num_stages=1) the K = 256 configs spill.
@autotune(configs=config_grid({"BV": (32, 64, 16)}, stages=(2,)), key=["H", "HV", "K", "V", "L2NORM"],
          allowed=state_fits(16), restore_value=["dv_new"])
@triton.jit(do_not_specialize=["T", "NT", "H", "HV"])
def state_backward_kernel(
    q, k, w, G, q_rnorm, k_rnorm, do, d_final_state,
    cu_seqlens, chunk_offsets,
    d_chunk_states, dv_new, d_initial_state, scale,
    stride_q, stride_k, T, NT, H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_D_FINAL_STATE: tl.constexpr, STORE_D_INITIAL_STATE: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, eos, first_chunk = document_bounds(i_n, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    num_chunks = tl.cdiv(eos - bos, BT)
    dot_dtype = w.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_D_FINAL_STATE:
        dS += state_tile(d_final_state, i_nh, K, V, o_k, o_v, BK, BV).to(tl.float32)

    for i_back in range(0, num_chunks):
        i_t = num_chunks - 1 - i_back
        i_c = first_chunk + i_t
        rows = bos + i_t * BT + o_t
        row_mask = rows < eos
        last = tl.minimum(bos + i_t * BT + BT, eos) - 1
        store_state_tile(d_chunk_states, i_c * HV + i_hv, dS, K, V, o_k, o_v, BK, BV)

        # Rows past the document: dv_new is not stored there and is 0 in the dS update (its local part is loaded
        # as 0, the k part has a 0 factor), and do is loaded as 0.
        b_G, G_last = load_log_decay(G, rows, row_mask, last, i_hv, HV)
        b_k = load_rows_clamped(k, rows, last, stride_k, i_h, K, o_k, BK)
        to_end = tl.where(row_mask, decay_between(G_last, b_G), 0.0) * load_rnorm(k_rnorm, rows, row_mask, i_h, H,
                                                                                    L2NORM, BT)
        b_dv_new = load_tile(dv_new, rows, row_mask, HV * V, i_hv, V, o_v, BV).to(tl.float32)
        b_dv_new += tl.dot(b_k, dS.to(dot_dtype), input_precision=DOT_PRECISION) * to_end[:, None]
        store_tile(dv_new, b_dv_new, rows, row_mask, HV, i_hv, V, o_v, BV)

        b_q = load_rows_clamped(q, rows, last, stride_q, i_h, K, o_k, BK)
        b_w = load_rows_clamped(w, rows, last, HV * K, i_hv, K, o_k, BK)
        b_do = load_tile(do, rows, row_mask, HV * V, i_hv, V, o_v, BV).to(tl.float32)
        from_start = q_row_factor(q_rnorm, rows, row_mask, i_h, H, scale, L2NORM, BT) * tl.exp(b_G.to(tl.float32))
        dS = dS * tl.exp(G_last.to(tl.float32))
        dS += tl.dot(tl.trans(b_q), (b_do * from_start[:, None]).to(dot_dtype), input_precision=DOT_PRECISION)
        dS -= tl.dot(tl.trans(b_w), b_dv_new.to(dot_dtype), input_precision=DOT_PRECISION)

    if STORE_D_INITIAL_STATE:
        store_state_tile(d_initial_state, i_nh, dS, K, V, o_k, o_v, BK, BV)


@autotune(configs=config_grid({"BV": (64, 32)}, warps=(8,)), key=["H", "HV", "K", "V", "L2NORM"],
          allowed=fewest_spills_before_hopper)
@triton.jit(do_not_specialize=["T", "NT", "H", "HV"])
def output_grads_kernel(
    q, k, G, q_rnorm, k_rnorm, chunk_states, v_new, d_chunk_states, dv_new, do,
    cu_seqlens, chunk_indices,
    dq_out, dk_out, dw_out, dgate_partial, scale,
    stride_q, stride_k, T, NT, H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """For K block i_k: dq_hat, dk_hat (output and state-update parts), dw, and this block's share of d gate."""
    i_c, i_k = chunk_and_block(tl.program_id(0).to(tl.int64), tl.cdiv(K, BK))
    i_hv = tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    rows, row_mask, last = chunk_rows(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN, BT)
    dot_dtype = v_new.dtype.element_ty
    o_k = i_k * BK + tl.arange(0, BK)
    i_state = i_c * HV + i_hv

    do_S = tl.zeros([BT, BK], dtype=tl.float32)  # do S^T
    v_new_dS = tl.zeros([BT, BK], dtype=tl.float32)  # v_new dS'^T
    dw = tl.zeros([BT, BK], dtype=tl.float32)  # -dv_new S^T
    d_attention = tl.zeros([BT, BT], dtype=tl.float32)  # do v_new^T
    S_dS = tl.zeros([BK], dtype=tl.float32)  # partial sums of S * dS'
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        S = state_tile(chunk_states, i_state, K, V, o_k, o_v, BK, BV)
        dS = state_tile(d_chunk_states, i_state, K, V, o_k, o_v, BK, BV).to(dot_dtype)
        b_do = load_tile(do, rows, row_mask, HV * V, i_hv, V, o_v, BV)
        b_v_new = load_tile(v_new, rows, row_mask, HV * V, i_hv, V, o_v, BV)
        b_dv_new = load_tile(dv_new, rows, row_mask, HV * V, i_hv, V, o_v, BV)
        do_S += tl.dot(b_do, tl.trans(S), input_precision=DOT_PRECISION)
        v_new_dS += tl.dot(b_v_new, tl.trans(dS), input_precision=DOT_PRECISION)
        dw -= tl.dot(b_dv_new, tl.trans(S), input_precision=DOT_PRECISION)
        d_attention += tl.dot(b_do, tl.trans(b_v_new), input_precision=DOT_PRECISION)
        S_dS += tl.sum(S.to(tl.float32) * dS.to(tl.float32), 1)

    store_tile(dw_out, dw, rows, row_mask, HV, i_hv, K, o_k, BK)

    # q_hat = q * q_factor, k_hat = k * k_factor row-wise: the factors go on the [BT, BT] side of each product.
    b_G, G_last = load_log_decay(G, rows, row_mask, last, i_hv, HV)
    gamma = tl.exp(b_G.to(tl.float32))
    q_factor = q_row_factor(q_rnorm, rows, row_mask, i_h, H, scale, L2NORM, BT)
    k_factor = load_rnorm(k_rnorm, rows, row_mask, i_h, H, L2NORM, BT)
    b_q = load_tile(q, rows, row_mask, stride_q, i_h, K, o_k, BK)
    b_k = load_tile(k, rows, row_mask, stride_k, i_h, K, o_k, BK)
    d_qk = d_attention * decay_matrix(b_G, False, BT)  # dL/d(q_hat_i . k_hat_j)
    dq = do_S * gamma[:, None]
    dq += tl.dot((d_qk * k_factor[None, :]).to(dot_dtype), b_k, input_precision=DOT_PRECISION)
    store_tile(dq_out, dq, rows, row_mask, HV, i_hv, K, o_k, BK)
    # d gate through the output (exp(G_t) q_t S and the decays of P) and the state update (exp(G_last) S and
    # exp(G_last - G_j) k_j), from this K block.
    dgate = grad_through_prefix(tl.sum(b_q.to(tl.float32) * do_S, 1) * q_factor * gamma)
    dk_state = v_new_dS * tl.where(row_mask, decay_between(G_last, b_G), 0.0)[:, None]
    dgate += grad_through_suffix(tl.sum(b_k.to(tl.float32) * dk_state, 1) * k_factor)
    dk = dk_state + tl.dot(tl.trans(d_qk * q_factor[:, None]).to(dot_dtype), b_q, input_precision=DOT_PRECISION)
    store_tile(dk_out, dk, rows, row_mask, HV, i_hv, K, o_k, BK)
    qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * q_factor[:, None] * k_factor[None, :]
    dgate += grad_through_decays(d_qk * qk, BT)
    dgate += tl.exp(G_last.to(tl.float32)) * tl.sum(S_dS, 0)
    tl.store(dgate_partial + (rows * HV + i_hv) * tl.cdiv(K, BK) + i_k, dgate, mask=row_mask)


# dk holds the output_grads part on entry and is updated in place: the autotuner must restore it between trials.
@autotune(configs=config_grid({"BV": (64, 32)}, warps=(8,)), key=["H", "HV", "K", "V", "GATE_FROM_RAW", "L2NORM"],
          allowed=fewest_spills_before_hopper, restore_value=["dk"])
@triton.jit(do_not_specialize=["T", "NT", "H", "HV"])
def wy_backward_kernel(
    k, v, beta, a, A_log, dt_bias, b,
    G, k_rnorm, Ainv, dw, dv_new, dgate_partial,
    cu_seqlens, chunk_indices,
    dk, dv_out, dgate_out, dbeta_out, dA_log_partial,
    stride_k, stride_v, T, NT, H, HV, NUM_K_BLOCKS,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    GATE_FROM_RAW: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BETA_FROM_RAW: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    rows, row_mask, last = chunk_rows(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN, BT)
    dot_dtype = dv_out.dtype.element_ty
    o_t = tl.arange(0, BT)

    b_G, _ = load_log_decay(G, rows, row_mask, last, i_hv, HV)
    gamma = tl.exp(b_G.to(tl.float32))
    b_beta = load_beta(beta, b, rows, row_mask, i_hv, HV, BETA_FROM_RAW)
    k_factor = load_rnorm(k_rnorm, rows, row_mask, i_h, H, L2NORM, BT)
    Ainv_t = tl.trans(tl.load(Ainv + (rows[:, None] * HV + i_hv) * BT + o_t[None, :], mask=row_mask[:, None],
                              other=0.0)).to(dot_dtype)

    # u = Ainv Y with Y = beta v (du = dv_new): dY = Ainv^T du.
    dAinv = tl.zeros([BT, BT], dtype=tl.float32)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_du = load_tile(dv_new, rows, row_mask, HV * V, i_hv, V, o_v, BV)
        b_v = load_tile(v, rows, row_mask, stride_v, i_hv, V, o_v, BV).to(tl.float32)
        dAinv += tl.dot(b_du, tl.trans((b_v * b_beta[:, None]).to(dot_dtype)), input_precision=DOT_PRECISION)
        dY = tl.dot(Ainv_t, b_du, input_precision=DOT_PRECISION)
        store_tile(dv_out, dY * b_beta[:, None], rows, row_mask, HV, i_hv, V, o_v, BV)
        dbeta += tl.sum(dY * b_v, 1)

    # w = Ainv X with X = beta exp(G) k_hat: dX = Ainv^T dw.
    x_factor = b_beta * gamma * k_factor
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_tile(k, rows, row_mask, stride_k, i_h, K, o_k, BK)
        b_dw = load_tile(dw, rows, row_mask, HV * K, i_hv, K, o_k, BK)
        kk += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
        dAinv += tl.dot(b_dw, tl.trans((b_k.to(tl.float32) * x_factor[:, None]).to(dot_dtype)),
                        input_precision=DOT_PRECISION)

    # Ainv = (I + A)^-1 and A = beta_i (k_hat_i . k_hat_j) exp(G_i - G_j), strictly lower.
    kk = kk * k_factor[:, None] * k_factor[None, :]
    dA = -tl.dot(tl.dot(Ainv_t, dAinv.to(dot_dtype), input_precision=DOT_PRECISION).to(dot_dtype), Ainv_t,
                 input_precision=DOT_PRECISION)
    dA_decay = dA * decay_matrix(b_G, True, BT)
    dbeta += tl.sum(dA_decay * kk, 1)
    d_kk = dA_decay * b_beta[:, None]
    dgate = grad_through_decays(d_kk * kk, BT)
    d_kk_sym = (d_kk + tl.trans(d_kk)).to(dot_dtype)

    dX_k = tl.zeros([BT], dtype=tl.float32)  # sum over K of dX * k (raw k)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_tile(k, rows, row_mask, stride_k, i_h, K, o_k, BK)
        b_dw = load_tile(dw, rows, row_mask, HV * K, i_hv, K, o_k, BK)
        dX = tl.dot(Ainv_t, b_dw, input_precision=DOT_PRECISION)
        dX_k += tl.sum(dX * b_k.to(tl.float32), 1)
        b_dk = load_tile(dk, rows, row_mask, HV * K, i_hv, K, o_k, BK)
        b_dk += tl.dot(d_kk_sym, (b_k.to(tl.float32) * k_factor[:, None]).to(dot_dtype), input_precision=DOT_PRECISION)
        b_dk += dX * (b_beta * gamma)[:, None]
        store_tile(dk, b_dk, rows, row_mask, HV, i_hv, K, o_k, BK)
    x_terms = dX_k * gamma * k_factor
    dbeta += x_terms
    dgate += grad_through_prefix(b_beta * x_terms)

    for i_k in range(0, NUM_K_BLOCKS):
        dgate += tl.load(dgate_partial + (rows * HV + i_hv) * NUM_K_BLOCKS + i_k, mask=row_mask, other=0.0)
    if GATE_FROM_RAW:
        x = raw_gate_input(a, dt_bias, rows, row_mask, i_hv, HV, HAS_DT_BIAS)
        decay_rate = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        # g = -exp(A_log) softplus(x): dg/dA_log = g, dg/dx = -exp(A_log) sigmoid(x).
        dA_log = tl.sum(tl.where(row_mask, -dgate * decay_rate * softplus(x), 0.0), 0)
        tl.store(dA_log_partial + i_c * HV + i_hv, dA_log)
        dgate = -dgate * decay_rate / (1.0 + tl.exp(-x))
    tl.store(dgate_out + rows * HV + i_hv, dgate, mask=row_mask)
    if BETA_FROM_RAW:
        dbeta = dbeta * b_beta * (1.0 - b_beta)
    tl.store(dbeta_out + rows * HV + i_hv, dbeta, mask=row_mask)


@autotune(configs=config_grid({"BLOCK_T": (32, 16)}), key=["H", "HV", "K", "L2NORM"])
@triton.jit(do_not_specialize=["tokens", "H", "HV"])
def qk_grads_kernel(
    x, x_rnorm, dx_heads, dx,
    factor, stride_x, tokens, H, HV,
    K: tl.constexpr, BK: tl.constexpr, BLOCK_T: tl.constexpr, L2NORM: tl.constexpr,
):
    """dx [tokens, H, K] = L2-norm backward of factor * (sum over the group's value heads of dx_heads [.., HV, K])."""
    i_t, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    group = HV // H
    rows = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < tokens
    o_k = tl.arange(0, BK)
    grad = tl.zeros([BLOCK_T, BK], dtype=tl.float32)
    for j in range(0, group):
        grad += load_tile(dx_heads, rows, row_mask, HV * K, i_h * group + j, K, o_k, BK)
    grad *= factor
    if L2NORM:
        # y = x r with r = 1 / |x|: dx = (dy - (dy . y) y) r.
        r = tl.load(x_rnorm + rows * H + i_h, mask=row_mask, other=0.0)
        y = load_tile(x, rows, row_mask, stride_x, i_h, K, o_k, BK).to(tl.float32) * r[:, None]
        grad = (grad - tl.sum(grad * y, 1)[:, None] * y) * r[:, None]
    store_tile(dx, grad, rows, row_mask, H, i_h, K, o_k, BK)
