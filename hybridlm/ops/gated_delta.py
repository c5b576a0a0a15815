"""The gated delta rule's backends (fla's contract: see kernels/gated_delta): our Triton kernels, fla's, and the
plain PyTorch reference. Each takes g/beta either ready or raw as (a, A_log, dt_bias) and b."""

from __future__ import annotations

import torch

from hybridlm.ops.registry import GATED_DELTA


class _NoChunkLayout:
    @staticmethod
    def chunk_layout(cu_seqlens, seq_len: int):
        return None


@GATED_DELTA.register("triton")
class TritonGatedDelta:
    """hybridlm.kernels.gated_delta: fuses the gate and beta, and takes a chunk layout built once per batch."""

    @staticmethod
    def chunk_layout(cu_seqlens, seq_len: int):
        from hybridlm.kernels.gated_delta import prepare_chunk_layout

        return prepare_chunk_layout(cu_seqlens, seq_len)

    @staticmethod
    def chunk(q, k, v, chunk_layout=None, **kwargs):
        from hybridlm.kernels.gated_delta import chunk_gated_delta_rule

        return chunk_gated_delta_rule(q, k, v, chunk_layout=chunk_layout, **kwargs)

    @staticmethod
    def recurrent(q, k, v, **kwargs):
        from hybridlm.kernels.gated_delta import fused_recurrent_gated_delta_rule

        return fused_recurrent_gated_delta_rule(q, k, v, **kwargs)


def _gate_and_beta(g, beta, a, A_log, dt_bias, b):
    """g = -exp(A_log) * softplus(a + dt_bias) (dt_bias optional) and beta = sigmoid(b), in fp32, for backends
    without the fused form (fla)."""
    if g is None:
        from hybridlm.kernels.gated_delta.inputs import gate_from_raw

        g = gate_from_raw(a, A_log, dt_bias, torch.float32)
    if beta is None:
        beta = b.float().sigmoid()
    return g, beta


@GATED_DELTA.register("fla", requires="fla")
class FlaGatedDelta(_NoChunkLayout):
    """flash-linear-attention's kernels; the gate and beta are computed in PyTorch first."""

    @staticmethod
    def chunk(q, k, v, g=None, beta=None, *, a=None, A_log=None, dt_bias=None, b=None, chunk_layout=None, **kwargs):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        g, beta = _gate_and_beta(g, beta, a, A_log, dt_bias, b)
        # As fla's own layer: the log decay stays fp32 (fla cumsums it; bf16 g loses ~0.4% per token), beta in the
        # activations' dtype.
        return chunk_gated_delta_rule(q, k, v, g.float(), beta.to(q.dtype), **kwargs)

    @staticmethod
    def recurrent(q, k, v, g=None, beta=None, *, a=None, A_log=None, dt_bias=None, b=None, **kwargs):
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        g, beta = _gate_and_beta(g, beta, a, A_log, dt_bias, b)
        # By name: fla's recurrent signature has gk and gv between g and beta.
        return fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta.to(q.dtype), **kwargs)


@GATED_DELTA.register("torch")
class TorchGatedDelta(_NoChunkLayout):
    """kernels/gated_delta/reference.py: any device and dtype; the CPU path."""

    @staticmethod
    def chunk(q, k, v, chunk_layout=None, **kwargs):
        from hybridlm.kernels.gated_delta.reference import chunk_gated_delta_rule_ref

        return chunk_gated_delta_rule_ref(q, k, v, **kwargs)

    @staticmethod
    def recurrent(q, k, v, **kwargs):
        from hybridlm.kernels.gated_delta.reference import fused_recurrent_gated_delta_rule_ref

        return fused_recurrent_gated_delta_rule_ref(q, k, v, **kwargs)


def prepare_gdn_chunk_layout(cu_seqlens, seq_len: int, *, backend: str = "auto"):
    """The chunk layout of packed documents for `chunk_gated_delta_rule(..., chunk_layout=)`, built once per batch
    (one host sync, instead of one per call); None when the backend needs none (torch, fla) or cu_seqlens is None."""
    if cu_seqlens is None:
        return None
    return GATED_DELTA.implementation(backend, cu_seqlens.device).chunk_layout(cu_seqlens, seq_len)


def chunk_gated_delta_rule(q, k, v, g=None, beta=None, *, backend: str = "auto", **kwargs):
    """Chunked gated delta rule (fla's contract; see kernels/gated_delta). g/beta may be given raw as
    (a=, A_log=, dt_bias=) and b=, which our kernels fuse. `chunk_layout=` (from `prepare_gdn_chunk_layout`) is used
    by the Triton backend and ignored by the others."""
    return GATED_DELTA.implementation(backend, q.device).chunk(q, k, v, g=g, beta=beta, **kwargs)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, beta=None, *, backend: str = "auto", **kwargs):
    """Token-by-token gated delta rule against a state (decoding); same arguments as the chunked form."""
    return GATED_DELTA.implementation(backend, q.device).recurrent(q, k, v, g=g, beta=beta, **kwargs)
