"""The dispatch seam: one call per op, and the implementation is picked per call.

`backend="auto"` takes our Triton kernels for CUDA tensors and the plain PyTorch reference for CPU tensors; "triton",
"fla" and "torch" force one. Layers call only these functions, so a new backend is one branch here.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "fla", "torch")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    return backend


def _gate_and_beta(g, beta, a, A_log, dt_bias, b):
    """g = -exp(A_log) * softplus(a + dt_bias) (dt_bias optional) and beta = sigmoid(b), in fp32, for backends
    without the fused form (fla)."""
    if g is None:
        from hybridlm.kernels.gated_delta.inputs import gate_from_raw

        g = gate_from_raw(a, A_log, dt_bias, torch.float32)
    if beta is None:
        beta = b.float().sigmoid()
    return g, beta


def prepare_gdn_chunk_layout(cu_seqlens, seq_len: int, *, backend: str = "auto"):
    """The chunk layout of packed documents for `chunk_gated_delta_rule(..., chunk_layout=)`, built once per batch
    (one host sync, instead of one per call); None when the backend needs none (torch, fla) or cu_seqlens is None."""
    if cu_seqlens is None or resolve_backend(backend, cu_seqlens) != "triton":
        return None
    from hybridlm.kernels.gated_delta import prepare_chunk_layout

    return prepare_chunk_layout(cu_seqlens, seq_len)


def chunk_gated_delta_rule(q, k, v, g=None, beta=None, *, backend: str = "auto", a=None, A_log=None, dt_bias=None,
                           b=None, chunk_layout=None, **kwargs):
    """Chunked gated delta rule (fla's contract; see kernels/gated_delta). g/beta may be given raw as
    (a, A_log, dt_bias) and b, which our kernels fuse. `chunk_layout` (from `prepare_gdn_chunk_layout`) is used by
    the Triton backend and ignored by the others."""
    backend = resolve_backend(backend, q)
    if backend == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        g, beta = _gate_and_beta(g, beta, a, A_log, dt_bias, b)
        # As fla's own layer: the log decay stays fp32 (fla cumsums it; bf16 g loses ~0.4% per token), beta in the
        # activations' dtype.
        return fla_chunk(q, k, v, g.float(), beta.to(q.dtype), **kwargs)
    if backend == "triton":
        from hybridlm.kernels.gated_delta import chunk_gated_delta_rule as impl

        kwargs["chunk_layout"] = chunk_layout
    else:
        from hybridlm.kernels.gated_delta.reference import chunk_gated_delta_rule_ref as impl
    return impl(q, k, v, g=g, beta=beta, a=a, A_log=A_log, dt_bias=dt_bias, b=b, **kwargs)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, beta=None, *, backend: str = "auto", a=None, A_log=None,
                                     dt_bias=None, b=None, **kwargs):
    """Token-by-token gated delta rule against a state (decoding); same arguments as the chunked form."""
    backend = resolve_backend(backend, q)
    if backend == "fla":
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

        g, beta = _gate_and_beta(g, beta, a, A_log, dt_bias, b)
        # By name: fla's recurrent signature has gk and gv between g and beta.
        return fla_recurrent(q, k, v, g=g, beta=beta.to(q.dtype), **kwargs)
    if backend == "triton":
        from hybridlm.kernels.gated_delta import fused_recurrent_gated_delta_rule as impl
    else:
        from hybridlm.kernels.gated_delta.reference import fused_recurrent_gated_delta_rule_ref as impl
    return impl(q, k, v, g=g, beta=beta, a=a, A_log=A_log, dt_bias=dt_bias, b=b, **kwargs)


def sparse_moe(x, router_weight, gate_up, down, top_k, score_func="softmax", renormalize=True, selection_bias=None,
               *, return_loss_stats: bool = False, backend: str = "auto"):
    """The routed MoE path: router -> top-k -> SwiGLU experts -> weighted combine.
    Returns (y [T,H], router_logits [T,E] fp32, expert_counts [E]), and with `return_loss_stats` the router's
    `RouterLossStats` (per-token logsumexp, per-expert probability sums) fourth, for the z and balancing losses."""
    backend = resolve_backend(backend, x)
    if backend == "fla":
        raise ValueError("model.moe.backend='fla': fla has no MoE kernels; use 'auto', 'triton' or 'torch'")
    if backend == "triton":
        from hybridlm.kernels.moe import sparse_moe as impl
    else:
        from hybridlm.kernels.moe.reference import sparse_moe_ref as impl
    return impl(x, router_weight, gate_up, down, top_k, score_func=score_func, renormalize=renormalize,
                selection_bias=selection_bias, return_loss_stats=return_loss_stats)
