# Cites: Gated DeltaNet (arXiv 2412.06464) in DeltaNet's chunked WY/UT form (arXiv 2406.06484).
"""Pieces shared by the gated delta rule Triton kernels: autotuning and small @triton.jit helpers.

Token layout inside the kernels: the batch is flattened into documents (B rows of length T become B documents), so
every kernel handles plain and packed (cu_seqlens) input the same way. q, k are [tokens, H, K] and v [tokens, HV, V]
with any token stride (so the layer's split of one projection needs no copy); everything the kernels write is
contiguous; per-token scalars are [tokens, HV]. Without cu_seqlens, flat chunk c is chunk c % NT of document c // NT
(NT = cdiv(T, 64)); with it, chunk_indices holds (document, chunk-in-document) pairs and chunk_offsets each
document's first flat chunk.

Every program id and every offset that can pass 2^31 (per-chunk states: num_chunks * HV * K * V elements) is int64.

The chunk-local cumulative log decay G is kept in fp64: after one strongly decaying token the later decays of the
chunk are differences of two large prefix sums, which fp32 cannot resolve. Differences are taken in fp64 and only
then rounded to fp32 for exp.
"""

from __future__ import annotations

import itertools
import os

import triton
import triton.language as tl

from hybridlm.kernels.arch import device_arch

# The interpreter cannot benchmark (the autotuner needs a GPU driver): it gets the first config only.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK = 64
L2NORM_EPS: tl.constexpr = tl.constexpr(1e-6)


def config_grid(meta: dict[str, tuple], warps=(4, 8), stages=(2, 1)) -> list[triton.Config]:
    """Every combination of the meta-parameter choices, warps and stages; the first one is the interpreter's."""
    names = list(meta)
    return [
        triton.Config(dict(zip(names, values)), num_warps=w, num_stages=s)
        for values in itertools.product(*(meta[n] for n in names))
        for w in warps
        for s in stages
    ]


def autotune(configs: list[triton.Config], key: list[str], allowed=None, restore_value=None):
    """triton.autotune with the interpreter's single config. `allowed(meta, num_warps, K, arch)` keeps, per head
    size and GPU architecture, the configs that compile there without register spills (the autotuner never times the
    others); tests/kernels/test_gated_delta_compile.py compiles what it keeps for sm_80, sm_89, sm_90 and sm_100.
    `early_config_prune(configs, named_args, K=..., arch=...)` is how those tests ask for one architecture."""
    if INTERPRET:
        return triton.autotune(configs=configs[:1], key=key)
    prune_configs_by = None
    if allowed is not None:
        def keep_allowed(configs, named_args, arch=None, **kwargs):
            arch = arch or device_arch()
            return [c for c in configs if allowed(c.kwargs, c.num_warps, kwargs["K"], arch)] or configs[:1]

        prune_configs_by = {"early_config_prune": keep_allowed}
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune_configs_by,
                           restore_value=restore_value or [])


def state_fits(floats_per_thread: int, rows_per_warp: int = 32):
    """`allowed` for kernels holding a [K, BV] fp32 state in registers: at most this many of its floats a thread,
    and at most `rows_per_warp` of its K rows a warp (the [64, K] operand tiles of a chunk grow with K too)."""
    return lambda meta, num_warps, K, arch: (K * meta["BV"] <= floats_per_thread * 32 * num_warps
                                             and K <= rows_per_warp * num_warps)


def recurrent_allowed(meta, num_warps, K, arch):
    """`allowed` for the decode kernel: state_fits(128, 256 rows a warp), and on sm_100 not BV = 32 with 4 warps at
    K = 128 (8 bytes of stack there)."""
    if arch >= 100 and K <= 128 and meta["BV"] == 32 and num_warps == 4:
        return False
    return state_fits(128, rows_per_warp=256)(meta, num_warps, K, arch)


def wide_or_many_warps(meta, num_warps, K, arch):
    """`allowed` for the chunk-parallel V-block kernels (output, local dv). Spill-free: on sm_90 BV = 64 or 8 warps
    (BV = 32 spills with 4), on sm_80 / sm_89 (mma.sync layouts) BV = 64 only, on sm_100 8 warps only."""
    if arch < 90:
        return meta["BV"] >= 64
    if arch >= 100:
        return num_warps >= 8
    return meta["BV"] >= 64 or num_warps >= 8


def many_warps_before_hopper(meta, num_warps, K, arch):
    """`allowed` for the prepare (WY) kernel: its 4-warp configs spill 8-16 bytes on sm_80 / sm_89."""
    return arch >= 90 or num_warps >= 8


