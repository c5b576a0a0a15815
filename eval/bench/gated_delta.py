"""Benchmark the gated delta rule: our Triton kernel vs fla 0.6's Triton path vs causal attention, bf16, on CUDA.

Columns at each shape, forward and forward+backward, all with the in-kernel L2 norm of q and k:
  ours       hybridlm.kernels.gated_delta.chunk_gated_delta_rule given g (log decay) and beta
  fla        fla.ops.gated_delta_rule.chunk_gated_delta_rule (FLA_FLASH_QLA=0: its Triton path), same g and beta
  ours_raw   ours from the raw a, A_log, dt_bias, b the model's layer passes (gate and sigmoid fused in the kernels)
  fla_raw    fla behind hybridlm.ops (backend="fla"): the same raw inputs, gate and sigmoid in PyTorch first
  attention  causal softmax attention at the same token count (SDPA / varlen FlashAttention), HV heads of dim V
Each time is the median of `triton.testing.do_bench(return_mode="all")` with at least 20 timed runs (the count is
recorded). Varlen shapes pack documents of random lengths that are not multiples of 64. Prints a table with the
ratios ours/fla and writes JSON with the device, versions, date, git commit and command line.

    python eval/bench/gated_delta.py --out eval/bench/results/gated_delta_h100.json
    python eval/bench/gated_delta.py --smoke --out /tmp/gdn.json   # tiny, CPU via the Triton interpreter: plumbing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
MIN_RUNS = 20
COLUMNS = ("ours", "fla", "ours_raw", "fla_raw", "attention")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq_len: int
    qk_heads: int
    v_heads: int
    head_k: int
    head_v: int
    documents: int = 0  # > 0: batch of one with this many packed documents (cu_seqlens)


SHAPES = [
    Shape("B1_T32768_H16_HV32", 1, 32768, 16, 32, 128, 128),
    Shape("B4_T4096_H16_HV32", 4, 4096, 16, 32, 128, 128),
    Shape("B8_T2048_H16_HV16", 8, 2048, 16, 16, 128, 128),
    Shape("varlen16_T32768_H16_HV32", 1, 32768, 16, 32, 128, 128, documents=16),
]
SMOKE_SHAPES = [Shape("smoke_varlen2_T70", 1, 70, 1, 2, 16, 16, documents=2)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="path of the JSON results file to write")
    parser.add_argument("--shapes", nargs="*", choices=[s.name for s in SHAPES], help="subset of shapes (default all)")
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=COLUMNS, help="what to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny varlen shape, fp32, one timed run each; on CPU through the Triton interpreter")
    return parser.parse_args(argv)


def document_bounds(shape: Shape, gen, torch):
    """cu_seqlens of `documents` random lengths (>= 1 token, not all multiples of 64) summing to seq_len."""
    while True:
        cuts = torch.randperm(shape.seq_len - 1, generator=gen)[: shape.documents - 1].add(1).sort().values
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([shape.seq_len])])
        if bool(((bounds[1:] - bounds[:-1]) % 64 != 0).any()):
            return bounds.to(torch.int32)


def make_inputs(shape: Shape, seed: int, device: str, dtype):
    """Benchmark tensors: q, k, v; g and beta; the raw a, A_log, dt_bias, b (model-like ranges); cu_seqlens."""
    import math

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    B, T, H, HV, K, V = shape.batch, shape.seq_len, shape.qk_heads, shape.v_heads, shape.head_k, shape.head_v

    def randn(*size):
        return torch.randn(*size, generator=gen)

    tensors = {
        "q": randn(B, T, H, K).to(dtype), "k": randn(B, T, H, K).to(dtype), "v": randn(B, T, HV, V).to(dtype),
        "g": F.logsigmoid(randn(B, T, HV) + 3.0), "beta": torch.sigmoid(randn(B, T, HV)),
    }  # fmt: skip
    raw = {"q": tensors["q"], "k": tensors["k"], "v": tensors["v"], "a": randn(B, T, HV).to(dtype),
           "A_log": torch.empty(HV).uniform_(math.log(1.0), math.log(16.0), generator=gen),
           "dt_bias": torch.empty(HV).uniform_(-6.9, -2.3, generator=gen), "b": randn(B, T, HV).to(dtype)}
    cu_seqlens = document_bounds(shape, gen, torch).to(device) if shape.documents else None
    return ({n: t.to(device) for n, t in tensors.items()}, {n: t.to(device) for n, t in raw.items()}, cu_seqlens)


def time_ms(fn, device: str, grad_inputs=None, runs: int = MIN_RUNS) -> dict:
    """Median (and count, min, max) of at least `runs` timed runs: do_bench(return_mode="all") on CUDA, called
    again with a longer budget until it has timed enough; a wall clock on CPU (no warm-up: nothing compiles)."""
    if device != "cuda":
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    else:
        import torch
        from triton.testing import do_bench

        fn()  # compile and autotune outside the timing
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one_run_ms = (time.perf_counter() - start) * 1e3
        rep = max(100.0, 1.5 * runs * one_run_ms)
        times = []
        while len(times) < runs:
            times += do_bench(fn, warmup=max(25.0, 3 * one_run_ms), rep=rep, grad_to_none=grad_inputs,
                              return_mode="all")
            rep *= 2
    return {"ms": statistics.median(times), "runs": len(times), "min_ms": min(times), "max_ms": max(times)}


def gated_delta_timings(fn, tensors, cu_seqlens, device, runs) -> dict:
    import torch

    def forward():
        with torch.no_grad():
            fn(**tensors, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)

    leaves = {n: t.detach().requires_grad_(t.is_floating_point()) for n, t in tensors.items()}
    do = torch.randn_like(tensors["v"])

    def forward_backward():
        o, _ = fn(**leaves, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)
        o.backward(do)

    return {"fwd": time_ms(forward, device, runs=runs),
            "fwd_bwd": time_ms(forward_backward, device, list(leaves.values()), runs=runs)}


def attention_timings(shape: Shape, cu_seqlens, device, dtype, runs) -> dict:
    """Causal softmax attention with HV heads of dim V at the same token count (FlashAttention via PyTorch)."""
    import torch
    import torch.nn.functional as F

    B, T, heads, D = shape.batch, shape.seq_len, shape.v_heads, shape.head_v
    if cu_seqlens is None or device != "cuda":
        q, k, v = (torch.randn(B, heads, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (torch.randn(T, heads, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

        def attend():
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, window_size=(-1, 0))

    do = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            attend()

    def forward_backward():
        attend().backward(do)

    return {"fwd": time_ms(forward, device, runs=runs), "fwd_bwd": time_ms(forward_backward, device, [q, k, v],
                                                                           runs=runs)}


def guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as error:  # a missing backend must not hide the other columns
        return {"error": f"{type(error).__name__}: {error}"[:500]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = e2e.kernel_bench_device("eval/bench/gated_delta.py", args.smoke)
    # fla's FlashQLA backend, when present, would replace the Triton path we compare against.
    os.environ["FLA_FLASH_QLA"] = "0"
    import torch

    from hybridlm import ops
    from hybridlm.evaluate.report import finish_report, run_metadata, write_json
    from hybridlm.kernels.gated_delta import chunk_gated_delta_rule

    def fla_chunk(**kwargs):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_impl

        return fla_impl(**kwargs)

    def fla_raw(**kwargs):
        return ops.chunk_gated_delta_rule(**kwargs, backend="fla")

    # The Triton interpreter computes bf16 wrongly: the CPU smoke run uses fp32 and one timed run per column.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    runs = MIN_RUNS if device == "cuda" else 1
    shapes = SMOKE_SHAPES if args.smoke else [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    implementations = {"ours": (chunk_gated_delta_rule, False), "fla": (fla_chunk, False),
                       "ours_raw": (chunk_gated_delta_rule, True), "fla_raw": (fla_raw, True)}
    script = str(Path(__file__).resolve().relative_to(REPO))
    report = {
        "benchmark": "gated_delta",
        **run_metadata(device, [script, *(sys.argv[1:] if argv is None else argv)]),
        "dtype": str(dtype).removeprefix("torch."),
        "smoke": args.smoke,
        "timing": f"median of triton.testing.do_bench(return_mode='all'), >= {runs} timed runs (count in 'runs')"
                  if device == "cuda" else "wall clock, CPU interpreter (plumbing only, the numbers mean nothing)",
        "use_qk_l2norm_in_kernel": True,
        "complete": False,
        "rows": [],
    }
    rows = report["rows"]
    for shape in shapes:
        tensors, raw, cu_seqlens = make_inputs(shape, args.seed, device, dtype)
        row = {"shape": asdict(shape)}
        if cu_seqlens is not None:
            row["document_lengths"] = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        for column in args.columns:
            if column == "attention":
                row[column] = guarded(attention_timings, shape, cu_seqlens, device, dtype, runs)
            else:
                fn, from_raw = implementations[column]
                row[column] = guarded(gated_delta_timings, fn, raw if from_raw else tensors, cu_seqlens, device, runs)
        for mode in ("fwd", "fwd_bwd"):
            for ours, theirs in (("ours", "fla"), ("ours_raw", "fla_raw")):
                if mode in row.get(ours, {}) and mode in row.get(theirs, {}):
                    row[f"{ours}_over_{theirs}_{mode}"] = row[ours][mode]["ms"] / row[theirs][mode]["ms"]
        rows.append(row)
        if args.out:  # after every shape, so a run stopped by a time limit keeps what it measured
            write_json(args.out, report)
        if device == "cuda":
            torch.cuda.empty_cache()
    return finish_report(report, args.out, print_table)


def print_table(report: dict) -> None:
    columns = [c for c in COLUMNS if any(c in row for row in report["rows"])]
    print(f"{'shape':28s} {'mode':8s}" + "".join(f" {c:>10s}" for c in columns) + f" {'ours/fla':>9s} {'raw/fla':>8s}")
    for row in report["rows"]:
        for mode in ("fwd", "fwd_bwd"):
            cells = "".join(f" {row.get(c, {}).get(mode, {}).get('ms', float('nan')):10.3f}" for c in columns)
            ratios = (f" {row.get(f'ours_over_fla_{mode}', float('nan')):9.3f}"
                      f" {row.get(f'ours_raw_over_fla_raw_{mode}', float('nan')):8.3f}")
            print(f"{row['shape']['name']:28s} {mode:8s}{cells}{ratios}")
        for column in columns:
            if "error" in row.get(column, {}):
                print(f"  {column}: {row[column]['error']}")


if __name__ == "__main__":
    main()
