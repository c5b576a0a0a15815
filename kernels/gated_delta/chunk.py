# Cites: Gated DeltaNet (arXiv 2412.06464) in DeltaNet's chunked WY/UT form (arXiv 2406.06484).
"""`chunk_gated_delta_rule`: the Triton chunked gated delta rule as an autograd Function (fla 0.6 compatible).

Forward: prepare (gate cumsum, WY) -> state pass -> output. Backward recomputes prepare and the state pass from the
saved inputs (per-chunk states only, never per-token K x V states), then runs the local dv, reverse state pass,
output-gradient, WY-gradient and q/k-gradient kernels (see backward.py). Grouped value heads: kernels run per value
head; q/k gradients are summed per group in the last kernel.

Host synchronisation: none without cu_seqlens. With it, `prepare_chunk_layout` builds the chunk list on the device
and reads back one pair of numbers (chunk count, validity); build it once per batch and pass it as `chunk_layout`
to every layer, and no call synchronises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .backward import local_dv_kernel, output_grads_kernel, qk_grads_kernel, state_backward_kernel, wy_backward_kernel
from .forward import output_kernel, prepare_wy_kernel, state_forward_kernel
from .inputs import (
    GatedDeltaDims,
    check_cu_seqlens_shape,
    check_gated_delta_inputs,
    compute_dtype,
    cu_seqlens_violation,
    kv_state,
    raise_bad_cu_seqlens,
    reject_unsupported_fla_arguments,
    resolve_fla_conventions,
)
from .triton_common import CHUNK, INTERPRET

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
# K block of the kernels that loop over K (the state kernels hold all of K).
K_BLOCK = 64


def check_triton_inputs(q, k, v, dims: GatedDeltaDims) -> torch.dtype:
    """What the Triton path adds to the shared checks: a compute dtype it supports (the widest of q, k, v), head
    dims it can tile, a usable device. Returns the compute dtype."""
    dtype = compute_dtype(q, k, v)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}, computed in {dtype}; the Triton kernels compute in "
            "fp32, fp16 or bf16 (use chunk_gated_delta_rule_ref for float64)"
        )
    for name, size in (("K", dims.head_k_dim), ("V", dims.head_v_dim)):
        if size > MAX_HEAD_DIM:
            raise ValueError(f"head dim {name}={size} is larger than {MAX_HEAD_DIM}, the largest the kernels tile")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"tensors are on {q.device} but Triton runs on CUDA only (or on CPU with TRITON_INTERPRET=1 set before "
            "triton is imported); use chunk_gated_delta_rule_ref on CPU"
        )
    return dtype


def tile_size(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs every side >= 16


@dataclass(frozen=True)
class ChunkLayout:
    """Documents of one call as 64-token chunks. Build it with `prepare_chunk_layout`.

    Without cu_seqlens the B rows of T tokens are the documents and the kernels derive everything from program ids;
    with it, the device tensors below give each flat chunk its document (as fla's `chunk_indices`).
    """

    seq_len: int  # T: tokens per batch row (all packed documents with cu_seqlens)
    num_docs: int
    num_chunks: int
    cu_seqlens: torch.Tensor | None = None  # [N + 1] int32
    chunk_indices: torch.Tensor | None = None  # [num_chunks, 2] int32: (document, chunk within the document)
    chunk_offsets: torch.Tensor | None = None  # [N] int32: first flat chunk of each document

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def chunks_per_row(self) -> int:
        return triton.cdiv(self.seq_len, CHUNK)

    def kernel_args(self) -> dict:
        return dict(T=self.seq_len, NT=self.chunks_per_row, IS_VARLEN=self.is_varlen)


def dense_layout(batch: int, seq_len: int) -> ChunkLayout:
    """B rows of T tokens: nothing on the device."""
    return ChunkLayout(seq_len, batch, batch * triton.cdiv(seq_len, CHUNK))


def _chunk_counts(bounds: torch.Tensor) -> torch.Tensor:
    return (bounds[1:] - bounds[:-1] + CHUNK - 1) // CHUNK


def prepare_chunk_layout(cu_seqlens: torch.Tensor, seq_len: int,
                         cu_seqlens_cpu: torch.Tensor | None = None) -> ChunkLayout:  # fmt: skip
    """The chunk layout of documents packed along T by `cu_seqlens` [N + 1]; checks the values on the device.

    One device-to-host read (the chunk count and the check's result), none when `cu_seqlens_cpu` (the same values
    on the CPU, fla's argument) is given: the layout is then built there and copied over. Build it once per batch
    and pass it as `chunk_layout=` to every `chunk_gated_delta_rule` call on that batch.
    """
    check_cu_seqlens_shape(cu_seqlens)
    if cu_seqlens_cpu is not None:
        host = prepare_chunk_layout(cu_seqlens_cpu.cpu(), seq_len)
        device = cu_seqlens.device
        return ChunkLayout(seq_len, host.num_docs, host.num_chunks, cu_seqlens.to(torch.int32),
                           host.chunk_indices.to(device), host.chunk_offsets.to(device))  # fmt: skip
    bounds = cu_seqlens.to(torch.int64)
    chunk_counts = _chunk_counts(bounds)
    chunk_ends = chunk_counts.cumsum(0)
    num_chunks, bad = torch.stack([chunk_ends[-1], cu_seqlens_violation(bounds, seq_len).to(torch.int64)]).tolist()
    if bad:
        raise_bad_cu_seqlens(cu_seqlens, seq_len)
    chunk_offsets = chunk_ends - chunk_counts
    flat = torch.arange(num_chunks, device=cu_seqlens.device)
    document = torch.searchsorted(chunk_ends, flat, right=True)
    chunk_indices = torch.stack([document, flat - chunk_offsets[document]], dim=1).to(torch.int32)
    return ChunkLayout(seq_len, cu_seqlens.numel() - 1, num_chunks, cu_seqlens.to(torch.int32), chunk_indices,
                       chunk_offsets.to(torch.int32))


def layout_from_chunk_indices(cu_seqlens: torch.Tensor, chunk_indices: torch.Tensor, seq_len: int) -> ChunkLayout:
    """The layout of fla's precomputed `chunk_indices` [num_chunks, 2] ((document, chunk in document) of every
    64-token chunk, fla.ops.utils.index.prepare_chunk_indices), built on the device without a host sync."""
    check_cu_seqlens_shape(cu_seqlens)
    if chunk_indices.dim() != 2 or chunk_indices.shape[1] != 2:
        raise ValueError(f"chunk_indices must be [num_chunks, 2] (fla's prepare_chunk_indices(cu_seqlens, 64)), got "
                         f"shape {tuple(chunk_indices.shape)}")  # fmt: skip
    chunk_counts = _chunk_counts(cu_seqlens.to(torch.int64))
    chunk_offsets = chunk_counts.cumsum(0) - chunk_counts
    return ChunkLayout(seq_len, cu_seqlens.numel() - 1, chunk_indices.shape[0], cu_seqlens.to(torch.int32),
                       chunk_indices.to(torch.int32), chunk_offsets.to(torch.int32))  # fmt: skip


def _check_layout(layout: ChunkLayout, cu_seqlens: torch.Tensor | None, dims: GatedDeltaDims, device) -> None:
    if layout.seq_len != dims.seq_len or (layout.is_varlen and layout.cu_seqlens.device != device):
        raise ValueError(
            f"chunk_layout was built for T={layout.seq_len} on {layout.cu_seqlens.device if layout.is_varlen else '-'}"
            f", but q has T={dims.seq_len} on {device}; build it from this batch's cu_seqlens"
        )
    if not layout.is_varlen:
        raise ValueError("chunk_layout is only for packed input: pass the layout of cu_seqlens, or neither")
    if cu_seqlens is not None and cu_seqlens.numel() != layout.num_docs + 1:
        raise ValueError(
            f"cu_seqlens has {cu_seqlens.numel() - 1} documents but chunk_layout {layout.num_docs}; build the layout "
            "from the same cu_seqlens"
        )


def token_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [B, T, heads, D] and its token stride, for kernels that read x[row, head, d] at row * stride + head * D + d.

    Views such as the layer's split of one qkv projection qualify as they are; anything else is copied once.
    """
    B, T, heads, D = x.shape
    if not (x.stride(3) == 1 and x.stride(2) == D and (B == 1 or x.stride(0) == T * x.stride(1))):
        x = x.contiguous()
    return x, x.stride(1)


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


@dataclass
class _Call:
    """Everything one forward or backward launches with: inputs as the kernels read them, sizes, layout, flags."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    strides: dict
    gate: dict  # g, a, A_log, dt_bias
    beta: dict  # beta, b
    layout: ChunkLayout
    dims: GatedDeltaDims
    use_l2norm: bool

    @property
    def tokens(self) -> int:
        return self.dims.batch * self.dims.seq_len

    def meta(self) -> dict:
        """Constexprs and sizes every kernel takes."""
        fp32 = self.q.dtype == torch.float32
        d = self.dims
        return dict(H=d.num_qk_heads, HV=d.num_v_heads, K=d.head_k_dim, V=d.head_v_dim, BT=CHUNK,
                    L2NORM=self.use_l2norm, DOT_PRECISION="ieee" if fp32 else "tf32", **self.layout.kernel_args())

    def chunk_args(self) -> tuple:
        return self.layout.cu_seqlens, self.layout.chunk_indices

    def document_args(self) -> tuple:
        return self.layout.cu_seqlens, self.layout.chunk_offsets


def _prepare_and_state_pass(call: _Call, initial_state, store_final_state: bool, for_backward: bool):
    """Prepare kernel then forward state pass; returns everything later kernels read (`for_backward`: also Ainv
    and 1/|q|, which only the backward reads)."""
    d, layout = call.dims, call.layout
    HV, K, V, tokens = d.num_v_heads, d.head_k_dim, d.head_v_dim, call.tokens
    device = call.q.device
    f32 = dict(device=device, dtype=torch.float32)
    G = torch.empty(tokens, HV, device=device, dtype=torch.float64)
    Ainv = torch.empty(tokens, HV, CHUNK, **f32) if for_backward else None
    w = torch.empty(tokens, HV, K, device=device, dtype=call.q.dtype)
    u = torch.empty(tokens, HV, V, device=device, dtype=call.q.dtype)
    k_rnorm = torch.empty(tokens, d.num_qk_heads, **f32) if call.use_l2norm else None
    q_rnorm = torch.empty(tokens, d.num_qk_heads, **f32) if for_backward and call.use_l2norm else None
    meta = call.meta()
    if layout.num_chunks:
        prepare_wy_kernel[(layout.num_chunks, HV)](
            call.q, call.k, call.v, **call.gate, **call.beta, cu_seqlens=layout.cu_seqlens,
            chunk_indices=layout.chunk_indices, G_out=G, Ainv_out=Ainv, w_out=w, u_out=u, q_rnorm_out=q_rnorm,
            k_rnorm_out=k_rnorm,
            stride_q=call.strides["q"], stride_k=call.strides["k"], stride_v=call.strides["v"],
            BK=min(K_BLOCK, tile_size(K)),
            GATE_FROM_RAW=call.gate["g"] is None, HAS_DT_BIAS=call.gate["dt_bias"] is not None,
            BETA_FROM_RAW=call.beta["beta"] is None, FOR_BACKWARD=for_backward,
            **meta,
        )
    chunk_states = torch.empty(max(layout.num_chunks, 1), HV, K, V, device=device, dtype=call.q.dtype)
    v_new = torch.empty_like(u)
    final_state = torch.empty(layout.num_docs, HV, K, V, **f32) if store_final_state else None
    state_forward_kernel[lambda m: (layout.num_docs * HV, triton.cdiv(V, m["BV"]))](
        call.k, w, u, G, k_rnorm, initial_state, *call.document_args(), chunk_states, v_new, final_state,
        stride_k=call.strides["k"], BK=tile_size(K),
        HAS_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=store_final_state,
        **meta,
    )
    return dict(G=G, Ainv=Ainv, w=w, k_rnorm=k_rnorm, q_rnorm=q_rnorm, chunk_states=chunk_states, v_new=v_new,
                final_state=final_state)


def _chunk_blocks_grid(num_chunks: int, blocks, HV: int):
    """Grid (blocks x chunks, HV) with a chunk's blocks adjacent; `blocks(meta)` may depend on the config."""
    return lambda m: (blocks(m) * num_chunks, HV)


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, a, A_log, dt_bias, b, initial_state, layout, dims, output_final_state,
                use_l2norm):
        (q, stride_q), (k, stride_k), (v, stride_v) = token_rows(q), token_rows(k), token_rows(v)
        gate = dict(g=_contiguous(g), a=_contiguous(a), A_log=_contiguous(A_log), dt_bias=_contiguous(dt_bias))
        beta_args = dict(beta=_contiguous(beta), b=_contiguous(b))
        h0 = _contiguous(initial_state)
        call = _Call(q, k, v, dict(q=stride_q, k=stride_k, v=stride_v), gate, beta_args, layout, dims, use_l2norm)
        state = _prepare_and_state_pass(call, h0, output_final_state, for_backward=False)
        HV, V = dims.num_v_heads, dims.head_v_dim
        o = torch.empty(call.tokens, HV, V, device=q.device, dtype=q.dtype)
        if layout.num_chunks:
            output_kernel[_chunk_blocks_grid(layout.num_chunks, lambda m: triton.cdiv(V, m["BV"]), HV)](
                q, k, state["v_new"], state["G"], state["k_rnorm"], state["chunk_states"], *call.chunk_args(),
                o, dims.scale, stride_q=stride_q, stride_k=stride_k, BK=min(K_BLOCK, tile_size(dims.head_k_dim)),
                **call.meta(),
            )
        # The kernel-ready views (copies only where the input's strides needed one): the backward copies nothing.
        ctx.save_for_backward(q, k, v, *gate.values(), *beta_args.values(), h0)
        ctx.strides, ctx.layout, ctx.dims, ctx.use_l2norm = call.strides, layout, dims, use_l2norm
        return o.view(dims.batch, dims.seq_len, HV, V), state["final_state"]

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, g, a, A_log, dt_bias, beta, b, h0 = ctx.saved_tensors
        gate, beta_args = dict(g=g, a=a, A_log=A_log, dt_bias=dt_bias), dict(beta=beta, b=b)
        layout, dims = ctx.layout, ctx.dims
        call = _Call(q, k, v, ctx.strides, gate, beta_args, layout, dims, ctx.use_l2norm)
        H, HV, K, V, tokens = dims.num_qk_heads, dims.num_v_heads, dims.head_k_dim, dims.head_v_dim, call.tokens
        f32 = dict(device=q.device, dtype=torch.float32)
        meta = call.meta()
        state = _prepare_and_state_pass(call, h0, False, for_backward=True)
        do = do.reshape(tokens, HV, V).to(q.dtype).contiguous()
        k_block = min(K_BLOCK, tile_size(K))
        common = dict(stride_q=ctx.strides["q"], stride_k=ctx.strides["k"], **meta)

        dv_new = torch.empty_like(state["v_new"])
        if layout.num_chunks:
            local_dv_kernel[_chunk_blocks_grid(layout.num_chunks, lambda m: triton.cdiv(V, m["BV"]), HV)](
                q, k, state["G"], state["q_rnorm"], state["k_rnorm"], do, *call.chunk_args(), dv_new, dims.scale,
                BK=k_block, **common,
            )
        d_chunk_states = torch.empty_like(state["chunk_states"])
        d_initial_state = torch.empty_like(h0, dtype=torch.float32) if h0 is not None else None
        state_backward_kernel[lambda m: (layout.num_docs * HV, triton.cdiv(V, m["BV"]))](
            q, k, state["w"], state["G"], state["q_rnorm"], state["k_rnorm"], do,
            None if d_final_state is None else d_final_state.contiguous(), *call.document_args(),
            d_chunk_states, dv_new, d_initial_state, dims.scale,
            BK=tile_size(K), HAS_D_FINAL_STATE=d_final_state is not None, STORE_D_INITIAL_STATE=h0 is not None,
            **common,
        )

        num_k_blocks = triton.cdiv(K, k_block)
        dq_heads = torch.empty(tokens, HV, K, **f32)
        dk_heads = torch.empty(tokens, HV, K, **f32)
        dw = torch.empty_like(state["w"])
        dgate_partial = torch.empty(tokens, HV, num_k_blocks, **f32)
        dv = torch.empty(tokens, HV, V, device=q.device, dtype=v.dtype)
        dgate = torch.empty(tokens, HV, **f32)
        dbeta = torch.empty(tokens, HV, **f32)
        dA_log_partial = torch.empty(layout.num_chunks, HV, **f32)  # summed over chunks: 0 with no tokens
        if layout.num_chunks:
            output_grads_kernel[(num_k_blocks * layout.num_chunks, HV)](
                q, k, state["G"], state["q_rnorm"], state["k_rnorm"], state["chunk_states"], state["v_new"],
                d_chunk_states, dv_new, do, *call.chunk_args(),
                dq_heads, dk_heads, dw, dgate_partial, dims.scale, BK=k_block, **common,
            )
            wy_backward_kernel[(layout.num_chunks, HV)](
                k, v, beta, a, A_log, dt_bias, b, state["G"], state["k_rnorm"], state["Ainv"], dw, dv_new,
                dgate_partial, *call.chunk_args(), dk_heads, dv, dgate, dbeta, dA_log_partial,
                stride_k=ctx.strides["k"], stride_v=ctx.strides["v"], NUM_K_BLOCKS=num_k_blocks, BK=k_block,
                GATE_FROM_RAW=g is None, HAS_DT_BIAS=dt_bias is not None, BETA_FROM_RAW=beta is None, **meta,
            )
        dq = torch.empty(tokens, H, K, device=q.device, dtype=q.dtype)
        dk = torch.empty(tokens, H, K, device=q.device, dtype=k.dtype)
        for x, x_rnorm, grads, out, factor, stride in (
            (q, state["q_rnorm"], dq_heads, dq, dims.scale, ctx.strides["q"]),
            (k, state["k_rnorm"], dk_heads, dk, 1.0, ctx.strides["k"]),
        ):
            if tokens:
                qk_grads_kernel[lambda m: (triton.cdiv(tokens, m["BLOCK_T"]), H)](
                    x, x_rnorm, grads, out, factor, stride, tokens, H, HV, K=K, BK=tile_size(K),
                    L2NORM=ctx.use_l2norm,
                )

        B, T = dims.batch, dims.seq_len

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
            dq.view(B, T, H, K), dk.view(B, T, H, K), dv.view(B, T, HV, V), dg, dbeta_input, da, dA_log, d_dt_bias,
            db, shaped(d_initial_state, h0), None, None, None, None,
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
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    cp_context=None,
    *,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int = 64,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    chunk_layout: ChunkLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (Triton) with fla 0.6's `chunk_gated_delta_rule` signature and meaning.

    q, k [B, T, H, K]; v [B, T, HV, V] (HV a multiple of H); g (log decay) and beta [B, T, HV]; initial/final
    states [N, HV, K, V] fp32 ([N, HV, V, K] with `state_v_first`); cu_seqlens [N+1] packs N documents along T
    (B == 1). fla's flags: `use_gate_in_kernel` (g raw, g = -exp(A_log) softplus(g + dt_bias)),
    `use_beta_sigmoid_in_kernel` (beta raw logits), `allow_neg_eigval` (beta = 2 sigmoid(logits)),
    `cu_seqlens_cpu` and `chunk_indices` (spare the host sync). Our names for the raw forms: `a` (with A_log,
    dt_bias) and `b`. `chunk_layout`, from `prepare_chunk_layout(cu_seqlens, T)` once per batch, spares the sync
    too (cu_seqlens may then be omitted). q, k, v may differ in dtype: computed in the widest. Returns (o in q's
    dtype, final state or None). Differentiable w.r.t. every tensor input. `cp_context` and chunk sizes other than
    64 are refused (README: "Swapping with fla").
    """
    reject_unsupported_fla_arguments(cp_context=cp_context, chunk_size=chunk_size)
    g, beta, a, b = resolve_fla_conventions(g, beta, a, A_log, dt_bias, b, use_gate_in_kernel=use_gate_in_kernel,
                                            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                                            allow_neg_eigval=allow_neg_eigval)  # fmt: skip
    initial_state = kv_state(initial_state, state_v_first)
    if chunk_layout is not None and not isinstance(chunk_layout, ChunkLayout):
        raise ValueError(f"chunk_layout must come from prepare_chunk_layout, got {type(chunk_layout).__name__}")
    if chunk_layout is not None and cu_seqlens is None:
        cu_seqlens = chunk_layout.cu_seqlens
    dims = check_gated_delta_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, a, A_log, dt_bias, b,
                                    check_cu_seqlens_values=False)
    dtype = check_triton_inputs(q, k, v, dims)
    if chunk_layout is not None:
        _check_layout(chunk_layout, cu_seqlens, dims, q.device)
        layout = chunk_layout
    elif cu_seqlens is not None and chunk_indices is not None:
        layout = layout_from_chunk_indices(cu_seqlens, chunk_indices, dims.seq_len)
    elif cu_seqlens is not None:
        layout = prepare_chunk_layout(cu_seqlens, dims.seq_len, cu_seqlens_cpu)
    else:
        layout = dense_layout(dims.batch, dims.seq_len)
    o, final_state = ChunkGatedDeltaRuleFunction.apply(
        q.to(dtype), k.to(dtype), v.to(dtype), g, beta, a, A_log, dt_bias, b, initial_state, layout, dims,
        output_final_state, use_qk_l2norm_in_kernel,
    )
    return o.to(q.dtype), kv_state(final_state, state_v_first)
