# Cites: zero-centred and gated RMSNorm as transformers' qwen3_next/modeling_qwen3_next.py.
"""RMSNorm variants used by the stack."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. `zero_centered` scales by (1 + w) with w starting at 0 (Qwen3-Next), which keeps
    weight decay from pulling the scale towards zero."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        scale = 1.0 + self.weight.float() if self.zero_centered else self.weight.float()
        return (normed * scale).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.zero_centered else nn.init.ones_(self.weight)


class RMSNormGated(nn.Module):
    """Output norm of the Gated DeltaNet mixer: RMSNorm(x) * w * SiLU(gate), per value head."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        # Round to the input dtype before the gate, as Qwen3-Next does, so exports match bit for bit in bf16 too.
        normed = self.weight * normed.to(x.dtype)
        return (normed.float() * F.silu(gate.float())).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
