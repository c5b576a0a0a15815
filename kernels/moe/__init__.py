"""Sparse MoE routed path: router, permutation, grouped SwiGLU experts, weighted combine.

`sparse_moe_ref` / `route_ref`: plain PyTorch, any device and dtype (the CPU path).
`sparse_moe` / `route`: the Triton kernels (CUDA, or the CPU interpreter under TRITON_INTERPRET=1); imported on
first use so that importing this package never needs triton to be set up.
"""

if not __name__.startswith("hybridlm.kernels."):
    # Reached as a top-level `kernels.*` through the repository root on sys.path: that name is Hugging Face's.
    raise ImportError(f"import this package as hybridlm.kernels.{__name__.rsplit('.', 1)[-1]}, not as {__name__}")


from .reference import RouterLossStats, RouterOutput, SparseMoEOutput, route_ref, sparse_moe_ref

_TRITON_EXPORTS = ("sparse_moe", "route")

__all__ = ["RouterLossStats", "RouterOutput", "SparseMoEOutput", "route", "route_ref", "sparse_moe", "sparse_moe_ref"]


def __getattr__(name: str):
    if name in _TRITON_EXPORTS:
        from . import routed

        return getattr(routed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
