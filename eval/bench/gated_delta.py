"""Benchmark the gated delta rule: our Triton kernel vs fla 0.6's Triton path vs causal attention, bf16, on CUDA.

Times forward and forward+backward with `triton.testing.do_bench` (median, at least 20 timed runs) at the issue's
shapes, prints a table with the ratio ours/fla, and writes JSON (device, versions, date, timings) to --out.

    python eval/bench/gated_delta.py --out eval/bench/results/gated_delta_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

MIN_RUNS = 20


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path of the JSON results file to write")
    parser.add_argument("--shapes", nargs="*", choices=[s.name for s in SHAPES], help="subset of shapes (default all)")
    parser.add_argument("--no-attention", action="store_true", help="skip the causal attention baseline")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def document_bounds(shape: Shape, gen, torch):
    """cu_seqlens of `documents` random lengths (at least 64 tokens each) summing to seq_len."""
    cuts = torch.randperm(shape.seq_len // 64 - 1, generator=gen)[: shape.documents - 1].add(1).sort().values * 64
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([shape.seq_len])]).to(torch.int32)


def make_inputs(shape: Shape, seed: int):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    B, T, H, HV, K, V = shape.batch, shape.seq_len, shape.qk_heads, shape.v_heads, shape.head_k, shape.head_v
    tensors = {
        "q": torch.randn(B, T, H, K, generator=gen),
        "k": torch.randn(B, T, H, K, generator=gen),
        "v": torch.randn(B, T, HV, V, generator=gen),
        "g": F.logsigmoid(torch.randn(B, T, HV, generator=gen) + 3.0),
        "beta": torch.sigmoid(torch.randn(B, T, HV, generator=gen)),
    }
    tensors = {n: t.cuda().to(torch.bfloat16 if n in ("q", "k", "v") else torch.float32) for n, t in tensors.items()}
    cu_seqlens = document_bounds(shape, gen, torch).cuda() if shape.documents else None
    return tensors, cu_seqlens


def time_ms(fn, grad_inputs=None) -> float:
    """Median of at least MIN_RUNS timed runs."""
    import torch
    from triton.testing import do_bench

    fn()  # compile and autotune outside the timing
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    rep = max(100.0, 1.5 * MIN_RUNS * start.elapsed_time(end))
    return do_bench(fn, warmup=max(25.0, 3 * start.elapsed_time(end)), rep=rep, grad_to_none=grad_inputs,
                    return_mode="median")


def gated_delta_timings(fn, tensors, cu_seqlens) -> dict:
    import torch

    def forward():
        with torch.no_grad():
            fn(**tensors, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)

    leaves = {n: t.detach().requires_grad_() for n, t in tensors.items()}
    do = torch.randn_like(tensors["v"])

    def forward_backward():
        o, _ = fn(**leaves, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)
        o.backward(do)

    return {"fwd_ms": time_ms(forward), "fwd_bwd_ms": time_ms(forward_backward, list(leaves.values()))}


def attention_timings(shape: Shape, cu_seqlens) -> dict:
    """Causal softmax attention with HV heads of dim V at the same token count (FlashAttention via PyTorch)."""
    import torch
    import torch.nn.functional as F

    B, T, heads, D = shape.batch, shape.seq_len, shape.v_heads, shape.head_v
    if cu_seqlens is None:
        q, k, v = (torch.randn(B, heads, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))

        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (torch.randn(T, heads, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

        def attend():
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, window_size=(-1, 0))

    do = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            attend()

    def forward_backward():
        attend().backward(do)

    return {"fwd_ms": time_ms(forward), "fwd_bwd_ms": time_ms(forward_backward, [q, k, v])}


def guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as error:  # a missing backend must not hide the other columns
        return {"error": f"{type(error).__name__}: {error}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gated_delta benchmark: needs a CUDA GPU (Triton's CPU interpreter is far too slow to time); "
              "run it on an H100/H200.", file=sys.stderr)
        return 2
    # fla's FlashQLA backend, when present, would replace the Triton path we compare against.
    os.environ["FLA_FLASH_QLA"] = "0"
    import fla
    import triton
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    from hybridlm.kernels.gated_delta import chunk_gated_delta_rule

    shapes = [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    rows = []
    for shape in shapes:
        tensors, cu_seqlens = make_inputs(shape, args.seed)
        row = {"shape": asdict(shape),
               "ours": guarded(gated_delta_timings, chunk_gated_delta_rule, tensors, cu_seqlens),
               "fla": guarded(gated_delta_timings, fla_chunk, tensors, cu_seqlens)}
        if not args.no_attention:
            row["attention"] = guarded(attention_timings, shape, cu_seqlens)
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if key in row["ours"] and key in row["fla"]:
                row[f"ours_over_fla_{key[:-3]}"] = row["ours"][key] / row["fla"][key]
        rows.append(row)
        torch.cuda.empty_cache()

    header = f"{'shape':28s} {'ours fwd':>9s} {'fla fwd':>9s} {'attn fwd':>9s} {'ours f+b':>9s} {'fla f+b':>9s} " \
             f"{'attn f+b':>9s} {'fwd/fla':>8s} {'f+b/fla':>8s}"
    print(header)
    for row in rows:
        cell = lambda who, key: f"{row.get(who, {}).get(key, float('nan')):9.3f}"  # noqa: E731
        print(f"{row['shape']['name']:28s} {cell('ours', 'fwd_ms')} {cell('fla', 'fwd_ms')} "
              f"{cell('attention', 'fwd_ms')} {cell('ours', 'fwd_bwd_ms')} {cell('fla', 'fwd_bwd_ms')} "
              f"{cell('attention', 'fwd_bwd_ms')} {row.get('ours_over_fla_fwd', float('nan')):8.3f} "
              f"{row.get('ours_over_fla_fwd_bwd', float('nan')):8.3f}")
        for who in ("ours", "fla", "attention"):
            if "error" in row.get(who, {}):
                print(f"  {who}: {row[who]['error']}")

    result = {
        "benchmark": "gated_delta",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "fla": fla.__version__,
                     "python": platform.python_version()},
        "dtype": "bfloat16",
        "timing": f"triton.testing.do_bench median, >= {MIN_RUNS} runs",
        "use_qk_l2norm_in_kernel": True,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