def fewest_spills_before_hopper(meta, num_warps, K, arch):
    """`allowed` for the output-gradient and WY-gradient kernels: spill-free on sm_90 / sm_100 at every config; on
    sm_80 / sm_89 every config spills (their [64, K] tiles are laid out for wgmma), least at BV = 32 (about 0.2 and
    0.7 KB a thread: correct, slower; test_gated_delta_compile.py bounds it)."""
    return arch >= 90 or meta["BV"] == 32


@triton.jit
def chunk_and_block(pid, num_blocks):
    """(flat chunk, block) of a program of a grid whose first axis runs over blocks x chunks, a chunk's blocks adjacent
    (so they share its q/k tiles in L2, and the chunk count is not bound by the 65535 limit of the other axes)."""
    return pid // num_blocks, pid % num_blocks


@triton.jit
def chunk_rows(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN: tl.constexpr, BT: tl.constexpr):
    """Token rows of flat chunk i_c, the mask of rows inside its document, and the index of its last valid row."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
        i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    start = bos + i_t * BT
    rows = start + tl.arange(0, BT)
    return rows, rows < eos, tl.minimum(start + BT, eos) - 1


@triton.jit
def document_bounds(i_n, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN: tl.constexpr):
    """First token, end token and first flat chunk of document i_n (int64)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
        first_chunk = i_n * NT
    return bos, eos, first_chunk


@triton.jit
def tile_mask(row_mask, cols, D: tl.constexpr, BD: tl.constexpr):
    """Mask of a [BT, BD] tile: rows inside the document, and columns < D unless BD blocks tile D exactly (a 2-D
    mask kept for a whole loop costs a register per element)."""
    if D % BD == 0:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (cols[None, :] < D)
    return mask


@triton.jit
def load_tile(ptr, rows, row_mask, token_stride, i_head, D: tl.constexpr, cols, BD: tl.constexpr):
    """[BT, BD] tile (columns `cols`) of head i_head of a [tokens, heads, D] tensor whose rows are token_stride
    apart, in its dtype; zero outside the document and past D."""
    return tl.load(ptr + rows[:, None] * token_stride + i_head * D + cols[None, :],
                   mask=tile_mask(row_mask, cols, D, BD), other=0.0)


@triton.jit
def load_rows_clamped(ptr, rows, last, token_stride, i_head, D: tl.constexpr, cols, BD: tl.constexpr):
    """load_tile for an operand whose rows past the document only ever meet zero factors: those rows re-read row
    `last`, so the load needs no row mask (the sequential kernels would carry it through their loop, a register per
    element)."""
    ptrs = ptr + tl.minimum(rows, last)[:, None] * token_stride + i_head * D + cols[None, :]
    if D % BD == 0:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
    return x


@triton.jit
def store_tile(ptr, x, rows, row_mask, heads, i_head, D: tl.constexpr, cols, BD: tl.constexpr):
    """Store a [BT, BD] tile into head i_head of a contiguous [tokens, heads, D] tensor, in its dtype."""
    tl.store(ptr + (rows[:, None] * heads + i_head) * D + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=tile_mask(row_mask, cols, D, BD))


@triton.jit
def state_tile(ptr, i_state, K: tl.constexpr, V: tl.constexpr, o_k, o_v, BK: tl.constexpr, BV: tl.constexpr):
    """[BK, BV] block (rows o_k, columns o_v) of state i_state (int64) of a [states, K, V] tensor, in its dtype."""
    offsets = i_state * K * V + o_k[:, None] * V + o_v[None, :]
    if K % BK == 0 and V % BV == 0:
        x = tl.load(ptr + offsets)
    else:
        x = tl.load(ptr + offsets, mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.0)
    return x


@triton.jit
def store_state_tile(ptr, i_state, x, K: tl.constexpr, V: tl.constexpr, o_k, o_v, BK: tl.constexpr,
                     BV: tl.constexpr):
    offsets = i_state * K * V + o_k[:, None] * V + o_v[None, :]
    if K % BK == 0 and V % BV == 0:
        tl.store(ptr + offsets, x.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + offsets, x.to(ptr.dtype.element_ty), mask=(o_k[:, None] < K) & (o_v[None, :] < V))


@triton.jit
def load_token_scalars(ptr, rows, row_mask, i_hv, HV):
    """[BT] fp32 per-token values of value head i_hv from a [tokens, HV] tensor; 0 outside the document."""
    return tl.load(ptr + rows * HV + i_hv, mask=row_mask, other=0.0).to(tl.float32)


