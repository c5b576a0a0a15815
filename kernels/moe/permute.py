# Cites: dropless MoE permutation (MegaBlocks, arXiv 2211.15841): (token, slot) pairs sorted by expert.
"""Sync-free permutation of the T*k (token, slot) pairs into expert-contiguous order.

Pairs are cut into blocks of BLOCK pairs. Pass 1 counts each block's pairs per expert; a prefix sum over
(expert, block) gives where each block's run of each expert starts; pass 2 ranks each pair inside its block
(a cumulative sum of its one-hot expert row) and writes its position. The result equals a stable sort by
expert: pairs of one expert stay in token order. No atomics, no host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Permutation(NamedTuple):
    sorted_to_pair: torch.Tensor  # [T*k] int32: pair index (token * k + slot) at each expert-sorted row
    pair_to_sorted: torch.Tensor  # [T*k] int32: expert-sorted row of each pair
    expert_counts: torch.Tensor  # [E] int32: pairs routed to each expert


@triton.jit
def _block_histogram_kernel(ids_ptr, hist_ptr, num_pairs, num_experts, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    pairs = block * BLOCK + tl.arange(0, BLOCK)
    experts = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=E_PAD)  # padding matches no expert
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(hist_ptr + block * num_experts + experts, tl.sum(one_hot, axis=0), mask=experts < num_experts)


@triton.jit
def _block_scatter_kernel(
    ids_ptr, run_start_ptr, pair_to_sorted_ptr, sorted_to_pair_ptr, num_pairs, num_experts,
    E_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    pairs = block * BLOCK + tl.arange(0, BLOCK)
    pair_mask = pairs < num_pairs
    experts = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + pairs, mask=pair_mask, other=E_PAD)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
    rank_in_block = tl.sum(one_hot * tl.cumsum(one_hot, axis=0), axis=1) - 1
    run_start = tl.load(run_start_ptr + block * num_experts + ids, mask=pair_mask, other=0)
    position = run_start + rank_in_block
    tl.store(pair_to_sorted_ptr + pairs, position, mask=pair_mask)
    tl.store(sorted_to_pair_ptr + position, pairs, mask=pair_mask)


def _block_size(num_experts: int) -> tuple[int, int]:
    """(E padded to a power of two, pairs per block) keeping a block's one-hot tile near 16K values."""
    e_pad = triton.next_power_of_2(num_experts)
    return e_pad, max(16, min(1024, 16384 // e_pad))


def permute_by_expert(expert_ids: torch.Tensor, num_experts: int) -> Permutation:
    """Expert-contiguous order of the pairs in `expert_ids [T,k]` (int32), computed on the device."""
    flat_ids = expert_ids.contiguous().view(-1)
    num_pairs = flat_ids.numel()
    e_pad, block = _block_size(num_experts)
    num_blocks = max(1, triton.cdiv(num_pairs, block))
    hist = torch.empty(num_blocks, num_experts, dtype=torch.int32, device=flat_ids.device)
    _block_histogram_kernel[(num_blocks,)](flat_ids, hist, num_pairs, num_experts, E_PAD=e_pad, BLOCK=block)
    expert_counts = hist.sum(dim=0, dtype=torch.int32)
    expert_starts = expert_counts.cumsum(0, dtype=torch.int32) - expert_counts
    run_start = (expert_starts[None, :] + hist.cumsum(0, dtype=torch.int32) - hist).contiguous()
    pair_to_sorted = torch.empty(num_pairs, dtype=torch.int32, device=flat_ids.device)
    sorted_to_pair = torch.empty_like(pair_to_sorted)
    _block_scatter_kernel[(num_blocks,)](
        flat_ids, run_start, pair_to_sorted, sorted_to_pair, num_pairs, num_experts, E_PAD=e_pad, BLOCK=block
    )
    return Permutation(sorted_to_pair, pair_to_sorted, expert_counts)
