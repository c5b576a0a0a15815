"""The token layout of a forward: where documents start, RoPE positions and the attention pattern.

Packed batches: `cu_seqlens` marks where each document starts over the flattened B*T tokens, and documents never cross
rows. The Gated DeltaNet and conv mixers run over the flattened row and restart at each document; attention runs per
row with the document-causal pattern built once per forward (see hybridlm.layers.attention). No state, convolution or
attention crosses a document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.layers.attention import AttentionPattern, sequence_pattern


@dataclass
class TokenLayout:
    """Where documents start and which keys attention sees, built once per forward and shared by every block."""

    position_ids: torch.Tensor  # [B,T] RoPE positions, restarting at 0 per document
    attention: AttentionPattern
    cu_seqlens: torch.Tensor | None = None  # [N+1] documents over the flattened B*T tokens (GDN and conv)
    position_in_doc: torch.Tensor | None = None  # [1,B*T] 0 at each document start, over the flattened tokens
    gdn_chunk_layout: object | None = None  # the GDN kernels' chunk list of cu_seqlens (ops.prepare_gdn_chunk_layout)
    padding_mask: torch.Tensor | None = None  # [B,T] 1 for tokens, 0 for left padding (batched generation)
    context: object | None = None  # hybridlm.parallel.context.ContextShard: B rows of T/CP tokens, this rank's slice


def check_packed_rows(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> None:
    """cu_seqlens must rise strictly from 0 to batch * seq_len and contain every row start: attention runs per row,
    so a document may not continue into the next row (the packer starts a new segment there)."""
    total = batch * seq_len
    bounds = cu_seqlens.to(torch.int64)
    shape_ok = bounds.ndim == 1 and bounds.numel() >= batch + 1
    if shape_ok:
        row_starts = torch.arange(0, total, seq_len, device=bounds.device)
        valid = (bounds[0] == 0) & (bounds[-1] == total) & (bounds.diff() > 0).all()
        valid = valid & torch.isin(row_starts, bounds).all()
    if not shape_ok or not bool(valid):
        raise ValueError(
            f"cu_seqlens={bounds.tolist()} must rise strictly from 0 to B*T={total} and contain every row start "
            f"(a multiple of T={seq_len}): documents never cross rows; build batches with hybridlm.data.packing.collate"
        )


def packed_layout(cu_seqlens: torch.Tensor, batch: int, seq_len: int, cfg: ModelConfig) -> TokenLayout:
    """Segment ids, in-document positions, attention pattern and GDN chunk list of `batch` packed rows of `seq_len`
    tokens."""
    check_packed_rows(cu_seqlens, batch, seq_len)
    device = cu_seqlens.device
    attn = dict(window=cfg.attention.sliding_window, backend=cfg.attention.backend)
    if cu_seqlens.numel() == batch + 1:  # only the row starts: each row is one document, a plain batch
        position_ids = torch.arange(seq_len, device=device).expand(batch, seq_len)
        return TokenLayout(position_ids=position_ids, attention=sequence_pattern(seq_len, device, **attn))
    total = batch * seq_len
    bounds = cu_seqlens.to(torch.int64)
    index = torch.arange(total, device=device)
    segment_ids = torch.searchsorted(bounds[1:], index, right=True)
    position_in_doc = index - bounds[segment_ids]
    position_ids = position_in_doc.view(batch, seq_len)
    attention = sequence_pattern(seq_len, device, segment_ids=segment_ids.view(batch, seq_len),
                                 sorted_segments=True, **attn)
    chunk_layout = None
    if "gated_deltanet" in cfg.layer_types:
        chunk_layout = ops.prepare_gdn_chunk_layout(cu_seqlens, total, backend=cfg.gdn.backend)
    return TokenLayout(position_ids=position_ids, attention=attention, cu_seqlens=cu_seqlens,
                       position_in_doc=position_in_doc[None], gdn_chunk_layout=chunk_layout)
