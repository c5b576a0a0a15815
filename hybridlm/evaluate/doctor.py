"""`hybridlm doctor`: is every op a model config would use correct on this machine, in the dtype it trains in?

Each op the config's layers call (the GDN chunked forward + backward, the GDN decode step, the MoE router,
permutation, grouped expert GEMMs + combine and the whole routed path, attention) runs once at a small shape of the
config's own dimensions, through the backend the config picks (`model.gdn.backend`, `model.moe.backend`,
`model.attention.backend`), in the training dtype, and is compared with the float64 PyTorch reference under the
bounds of `hybridlm.kernels.tolerances` (the ones the kernel tests assert). The trainer's start-up check
(`trainer.kernel_check`, hybridlm/train/kernel_check.py) runs the same checks before step 1.

On a CPU with backend `auto` the ops are the PyTorch references, and the report says the kernels were not run; with
`model.gdn.backend=triton` / `model.moe.backend=triton` under `TRITON_INTERPRET=1` the Triton kernels run in the
interpreter (fp32, correct there; bf16 is not), and the report says they ran in the interpreter, not on a GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.kernels.tolerances import (
    ATTENTION_REL_TOL,
    GDN_REL_TOL,
    MOE_CHOICE_FLIP_FRACTION,
    MOE_MAX_REL_TOL,
    max_rel_err,
    rel_err,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GDN_FIX = {"triton": "model.gdn.backend=fla or model.gdn.backend=torch", "fla": "model.gdn.backend=torch",
           "torch": "none: the PyTorch reference itself is wrong here; report it"}
MOE_FIX = {"triton": "model.moe.backend=torch", "torch": "none: the PyTorch reference itself is wrong here; report it"}
ATTENTION_FIX = {"flex": "model.attention.backend=sdpa", "sdpa": "model.attention.backend=flex (CUDA only)"}


class CheckFailed(AssertionError):
    """An op's result is off its reference by more than its bound (the message says where and by how much)."""


class CheckSkipped(Exception):
    """An op that cannot be checked here (the message says why)."""


@dataclass
class CheckResult:
    op: str
    status: str  # pass | FAIL | skipped
    seconds: float
    implementation: str  # what ran, e.g. "triton kernel on NVIDIA H200", "PyTorch reference on cpu"
    kernel: bool  # whether a kernel of ours or of a library (not a PyTorch reference) ran
    on_gpu: bool
    detail: str  # measured error against the bound, the error raised, or why it was skipped
    fix: str = ""  # the override that takes another implementation, for a failure


@dataclass
class DoctorReport:
    environment: dict
    model: str
    device: str
    dtype: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "FAIL"]

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": not self.failures}

    def format(self) -> str:
        env = self.environment
        versions = env.get("versions", {})
        lines = ["environment:"]
        lines.append("  " + " | ".join(f"{name} {versions.get(name, 'not installed')}" for name in
                                       ("torch", "triton", "fla", "deepspeed", "transformers")))
        gpu = env.get("gpu")
        lines.append(f"  CUDA {versions.get('cuda', 'none')} | GPU: " +
                     (f"{gpu['name']} (compute capability {gpu['capability']})" if gpu else "none"))
        lines.append(f"ops of model {self.model}, {self.dtype} on {self.device}, against float64 references:")
        width = max((len(r.op) for r in self.results), default=10)
        for r in self.results:
            line = f"  {r.status:<7} {r.seconds:6.2f} s  {r.op:<{width}}  {r.implementation}: {r.detail}"
            lines.append(line + (f"  -> fix: {r.fix}" if r.status == "FAIL" else ""))
        on_gpu = [r.op for r in self.results if r.kernel and r.on_gpu and r.status != "skipped"]
        elsewhere = [r.op for r in self.results if r.kernel and not r.on_gpu and r.status != "skipped"]
        lines.append("kernels run on a GPU: " + (", ".join(on_gpu) if on_gpu else "none"))
        if not on_gpu and not elsewhere:
            lines.append("  (every op here is a PyTorch reference: the kernels run on a GPU, or in the Triton CPU "
                         "interpreter with model.gdn.backend=triton model.moe.backend=triton)")
        if elsewhere:
            lines.append("kernels run on the CPU only (Triton interpreter, eager FlexAttention), not on a GPU: "
                         + ", ".join(elsewhere))
        if self.failures:
            lines.append(f"FAILED: {len(self.failures)} of {len(self.results)} checks: " + "; ".join(
                f"{r.op} (fix: {r.fix})" for r in self.failures))
        else:
            passed = sum(r.status == "pass" for r in self.results)
            lines.append(f"ok: {passed} passed, {len(self.results) - passed} skipped")
        return "\n".join(lines)


