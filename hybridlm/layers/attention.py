"""Causal softmax attention: GQA, q/k RMSNorm, partial RoPE, optional sigmoid output gate and sliding window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import AttentionConfig
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.rope import RotaryEmbedding, apply_rotary


def attention_mask(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    q_segments: torch.Tensor | None,
    k_segments: torch.Tensor | None,
    window: int,
) -> torch.Tensor:
    """Boolean [B,1,Tq,Tk] mask: causal, inside one document, within the sliding window (0 = unbounded).
    Indices are absolute positions along the (flattened) row, not RoPE positions."""
    allowed = k_index[:, None, :] <= q_index[:, :, None]
    if window:
        allowed = allowed & (q_index[:, :, None] - k_index[:, None, :] < window)
    if q_segments is not None:
        allowed = allowed & (q_segments[:, :, None] == k_segments[:, None, :])
    return allowed[:, None]


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
        segment_ids: torch.Tensor | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x [B,T,H]; position_ids [B,T] restart at 0 per document (RoPE); segment_ids [B,T] keep documents apart.
        `cache` (decoding) holds "k", "v" [B,T_past,kv_heads,d] and "segment_ids"; it is updated in place."""
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

        past = 0 if cache is None or "k" not in cache else cache["k"].shape[1]
        q_index = torch.arange(past, past + T, device=x.device).expand(B, T)
        q_segments = k_segments = segment_ids
        if cache is not None:
            if past:
                k, v = torch.cat((cache["k"], k), dim=1), torch.cat((cache["v"], v), dim=1)
                if segment_ids is not None:
                    k_segments = torch.cat((cache["segment_ids"], segment_ids), dim=1)
            cache.update(k=k, v=v, segment_ids=k_segments)
        k_index = torch.arange(k.shape[1], device=x.device).expand(B, -1)
        # Plain causal attention needs no mask (SDPA picks its fused kernels); anything else gets an explicit one.
        plain_causal = segment_ids is None and not cfg.sliding_window and not past
        mask = None if plain_causal else attention_mask(q_index, k_index, q_segments, k_segments, cfg.sliding_window)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=plain_causal,
            enable_gqa=cfg.num_heads != cfg.num_kv_heads,
        )
        out = out.transpose(1, 2).reshape(B, T, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)
