"""Attention's backends: SDPA (causal flag or boolean mask) and FlexAttention (block mask). `auto` is flex on CUDA,
where its block mask skips block pairs across documents; the model builds the pattern for the resolved backend
(layers/attention.py: `sequence_pattern`), and `attend` runs the kernel that pattern was built for."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from hybridlm.ops.registry import ATTENTION

if TYPE_CHECKING:
    from hybridlm.layers.attention import AttentionPattern


@functools.cache
def compiled_flex_attention():
    # Compiled once per process, on first use: eager flex_attention materialises the full score matrix.
    return torch.compile(flex_attention)


@ATTENTION.register("flex")
def _flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    return compiled_flex_attention()(q, k, v, block_mask=pattern.block_mask, enable_gqa=q.shape[1] != k.shape[1])


@ATTENTION.register("sdpa")
def _sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    B, H, Tq, d = q.shape
    if gqa and Tq == 1 and isinstance(pattern.mask, torch.Tensor):
        # One query per row: fold each KV head's query heads into the query axis, so the masked call needs neither
        # GQA support (CUDA's mask-capable kernel has none) nor repeated keys.
        folded = q.reshape(B, k.shape[1], H // k.shape[1], d)
        return F.scaled_dot_product_attention(folded, k, v, attn_mask=pattern.mask).reshape(B, H, 1, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask, is_causal=pattern.is_causal, enable_gqa=gqa)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    """q [B,H,Tq,d], k and v [B,H_kv,Tk,d] -> [B,H,Tq,d], by the backend `pattern` was built for (a block mask:
    flex; else SDPA)."""
    backend = "flex" if pattern.block_mask is not None else "sdpa"
    return ATTENTION.implementation(backend, q.device)(q, k, v, pattern)
