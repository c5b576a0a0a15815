"""The chunked linear cross-entropy of the LM head, and the label it ignores.

Only one chunk of logits (tokens x vocabulary) exists at a time, so [B,T,V] fp32 logits are never built for the loss;
the gradients are computed in the same pass (Liger-Kernel's fused linear cross-entropy computes them the same way,
linkedin/Liger-Kernel src/liger_kernel/ops/fused_linear_cross_entropy.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Targets with this label are not trained (PyTorch's and transformers' default ignore_index); every data source writes it.
IGNORE_INDEX = -100
# The loss computes logits this many at a time (tokens x vocabulary), so [B,T,V] fp32 logits never exist at once.
LOSS_CHUNK_LOGITS = 1 << 24


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` (see `linear_cross_entropy`). The gradients (softmax minus
    one-hot, times the inputs) are computed chunk by chunk in forward, so backward needs neither the logits nor a
    recompute."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        total, grad_hidden, grad_weight = _chunked_cross_entropy(
            hidden, weight, targets, chunk_tokens, *ctx.needs_input_grad[:2]
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_total.to(grad_weight.dtype),
            None,
            None,
        )


def _chunked_cross_entropy(hidden, weight, targets, chunk_tokens, want_grad_hidden, want_grad_weight):
    loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
    total = hidden.new_zeros((), dtype=loss_dtype)
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if want_grad_weight else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        logits = F.linear(h, weight).to(loss_dtype)
        total = total + F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
        if not (want_grad_hidden or want_grad_weight):
            continue
        valid = (t != IGNORE_INDEX)[:, None]
        grad_logits = logits.softmax(dim=-1)
        grad_logits.scatter_add_(1, t.clamp(min=0)[:, None], -valid.to(loss_dtype))
        # In the model dtype, as autograd would hand it to the matmul's backward.
        grad_logits = (grad_logits * valid).to(hidden.dtype)
        if want_grad_hidden:
            grad_hidden[start : start + chunk_tokens] = grad_logits @ weight
        if want_grad_weight:
            grad_weight += (grad_logits.T @ h).to(loss_dtype)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return total, grad_hidden, grad_weight


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight.T, targets), in fp32 (or wider), ignoring IGNORE_INDEX;
    hidden [N,H], weight [V,H], targets [N]. Only one chunk's logits exist at a time."""
    chunk_tokens = max(1, LOSS_CHUNK_LOGITS // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
    return _chunked_cross_entropy(hidden, weight, targets, chunk_tokens, False, False)[0]