def environment(device: torch.device) -> dict:
    """Versions (torch, triton, CUDA, fla, deepspeed, transformers), date, commit and the GPU with its compute
    capability (hybridlm.evaluate.report.run_metadata, which every results file records)."""
    from hybridlm.evaluate.report import run_metadata

    meta = run_metadata(str(device))
    meta["gpu"] = None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        meta["gpu"] = {"name": torch.cuda.get_device_name(device), "capability": f"sm_{major}{minor}"}
    return meta


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class OpCheck:
    op: str
    backend: str  # the implementation the config resolves to on this device: triton | fla | torch | flex | sdpa
    fix: str
    run: Callable[[], str]  # returns what it measured; raises CheckFailed / CheckSkipped


def _implementation(backend: str, device: torch.device) -> tuple[str, bool]:
    """(description, kernel?) of what a backend runs on `device`."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if backend == "torch":
        return f"PyTorch reference on {where}", False
    if backend == "sdpa":
        return f"SDPA on {where}", device.type == "cuda"
    if backend == "flex":
        return f"FlexAttention ({'compiled' if device.type == 'cuda' else 'eager'}) on {where}", True
    owner = "our" if backend == "triton" else f"{backend}'s"
    if device.type == "cpu":
        return f"{owner} Triton kernel in the CPU interpreter", True
    return f"{owner} Triton kernel on {where}", True


def plan(model: ModelConfig, device: torch.device, dtype: torch.dtype) -> list[OpCheck]:
    """The checks of every op `model` uses, each bound to the backend its config resolves to on `device`."""
    checks = []
    small = device.type == "cpu"  # the interpreter and the float64 references are slow on a CPU
    if "gated_deltanet" in model.layer_types:
        backend = ops.GATED_DELTA.resolve(model.gdn.backend, device)
        checks += [
            OpCheck("gdn.chunk fwd+bwd", backend, GDN_FIX[backend],
                    partial(_check_gdn_chunk, model, backend, device, dtype, small)),
            OpCheck("gdn.decode step", backend, GDN_FIX[backend],
                    partial(_check_gdn_decode, model, backend, device, dtype)),
        ]
    if "moe" in model.mlp_types:
        backend = ops.MOE.resolve(model.moe.backend, device)
        moe_fix = MOE_FIX[backend]
        checks += [
            OpCheck("moe.router fwd+bwd", backend, moe_fix,
                    partial(_check_moe_router, model, backend, device, dtype, small)),
            OpCheck("moe.permutation", backend, moe_fix,
                    partial(_check_moe_permutation, model, backend, device, small)),
            OpCheck("moe.experts+combine fwd+bwd", backend, moe_fix,
                    partial(_check_moe_experts, model, backend, device, dtype, small)),
            OpCheck("moe.path fwd+bwd", backend, moe_fix,
                    partial(_check_moe_path, model, backend, device, dtype, small)),
        ]
    if "attention" in model.layer_types:
        backend = ops.ATTENTION.resolve(model.attention.backend, device)
        checks.append(OpCheck("attention fwd+bwd", backend, ATTENTION_FIX[backend],
                              partial(_check_attention, model, backend, device, dtype, small)))
    return checks


def run_checks(model: ModelConfig, device: torch.device, dtype: torch.dtype, *, kernels_only: bool = False,
               model_name: str = "", progress: Callable[[str], None] | None = None) -> DoctorReport:
    """Run every check of `plan` (with `kernels_only`, those whose implementation is a kernel: what the trainer's
    start-up check runs) and collect one result per op; an exception in a check is that op's failure."""
    report = DoctorReport(environment(device), model_name or f"{model.layer_pattern} x {model.mlp_pattern}",
                          str(device), {v: k for k, v in DTYPES.items()}[dtype])
    for check in plan(model, device, dtype):
        implementation, kernel = _implementation(check.backend, device)
        if kernels_only and not kernel:
            continue
        started = time.perf_counter()
        try:
            detail, status = check.run(), "pass"
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous kernel fault surfaces here: this op's failure
        except CheckSkipped as skip:
            detail, status = str(skip), "skipped"
        except CheckFailed as failure:
            detail, status = str(failure), "FAIL"
        except Exception as error:  # a crash (compile error, misaligned address, ...) is that op's failure
            message = str(error).strip().splitlines()
            detail, status = f"{type(error).__name__}: {message[0] if message else ''}", "FAIL"
        result = CheckResult(check.op, status, time.perf_counter() - started, implementation, kernel,
                             device.type == "cuda", detail, check.fix)
        report.results.append(result)
        if progress is not None:
            progress(f"  {result.status:<7} {result.seconds:6.2f} s  {result.op}")
    return report


