"""Benchmark the routed sparse-MoE path, forward + backward (router -> experts -> combine), bf16 on a GPU.

Compared at each (tokens, H, I, E, k):
  ours         hybridlm.kernels.moe.sparse_moe (Triton router, sync-free permutation, grouped GEMMs, combine)
  hf_grouped   transformers 5 Qwen3-Next router + experts with experts_implementation="grouped_mm"
  hf_loop      the same with the eager per-expert loop
  dense        a dense SwiGLU MLP with intermediate k*I: same active FLOPs, no routing (speed-of-light reference)
Reports median time, TFLOP/s of the active expert GEMMs, memory per implementation (peak extra memory of a step on
a GPU; on any device, the bytes autograd saves for backward beyond the inputs and weights), speedups; prints a
table and writes JSON with `--out`, recording the device, versions, date, git commit and command line.

    python eval/bench/moe.py --out eval/bench/results/moe_h100.json
    python eval/bench/moe.py --smoke          # tiny shapes; on CPU through the Triton interpreter (plumbing only)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

DEFAULT_SHAPES = ["16384,2048,512,64,8", "16384,2048,768,128,8", "8192,4096,1536,8,2"]
SMOKE_SHAPES = ["40,32,16,4,2"]
IMPLS = ("ours", "hf_grouped", "hf_loop", "dense")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", default=None, metavar="T,H,I,E,K",
        help=f"shapes as tokens,hidden,intermediate,experts,top_k (default: {' '.join(DEFAULT_SHAPES)})",
    )  # fmt: skip
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to time")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations (also autotunes our kernels)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, 1 iteration; on CPU through the Triton interpreter in fp32"
    )
    parser.add_argument("--out", default=None, help="write results as JSON to this path")
    args = parser.parse_args(argv)
    shapes = args.shapes or (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)
    try:
        args.shapes = [tuple(int(v) for v in shape.split(",")) for shape in shapes]
    except ValueError:
        parser.error(f"--shapes takes T,H,I,E,K integer tuples, got {shapes}")
    for shape in args.shapes:
        if len(shape) != 5 or not 1 <= shape[4] <= shape[3]:
            parser.error(f"shape {shape} must be tokens,hidden,intermediate,experts,top_k with 1 <= top_k <= experts")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.smoke:
        args.warmup, args.iters = 1, 1
    return args


def make_inputs(shape, dtype, device, seed):
    import torch

    tokens, hidden, intermediate, experts, _ = shape
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale):
        return (torch.randn(*size, generator=generator, device=device, dtype=torch.float32) * scale).to(dtype)

    return dict(
        x=randn(tokens, hidden, scale=1.0),
        router_weight=randn(experts, hidden, scale=hidden**-0.5),
        gate_up=randn(experts, 2 * intermediate, hidden, scale=hidden**-0.5),
        down=randn(experts, hidden, intermediate, scale=intermediate**-0.5),
        dy=randn(tokens, hidden, scale=1.0),
    )


def build_step(impl, shape, inputs):
    """(step, leaves): `step` runs one forward + backward and returns the forward output; `leaves` are the tensors
    it differentiates (x and the weights)."""
    import torch
    import torch.nn.functional as F

    tokens, hidden, intermediate, experts, top_k = shape
    x = inputs["x"].detach().clone().requires_grad_()
    dy = inputs["dy"]

    if impl == "ours":
        from hybridlm.kernels.moe import sparse_moe

        params = [inputs[name].detach().clone().requires_grad_() for name in ("router_weight", "gate_up", "down")]

        def forward():
            return sparse_moe(x, *params, top_k=top_k).y

    elif impl in ("hf_grouped", "hf_loop"):
        from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextExperts, Qwen3NextTopKRouter

        config = Qwen3NextConfig(
            hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=experts,
            num_experts_per_tok=top_k, norm_topk_prob=True, hidden_act="silu",
        )  # fmt: skip
        config._experts_implementation = "grouped_mm" if impl == "hf_grouped" else "eager"
        router = Qwen3NextTopKRouter(config).to(x.device)
        module = Qwen3NextExperts(config).to(x.device)
        with torch.no_grad():
            router.weight.copy_(inputs["router_weight"].float())
            module.gate_up_proj.data = inputs["gate_up"].clone()
            module.down_proj.data = inputs["down"].clone()
        router.to(x.dtype)
        params = [router.weight, module.gate_up_proj, module.down_proj]

        def forward():
            _, weights, expert_ids = router(x)
            return module(x, expert_ids, weights)

    elif impl == "dense":
        dense_intermediate = top_k * intermediate
        scale = hidden**-0.5
        gate_up = (torch.randn(2 * dense_intermediate, hidden, device=x.device) * scale).to(x.dtype).requires_grad_()
        down = (torch.randn(hidden, dense_intermediate, device=x.device) * dense_intermediate**-0.5).to(x.dtype)
        down.requires_grad_()
        params = [gate_up, down]

        def forward():
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, down)

    else:
        raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")

    leaves = [x, *params]

    def step():
        for tensor in leaves:
            tensor.grad = None
        y = forward()
        y.backward(dy)
        return y

    return step, leaves


def saved_for_backward_mib(step, leaves) -> float:
    """MiB that autograd keeps between the forward and the backward of `step`, beyond the leaves themselves:
    the activation memory one layer holds during training, on any device. Views of one buffer count once."""
    from hybridlm.evaluate.memory import saved_for_backward

    _, saved = saved_for_backward(step, leaves)
    return sum(saved.values()) / 2**20


def time_step(step, device, warmup, iters):
    """(median ms, peak extra MiB or None) of `step`."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        peak_mib = None
    return statistics.median(times), peak_mib


