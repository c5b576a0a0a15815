"""`chunk_gated_delta_rule`: the Triton chunked gated delta rule as an autograd Function (fla 0.6 compatible).

Forward: prepare (gate cumsum, beta, WY) -> state pass -> output. Backward recomputes prepare and the state pass from
the saved inputs (per-chunk states only, never per-token K x V states), runs the reverse state pass, then the
per-chunk gradient kernel. Grouped value heads: kernels run per value head; q/k gradients are summed per group here.
"""

from __future__ import annotations

import torch
import triton

from .backward import chunk_grads_kernel, state_backward_kernel
from .forward import output_kernel, prepare_wy_kernel, state_forward_kernel
from .inputs import L2NORM_EPS, GatedDeltaDims, check_gated_delta_inputs, l2_normalize, sequence_bounds
from .triton_common import CHUNK, INTERPRET

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def check_triton_inputs(q, k, v, dims: GatedDeltaDims) -> None:
    """What the Triton path adds to the shared checks: one supported dtype, head dims it can tile, a usable device."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; the Triton kernels need one of fp32/fp16/bf16 for "
            "all three (use chunk_gated_delta_rule_ref for float64)"
        )
    for name, size in (("K", dims.head_k_dim), ("V", dims.head_v_dim)):
        if size > MAX_HEAD_DIM:
            raise ValueError(f"head dim {name}={size} is larger than {MAX_HEAD_DIM}, the largest the kernels tile")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"tensors are on {q.device} but Triton runs on CUDA only (or on CPU with TRITON_INTERPRET=1 set before "
            "triton is imported); use chunk_gated_delta_rule_ref on CPU"
        )


def tile_size(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs every side >= 16


class ChunkLayout:
    """Documents as token ranges of the flattened batch, and the flat list of 64-token chunks over them."""

    def __init__(self, cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device: torch.device):
        if cu_seqlens is None:
            bounds = [(n * seq_len, (n + 1) * seq_len) for n in range(batch)]
        else:
            bounds = sequence_bounds(cu_seqlens, seq_len)
        chunks_per_doc = [triton.cdiv(end - start, CHUNK) for start, end in bounds]
        offsets = [0]
        for count in chunks_per_doc:
            offsets.append(offsets[-1] + count)
        info = [(n, t) for n, count in enumerate(chunks_per_doc) for t in range(count)]
        self.num_docs = len(bounds)
        self.num_chunks = offsets[-1]
        self.cu_seqlens = torch.tensor([0] + [end for _, end in bounds], dtype=torch.int32, device=device)
        self.chunk_offsets = torch.tensor(offsets[:-1], dtype=torch.int32, device=device)
        self.chunk_info = torch.tensor(info or [(0, 0)], dtype=torch.int32, device=device).flatten()


def _meta(dims: GatedDeltaDims, dtype: torch.dtype, use_l2norm: bool) -> dict:
    return dict(
        H=dims.num_qk_heads, HV=dims.num_v_heads, K=dims.head_k_dim, V=dims.head_v_dim,
        BK=tile_size(dims.head_k_dim), BT=CHUNK, L2NORM=use_l2norm,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def _prepare_and_state_pass(q, k, v, gate_args, beta_args, initial_state, layout, dims, meta, store_final_state):
    """Prepare kernel then forward state pass; returns everything later kernels read."""
    tokens, HV, K, V = q.shape[0], dims.num_v_heads, dims.head_k_dim, dims.head_v_dim
    f32 = dict(device=q.device, dtype=torch.float32)
    G = torch.empty(tokens, HV, **f32)
    beta_act = torch.empty(tokens, HV, **f32)
    Ainv = torch.empty(tokens, HV, CHUNK, **f32)
    w = torch.empty(tokens, HV, K, device=q.device, dtype=q.dtype)
    u = torch.empty(tokens, HV, V, device=q.device, dtype=q.dtype)
    g, a, A_log, dt_bias = gate_args
    beta, b = beta_args
    if layout.num_chunks:
        prepare_wy_kernel[(layout.num_chunks, HV)](
            k, v, g, beta, a, A_log, dt_bias, b, layout.cu_seqlens, layout.chunk_info,
            G, beta_act, Ainv, w, u,
            GATE_FROM_RAW=g is None, HAS_DT_BIAS=dt_bias is not None, BETA_FROM_RAW=beta is None,
            **meta,
        )
    chunk_states = torch.empty(max(layout.num_chunks, 1), HV, K, V, device=q.device, dtype=q.dtype)
    v_new = torch.empty_like(u)
    final_state = torch.empty(layout.num_docs, HV, K, V, **f32) if store_final_state else None
    state_forward_kernel[lambda m: (triton.cdiv(V, m["BV"]), layout.num_docs * HV)](
        k, w, u, G, initial_state, layout.cu_seqlens, layout.chunk_offsets, chunk_states, v_new, final_state,
        HAS_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=store_final_state,
        **meta,
    )
    return G, beta_act, Ainv, w, chunk_states, v_new, final_state


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T, ...] -> contiguous [B*T, ...]."""
    return None if x is None else x.contiguous().flatten(0, 1)


