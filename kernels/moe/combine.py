"""Inverse permutation with the weighted top-k combine, and its weight gradient.

Each token reads its k expert-sorted rows and sums them in slot order in fp32: a gather, not a scatter,
so no atomics and bitwise-reproducible results.
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
def _combine_weight_grad_kernel(
    rows_ptr, pair_to_sorted_ptr, dout_ptr, dweights_ptr, num_tokens, hidden,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    pairs = tokens.to(tl.int64) * TOP_K
    cols = tl.arange(0, BLOCK_H)
    for slot in range(TOP_K):
        rows = tl.load(pair_to_sorted_ptr + pairs + slot, mask=token_mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_T,), tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            mask = token_mask[:, None] & (cols < hidden - h0)[None, :]
            dout = tl.load(dout_ptr + tokens[:, None].to(tl.int64) * hidden + h0 + cols[None, :], mask=mask, other=0.0)
            values = tl.load(rows_ptr + rows[:, None] * hidden + h0 + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(dout.to(tl.float32) * values.to(tl.float32), axis=1)
        tl.store(dweights_ptr + pairs + slot, acc, mask=token_mask)


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


def combine_weight_grad(
    rows: torch.Tensor, pair_to_sorted: torch.Tensor, top_k: int, dout: torch.Tensor
) -> torch.Tensor:
    """dweights[t, s] = <dout[t], rows[pair_to_sorted[t*k + s]]> in fp32; [T, k]."""
    num_tokens, hidden = dout.shape
    dweights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=dout.device)
    if num_tokens:
        _combine_weight_grad_kernel[(triton.cdiv(num_tokens, BLOCK_TOKENS),)](
            rows, pair_to_sorted, dout, dweights, num_tokens, hidden,
            TOP_K=top_k, BLOCK_T=BLOCK_TOKENS, BLOCK_H=_block_hidden(hidden),
        )  # fmt: skip
    return dweights
