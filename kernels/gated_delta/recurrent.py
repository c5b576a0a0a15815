# Cites: Gated DeltaNet (arXiv 2412.06464), token by token.
"""`fused_recurrent_gated_delta_rule`: token-by-token Triton kernel for decoding, differentiable.

One program per (document, value head, V block) keeps its [K, BV] slice of the fp32 state in registers and walks the
document's tokens: S <- exp(g) S; S += k (beta (v - S^T k))^T; o = scale S^T q. Same contract as fla 0.6's.
No host synchronisation: documents come from cu_seqlens on the device (or are the B rows), and its values are not
read on the host for CUDA tensors (decoding calls this once per token; the prefill's chunked call checks them).

Backward (RL, short-sequence fine-tuning): the gradient of the same function through the chunked kernels, which
recompute from the saved inputs and keep one state per 64-token chunk. A token-by-token reverse pass would need
every token's K x V state (fla 0.6 has no recurrent backward for that reason) or would rebuild them by dividing out
exp(g), which is unstable for strong decays; the chunked backward is already verified and compile-checked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import ChunkGatedDeltaRuleFunction, check_triton_inputs, dense_layout, prepare_chunk_layout, tile_size
from .inputs import (
    GatedDeltaDims,
    check_gated_delta_inputs,
    kv_state,
    reject_unsupported_fla_arguments,
    resolve_fla_conventions,
)
from .triton_common import L2NORM_EPS, autotune, config_grid, recurrent_allowed, softplus


@autotune(configs=config_grid({"BV": (32, 16, 64)}, warps=(1, 2, 4), stages=(1,)), key=["H", "HV", "K", "V"],
          allowed=recurrent_allowed)
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


class FusedRecurrentGatedDeltaRuleFunction(torch.autograd.Function):
    """Forward: the recurrent kernel. Backward: the chunked path's gradient of the same function (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, a, A_log, dt_bias, b, initial_state, cu_seqlens, dims, output_final_state,
                use_l2norm):
        HV, K, V = dims.num_v_heads, dims.head_k_dim, dims.head_v_dim
        inputs = (q, k, v, g, beta, a, A_log, dt_bias, b, initial_state)
        flat = [None if t is None else t.contiguous() for t in inputs]
        o = torch.empty(dims.batch, dims.seq_len, HV, V, device=q.device, dtype=q.dtype)
        final_state = (
            torch.empty(dims.num_states, HV, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
        )
        recurrent_kernel[lambda m: (dims.num_states * HV, triton.cdiv(V, m["BV"]))](
            *flat, cu_seqlens, o, final_state, dims.scale,
            T=dims.seq_len, H=dims.num_qk_heads, HV=HV, K=K, V=V, BK=tile_size(K), IS_VARLEN=cu_seqlens is not None,
            GATE_FROM_RAW=g is None, HAS_DT_BIAS=dt_bias is not None, BETA_FROM_RAW=beta is None,
            L2NORM=use_l2norm, HAS_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        )
        ctx.save_for_backward(*inputs, cu_seqlens)
        ctx.dims, ctx.use_l2norm = dims, use_l2norm
        ctx.set_materialize_grads(False)
        return o, final_state

    @staticmethod
    def backward(ctx, do, d_final_state):
        *inputs, cu_seqlens = ctx.saved_tensors
        dims = ctx.dims
        if do is None and d_final_state is None:
            return (None,) * 14
        if do is None:
            do = torch.zeros(dims.batch, dims.seq_len, dims.num_v_heads, dims.head_v_dim, device=inputs[0].device,
                             dtype=inputs[0].dtype)  # fmt: skip
        layout = (dense_layout(dims.batch, dims.seq_len) if cu_seqlens is None
                  else prepare_chunk_layout(cu_seqlens, dims.seq_len))  # fmt: skip
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip(inputs, ctx.needs_input_grad)]  # fmt: skip
            o, final_state = ChunkGatedDeltaRuleFunction.apply(*leaves, layout, dims, d_final_state is not None,
                                                               ctx.use_l2norm)  # fmt: skip
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            outputs, grads = [o], [do]
            if d_final_state is not None:
                outputs.append(final_state)
                grads.append(d_final_state)
            found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
        return (*(next(found) if t is not None and t.requires_grad else None for t in leaves), None, None, None, None)


def fused_recurrent_gated_delta_rule(
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
    """Recurrent gated delta rule for a few tokens against a state, with fla 0.6's signature and meaning.

    Arguments as `chunk_gated_delta_rule` (fla's flags and our raw-form names `a`, `b` alike); as in fla, g or
    beta may be omitted (no decay; beta = 1), and o comes back in v's dtype. Differentiable: the backward is the
    chunked kernels' (module docstring). Per-key / per-value decays `gk`, `gv` are refused (README).
    """
    reject_unsupported_fla_arguments(gk=gk, gv=gv)
    g, beta, a, b = resolve_fla_conventions(g, beta, a, A_log, dt_bias, b, use_gate_in_kernel=use_gate_in_kernel,
                                            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                                            allow_neg_eigval=allow_neg_eigval)  # fmt: skip
    if g is None and a is None:
        if A_log is not None or dt_bias is not None:
            raise ValueError("A_log / dt_bias given without a raw gate: pass it as g with use_gate_in_kernel=True")
        g = q.new_zeros(v.shape[:3], dtype=torch.float32)
    if beta is None and b is None:
        beta = q.new_ones(v.shape[:3], dtype=torch.float32)
    initial_state = kv_state(initial_state, state_v_first)
    dims: GatedDeltaDims = check_gated_delta_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, a, A_log,
                                                    dt_bias, b, check_cu_seqlens_values=not q.is_cuda)  # fmt: skip
    dtype = check_triton_inputs(q, k, v, dims)
    o, final_state = FusedRecurrentGatedDeltaRuleFunction.apply(
        q.to(dtype), k.to(dtype), v.to(dtype), g, beta, a, A_log, dt_bias, b, initial_state, cu_seqlens, dims,
        output_final_state, use_qk_l2norm_in_kernel,
    )
    return o.to(v.dtype), kv_state(final_state, state_v_first)