# --------------------------------------------------------------------------------------------- comparisons


def _compare(pairs, tol: float, measure=rel_err) -> str:
    """Every (name, actual, expected) within `tol` of `measure`, finite; the worst one, as text."""
    worst_name, worst = "", -1.0
    for name, actual, expected in pairs:
        if not torch.isfinite(actual).all():
            raise CheckFailed(f"{name}: non-finite values")
        err = measure(actual.detach(), expected.detach())
        if err > tol:
            raise CheckFailed(f"{name}: error {err:.2e} > {tol:.0e}")
        if err > worst:
            worst_name, worst = name, err
    return f"worst error {worst:.1e} ({worst_name}) <= {tol:.0e}"


def _tolerance(table: dict, dtype: torch.dtype, device: torch.device) -> float:
    if device.type == "cpu" and dtype != torch.float32:
        raise CheckSkipped(f"{dtype} on a CPU: Triton's interpreter is only correct in fp32; check fp32 or on a GPU")
    return table[dtype]


def _leaves(tensors: dict, dtype_of: Callable[[str], torch.dtype], device) -> dict:
    return {n: t.to(device, dtype_of(n)).requires_grad_() for n, t in tensors.items()}


def _cotangents(outputs, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]


def _grads(outputs, leaves: dict, seed: int) -> dict:
    """Gradients of a fixed random projection of `outputs` with respect to every leaf."""
    total = sum((o * c).sum() for o, c in zip(outputs, _cotangents(outputs, seed)))
    return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), allow_unused=True)))


# --------------------------------------------------------------------------------------------- GDN


def _gdn_tensors(model: ModelConfig, lengths: list[int], seed: int) -> dict:
    """Inputs as the layer gives them: raw gates (a, A_log, dt_bias, b) with A and dt from the config's own
    initialisation ranges, un-normalised q and k (L2-normalised in the kernel), an initial state per document."""
    g = model.gdn
    gen = torch.Generator().manual_seed(seed)
    T, H, HV, K, V = sum(lengths), g.num_k_heads, g.num_v_heads, g.head_k_dim, g.head_v_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    A = torch.empty(HV, dtype=torch.float64).uniform_(g.a_init_min, g.a_init_max, generator=gen)
    dt = torch.empty(HV, dtype=torch.float64).uniform_(math.log(g.dt_init_min), math.log(g.dt_init_max),
                                                        generator=gen).exp()
    return {"q": randn(1, T, H, K), "k": randn(1, T, H, K), "v": randn(1, T, HV, V), "a": randn(1, T, HV),
            "A_log": A.log(), "dt_bias": dt + torch.log(-torch.expm1(-dt)), "b": randn(1, T, HV),
            "initial_state": randn(len(lengths), HV, K, V) * 0.5}


def _cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _check_gdn_chunk(model, backend, device, dtype, small) -> str:
    from hybridlm.kernels.gated_delta import chunk_gated_delta_rule_ref

    tol = _tolerance(GDN_REL_TOL, dtype, device)
    lengths = [17, 40, 23] if small else [37, 100, 119]  # packed documents, none a multiple of the 64-token chunk
    tensors = _gdn_tensors(model, lengths, seed=0)
    kwargs = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
    leaves = _leaves(tensors, lambda n: torch.float32 if n == "initial_state" else dtype, device)
    cu_seqlens = _cu_seqlens(lengths, device)
    layout = ops.prepare_gdn_chunk_layout(cu_seqlens, sum(lengths), backend=backend)
    o, state = ops.chunk_gated_delta_rule(**leaves, cu_seqlens=cu_seqlens, chunk_layout=layout, backend=backend,
                                          **kwargs)
    grads = _grads([o, state], leaves, seed=1)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    o_ref, state_ref = chunk_gated_delta_rule_ref(**ref_leaves, cu_seqlens=cu_seqlens, **kwargs)
    ref_grads = _grads([o_ref, state_ref], ref_leaves, seed=1)
    if o.dtype != dtype:
        raise CheckFailed(f"output dtype {o.dtype}, expected {dtype}")
    return _compare([("output", o, o_ref), ("final state", state, state_ref)]
                    + [(f"grad of {n}", grads[n], ref_grads[n]) for n in leaves], tol)


