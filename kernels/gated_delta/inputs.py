# Cites: Gated DeltaNet (arXiv 2412.06464): gate and beta as transformers' qwen3_next/modeling_qwen3_next.py.
"""Argument checks and the small elementwise pieces shared by every gated delta rule implementation.

Everything here is plain PyTorch and imports no Triton, so the package imports on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Same epsilon as fla's fused L2 norm: x / sqrt(sum(x^2) + eps).
L2NORM_EPS = 1e-6


@dataclass(frozen=True)
class GatedDeltaDims:
    """Sizes of one gated delta rule call, after the arguments have been checked."""

    batch: int  # B
    seq_len: int  # T (total tokens per batch row; with cu_seqlens, all documents packed)
    num_qk_heads: int  # H
    num_v_heads: int  # HV, a multiple of H
    head_k_dim: int  # K
    head_v_dim: int  # V
    num_states: int  # N: B, or the number of documents when cu_seqlens is given
    scale: float

    @property
    def value_heads_per_qk_head(self) -> int:
        return self.num_v_heads // self.num_qk_heads


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} ({meaning})")


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} has dtype {tensor.dtype}; pass a floating point tensor (fp32, fp16, bf16 or fp64)")


def check_gated_delta_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale: float | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    a: torch.Tensor | None,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    b: torch.Tensor | None,
    check_cu_seqlens_values: bool = True,
) -> GatedDeltaDims:
    """Validate the arguments of `chunk_gated_delta_rule` / `fused_recurrent_gated_delta_rule`.

    Raises ValueError naming the bad argument and the fix. Reads the `cu_seqlens` values (a host sync on GPU) unless
    `check_cu_seqlens_values` is False, where the caller checks them on the device (`cu_seqlens_violation`).
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, heads, head_dim], got shape {tuple(tensor.shape)}")
        _check_float(name, tensor)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    _check_shape("k", k, (B, T, H, K), "same shape as q: [B, T, H, K]")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v has shape {tuple(v.shape)}, expected [B={B}, T={T}, HV, V] matching q's batch and time")
    if H == 0 or HV % H != 0:
        raise ValueError(f"v has {HV} heads but q/k have {H}: the number of value heads must be a multiple of H")
    if K == 0 or V == 0:
        raise ValueError(f"head dims must be positive, got K={K}, V={V}")

    if g is not None:
        if a is not None or A_log is not None or dt_bias is not None:
            raise ValueError(
                "pass either g (log-space decay) or the raw gate (a, A_log, dt_bias), not both; with fla's naming, "
                "use_gate_in_kernel=True makes g the raw gate that A_log and dt_bias apply to"
            )
        _check_shape("g", g, (B, T, HV), "[B, T, HV] log-space decay")
        _check_float("g", g)
    else:
        if a is None or A_log is None:
            raise ValueError(
                "no decay given: pass g [B, T, HV] (log-space decay), or a [B, T, HV] with A_log [HV] "
                "(and optionally dt_bias [HV]) to compute g = -exp(A_log) * softplus(a + dt_bias)"
            )
        _check_shape("a", a, (B, T, HV), "[B, T, HV] raw gate input")
        _check_shape("A_log", A_log, (HV,), "[HV] per value head")
        _check_float("a", a)
        _check_float("A_log", A_log)
        if dt_bias is not None:
            _check_shape("dt_bias", dt_bias, (HV,), "[HV] per value head")
            _check_float("dt_bias", dt_bias)

    if (beta is None) == (b is None):
        raise ValueError("pass exactly one of beta [B, T, HV] (in [0, 1]) or b [B, T, HV] (beta = sigmoid(b))")
    beta_name, beta_tensor = ("beta", beta) if beta is not None else ("b", b)
    _check_shape(beta_name, beta_tensor, (B, T, HV), "[B, T, HV] per value head")
    _check_float(beta_name, beta_tensor)

    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs documents along T and needs B == 1, got B={B}; flatten the batch first")
        check_cu_seqlens_shape(cu_seqlens)
        if check_cu_seqlens_values and bool(cu_seqlens_violation(cu_seqlens, T)):
            raise_bad_cu_seqlens(cu_seqlens, T)
        N = cu_seqlens.numel() - 1
    else:
        N = B

    if initial_state is not None:
        _check_shape("initial_state", initial_state, (N, HV, K, V), "[N, HV, K, V] with N = B or number of documents")
        _check_float("initial_state", initial_state)

    devices = {t.device for t in (q, k, v, g, beta, initial_state, a, A_log, dt_bias, b) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")

    if scale is None:
        scale = K**-0.5
    return GatedDeltaDims(B, T, H, HV, K, V, N, float(scale))


def resolve_fla_conventions(g, beta, a, A_log, dt_bias, b, *, use_gate_in_kernel: bool = False,
                            use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False):
    """fla 0.6's flags in our argument names: returns (g, beta, a, b) where g/beta are the activated gate and beta
    and a/b the raw ones our kernels fuse (`A_log`, `dt_bias` mean the same in both).

    fla: `use_gate_in_kernel=True` makes g the raw gate, g = -exp(A_log) * softplus(g + dt_bias) (fla's
    gated_delta_rule/gate.py, no lower bound); `use_beta_sigmoid_in_kernel=True` makes beta the raw logits,
    beta = sigmoid(beta), or 2 * sigmoid(beta) with `allow_neg_eigval=True` (negative eigenvalues, Grazzi et al.
    2024). Ours: the raw forms under their own names `a` and `b`.
    """
    if use_gate_in_kernel:
        if a is not None:
            raise ValueError("use_gate_in_kernel=True reads the raw gate from g: pass it as g or as a, not both")
        if g is None or A_log is None:
            raise ValueError(
                "use_gate_in_kernel=True needs the raw gate g [B, T, HV] and A_log [HV] (optionally dt_bias [HV]): "
                "g = -exp(A_log) * softplus(g + dt_bias)"
            )
        g, a = None, g
    if use_beta_sigmoid_in_kernel:
        if b is not None:
            raise ValueError("use_beta_sigmoid_in_kernel=True reads the beta logits from beta: pass them as beta or "
                             "as b, not both")  # fmt: skip
        beta, b = None, beta
    if allow_neg_eigval:
        if b is None:
            raise ValueError("allow_neg_eigval=True scales raw beta logits to 2 * sigmoid(beta): it needs "
                             "use_beta_sigmoid_in_kernel=True (or the logits as b)")  # fmt: skip
        # The kernels fuse sigmoid(b) only; the factor 2 is one elementwise op here (autograd carries it).
        beta, b = 2.0 * torch.sigmoid(b.float()), None
    return g, beta, a, b


def reject_unsupported_fla_arguments(**given) -> None:
    """A clear error for the fla 0.6 arguments our kernels do not implement (README: "Swapping with fla")."""
    why = {
        "gk": "per-key decays (fla's KDA-style gk) are not Gated DeltaNet's scalar decay; pass g",
        "gv": "per-value decays are not Gated DeltaNet's scalar decay; pass g",
        "cp_context": "context parallelism is not implemented; split documents with cu_seqlens instead",
        "chunk_size": "the kernels are built for 64-token chunks only",
    }
    for name, value in given.items():
        if name == "chunk_size" and value == 64 or name != "chunk_size" and value is None:
            continue
        raise ValueError(f"{name}={value if name == 'chunk_size' else '...'} is not supported: {why[name]}")


def kv_state(state: torch.Tensor | None, state_v_first: bool) -> torch.Tensor | None:
    """A state in our [N, HV, K, V] layout from fla's `state_v_first` [N, HV, V, K], and back (a transpose)."""
    return state.transpose(-1, -2).contiguous() if state is not None and state_v_first else state


def compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The widest of q, k, v (fp16 with bf16 gives fp32): mixed inputs, as fla accepts them, are computed in it."""
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def check_cu_seqlens_shape(cu_seqlens: torch.Tensor) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)} and dtype "
            f"{cu_seqlens.dtype}; pass torch.int32 or torch.int64"
        )


def raise_bad_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int):
    raise ValueError(f"cu_seqlens must rise from 0 to T={seq_len} without decreasing, got {cu_seqlens.tolist()}")


def cu_seqlens_violation(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Device-side bool: True unless cu_seqlens rises from 0 to seq_len without decreasing (no host sync)."""
    return (cu_seqlens[0] != 0) | (cu_seqlens[-1] != seq_len) | (cu_seqlens[1:] < cu_seqlens[:-1]).any()


def sequence_bounds(cu_seqlens: torch.Tensor | None, seq_len: int) -> list[tuple[int, int]]:
    """[(start, end)] of each document along T; the whole row when there is no cu_seqlens."""
    if cu_seqlens is None:
        return [(0, seq_len)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def gate_from_raw(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """g = -exp(A_log) * softplus(a + dt_bias), in `dtype` (at least fp32)."""
    x = a.to(dtype)
    if dt_bias is not None:
        x = x + dt_bias.to(dtype)
    return -torch.exp(A_log.to(dtype)) * F.softplus(x)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as fla's `use_qk_l2norm_in_kernel`."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)
