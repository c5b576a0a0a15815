# Cites: Gated attention (arXiv 2505.06708), as transformers' qwen3_next/modeling_qwen3_next.py.
"""Causal softmax attention: GQA, q/k RMSNorm, partial RoPE, optional sigmoid output gate and sliding window.

Which keys a query sees is one rule (`visibility_rule`): not later than the query, inside the sliding window, and in
the same segment (document, or padding). Attention always runs per row [B,T]: packed documents never cross rows. The
model turns the rule into an `AttentionPattern` once per forward pass, shared by every attention layer:
- one document per row, no window: SDPA's `is_causal`, no mask (the flash kernel on CUDA);
- packed documents or a window, with the flex backend (auto on CUDA): FlexAttention with a block mask computed from
  block boundaries, so block pairs across documents or outside the window are skipped, never materialised;
- otherwise (CPU, padded batches): SDPA with a boolean mask [B,1,T,T] per row.
Decoding writes keys and values into buffers that grow geometrically and asks for a mask only when the rule needs
one: a single new token with no padding sees every cached key (with a window: the keys of the window, sliced).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right
from torch.nn.attention.flex_attention import BlockMask

from hybridlm.config import AttentionConfig
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.rope import RotaryEmbedding, apply_rotary
from hybridlm.ops import ATTENTION, attend

FLEX_BLOCK_SIZE = 128  # FlexAttention's sparse block; its kernels tile queries and keys by it


def visibility_rule(segment_ids: torch.Tensor | None, window: int) -> Callable[..., torch.Tensor]:
    """The attention rule as a FlexAttention `mask_mod(b, h, q, k) -> visible`. q and k are positions along a row
    (indices into the keys, not RoPE positions): k is visible from q when k <= q, q - k < `window` (0: unbounded) and
    both carry the same id in `segment_ids` [B, keys] (None: one segment)."""

    def rule(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx
        if window:
            visible = visible & (q_idx - kv_idx < window)
        if segment_ids is not None:
            visible = visible & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])
        return visible

    return rule


def dense_mask(
    segment_ids: torch.Tensor | None, window: int, q_index: torch.Tensor, k_index: torch.Tensor
) -> torch.Tensor:
    """`visibility_rule` at every (query, key) pair: bool [B or 1, 1, Tq, Tk] for SDPA (1 broadcasts over rows)."""
    rows = torch.arange(1 if segment_ids is None else segment_ids.shape[0], device=q_index.device)
    rule = visibility_rule(segment_ids, window)
    return rule(rows[:, None, None, None], 0, q_index[None, None, :, None], k_index[None, None, None, :])


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense block flags [B,1,Q_blocks,KV_blocks] -> BlockMask's (count per query block, key blocks listed first)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, order.to(torch.int32)


def document_block_mask(
    segment_ids: torch.Tensor | None,
    seq_len: int,
    window: int,
    device: torch.device,
    block_size: int = FLEX_BLOCK_SIZE,
) -> BlockMask:
    """FlexAttention's BlockMask for `visibility_rule` over rows of `seq_len` tokens, computed per pair of blocks from
    the block boundaries (cost B * (T / block)^2), not from a dense [B,T,T] mask. `segment_ids` [B,T] must never
    decrease along a row, as packed documents do. A block pair is empty (skipped), full (every pair visible; no
    mask_mod call) or partial (mask_mod decides per pair), exactly as `create_block_mask` classifies it."""
    starts = torch.arange(0, seq_len, block_size, device=device)
    ends = (starts + block_size).clamp(max=seq_len) - 1  # last position of each block
    whole = (ends - starts + 1) == block_size  # a cut last block is never full, as create_block_mask pads it
    q_first, q_last, k_first, k_last = starts[:, None], ends[:, None], starts[None, :], ends[None, :]
    # The visible pair closest in distance: the query block's first token and the latest key not after it.
    k_nearest = torch.minimum(k_last, q_first)
    nonempty = k_first <= q_last
    full = (k_last <= q_first) & whole[:, None] & whole[None, :]
    if window:
        nonempty = nonempty & (q_first - k_nearest < window)
        full = full & (q_last - k_first < window)
    if segment_ids is not None:
        # Segments never decrease along a row, so a block pair shares a document iff its closest pair does, and lies
        # inside one document iff its farthest pair (last query, first key) does.
        nonempty = nonempty & (segment_ids[:, k_nearest] == segment_ids[:, q_first])
        full = full & (segment_ids[:, k_first] == segment_ids[:, q_last])
    blocks = len(starts)
    full = full.reshape(-1, 1, blocks, blocks)  # [B or 1, 1, Q blocks, KV blocks]; 1 broadcasts over rows
    partial = nonempty.reshape(-1, 1, blocks, blocks) & ~full
    kv_num_blocks, kv_indices = _block_lists(partial)
    full_kv_num_blocks, full_kv_indices = _block_lists(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=block_size,
        mask_mod=visibility_rule(segment_ids, window),
        seq_lengths=(seq_len, seq_len),
    )


@dataclass
class AttentionPattern:
    """How every attention layer of one forward pass applies the rule; built once by the model. At most one of
    `is_causal`, `mask` and `block_mask` is set; none: every key is visible (one new token against a cache)."""

    is_causal: bool = False
    mask: torch.Tensor | CausalBias | None = None  # SDPA attn_mask: True (or the bias) where visible
    block_mask: BlockMask | None = None  # FlexAttention
    cached_tokens: int = 0  # decoding: keys in the cache before this call's tokens
    first_key: int = 0  # decoding: keys before this one are outside every query's window and are not read
    cache_capacity: int = 0  # decoding: tokens a newly allocated key/value buffer holds at least


def sequence_pattern(
    seq_len: int,
    device: torch.device,
    *,
    window: int,
    backend: str,
    segment_ids: torch.Tensor | None = None,
    sorted_segments: bool = False,
) -> AttentionPattern:
    """Whole rows, no cache (training, scoring). `segment_ids` [B,T]: None when each row is one document;
    `sorted_segments` when they never decrease along a row (packing), which the flex block mask needs."""
    if segment_ids is None and not window:
        return AttentionPattern(is_causal=True)
    if ATTENTION.resolve(backend, device) == "flex" and (segment_ids is None or sorted_segments):
        return AttentionPattern(block_mask=document_block_mask(segment_ids, seq_len, window, device, FLEX_BLOCK_SIZE))
    index = torch.arange(seq_len, device=device)
    return AttentionPattern(mask=dense_mask(segment_ids, window, index, index))


def cached_pattern(
    cached_tokens: int,
    new_tokens: int,
    device: torch.device,
    *,
    window: int,
    key_segments: torch.Tensor | None = None,
    cache_capacity: int = 0,
) -> AttentionPattern:
    """Decoding: `new_tokens` queries after `cached_tokens` cached keys. `key_segments` [B, keys] (0: padding,
    1: token) once the batch has padding, else None."""
    keys = cached_tokens + new_tokens
    first_key = max(0, cached_tokens - window + 1) if window else 0  # the earliest key the first query may see
    cache_fields = dict(cached_tokens=cached_tokens, first_key=first_key, cache_capacity=cache_capacity)
    window_binds = window and keys - first_key > window
    if key_segments is None and not window_binds:
        if new_tokens == 1:
            return AttentionPattern(**cache_fields)
        if cached_tokens == first_key:
            return AttentionPattern(is_causal=True, **cache_fields)
        return AttentionPattern(mask=causal_lower_right(new_tokens, keys - first_key), **cache_fields)  # chunked prefill
    q_index, k_index = torch.arange(cached_tokens, keys, device=device), torch.arange(first_key, keys, device=device)
    return AttentionPattern(mask=dense_mask(key_segments, window, q_index, k_index), **cache_fields)


def append_along(
    buffer: torch.Tensor | None, length: int, new: torch.Tensor, dim: int, capacity: int = 0
) -> torch.Tensor:
    """Write `new` after the first `length` entries of `buffer` along `dim`. A full buffer is replaced by one of
    at least twice the size (and at least `capacity`), so appending token by token copies each entry O(1) times."""
    needed = length + new.shape[dim]
    if buffer is None or buffer.shape[dim] < needed:
        size = max(needed, capacity, 2 * buffer.shape[dim] if buffer is not None else 0)
        shape = list(new.shape)
        shape[dim] = size
        grown = new.new_empty(shape)
        if buffer is not None and length:
            grown.narrow(dim, 0, length).copy_(buffer.narrow(dim, 0, length))
        buffer = grown
    buffer.narrow(dim, length, new.shape[dim]).copy_(new)
    return buffer


class Attention(nn.Module):
    def __init__(self, hidden_size: int, cfg: AttentionConfig, norm_eps: float, zero_centered_norm: bool):
        super().__init__()
        self.cfg = cfg
        d, heads, kv_heads = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        # With the output gate, each head's query row block is followed by its gate block (Qwen3-Next layout).
        self.q_proj = nn.Linear(hidden_size, heads * d * (2 if cfg.output_gate else 1), bias=cfg.bias)
        self.k_proj = nn.Linear(hidden_size, kv_heads * d, bias=cfg.bias)
        self.v_proj = nn.Linear(hidden_size, kv_heads * d, bias=cfg.bias)
        self.o_proj = nn.Linear(heads * d, hidden_size, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, norm_eps, zero_centered_norm)
            self.k_norm = RMSNorm(d, norm_eps, zero_centered_norm)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        pattern: AttentionPattern,
        cache: dict | None = None,
        context=None,
    ) -> torch.Tensor:
        """x [B,T,H]; position_ids [B,T] for RoPE (restarting at 0 per document); `pattern` says which keys each
        query sees. `cache` (decoding) holds "k" and "v" buffers [B,kv_heads,capacity,d]; the first
        `pattern.cached_tokens` positions are filled, and this call's keys and values are written after them.
        `context` (a hybridlm.parallel.context.ContextShard: x is this rank's slice of each row, position_ids global)
        attends to the keys and values of the shards up to this one."""
        cfg = self.cfg
        B, T, _ = x.shape
        d = cfg.head_dim
        q = self.q_proj(x).view(B, T, cfg.num_heads, -1)
        gate = None
        if cfg.output_gate:
            q, gate = q.split(d, dim=-1)
            gate = gate.reshape(B, T, -1)
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, d)
        v = self.v_proj(x).view(B, T, cfg.num_kv_heads, d)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary(position_ids)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        if cache is not None:
            past, capacity = pattern.cached_tokens, pattern.cache_capacity
            cache["k"] = append_along(cache.get("k"), past, k, dim=2, capacity=capacity)
            cache["v"] = append_along(cache.get("v"), past, v, dim=2, capacity=capacity)
            k = cache["k"][:, :, pattern.first_key : past + T]
            v = cache["v"][:, :, pattern.first_key : past + T]
        if context is not None:
            from hybridlm.parallel.context import gather_keys_values

            k, v = gather_keys_values(k, v, context)
        out = attend(q, k, v, pattern).transpose(1, 2).reshape(B, T, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)