@triton.jit
def load_rnorm(ptr, rows, row_mask, i_h, H, L2NORM: tl.constexpr, BT: tl.constexpr):
    """Per-token 1 / |x| (stored by the prepare kernel) of q/k head i_h when L2NORM, else ones."""
    if L2NORM:
        out = tl.load(ptr + rows * H + i_h, mask=row_mask, other=0.0)
    else:
        out = tl.full([BT], 1.0, tl.float32)
    return out


@triton.jit
def rnorm_from_squares(sum_of_squares):
    # Same epsilon as fla's fused L2 norm: x / sqrt(sum(x^2) + eps).
    return 1.0 / tl.sqrt(sum_of_squares + L2NORM_EPS)


@triton.jit
def load_log_decay(G, rows, row_mask, last, i_hv, HV):
    """Chunk-local cumulative log decay [BT] (fp64) and its value at the chunk's last valid row.

    Rows past the document end repeat the last value (as their zero gates would give), so every exp(G_i - G_j)
    with i >= j stays <= 1 there too.
    """
    G_last = tl.load(G + last * HV + i_hv)
    return tl.where(row_mask, tl.load(G + rows * HV + i_hv, mask=row_mask, other=0.0), G_last), G_last


@triton.jit
def decay_between(G_to, G_from):
    """exp(G_to - G_from) with the difference of the fp64 log decays taken before rounding to fp32."""
    return tl.exp((G_to - G_from).to(tl.float32))


@triton.jit
def decay_matrix(G, STRICT: tl.constexpr, BT: tl.constexpr):
    """exp(G_i - G_j) for j <= i (j < i if STRICT), else 0; masked to -inf before exp so no exponent is positive."""
    o_t = tl.arange(0, BT)
    if STRICT:
        keep = o_t[:, None] > o_t[None, :]
    else:
        keep = o_t[:, None] >= o_t[None, :]
    return tl.exp(tl.where(keep, (G[:, None] - G[None, :]).to(tl.float32), float("-inf")))


# Gradients w.r.t. the gates, assembled so that no large term cancels against another: with G the chunk-local cumsum
# of the gate g, a factor exp(G_t) depends on g_i for i <= t, and a decay exp(G_t - G_j) (j <= t) for j < i <= t.
@triton.jit
def grad_through_prefix(r):
    """d gate_i from per-row terms r_t = dL/dG_t: sum_{t >= i} r_t (accumulated in fp64)."""
    return tl.cumsum(r.to(tl.float64), 0, reverse=True).to(tl.float32)


@triton.jit
def grad_through_suffix(r):
    """d gate_i from terms r_j = dL/d(G_last - G_j): sum_{j < i} r_j (accumulated in fp64)."""
    r64 = r.to(tl.float64)
    return (tl.cumsum(r64, 0) - r64).to(tl.float32)


@triton.jit
def grad_through_decays(M, BT: tl.constexpr):
    """d gate_i from pair terms M_tj = dL/d(G_t - G_j) (lower triangular): sum_{t >= i} sum_{j < i} M_tj.

    Summing row minus column totals and then a reverse cumsum would give the same in exact arithmetic, but the large
    diagonal terms would cancel only to round-off of the totals.
    """
    o_t = tl.arange(0, BT)
    from_below = tl.cumsum(M, 0, reverse=True)  # [i, j]: sum_{t >= i} M_tj
    return tl.sum(tl.where(o_t[None, :] < o_t[:, None], from_below, 0.0), 1)


@triton.jit
def softplus(x):
    # log(1 + e^x), exact to fp32 round-off; linear beyond 20 where e^x would dominate anyway.
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def raw_gate_input(a, dt_bias, rows, row_mask, i_hv, HV, HAS_DT_BIAS: tl.constexpr):
    """a + dt_bias, the argument of the softplus in the raw gate."""
    x = load_token_scalars(a, rows, row_mask, i_hv, HV)
    if HAS_DT_BIAS:
        x += tl.load(dt_bias + i_hv).to(tl.float32)
    return x


@triton.jit
def load_gate(g, a, A_log, dt_bias, rows, row_mask, i_hv, HV, GATE_FROM_RAW: tl.constexpr, HAS_DT_BIAS: tl.constexpr):
    """Per-token log decay g, or -exp(A_log) * softplus(a + dt_bias) from the raw gate; 0 outside the document."""
    if GATE_FROM_RAW:
        x = raw_gate_input(a, dt_bias, rows, row_mask, i_hv, HV, HAS_DT_BIAS)
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
