# Cites: the short causal convolution of Gated DeltaNet (arXiv 2412.06464).
"""Depthwise causal short convolution that never mixes tokens of different documents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """Depthwise causal conv1d + SiLU over channels. Weight layout [C, 1, K] as `nn.Conv1d(groups=C)`:
    out[t] = sum_i w[:, 0, i] * x[t - (K - 1) + i]."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default for a depthwise kernel: fan_in = kernel_size.
        bound = 1.0 / self.kernel_size**0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        position_in_doc: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,C]. `position_in_doc` [B,T] (0 at each document start) zeroes the taps that would reach into the
        previous document. `state` [B,C,K-1] holds the inputs before x (decode); returns (y [B,T,C], new state)."""
        B, T, C = x.shape
        K = self.kernel_size
        history = state.to(x.dtype) if state is not None else x.new_zeros(B, C, K - 1)
        padded = torch.cat((history, x.transpose(1, 2)), dim=-1)  # [B, C, K-1+T]
        if position_in_doc is None:
            y = F.conv1d(padded, self.weight, groups=C)
        else:
            # Tap lag j reads x[t - j]; it is valid only while t - j stays inside the same document.
            w = self.weight[:, 0, :]  # [C, K]
            y = padded.new_zeros(B, C, T)
            for lag in range(K):
                tap = padded[:, :, K - 1 - lag : K - 1 - lag + T]
                valid = (position_in_doc >= lag).to(x.dtype)[:, None, :]
                y = y + w[:, K - 1 - lag, None] * tap * valid
        new_state = padded[:, :, -(K - 1) :] if K > 1 else padded[:, :, :0]
        return F.silu(y).transpose(1, 2), new_state
