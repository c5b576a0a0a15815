"""The dispatch seam: one call per op, and the implementation is picked per call from that op's backend registry
(`registry.py`: GATED_DELTA, MOE, ATTENTION), where each backend module registers its implementations.

`backend="auto"` takes our Triton kernels (FlexAttention for attention) for CUDA tensors and the plain PyTorch
reference (SDPA) for CPU tensors; a name forces one. Layers call only these functions, so a new backend is one
registered implementation, and the config accepts it from then on.
"""

from hybridlm.ops.attention import attend
from hybridlm.ops.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, prepare_gdn_chunk_layout
from hybridlm.ops.moe import sparse_moe
from hybridlm.ops.registry import ATTENTION, GATED_DELTA, MOE, BackendRegistry

__all__ = ["ATTENTION", "GATED_DELTA", "MOE", "BackendRegistry", "attend", "chunk_gated_delta_rule",
           "fused_recurrent_gated_delta_rule", "prepare_gdn_chunk_layout", "sparse_moe"]
