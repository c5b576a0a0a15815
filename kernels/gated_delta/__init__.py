"""Gated delta rule (Gated DeltaNet's linear-attention recurrence): Triton kernels and plain PyTorch references.

Triton itself imports on any machine; the kernels run on CUDA, or on CPU when TRITON_INTERPRET=1 was set before
triton was first imported. The references run anywhere.
"""

if not __name__.startswith("hybridlm.kernels."):
    # Reached as a top-level `kernels.*` through the repository root on sys.path: that name is Hugging Face's.
    raise ImportError(f"import this package as hybridlm.kernels.{__name__.rsplit('.', 1)[-1]}, not as {__name__}")


from .chunk import ChunkLayout, chunk_gated_delta_rule, prepare_chunk_layout
from .recurrent import fused_recurrent_gated_delta_rule
from .reference import (
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule_ref,
    naive_recurrent_gated_delta_rule,
)

__all__ = [
    "ChunkLayout",
    "chunk_gated_delta_rule",
    "prepare_chunk_layout",
    "fused_recurrent_gated_delta_rule",
    "chunk_gated_delta_rule_ref",
    "fused_recurrent_gated_delta_rule_ref",
    "naive_recurrent_gated_delta_rule",
]
