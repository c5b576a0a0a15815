"""`fused_recurrent_gated_delta_rule`: token-by-token Triton kernel for decoding (forward only).

One program per (document, value head, V block) keeps its [K, BV] slice of the fp32 state in registers and walks the
document's tokens: S <- exp(g) S; S += k (beta (v - S^T k))^T; o = scale S^T q. Same contract as the chunked one.
No host synchronisation: documents come from cu_seqlens on the device (or are the B rows), and its values are not
read on the host for CUDA tensors (decoding calls this once per token; the prefill's chunked call checks them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import check_triton_inputs, tile_size
from .inputs import check_gated_delta_inputs
from .triton_common import L2NORM_EPS, autotune, config_grid, softplus, state_fits


@autotune(configs=config_grid({"BV": (32, 16, 64)}, warps=(1, 2, 4), stages=(1,)), key=["H", "HV", "K", "V"],
          allowed=state_fits(128, rows_per_warp=256))
@triton.jit(do_not_specialize=["T", "H", "HV"])
def recurrent_kernel(
    q, k, v, g, beta, a, A_log, dt_bias, b, initial_state,
    cu_seqlens,
    o, final_state, scale,
    T, H, HV,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_FROM_RAW: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BETA_FROM_RAW: tl.constexpr, L2NORM: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    state_offsets = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL_STATE:
        S += tl.load(initial_state + i_nh * K * V + state_offsets, mask=m_kv, other=0.0).to(tl.float32)
    if GATE_FROM_RAW:
        decay_rate = tl.exp(tl.load(A_log + i_hv).to(tl.float32))

    for t in range(0, eos - bos):
        row = bos + t
        b_q = tl.load(q + (row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 0) + L2NORM_EPS)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 0) + L2NORM_EPS)
        b_v = tl.load(v + (row * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if GATE_FROM_RAW:
            x = tl.load(a + row * HV + i_hv).to(tl.float32)
            if HAS_DT_BIAS:
                x += tl.load(dt_bias + i_hv).to(tl.float32)
            b_g = -decay_rate * softplus(x)
        else:
            b_g = tl.load(g + row * HV + i_hv).to(tl.float32)
        if BETA_FROM_RAW:
            b_beta = 1.0 / (1.0 + tl.exp(-tl.load(b + row * HV + i_hv).to(tl.float32)))
        else:
            b_beta = tl.load(beta + row * HV + i_hv).to(tl.float32)
        S *= tl.exp(b_g)
        residual = b_v - tl.sum(S * b_k[:, None], 0)
        S += b_k[:, None] * (b_beta * residual)[None, :]
        b_o = tl.sum(S * b_q[:, None], 0) * scale
        tl.store(o + (row * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

    if STORE_FINAL_STATE:
        tl.store(final_state + i_nh * K * V + state_offsets, S, mask=m_kv)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    *,
    a: torch.Tensor | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent gated delta rule for decoding a few tokens against a state. Forward only (no autograd).

    Same arguments and results as `chunk_gated_delta_rule`; use that one for training.
    """
    dims = check_gated_delta_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, a, A_log, dt_bias, b,
                                    check_cu_seqlens_values=not q.is_cuda)
    check_triton_inputs(q, k, v, dims)
    inputs = (q, k, v, g, beta, a, A_log, dt_bias, b, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise ValueError(
            "fused_recurrent_gated_delta_rule is forward only: call it under torch.no_grad() (decoding) or use "
            "chunk_gated_delta_rule for training"
        )
    HV, K, V = dims.num_v_heads, dims.head_k_dim, dims.head_v_dim
    flat = [None if t is None else t.contiguous() for t in inputs]
    o = torch.empty(dims.batch, dims.seq_len, HV, V, device=q.device, dtype=q.dtype)
    final_state = (
        torch.empty(dims.num_states, HV, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    )
    recurrent_kernel[lambda m: (dims.num_states * HV, triton.cdiv(V, m["BV"]))](
        *flat, cu_seqlens, o, final_state, dims.scale,
        T=dims.seq_len, H=dims.num_qk_heads, HV=HV, K=K, V=V, BK=tile_size(K), IS_VARLEN=cu_seqlens is not None,
        GATE_FROM_RAW=g is None, HAS_DT_BIAS=dt_bias is not None, BETA_FROM_RAW=beta is None,
        L2NORM=use_qk_l2norm_in_kernel, HAS_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state,
    )
    return o, final_state