def _check_gdn_decode(model, backend, device, dtype) -> str:
    from hybridlm.kernels.gated_delta import naive_recurrent_gated_delta_rule

    tol = _tolerance(GDN_REL_TOL, dtype, device)
    tensors = _gdn_tensors(model, [1, 1, 1], seed=2)  # three rows decoding one token each against a state
    tensors = {n: t.reshape(3, 1, *t.shape[2:]) if t.dim() >= 3 and n != "initial_state" else t
               for n, t in tensors.items()}
    kwargs = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
    inputs = {n: t.to(device, torch.float32 if n == "initial_state" else dtype) for n, t in tensors.items()}
    with torch.no_grad():
        o, state = ops.fused_recurrent_gated_delta_rule(**inputs, backend=backend, **kwargs)
    o_ref, state_ref = naive_recurrent_gated_delta_rule(**{n: t.double() for n, t in inputs.items()}, **kwargs)
    return _compare([("output", o, o_ref), ("state", state, state_ref)], tol)


# --------------------------------------------------------------------------------------------- MoE


def _moe_tensors(model: ModelConfig, num_tokens: int, seed: int):
    """x, router_weight, gate_up, down at the config's sizes (scales that keep activations O(1)), and the selection
    bias when the config has one."""
    m, hidden = model.moe, model.hidden_size
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    tensors = {"x": randn(num_tokens, hidden), "router_weight": randn(m.num_experts, hidden, scale=hidden**-0.5),
               "gate_up": randn(m.num_experts, 2 * m.intermediate_size, hidden, scale=hidden**-0.5),
               "down": randn(m.num_experts, hidden, m.intermediate_size, scale=m.intermediate_size**-0.5)}
    bias = torch.linspace(-0.3, 0.3, m.num_experts) if m.selection_bias else None
    return tensors, bias


def _moe_tokens(model: ModelConfig, small: bool) -> int:
    return (2 if small else 4) * model.moe.num_experts + 3


def _check_choices(counts: torch.Tensor, expected: torch.Tensor) -> None:
    flipped = (counts.cpu() - expected.cpu()).abs().sum().item()
    if flipped > MOE_CHOICE_FLIP_FRACTION * expected.sum().item():
        raise CheckFailed(f"expert choices: {flipped} of {expected.sum().item()} (token, slot) pairs differ")


def _check_moe_router(model, backend, device, dtype, small) -> str:
    from hybridlm.kernels.moe import route_ref

    tol = _tolerance(MOE_MAX_REL_TOL, dtype, device)
    m = model.moe
    tensors, bias = _moe_tensors(model, _moe_tokens(model, small), seed=3)
    tensors = {n: tensors[n] for n in ("x", "router_weight")}
    if backend == "triton":
        from hybridlm.kernels.moe import route
    else:
        route = route_ref

    def run(fn, leaves, bias):
        out = fn(leaves["x"], leaves["router_weight"], m.top_k, m.score_func, m.renormalize, bias)
        outputs = [out.weights, out.scores, *out.loss_stats]
        return out, outputs, _grads(outputs, leaves, seed=4)

    leaves = _leaves(tensors, lambda n: dtype, device)
    out, outputs, grads = run(route, leaves, bias.to(device) if bias is not None else None)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref, ref_outputs, ref_grads = run(route_ref, ref_leaves, bias.to(device).double() if bias is not None else None)
    _check_choices(out.expert_counts, ref.expert_counts)
    names = ["routing weights", "scores", "logsumexp", "probability sums"]
    return _compare([*zip(names, outputs, ref_outputs), ("router logits", out.router_logits, ref.router_logits)]
                    + [(f"grad of {n}", grads[n], ref_grads[n]) for n in leaves], tol, max_rel_err)


