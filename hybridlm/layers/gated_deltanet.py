# Cites: Gated DeltaNet (arXiv 2412.06464), as transformers' qwen3_next/modeling_qwen3_next.py.
"""Gated DeltaNet mixer with Qwen3.5 / Qwen3-Next semantics.

q, k, v come from one projection through a depthwise causal short convolution + SiLU; q and k are L2-normalised (in
the kernel); beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias); the recurrence output is normalised per value
head and gated by SiLU(z) before the output projection.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from hybridlm import ops
from hybridlm.config import GatedDeltaNetConfig
from hybridlm.layers.conv import ShortConv
from hybridlm.layers.norm import RMSNormGated


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden_size: int, cfg: GatedDeltaNetConfig, norm_eps: float):
        super().__init__()
        self.cfg = cfg
        self.key_dim = cfg.num_k_heads * cfg.head_k_dim
        self.value_dim = cfg.num_v_heads * cfg.head_v_dim
        self.in_proj_qkv = nn.Linear(hidden_size, 2 * self.key_dim + self.value_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden_size, cfg.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden_size, cfg.num_v_heads, bias=False)
        self.conv1d = ShortConv(2 * self.key_dim + self.value_dim, cfg.conv_kernel)
        self.A_log = nn.Parameter(torch.empty(cfg.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(cfg.num_v_heads))
        self.norm = RMSNormGated(cfg.head_v_dim, norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.reset_decay_parameters()

    @torch.no_grad()
    def reset_decay_parameters(self) -> None:
        """A ~ U(a_init_min, a_init_max), stored as log; dt ~ log-uniform in [dt_init_min, dt_init_max] stored as its
        inverse softplus, so softplus(dt_bias) starts at dt (the Mamba-2 / Gated DeltaNet initialisation)."""
        cfg = self.cfg
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(cfg.a_init_min, cfg.a_init_max).log())
        log_dt = torch.empty_like(self.dt_bias).uniform_(math.log(cfg.dt_init_min), math.log(cfg.dt_init_max))
        dt = log_dt.exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        position_in_doc: torch.Tensor | None = None,
        cache: dict | None = None,
        chunk_layout=None,
        context=None,
    ) -> torch.Tensor:
        """x [B,T,H]. With `cu_seqlens` (B == 1, documents packed along T) neither the conv nor the recurrence
        crosses a document start; `position_in_doc` [B,T] marks those starts for the conv. `cache` (decoding) holds
        "conv" [B,C,K-1] and "recurrent" [B,HV,K,V] fp32 states and is updated in place. `chunk_layout`, from
        `ops.prepare_gdn_chunk_layout(cu_seqlens, T, backend=...)` once per batch, spares the chunked kernels their
        per-call host sync. `context` (a hybridlm.parallel.context.ContextShard; x [B,T/CP,H], this rank's slice of
        each row) runs the conv with the previous shard's halo and the recurrence by state passing."""
        if context is not None:
            return self._context_parallel_forward(x, context, chunk_layout)
        cfg = self.cfg
        B, T, _ = x.shape
        conv_state = None if cache is None else cache.get("conv")
        qkv, new_conv_state = self.conv1d(self.in_proj_qkv(x), position_in_doc, conv_state)
        q, k, v = qkv.split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        q = q.reshape(B, T, cfg.num_k_heads, cfg.head_k_dim)
        k = k.reshape(B, T, cfg.num_k_heads, cfg.head_k_dim)
        v = v.reshape(B, T, cfg.num_v_heads, cfg.head_v_dim)
        recurrent_state = None if cache is None else cache.get("recurrent")
        decode = cache is not None and recurrent_state is not None and T <= 4
        if decode:
            rule = ops.fused_recurrent_gated_delta_rule
        else:
            rule = functools.partial(ops.chunk_gated_delta_rule, chunk_layout=chunk_layout)
        o, final_state = rule(
            q,
            k,
            v,
            a=self.in_proj_a(x),
            A_log=self.A_log,
            dt_bias=self.dt_bias,
            b=self.in_proj_b(x),
            initial_state=recurrent_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=True,
            backend=cfg.backend,
        )
        if cache is not None:
            cache.update(conv=new_conv_state, recurrent=final_state)
        return self._output(x, o)

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The gated per-head norm and the output projection of the recurrence's o (any [.., T, HV, V] of x's T)."""
        B, T, _ = x.shape
        z = self.in_proj_z(x).reshape(B, T, self.cfg.num_v_heads, self.cfg.head_v_dim)
        o = self.norm(o.reshape(z.shape), z).reshape(B, T, self.value_dim)
        return self.out_proj(o)

    def _context_parallel_forward(self, x: torch.Tensor, context, chunk_layout) -> torch.Tensor:
        from hybridlm.parallel.context import context_parallel_gated_delta_rule, conv_halo

        cfg = self.cfg
        B, T, _ = x.shape
        projected = self.in_proj_qkv(x)
        qkv, _ = self.conv1d(projected, context.position_in_doc, conv_halo(projected, cfg.conv_kernel, context))
        flat = (1, B * T)  # the rows one after the other, as the shard's documents (context.cu_seqlens) lie
        q, k, v = qkv.split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        o = context_parallel_gated_delta_rule(
            q.reshape(*flat, cfg.num_k_heads, cfg.head_k_dim), k.reshape(*flat, cfg.num_k_heads, cfg.head_k_dim),
            v.reshape(*flat, cfg.num_v_heads, cfg.head_v_dim), context, a=self.in_proj_a(x).reshape(*flat, -1),
            A_log=self.A_log, dt_bias=self.dt_bias, b=self.in_proj_b(x).reshape(*flat, -1),
            use_qk_l2norm_in_kernel=True, backend=cfg.backend, chunk_layout=chunk_layout,
        )  # fmt: skip
        return self._output(x, o)
