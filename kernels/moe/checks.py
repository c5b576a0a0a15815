"""Input validation shared by every implementation of the `sparse_moe` / `route` contract.

Every check runs before any work starts and names the bad value and the fix.
"""

from __future__ import annotations

import torch

SCORE_FUNCS = ("softmax", "sigmoid")


def check_router_inputs(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    score_func: str,
    selection_bias: torch.Tensor | None,
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H] (flatten batch and sequence first), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if router_weight.dim() != 2 or router_weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"router_weight must be [E, H] with H = x.shape[1] = {x.shape[1]}, got shape {tuple(router_weight.shape)}"
        )
    if not router_weight.is_floating_point():
        raise TypeError(f"router_weight must be a floating-point tensor, got dtype {router_weight.dtype}")
    num_experts = router_weight.shape[0]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E={num_experts}], got {top_k!r}")
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if selection_bias is not None:
        if selection_bias.shape != (num_experts,):
            raise ValueError(
                f"selection_bias must have shape [E] = ({num_experts},), got {tuple(selection_bias.shape)}"
            )
        if not selection_bias.is_floating_point():
            raise TypeError(f"selection_bias must be a floating-point tensor, got dtype {selection_bias.dtype}")
    for name, tensor in (("router_weight", router_weight), ("selection_bias", selection_bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}: move both to one device")


def check_sparse_moe_inputs(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    score_func: str,
    selection_bias: torch.Tensor | None,
) -> None:
    check_router_inputs(x, router_weight, top_k, score_func, selection_bias)
    num_experts, hidden = router_weight.shape
    if gate_up.dim() != 3 or gate_up.shape[0] != num_experts or gate_up.shape[2] != hidden or gate_up.shape[1] % 2:
        raise ValueError(
            f"gate_up must be [E, 2*I, H] = [{num_experts}, 2*I, {hidden}] (gate rows, then up rows), "
            f"got shape {tuple(gate_up.shape)}"
        )
    intermediate = gate_up.shape[1] // 2
    if down.shape != (num_experts, hidden, intermediate):
        raise ValueError(
            f"down must be [E, H, I] = [{num_experts}, {hidden}, {intermediate}] to match gate_up, "
            f"got shape {tuple(down.shape)}"
        )
    for name, tensor in (("gate_up", gate_up), ("down", down)):
        if tensor.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but x has {x.dtype}: cast the expert weights to x's dtype"
            )
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}: move both to one device")