def _check_moe_permutation(model, backend, device, small) -> str:
    if backend != "triton":
        raise CheckSkipped("no permutation kernel on this backend (torch.argsort; checked within moe.path)")
    from hybridlm.kernels.moe.permute import permute_by_expert

    m = model.moe
    gen = torch.Generator().manual_seed(5)
    num_tokens = _moe_tokens(model, small)
    ids = torch.stack([torch.randperm(m.num_experts, generator=gen)[: m.top_k] for _ in range(num_tokens)])
    permutation = permute_by_expert(ids.to(device, torch.int32), m.num_experts)
    order = ids.flatten().argsort(stable=True)
    if not torch.equal(permutation.sorted_to_pair.cpu().long(), order):
        raise CheckFailed("sorted_to_pair is not the stable sort of the pairs by expert")
    inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel()))
    if not torch.equal(permutation.pair_to_sorted.cpu().long(), inverse):
        raise CheckFailed("pair_to_sorted is not the inverse of sorted_to_pair")
    if permutation.expert_counts.cpu().tolist() != torch.bincount(ids.flatten(), minlength=m.num_experts).tolist():
        raise CheckFailed("expert counts differ from a bincount of the expert ids")
    return f"exact ({order.numel()} pairs over {m.num_experts} experts)"


def _check_moe_experts(model, backend, device, dtype, small) -> str:
    """The grouped SwiGLU GEMMs and the weighted combine, forward and backward, on a fixed routing (so that a fault
    here is told apart from one in the router or the permutation)."""
    if backend != "triton":
        raise CheckSkipped("no expert kernels on this backend (a loop over experts; checked within moe.path)")
    from hybridlm.kernels.moe.reference import swiglu_experts_ref
    from hybridlm.kernels.moe.routed import RoutedExpertsFunction

    tol = _tolerance(MOE_MAX_REL_TOL, dtype, device)
    m = model.moe
    num_tokens = _moe_tokens(model, small)
    tensors, _ = _moe_tensors(model, num_tokens, seed=6)
    gen = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(m.num_experts, generator=gen)[: m.top_k] for _ in range(num_tokens)])
    tensors = {"x": tensors["x"], "weights": torch.rand(num_tokens, m.top_k, generator=gen, dtype=torch.float64),
               "gate_up": tensors["gate_up"], "down": tensors["down"]}
    order = ids.flatten().argsort(stable=True)
    inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel()))
    counts = torch.bincount(ids.flatten(), minlength=m.num_experts)
    leaves = _leaves(tensors, lambda n: torch.float32 if n == "weights" else dtype, device)
    layout = [t.to(device, torch.int32) for t in (order, inverse, counts)]
    y = RoutedExpertsFunction.apply(leaves["x"], leaves["weights"], leaves["gate_up"], leaves["down"], *layout,
                                    m.top_k)
    grads = _grads([y], leaves, seed=8)
    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    order = order.to(device)
    out_sorted = swiglu_experts_ref(ref["x"][order // m.top_k], ref["gate_up"], ref["down"], counts)
    by_pair = torch.empty_like(out_sorted).index_copy(0, order, out_sorted).view(num_tokens, m.top_k, -1)
    y_ref = (by_pair * ref["weights"].unsqueeze(-1)).sum(dim=1)
    ref_grads = _grads([y_ref], ref, seed=8)
    return _compare([("output", y, y_ref)] + [(f"grad of {n}", grads[n], ref_grads[n]) for n in leaves], tol,
                    max_rel_err)


def _check_moe_path(model, backend, device, dtype, small) -> str:
    from hybridlm.kernels.moe import sparse_moe_ref

    tol = _tolerance(MOE_MAX_REL_TOL, dtype, device)
    m = model.moe
    tensors, bias = _moe_tensors(model, _moe_tokens(model, small), seed=9)
    routing = dict(score_func=m.score_func, renormalize=m.renormalize)

    def run(fn, leaves, bias, **extra):
        routed = fn(*leaves.values(), m.top_k, selection_bias=bias, **routing, **extra)
        outputs = [routed.y, routed.router_logits, *routed.loss_stats]
        return routed.expert_counts, outputs, _grads(outputs, leaves, seed=10)

    leaves = _leaves(tensors, lambda n: dtype, device)
    counts, outputs, grads = run(ops.sparse_moe, leaves, bias.to(device) if bias is not None else None,
                                 backend=backend)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref_counts, ref_outputs, ref_grads = run(sparse_moe_ref, ref_leaves,
                                             bias.to(device).double() if bias is not None else None)
    _check_choices(counts, ref_counts)
    names = ["output", "router logits", "logsumexp", "probability sums"]
    return _compare([*zip(names, outputs, ref_outputs)] + [(f"grad of {n}", grads[n], ref_grads[n]) for n in leaves],
                    tol, max_rel_err)


# --------------------------------------------------------------------------------------------- attention


def _check_attention(model, backend, device, dtype, small) -> str:
    """Packed documents (the pattern the model builds for them), the config's heads, head size and window."""
    from hybridlm.layers import attention

    a = model.attention
    if device.type == "cpu" and dtype != torch.float32:
        raise CheckSkipped(f"{dtype} attention on a CPU is not what training runs; check fp32 or on a GPU")
    tol = ATTENTION_REL_TOL[dtype]
    B, T = 2, 64 if small else 256
    gen = torch.Generator().manual_seed(11)
    segments = torch.randint(0, 4, (B, T), generator=gen).sort(dim=1).values
    tensors = {"q": torch.randn(B, a.num_heads, T, a.head_dim, generator=gen, dtype=torch.float64),
               "k": torch.randn(B, a.num_kv_heads, T, a.head_dim, generator=gen, dtype=torch.float64),
               "v": torch.randn(B, a.num_kv_heads, T, a.head_dim, generator=gen, dtype=torch.float64)}
    backward = not (backend == "flex" and device.type == "cpu")  # FlexAttention has no CPU backward
    leaves = {n: t.to(device, dtype).requires_grad_(backward) for n, t in tensors.items()}
    pattern = attention.sequence_pattern(T, device, window=a.sliding_window, backend=backend,
                                         segment_ids=segments.to(device), sorted_segments=True)
    out = attention.attend(*leaves.values(), pattern)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref_pattern = attention.sequence_pattern(T, device, window=a.sliding_window, backend="sdpa",
                                             segment_ids=segments.to(device), sorted_segments=True)
    ref = attention.attend(*ref_leaves.values(), ref_pattern)
    pairs = [("output", out, ref)]
    if backward:
        grads, ref_grads = _grads([out], leaves, seed=12), _grads([ref], ref_leaves, seed=12)
        pairs += [(f"grad of {n}", grads[n], ref_grads[n]) for n in leaves]
    measured = _compare(pairs, tol)
    return measured if backward else measured + " (forward only: FlexAttention has no CPU backward)"


# --------------------------------------------------------------------------------------------- command line


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def load_train_config(source: str | None, overrides: list[str]):
    """The TrainConfig of a run directory / checkpoint / config file (`source`, dotted overrides on top), or of
    configs/train.yaml composed with Hydra overrides (`model=gpu_1b deepspeed.precision=bf16`)."""
    from omegaconf import OmegaConf

    from hybridlm.train.config import TrainConfig, register_configs, to_train_config

    if source is not None:
        path = Path(source)
        candidates = [path] if path.is_file() else [path / ".hydra" / "config.yaml", path / "config.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ValueError(f"{source}: no config found (looked for {', '.join(map(str, candidates))})")
        bad = [o for o in overrides if "=" not in o or "." not in o.split("=", 1)[0]]
        if bad:
            raise ValueError(f"overrides of a run's config take dotted keys (model.gdn.backend=torch), not {bad}")
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(found),
                                 OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)
    if not (CONFIG_DIR / "train.yaml").is_file():
        raise ValueError(f"{CONFIG_DIR / 'train.yaml'} not found: run from a checkout, or pass a run directory")
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return to_train_config(compose("train", overrides=overrides))


def add_config_source_argument(parser) -> None:
    """The positional arguments `load_train_config` reads: a run, checkpoint or config file, then overrides."""
    parser.add_argument("args", nargs="*", metavar="RUN_OR_OVERRIDE",
                        help="a run directory, checkpoint or config file first (optional), then overrides: Hydra "
                             "ones for configs/train.yaml (model=gpu_1b), dotted keys for a run's config")


def add_doctor_parser(subparsers):
    parser = subparsers.add_parser(
        "doctor", help="check every op a model config uses against its float64 reference on this machine",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_source_argument(parser)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    parser.set_defaults(func=run_doctor)
    return parser


def run_doctor(args) -> int:
    from hybridlm.evaluate.report import write_json
    from hybridlm.train.engine import resolve_precision

    source = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if source is not None else args.args
    cfg = load_train_config(source, overrides)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = DTYPES[resolve_precision(cfg.deepspeed.precision, device)]
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), source or "model")
    report = run_checks(cfg.model, device, dtype, model_name=name,
                        progress=lambda line: print(line, file=sys.stderr, flush=True))  # compiling takes a while
    print(report.format(), flush=True)
    if args.json is not None:
        write_json(args.json, report.to_dict())
    return 1 if report.failures else 0