def _kernel_inputs(q, k, v, g, beta, a, A_log, dt_bias, b, initial_state):
    """Flat contiguous q, k, v, the gate arguments (g, a, A_log, dt_bias), beta arguments (beta, b), initial state."""
    contiguous = [None if t is None else t.contiguous() for t in (A_log, dt_bias, initial_state)]
    return (_flat(q), _flat(k), _flat(v), (_flat(g), _flat(a), contiguous[0], contiguous[1]), (_flat(beta), _flat(b)),
            contiguous[2])


def _l2norm_backward(x: torch.Tensor, grad_normalised: torch.Tensor) -> torch.Tensor:
    """Gradient through y = x / sqrt(|x|^2 + eps), given dL/dy."""
    x = x.float()
    y = l2_normalize(x)
    rstd = torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)
    return (grad_normalised - (grad_normalised * y).sum(-1, keepdim=True) * y) * rstd


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, a, A_log, dt_bias, b, initial_state, layout, dims, output_final_state,
                use_l2norm):
        B, T = q.shape[:2]
        qf, kf, vf, gate_args, beta_args, h0 = _kernel_inputs(q, k, v, g, beta, a, A_log, dt_bias, b, initial_state)
        meta = _meta(dims, q.dtype, use_l2norm)
        G, _, _, _, chunk_states, v_new, final_state = _prepare_and_state_pass(
            qf, kf, vf, gate_args, beta_args, h0, layout, dims, meta, output_final_state
        )
        o = torch.empty_like(vf, dtype=q.dtype)
        if layout.num_chunks:
            output_kernel[lambda m: (triton.cdiv(dims.head_v_dim, m["BV"]), layout.num_chunks, dims.num_v_heads)](
                qf, kf, v_new, G, chunk_states, layout.cu_seqlens, layout.chunk_info, o, dims.scale, **meta
            )
        ctx.save_for_backward(q, k, v, g, beta, a, A_log, dt_bias, b, initial_state)
        ctx.layout, ctx.dims, ctx.use_l2norm = layout, dims, use_l2norm
        return o.view(B, T, dims.num_v_heads, dims.head_v_dim), final_state

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, g, beta, a, A_log, dt_bias, b, initial_state = ctx.saved_tensors
        layout, dims, use_l2norm = ctx.layout, ctx.dims, ctx.use_l2norm
        HV, K, V = dims.num_v_heads, dims.head_k_dim, dims.head_v_dim
        qf, kf, vf, gate_args, beta_args, h0 = _kernel_inputs(q, k, v, g, beta, a, A_log, dt_bias, b, initial_state)
        meta = _meta(dims, q.dtype, use_l2norm)
        G, beta_act, Ainv, w, chunk_states, v_new, _ = _prepare_and_state_pass(
            qf, kf, vf, gate_args, beta_args, h0, layout, dims, meta, False
        )
        do = _flat(do).to(q.dtype)
        tokens = qf.shape[0]
        f32 = dict(device=q.device, dtype=torch.float32)
        d_chunk_states = torch.empty_like(chunk_states)
        dv_new = torch.empty_like(v_new)
        d_initial_state = torch.empty_like(h0, dtype=torch.float32) if h0 is not None else None
        has_d_final = d_final_state is not None
        state_backward_kernel[lambda m: (triton.cdiv(V, m["BV"]), layout.num_docs * HV)](
            qf, kf, w, G, do, d_final_state.contiguous() if has_d_final else None,
            layout.cu_seqlens, layout.chunk_offsets, d_chunk_states, dv_new, d_initial_state, dims.scale,
            HAS_D_FINAL_STATE=has_d_final, STORE_D_INITIAL_STATE=h0 is not None,
            **meta,
        )
        dq_heads = torch.zeros(tokens, HV, K, **f32)
        dk_heads = torch.zeros(tokens, HV, K, **f32)
        dv = torch.empty_like(vf)
        dgate = torch.zeros(tokens, HV, **f32)
        dbeta = torch.zeros(tokens, HV, **f32)
        dA_log_partial = torch.zeros(max(layout.num_chunks, 1), HV, **f32)
        if layout.num_chunks:
            chunk_grads_kernel[(layout.num_chunks, HV)](
                qf, kf, vf, gate_args[1], gate_args[2], gate_args[3], beta_args[1],
                G, beta_act, Ainv, chunk_states, v_new, d_chunk_states, dv_new, do,
                layout.cu_seqlens, layout.chunk_info,
                dq_heads, dk_heads, dv, dgate, dbeta, dA_log_partial, dims.scale,
                GATE_FROM_RAW=g is None, HAS_DT_BIAS=dt_bias is not None, BETA_FROM_RAW=beta is None,
                **meta,
            )
        else:
            dv.zero_()
        group = HV // dims.num_qk_heads
        dq = dq_heads.view(tokens, dims.num_qk_heads, group, K).sum(2) * dims.scale
        dk = dk_heads.view(tokens, dims.num_qk_heads, group, K).sum(2)
        if use_l2norm:
            dq, dk = _l2norm_backward(qf, dq), _l2norm_backward(kf, dk)

        def shaped(grad, like):
            return None if like is None else grad.view(like.shape).to(like.dtype)

        dg = da = dA_log = d_dt_bias = None
        if g is not None:
            dg = shaped(dgate, g)
        else:
            da = shaped(dgate, a)
            dA_log = dA_log_partial.sum(0).to(A_log.dtype)
            if dt_bias is not None:
                d_dt_bias = dgate.sum(0).to(dt_bias.dtype)
        dbeta_input, db = (shaped(dbeta, beta), None) if beta is not None else (None, shaped(dbeta, b))
        return (
            shaped(dq, q), shaped(dk, k), shaped(dv, v), dg, dbeta_input, da, dA_log, d_dt_bias, db,
            shaped(d_initial_state, initial_state), None, None, None, None,
        )


def chunk_gated_delta_rule(
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
    """Chunked gated delta rule (Triton), same contract as fla 0.6's `chunk_gated_delta_rule`.

    q, k [B, T, H, K]; v [B, T, HV, V] (HV a multiple of H); g (log decay) and beta [B, T, HV], or raw `a, A_log,
    dt_bias` (g = -exp(A_log) softplus(a + dt_bias)) and `b` (beta = sigmoid(b)); initial/final states
    [N, HV, K, V] fp32; cu_seqlens [N+1] packs N documents along T (B == 1). Returns (o in q's dtype, final state
    or None). Differentiable w.r.t. every tensor input.
    """
    dims = check_gated_delta_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, a, A_log, dt_bias, b)
    check_triton_inputs(q, k, v, dims)
    layout = ChunkLayout(cu_seqlens, dims.batch, dims.seq_len, q.device)
    return ChunkGatedDeltaRuleFunction.apply(
        q, k, v, g, beta, a, A_log, dt_bias, b, initial_state, layout, dims, output_final_state,
        use_qk_l2norm_in_kernel,
    )
