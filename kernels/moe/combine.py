# Cites: dropless MoE combine (MegaBlocks, arXiv 2211.15841): gather each token's k expert rows, weight and sum.
"""Inverse permutation with the weighted top-k combine, and the routing-weight gradient.

Each token reads its k expert-sorted rows and sums them in slot order in fp32: a gather, not a scatter,
so no atomics and bitwise-reproducible results.

The routing-weight gradient dL/dw[t, s] = <dy[t], out_e(x[t])> is taken as <down_e^T dy[t], act> = <d(up), up>
(d(act)_i act_i = d(act)_i silu(gate_i) up_i = d(up)_i up_i), from the unweighted SwiGLU backward and the saved
pre-activation: [T*k, I] reads instead of keeping the expert outputs [T*k, H] for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_TOKENS = 16


def _block_hidden(hidden: int) -> int:
    return min(triton.next_power_of_2(hidden), 256)


@triton.jit
def _combine_kernel(
    rows_ptr, pair_to_sorted_ptr, weights_ptr, out_ptr, num_tokens, hidden,
    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < num_tokens
    mask = token_mask[:, None] & (cols < hidden)[None, :]
    pairs = tokens.to(tl.int64) * TOP_K
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for slot in range(TOP_K):
        rows = tl.load(pair_to_sorted_ptr + pairs + slot, mask=token_mask, other=0).to(tl.int64)
        values = tl.load(rows_ptr + rows[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            values *= tl.load(weights_ptr + pairs + slot, mask=token_mask, other=0.0)[:, None]
        acc += values
    out_ptrs = out_ptr + tokens[:, None].to(tl.int64) * hidden + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _routing_weight_grad_kernel(
    d_pre_ptr, pre_ptr, pair_to_sorted_ptr, dweights_ptr, num_pairs, intermediate,
    BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pair_mask = pairs < num_pairs
    rows = tl.load(pair_to_sorted_ptr + pairs, mask=pair_mask, other=0).to(tl.int64)
    up_offsets = rows[:, None] * (2 * intermediate) + intermediate  # the up half of [gate | up]
    cols = tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_P,), tl.float32)
    for i0 in range(0, intermediate, BLOCK_I):
        mask = pair_mask[:, None] & (cols < intermediate - i0)[None, :]
        d_up = tl.load(d_pre_ptr + up_offsets + i0 + cols[None, :], mask=mask, other=0.0)
        up = tl.load(pre_ptr + up_offsets + i0 + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(d_up.to(tl.float32) * up.to(tl.float32), axis=1)
    tl.store(dweights_ptr + pairs, acc, mask=pair_mask)


def combine(
    rows: torch.Tensor, pair_to_sorted: torch.Tensor, top_k: int, weights: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[t] = sum_s weights[t, s] * rows[pair_to_sorted[t*k + s]] (weights = 1 when None); [T, H]."""
    num_tokens, hidden = pair_to_sorted.numel() // top_k, rows.shape[1]
    out = rows.new_empty(num_tokens, hidden, dtype=out_dtype)
    block_h = _block_hidden(hidden)
    grid = (triton.cdiv(num_tokens, BLOCK_TOKENS), triton.cdiv(hidden, block_h))
    if num_tokens:
        _combine_kernel[grid](
            rows, pair_to_sorted, weights if weights is not None else rows, out, num_tokens, hidden,
            TOP_K=top_k, HAS_WEIGHTS=weights is not None, BLOCK_T=BLOCK_TOKENS, BLOCK_H=block_h,
        )  # fmt: skip
    return out


def swiglu_routing_weight_grad(
    d_pre_unweighted: torch.Tensor, pre_activation: torch.Tensor, pair_to_sorted: torch.Tensor, top_k: int
) -> torch.Tensor:
    """dweights [T, k] fp32 in (token, slot) order: <d(up), up> of each pair's sorted row, from the SwiGLU backward
    of the unweighted expert output `d_pre_unweighted` [T*k, 2I] and the `pre_activation` [T*k, 2I]."""
    num_pairs, intermediate = pair_to_sorted.numel(), pre_activation.shape[1] // 2
    dweights = torch.empty(num_pairs, dtype=torch.float32, device=pre_activation.device)
    if num_pairs:
        _routing_weight_grad_kernel[(triton.cdiv(num_pairs, BLOCK_TOKENS),)](
            d_pre_unweighted, pre_activation, pair_to_sorted, dweights, num_pairs, intermediate,
            BLOCK_P=BLOCK_TOKENS, BLOCK_I=_block_hidden(intermediate),
        )  # fmt: skip
    return dweights.view(-1, top_k)
