# Cites: dropless grouped-GEMM MoE (MegaBlocks, arXiv 2211.15841).
"""Grouped GEMMs over expert-contiguous rows, for SwiGLU experts with fused weights.

Rows are the T*k (token, slot) pairs in expert order (see permute.py); expert e owns rows
[start_e, start_e + count_e). Nothing about the split is read back to the host: the launch grid is an upper
bound (cdiv(T*k, BLOCK_M) + E row tiles) and each program finds its expert from the counts on the device;
programs past the last tile exit at once. Experts with no rows get no row tiles, and their weight gradient
is written as zeros.

- `expert_rows_gemm`:  C[r] = A[src(r)] @ B_e, one program per (row tile, column tile). The A rows may be
  gathered from token order (src(r) = token of pair r) and scaled by the pair's routing weight. Epilogues:
  plain; SwiGLU forward (gate and up columns in one program: writes the pre-activation and silu(gate) * up);
  SwiGLU backward (turns d(act) into d(gate), d(up) using the saved pre-activation).
- `expert_weight_grad`: dW_e = L[rows_e]^T @ R[rows_e], one program per (expert, output tile), looping over
  the expert's rows: deterministic, no atomics. R may be recomputed on load as silu(gate) * up from the saved
  pre-activation, so the forward's activation need not be kept either.

The SwiGLU activation is always computed from the pre-activation as stored (rounded to the input dtype), so the
forward's act and every recomputation of it agree bitwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.kernels.arch import max_shared_bytes

from .tuning import autotune, dot_precision

EPILOGUE_PLAIN, EPILOGUE_SWIGLU, EPILOGUE_SWIGLU_BACKWARD = 0, 1, 2


@triton.jit
def _swiglu(gate, up):
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _expert_rows(counts_ptr, expert, num_experts, E_PAD: tl.constexpr):
    """(first row, row count) of `expert` from the per-expert counts."""
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    is_expert = experts == expert
    row_start = tl.sum(tl.where(is_expert, tl.cumsum(counts, axis=0) - counts, 0))
    return row_start, tl.sum(tl.where(is_expert, counts, 0))


def _rows_gemm_configs():
    # sm_90 AOT compiles: 128x256 tiles spill 0.6-2 KB per thread; the 4-warp 64x128 / 128x64 tiles spill a few
    # registers in the SwiGLU-backward epilogue (three fp32 tiles live), which their 8-warp versions do not.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 64, 64, 4, 4),
            (128, 64, 64, 8, 4),
            (64, 128, 64, 4, 4),
            (64, 128, 64, 8, 4),
            (64, 64, 64, 4, 4),
            (64, 128, 32, 4, 5),
        ]
    ]


def _rows_gemm_fits(config: triton.Config, arch: int, launch: dict) -> bool:
    """Before Hopper (mma.sync, the accumulator in registers without wgmma's layout) tiles of more than 32 fp32
    accumulators a thread spill 80 B - 3.5 KB in the SwiGLU forward, and the pipeline's shared memory must fit the
    device (sm_89: 99 KB): (stages - 1) buffers of an A and a B tile (two B tiles with SwiGLU). Measured by
    tests/kernels/test_moe_compile.py, which compiles what this keeps for sm_80, sm_89, sm_90 and sm_100."""
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    b_tiles = 2 if launch.get("SWIGLU_FORWARD") else 1
    element_size = launch["a_ptr"].element_size() if "a_ptr" in launch else 2  # asked without tensors: bf16
    if (config.num_stages - 1) * (m * k + b_tiles * k * n) * element_size > max_shared_bytes(arch):
        return False
    return arch >= 90 or m * n <= 32 * 32 * config.num_warps


@autotune(
    _rows_gemm_configs(),
    # Interpreter cost grows with the program count: few wide tiles; BLOCK_K < H still loops over K.
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}),
    key=["N", "K", "SWIGLU_FORWARD", "SWIGLU_BACKWARD", "A_GATHER", "A_SCALE", "TOP_K"],
    allowed=_rows_gemm_fits,
)
@triton.jit
def _expert_rows_gemm_kernel(
    a_ptr, b_ptr, c_ptr, act_ptr, pre_ptr, sorted_to_pair_ptr, pair_weights_ptr, counts_ptr,
    num_experts, N, K, stride_am, stride_be, stride_bk, stride_bn,
    TOP_K: tl.constexpr, A_GATHER: tl.constexpr, A_SCALE: tl.constexpr,
    SWIGLU_FORWARD: tl.constexpr, SWIGLU_BACKWARD: tl.constexpr, E_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which expert owns row tile pid_m: tiles are numbered expert by expert.
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    tiles = tl.cdiv(counts, BLOCK_M)
    tiles_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32))
    if expert >= num_experts:
        return
    tile_in_expert = pid_m - tl.sum(tl.where(experts == expert, tiles_end - tiles, 0))
    row_start, row_count = _expert_rows(counts_ptr, expert, num_experts, E_PAD)

    rows = row_start + tile_in_expert * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < row_start + row_count
    rows = rows.to(tl.int64)
    pairs = tl.load(sorted_to_pair_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    a_rows = rows
    if A_GATHER:
        a_rows = pairs // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    inner = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + inner[None, :]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + inner[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        inner_mask = inner < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=inner_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SWIGLU_FORWARD:  # up rows sit N rows after the gate rows
            b_up = tl.load(b_ptrs + N * stride_bn, mask=inner_mask[:, None] & col_mask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if A_SCALE:
        acc *= tl.load(pair_weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]

    mask = row_mask[:, None] & col_mask[None, :]
    out_dtype = c_ptr.dtype.element_ty
    if SWIGLU_FORWARD:
        pre_ptrs = c_ptr + rows[:, None] * (2 * N) + cols[None, :]
        gate = acc.to(out_dtype)
        up = acc_up.to(out_dtype)
        tl.store(pre_ptrs, gate, mask=mask)
        tl.store(pre_ptrs + N, up, mask=mask)
        act = _swiglu(gate.to(tl.float32), up.to(tl.float32))
        tl.store(act_ptr + rows[:, None] * N + cols[None, :], act.to(out_dtype), mask=mask)
    elif SWIGLU_BACKWARD:  # acc holds d(act)
        pre_ptrs = pre_ptr + rows[:, None] * (2 * N) + cols[None, :]
        gate = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(pre_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        dgate = acc * up * sig * (1.0 + gate * (1.0 - sig))
        dup = acc * gate * sig
        out_ptrs = c_ptr + rows[:, None] * (2 * N) + cols[None, :]
        tl.store(out_ptrs, dgate.to(out_dtype), mask=mask)
        tl.store(out_ptrs + N, dup.to(out_dtype), mask=mask)
    else:
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(out_dtype), mask=mask)


def _weight_grad_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (64, 128, 128, 8, 3),
            (64, 128, 64, 4, 4),
            (32, 128, 128, 8, 4),
            (64, 64, 128, 4, 4),
            (64, 64, 64, 4, 4),
            (32, 64, 64, 4, 5),
        ]
    ]


@autotune(
    _weight_grad_configs(),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
    key=["N", "K", "L_GATHER", "L_SCALE", "R_GATHER", "R_SWIGLU", "TOP_K"],
)
@triton.jit
def _expert_weight_grad_kernel(
    l_ptr, r_ptr, out_ptr, sorted_to_pair_ptr, pair_weights_ptr, counts_ptr,
    num_experts, N, K, stride_lm, stride_rm,
    TOP_K: tl.constexpr, L_GATHER: tl.constexpr, L_SCALE: tl.constexpr, R_GATHER: tl.constexpr,
    R_SWIGLU: tl.constexpr, E_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_k = tl.cdiv(K, BLOCK_K)
    expert = pid // (tiles_n * tiles_k)
    pid_n = (pid // tiles_k) % tiles_n
    pid_k = pid % tiles_k
    row_start, row_count = _expert_rows(counts_ptr, expert, num_experts, E_PAD)

    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = cols_n < N
    k_mask = cols_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for m0 in range(0, row_count, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        row_mask = local < row_count
        rows = (row_start + local).to(tl.int64)
        pairs = tl.load(sorted_to_pair_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        l_rows = rows
        if L_GATHER:
            l_rows = pairs // TOP_K
        r_rows = rows
        if R_GATHER:
            r_rows = pairs // TOP_K
        left_ptrs = l_ptr + l_rows[:, None] * stride_lm + cols_n[None, :]
        left = tl.load(left_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if L_SCALE:
            scale = tl.load(pair_weights_ptr + pairs, mask=row_mask, other=0.0)
            left = (left.to(tl.float32) * scale[:, None]).to(left.dtype)
        right_ptrs = r_ptr + r_rows[:, None] * stride_rm + cols_k[None, :]
        right_mask = row_mask[:, None] & k_mask[None, :]
        right = tl.load(right_ptrs, mask=right_mask, other=0.0)
        if R_SWIGLU:  # R holds [gate | up] rows of width 2K: the activation is recomputed here
            up = tl.load(right_ptrs + K, mask=right_mask, other=0.0)
            right = _swiglu(right.to(tl.float32), up.to(tl.float32)).to(r_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(left), right, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * N * K + cols_n[:, None] * K + cols_k[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def expert_rows_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    transpose_weight: bool,
    expert_counts: torch.Tensor,
    sorted_to_pair: torch.Tensor,
    top_k: int,
    gather: bool = False,
    pair_weights: torch.Tensor | None = None,
    epilogue: int = EPILOGUE_PLAIN,
    pre_activation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per expert-sorted row r of expert e: A[src(r)] (* w_pair) @ B_e.

    B_e = weight[e].T if `transpose_weight` else weight[e]; `weight` is [E, N(, or 2N for SwiGLU), K] or
    [E, K, N]. Returns (C,) for the plain epilogue, (pre-activation [M, 2N], act [M, N]) for the SwiGLU forward,
    and (C,) for the SwiGLU backward, C = d(pre-activation) [M, 2N] from d(act) = A[src(r)] (* w_pair) @ B_e
    (A = dy, B = down) and `pre_activation`.
    """
    num_rows = sorted_to_pair.numel()
    num_experts = weight.shape[0]
    if transpose_weight:
        n_total, inner = weight.shape[1], weight.shape[2]
        stride_bk, stride_bn = weight.stride(2), weight.stride(1)
    else:
        inner, n_total = weight.shape[1], weight.shape[2]
        stride_bk, stride_bn = weight.stride(1), weight.stride(2)
    n_out = n_total // 2 if epilogue == EPILOGUE_SWIGLU else n_total
    if epilogue == EPILOGUE_PLAIN:
        c = a.new_empty(num_rows, n_out)
        act = None
    else:
        c = a.new_empty(num_rows, 2 * n_out)
        act = a.new_empty(num_rows, n_out) if epilogue == EPILOGUE_SWIGLU else None

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts, triton.cdiv(n_out, meta["BLOCK_N"]))

    if num_rows:
        _expert_rows_gemm_kernel[grid](
            a, weight, c, act if act is not None else c, pre_activation if pre_activation is not None else c,
            sorted_to_pair, pair_weights if pair_weights is not None else c, expert_counts,
            num_experts, n_out, inner, a.stride(0), weight.stride(0), stride_bk, stride_bn,
            TOP_K=top_k, A_GATHER=gather, A_SCALE=pair_weights is not None,
            SWIGLU_FORWARD=epilogue == EPILOGUE_SWIGLU, SWIGLU_BACKWARD=epilogue == EPILOGUE_SWIGLU_BACKWARD,
            E_PAD=triton.next_power_of_2(num_experts), PRECISION=dot_precision(a.dtype),
        )  # fmt: skip
    return (c, act) if epilogue == EPILOGUE_SWIGLU else (c,)