def check_against_hf(shape, inputs):
    """Relative max error of our forward vs transformers' grouped_mm path (same weights; bf16 routing may differ)."""
    ours = build_step("ours", shape, inputs)[0]().detach().float()
    hf = build_step("hf_grouped", shape, inputs)[0]().detach().float()
    return ((ours - hf).abs().max() / hf.abs().max()).item()


def main(argv=None):
    args = parse_args(argv)
    device = e2e.kernel_bench_device("eval/bench/moe.py", args.smoke)
    import torch

    # The Triton interpreter computes bf16 wrongly (triton issue 11584): the CPU smoke run uses fp32.
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    from hybridlm.evaluate.report import finish_report, run_metadata, write_json

    script = str(Path(__file__).resolve().relative_to(REPO))
    report = {
        "benchmark": "routed sparse MoE forward+backward",
        **run_metadata(device, [script, *(sys.argv[1:] if argv is None else argv)]),
        "dtype": str(dtype).removeprefix("torch."), "warmup": args.warmup, "iters": args.iters, "smoke": args.smoke,
        "complete": False, "results": [],
    }  # fmt: skip
    results = report["results"]
    for shape in args.shapes:
        tokens, hidden, intermediate, experts, top_k = shape
        inputs = make_inputs(shape, dtype, device, args.seed)
        # Active expert FLOPs, forward + backward (3x forward): gate_up (2I x H) and down (H x I) per routed pair.
        flops = 3 * 2 * tokens * top_k * 3 * hidden * intermediate
        row = {"tokens": tokens, "hidden": hidden, "intermediate": intermediate, "experts": experts, "top_k": top_k}
        for impl in args.impls:
            try:
                step, leaves = build_step(impl, shape, inputs)
                ms, peak_mib = time_step(step, device, args.warmup, args.iters)
                saved_mib = saved_for_backward_mib(step, leaves)
                row[impl] = {"ms": ms, "tflops": flops / ms / 1e9, "peak_mib": peak_mib, "saved_mib": saved_mib}
            except torch.OutOfMemoryError as error:  # the per-expert loop can run out at large shapes
                row[impl] = {"error": f"out of memory: {error}"[:200]}
            if device == "cuda":
                torch.cuda.empty_cache()
        if "hf_grouped" in args.impls:
            row["max_rel_diff_vs_hf_grouped"] = check_against_hf(shape, inputs)
        ours_ms = row.get("ours", {}).get("ms")
        for baseline in ("hf_grouped", "hf_loop", "dense"):
            if ours_ms and row.get(baseline, {}).get("ms"):
                row[f"speedup_vs_{baseline}"] = row[baseline]["ms"] / ours_ms
        results.append(row)
        if args.out:  # after every shape, so a run stopped by a time limit keeps what it measured
            write_json(args.out, report)
    return finish_report(report, args.out, print_table)


def print_table(report):
    """One row per shape; per implementation: median ms, peak extra MiB (GPU) / MiB saved for backward."""
    print(f"{report['benchmark']} | {report['dtype']} | {report['device']} | {report['date']} | {report['git']['commit']}")
    header = f"{'T,H,I,E,k':<24}" + "".join(f"{impl:>28}" for impl in IMPLS) + f"{'vs hf_grouped':>15}{'vs dense':>10}"
    print(header)
    for row in report["results"]:
        shape = ",".join(str(row[key]) for key in ("tokens", "hidden", "intermediate", "experts", "top_k"))
        cells = []
        for impl in IMPLS:
            entry = row.get(impl)
            if entry is None:
                cells.append(f"{'-':>28}")
            elif "error" in entry:
                cells.append(f"{'OOM':>28}")
            else:
                peak = f"{entry['peak_mib']:.0f}" if entry["peak_mib"] is not None else "-"
                cells.append(f"{entry['ms']:>9.2f}ms {peak:>6}/{entry['saved_mib']:.4g}MiB".rjust(28))
        speedups = [row.get(f"speedup_vs_{b}") for b in ("hf_grouped", "dense")]
        print(f"{shape:<24}" + "".join(cells) + "".join(f"{s:>14.2f}x" if s else f"{'-':>15}" for s in speedups))


if __name__ == "__main__":
    main()
