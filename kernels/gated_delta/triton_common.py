"""Pieces shared by the gated delta rule Triton kernels: autotuning and small @triton.jit helpers.

Token layout inside the kernels: the batch is flattened into documents (B rows of length T become B documents), so
every kernel handles plain and packed (cu_seqlens) input the same way. q, k are [tokens, H, K], v [tokens, HV, V],
per-token scalars [tokens, HV]; chunk `c` of the flat chunk list holds (document, chunk-in-document) in chunk_info.
"""

from __future__ import annotations

import itertools
import os

import triton
import triton.language as tl

# The interpreter cannot benchmark (the autotuner needs a GPU driver): it gets the first config only.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK = 64
L2NORM_EPS: tl.constexpr = tl.constexpr(1e-6)


def config_grid(meta: dict[str, tuple], warps=(4, 2, 8), stages=(2, 1, 3)) -> list[triton.Config]:
    """Every combination of the meta-parameter choices, warps and stages; the first one is the interpreter's."""
    names = list(meta)
    return [
        triton.Config(dict(zip(names, values)), num_warps=w, num_stages=s)
        for values in itertools.product(*(meta[n] for n in names))
        for w in warps
        for s in stages
    ]


def autotune(configs: list[triton.Config], key: list[str]):
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key)


@triton.jit
def chunk_rows(cu_seqlens, chunk_info, i_c, BT: tl.constexpr):
    """Token rows of flat chunk i_c, the mask of rows inside its document, and the index of its last valid row."""
    i_n = tl.load(chunk_info + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_info + 2 * i_c + 1).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    start = tl.load(cu_seqlens + i_n).to(tl.int64) + i_t * BT
    rows = start + tl.arange(0, BT)
    last = tl.minimum(start + BT, eos) - 1
    return rows, rows < eos, last


@triton.jit
def load_heads(ptr, rows, row_mask, i_h, NH, D: tl.constexpr, BD: tl.constexpr, L2NORM: tl.constexpr):
    """[BT, BD] fp32 tile of head i_h from a [tokens, NH, D] tensor, rows L2-normalised if L2NORM (eps as fla)."""
    cols = tl.arange(0, BD)
    x = tl.load(
        ptr + (rows[:, None] * NH + i_h) * D + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < D), other=0.0
    ).to(tl.float32)
    if L2NORM:
        x = x / tl.sqrt(tl.sum(x * x, 1) + L2NORM_EPS)[:, None]
    return x


@triton.jit
def load_token_scalars(ptr, rows, row_mask, i_hv, HV):
    """[BT] fp32 per-token values of value head i_hv from a [tokens, HV] tensor; 0 outside the document."""
    return tl.load(ptr + rows * HV + i_hv, mask=row_mask, other=0.0).to(tl.float32)


@triton.jit
def load_log_decay(G, rows, row_mask, last, i_hv, HV):
    """Chunk-local cumulative log decay [BT] and its value at the chunk's last valid row.

    Rows past the document end repeat the last value (as their zero gates would give), so every exp(G_i - G_j)
    with i >= j stays <= 1 there too.
    """
    G_last = tl.load(G + last * HV + i_hv).to(tl.float32)
    return tl.where(row_mask, tl.load(G + rows * HV + i_hv, mask=row_mask, other=0.0).to(tl.float32), G_last), G_last


@triton.jit
def softplus(x):
    # log(1 + e^x), exact to fp32 round-off; linear beyond 20 where e^x would dominate anyway.
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def load_gate(g, a, A_log, dt_bias, rows, row_mask, i_hv, HV, GATE_FROM_RAW: tl.constexpr, HAS_DT_BIAS: tl.constexpr):
    """Per-token log decay g, or -exp(A_log) * softplus(a + dt_bias) from the raw gate; 0 outside the document."""
    if GATE_FROM_RAW:
        x = load_token_scalars(a, rows, row_mask, i_hv, HV)
        if HAS_DT_BIAS:
            x += tl.load(dt_bias + i_hv).to(tl.float32)
        gate = tl.where(row_mask, -tl.exp(tl.load(A_log + i_hv).to(tl.float32)) * softplus(x), 0.0)
    else:
        gate = load_token_scalars(g, rows, row_mask, i_hv, HV)
    return gate


@triton.jit
def load_beta(beta, b, rows, row_mask, i_hv, HV, BETA_FROM_RAW: tl.constexpr):
    """Per-token beta, or sigmoid(b); 0 outside the document (so padded rows write nothing)."""
    if BETA_FROM_RAW:
        x = load_token_scalars(b, rows, row_mask, i_hv, HV)
        out = tl.where(row_mask, 1.0 / (1.0 + tl.exp(-x)), 0.0)
    else:
        out = load_token_scalars(beta, rows, row_mask, i_hv, HV)
    return out


@triton.jit
def decay_matrix(G, STRICT: tl.constexpr, BT: tl.constexpr):
    """exp(G_i - G_j) for j <= i (j < i if STRICT), else 0; masked to -inf before exp so no exponent is positive."""
    o_t = tl.arange(0, BT)
    if STRICT:
        keep = o_t[:, None] > o_t[None, :]
    else:
        keep = o_t[:, None] >= o_t[None, :]
    return tl.exp(tl.where(keep, G[:, None] - G[None, :], float("-inf")))
