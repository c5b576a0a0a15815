"""The routed MoE's backends: our Triton kernels (kernels/moe) and the plain PyTorch reference; fla has none."""

from __future__ import annotations

from hybridlm.ops.registry import MOE


@MOE.register("triton")
def _triton_sparse_moe(*args, **kwargs):
    from hybridlm.kernels.moe import sparse_moe

    return sparse_moe(*args, **kwargs)


@MOE.register("torch")
def _torch_sparse_moe(*args, **kwargs):
    from hybridlm.kernels.moe.reference import sparse_moe_ref

    return sparse_moe_ref(*args, **kwargs)


def sparse_moe(x, router_weight, gate_up, down, top_k, score_func="softmax", renormalize=True, selection_bias=None,
               *, backend: str = "auto"):
    """The routed MoE path: router -> top-k -> SwiGLU experts -> weighted combine, as a `SparseMoEOutput`
    (y [T,H], router_logits [T,E] fp32, expert_counts [E], the router's loss stats)."""
    return MOE.implementation(backend, x.device)(x, router_weight, gate_up, down, top_k, score_func=score_func,
                                                 renormalize=renormalize, selection_bias=selection_bias)
