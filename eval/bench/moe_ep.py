"""Benchmark one expert-parallel MoE layer, forward + backward, at EP = 1, 2, 4, 8 on one node (issue 16).

Each EP size runs in EP processes, one GPU each (NCCL), every rank with the same tokens (--tokens-per-rank: what a
fixed micro-batch gives each GPU) and num_experts / EP experts. Timed, forward + backward each, the median over
--iters of the slowest rank:

  layer       hybridlm.parallel.expert.expert_parallel_moe: the whole routed path, as training runs it
  routing     its router (scores, top-k, weights, counts)
  dispatch    the split-size exchange (the layer's one device-to-host read) and the all-to-all of the rows to
              their experts' ranks; its backward is the all-to-all back
  experts     the local experts' grouped GEMMs (Triton on a GPU) on the rows this rank received
  combine     the all-to-all back and the weighted sum over the k slots; backward: the all-to-all out again
  all_to_all  the bare all_to_all_single of the same rows, out and back, twice (forward and backward): the floor

The phases are the layer's own functions (router, dispatch, local_experts, combine), run one at a time, so
`layer / sum of phases` shows what running them together costs or saves, and `layer / (experts + all_to_all)` is
the issue's efficiency target (<= 1.3 at EP = 8). EP = 1 runs the same code on one GPU (its all-to-alls are local
copies). Each rank first checks the sharded layer's output against the whole layer (every expert, on its own
tokens: `max_rel_diff_vs_all_experts`). Writes JSON (device, versions, date, git commit, command) with --out after
every EP size.

    python eval/bench/moe_ep.py --out eval/bench/results/moe_ep_h100.json      # needs >= 2 GPUs on the node
    python eval/bench/moe_ep.py --smoke                                         # 2 CPU ranks on gloo, tiny

--smoke checks the plumbing on CPU (EP = 1 and 2, fp32, the PyTorch reference experts): its times mean nothing.
No GPU numbers have been measured with this script yet.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Qwen3-Next-80B-A3B's MoE layer: hidden 2048, expert intermediate 512, 512 experts, top-10; 8K tokens per GPU.
DEFAULT_SHAPE = "8192,2048,512,512,10"
SMOKE_SHAPE = "32,16,8,4,2"
HOST = "127.0.0.1"
PHASES = ("layer", "routing", "dispatch", "experts", "combine", "all_to_all")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=None, metavar="T,H,I,E,K",
                        help=f"tokens per rank, hidden, intermediate, experts, top_k (default {DEFAULT_SHAPE})")
    parser.add_argument("--ep", type=int, nargs="+", default=None, help="EP sizes (default 1 2 4 8; --smoke: 1 2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations (also autotunes the kernels)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations; the median is reported")
    parser.add_argument("--smoke", action="store_true", help="2 CPU ranks on gloo, tiny shape, fp32")
    parser.add_argument("--out", default=None, help="write results as JSON to this path")
    args = parser.parse_args(argv)
    shape = args.shape or (SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE)
    try:
        args.shape = tuple(int(v) for v in shape.split(","))
    except ValueError:
        parser.error(f"--shape takes T,H,I,E,K integers, got {shape!r}")
    if len(args.shape) != 5 or not 1 <= args.shape[4] <= args.shape[3]:
        parser.error(f"--shape {shape} must be tokens,hidden,intermediate,experts,top_k with 1 <= top_k <= experts")
    args.ep = args.ep or ([1, 2] if args.smoke else [1, 2, 4, 8])
    bad = [ep for ep in args.ep if ep < 1 or args.shape[3] % ep]
    if bad:
        parser.error(f"--ep {bad}: each EP size must be >= 1 and divide the {args.shape[3]} experts")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.smoke:
        args.warmup, args.iters = 1, 2
    return args


def _rank_main(rank: int, ep_size: int, args, port: int, results) -> None:
    """One rank of one EP size: time every phase, then rank 0 reports the slowest rank's medians."""
    import torch
    import torch.distributed as dist

    device = torch.device(f"cuda:{rank}" if not args.smoke else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The launcher's store (on a port it holds, so no other process can take it between choosing and binding)
    store = dist.TCPStore(HOST, port, ep_size + 1, is_master=False)
    dist.init_process_group("gloo" if args.smoke else "nccl", store=store, rank=rank, world_size=ep_size,
                            device_id=device if device.type == "cuda" else None)  # fmt: skip
    try:
        row = _time_phases(rank, ep_size, args, device)
        if rank == 0:
            results.put(row)
    finally:
        dist.destroy_process_group()


def _time_phases(rank: int, ep_size: int, args, device) -> dict:
    import torch
    import torch.distributed as dist

    from hybridlm.ops import sparse_moe
    from hybridlm.ops.registry import MOE
    from hybridlm.parallel.expert import combine, dispatch, expert_parallel_moe, local_experts, router
    from hybridlm.parallel.groups import ExpertParallelGroup

    tokens, hidden, intermediate, experts, top_k = args.shape
    dtype = torch.float32 if args.smoke else torch.bfloat16
    local = experts // ep_size
    ep = ExpertParallelGroup(group=dist.group.WORLD, size=ep_size, rank=rank, num_local_experts=local,
                             name=f"ep_size_{ep_size}")  # fmt: skip
    backend = MOE.resolve("auto", device)
    route = router(backend)
    weights = torch.Generator().manual_seed(0)  # the same full layer on every rank; each keeps its experts
    router_weight = (torch.randn(experts, hidden, generator=weights) * hidden**-0.5).to(device, dtype)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=weights) * hidden**-0.5
    down = torch.randn(experts, hidden, intermediate, generator=weights) * intermediate**-0.5
    data = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, hidden, generator=data).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, hidden, generator=data).to(device, dtype)
    with torch.no_grad():  # the check: the layer's output is the full layer's (every expert here) on these tokens
        full = sparse_moe(x, router_weight, gate_up.to(device, dtype), down.to(device, dtype), top_k,
                          backend=backend).y.float()  # fmt: skip
        sharded = expert_parallel_moe(x, router_weight, *(w[rank * local:(rank + 1) * local].to(device, dtype)
                                                          for w in (gate_up, down)), top_k, ep, backend=backend)
        max_rel_diff = ((sharded.y.float() - full).abs().max() / full.abs().max()).item()
    del full
    mine = slice(rank * local, (rank + 1) * local)
    gate_up, down = (w[mine].to(device, dtype).requires_grad_() for w in (gate_up, down))

    with torch.no_grad():  # the inputs of each phase alone, as the layer would hand them on
        routing = route(x, router_weight, top_k, "softmax", True, None)
        rows, local_ids, sent = dispatch(x, routing.expert_ids, routing.expert_counts, ep)
        expert_out = local_experts(rows, local_ids, gate_up, down, backend)
    d_weights, d_rows, d_out = torch.randn_like(routing.weights), torch.randn_like(rows), torch.randn_like(expert_out)
    rows_in = rows.clone().requires_grad_()
    out_in = expert_out.clone().requires_grad_()
    weights_in = routing.weights.clone().requires_grad_()
    send_rows = x.detach()[sent.order // top_k]
    received = torch.empty_like(rows)
    returned = torch.empty_like(send_rows)

    def bare_all_to_all():
        for _ in range(2):  # forward and backward each move the rows out and back
            dist.all_to_all_single(received, send_rows, sent.receive_per_rank, sent.send_per_rank)
            dist.all_to_all_single(returned, received, sent.send_per_rank, sent.receive_per_rank)

    def layer():
        expert_parallel_moe(x, router_weight, gate_up, down, top_k, ep, backend=backend).y.backward(dy)

    def routing_alone():
        (route(x, router_weight, top_k, "softmax", True, None).weights * d_weights).sum().backward()

    steps = {
        "layer": layer,
        "routing": routing_alone,
        "dispatch": lambda: dispatch(x, routing.expert_ids, routing.expert_counts, ep)[0].backward(d_rows),
        "experts": lambda: local_experts(rows_in, local_ids, gate_up, down, backend).backward(d_out),
        "combine": lambda: combine(out_in, weights_in, sent, ep).backward(dy.float()),
        "all_to_all": bare_all_to_all,
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    medians = []
    for phase in PHASES:
        times = []
        for i in range(args.warmup + args.iters):
            sync()
            start = time.perf_counter()
            steps[phase]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
        medians.append(statistics.median(times))
    slowest = torch.tensor(medians, dtype=torch.float64, device=device)
    most, total = (torch.tensor([rows.shape[0]], dtype=torch.int64, device=device) for _ in range(2))
    worst = torch.tensor([max_rel_diff], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    ms = dict(zip(PHASES, slowest.tolist()))
    phases = sum(ms[p] for p in ("routing", "dispatch", "experts", "combine"))
    return {
        "ep": ep_size, "experts_per_rank": local, "backend": backend,
        "ms": ms, "layer_over_phases": ms["layer"] / phases,
        # max |y - y_full| / max |y_full| over the ranks: the sharded layer against all experts on one rank
        "max_rel_diff_vs_all_experts": float(worst),
        "layer_over_experts_plus_all_to_all": ms["layer"] / (ms["experts"] + ms["all_to_all"]),
        # dispatched (token, slot) rows: the most any rank received, and all of them (= EP x tokens x top_k)
        "rows_received_max": int(most), "rows_total": int(total),
        "all_to_all_mib_per_rank": 4 * send_rows.numel() * send_rows.element_size() / 2**20,
    }  # fmt: skip


def run_ep_size(ep_size: int, args) -> dict:
    """Spawn `ep_size` ranks for one EP size; rank 0's row, or an error naming the ranks that failed."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    store = dist.TCPStore(HOST, 0, ep_size + 1, is_master=True, wait_for_workers=False)
    ranks = [context.Process(target=_rank_main, args=(rank, ep_size, args, store.port, results))
             for rank in range(ep_size)]  # fmt: skip
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    failed = [rank for rank, process in enumerate(ranks) if process.exitcode != 0]
    if failed:
        return {"ep": ep_size, "error": f"ranks {failed} failed (exit codes "
                                        f"{[ranks[r].exitcode for r in failed]}); see their tracebacks above"}
    return results.get(timeout=60)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from hybridlm.evaluate.report import finish_report, run_metadata, write_json

    if args.smoke:
        device = "cpu"
    else:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            sys.exit("eval/bench/moe_ep.py: no CUDA GPU visible; each EP rank needs a GPU of this node (EP > 1 at "
                     "least 2); `--smoke` checks the plumbing on CPU")
        too_many = [ep for ep in args.ep if ep > gpus]
        if too_many:
            print(f"EP sizes {too_many} skipped: {gpus} GPU(s) on this node", file=sys.stderr)
            args.ep = [ep for ep in args.ep if ep <= gpus]
        device = "cuda"
    tokens, hidden, intermediate, experts, top_k = args.shape
    script = str(Path(__file__).resolve().relative_to(REPO))
    report = {
        "benchmark": "expert-parallel MoE layer forward+backward",
        **run_metadata(device, [script, *(sys.argv[1:] if argv is None else argv)]),
        "dtype": "float32" if args.smoke else "bfloat16", "smoke": args.smoke,
        "tokens_per_rank": tokens, "hidden": hidden, "intermediate": intermediate, "experts": experts,
        "top_k": top_k, "warmup": args.warmup, "iters": args.iters, "complete": False, "results": [],
    }  # fmt: skip
    for ep_size in args.ep:
        report["results"].append(run_ep_size(ep_size, args))
        if args.out:  # after every EP size, so a run stopped by a time limit keeps what it measured
            write_json(args.out, report)
    return finish_report(report, args.out, print_table)


def print_table(report):
    print(f"{report['benchmark']} | T={report['tokens_per_rank']} per rank, H={report['hidden']}, "
          f"I={report['intermediate']}, E={report['experts']}, k={report['top_k']} | {report['dtype']} | "
          f"{report['device']} | {report['git']['commit']}")
    print(f"{'EP':>3}" + "".join(f"{phase + ' ms':>14}" for phase in PHASES) + f"{'layer/phases':>14}"
          f"{'layer/(exp+a2a)':>17}")
    for row in report["results"]:
        if "error" in row:
            print(f"{row['ep']:>3}  {row['error']}")
            continue
        print(f"{row['ep']:>3}" + "".join(f"{row['ms'][phase]:>14.3f}" for phase in PHASES)
              + f"{row['layer_over_phases']:>14.2f}{row['layer_over_experts_plus_all_to_all']:>17.2f}")


if __name__ == "__main__":
    main()