def expert_weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    expert_counts: torch.Tensor,
    sorted_to_pair: torch.Tensor,
    top_k: int,
    gather_left: bool = False,
    left_pair_weights: torch.Tensor | None = None,
    gather_right: bool = False,
    right_swiglu: bool = False,
) -> torch.Tensor:
    """dW [E, N, K] with dW_e = sum over expert e's sorted rows r of L[src(r)] (* w_pair) outer R[src(r)].

    With `right_swiglu`, `right` is a pre-activation [M, 2K] and R = silu(gate) * up is computed on load.
    """
    num_experts = expert_counts.numel()
    n, k = left.shape[1], right.shape[1] // 2 if right_swiglu else right.shape[1]
    out = left.new_empty(num_experts, n, k)

    def grid(meta):
        return (num_experts * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    _expert_weight_grad_kernel[grid](
        left, right, out, sorted_to_pair, left_pair_weights if left_pair_weights is not None else out,
        expert_counts, num_experts, n, k, left.stride(0), right.stride(0),
        TOP_K=top_k, L_GATHER=gather_left, L_SCALE=left_pair_weights is not None, R_GATHER=gather_right,
        R_SWIGLU=right_swiglu, E_PAD=triton.next_power_of_2(num_experts), PRECISION=dot_precision(left.dtype),
    )  # fmt: skip
    return out
