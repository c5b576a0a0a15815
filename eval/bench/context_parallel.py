"""Context-parallel training throughput (issue 17): tokens/s and peak memory per GPU at long sequence lengths, with
CP = 1, 2, 4, 8 ranks splitting every row (hybridlm/parallel/context.py).

Launch one process per GPU (NCCL):

    torchrun --nproc_per_node=8 eval/bench/context_parallel.py --seq-lens 16384 65536 131072 262144 \\
        --context-parallel 1 2 4 8 --activation-checkpointing
    python eval/bench/context_parallel.py --smoke     # CPU: 2 gloo ranks, tiny model, CP 1 and 2; plumbing only

Each (seq_len, CP) pair: W / CP groups of CP consecutive ranks, every group training its own row of seq_len tokens
(one document per row: long-context training); one step = forward -> loss -> backward -> AdamW, bf16 autocast with
fp32 weights. No data-parallel gradient all-reduce runs (what DeepSpeed adds is the same for every CP), so the
numbers isolate the layers' exchanges. tokens/s per GPU = (W / CP) * seq_len / step time / W. Out of memory is
recorded as such. Scaling efficiency of a CP run at length L: its tokens/s per GPU over that of CP = 1 at L / CP
(the same tokens per GPU). Writes JSON (eval/bench/results/context_parallel_<gpu>.json) as rows complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=e2e.REPO / "configs" / "model" / "gpu_1b.yaml")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536, 131072, 262144])
    parser.add_argument("--context-parallel", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="CP sizes; those that do not divide the world size are skipped")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 gloo ranks, tiny model, CP 1 and 2, 1+1 steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.context_parallel, args.warmup, args.steps = [256], [1, 2], 1, 1
    for seq_len in args.seq_lens:
        for cp in args.context_parallel:
            if cp < 1 or seq_len % (cp * 64):
                parser.error(f"--seq-lens {seq_len} is not a multiple of --context-parallel {cp} x 64")
    return args


def _step_fn(model, optimizer, shard_kwargs, device):
    import torch

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**shard_kwargs)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(args, cfg, device, seq_len: int, cp_size: int) -> dict:
    """One (seq_len, CP) point on every rank (collective); rank 0's dict holds the result."""
    import torch
    import torch.distributed as dist

    from hybridlm.parallel.context import shard_batch
    from hybridlm.parallel.groups import context_parallel_group

    world = dist.get_world_size()
    cp = context_parallel_group(cp_size)
    row = dist.get_rank() // cp_size  # each group trains its own row
    generator = torch.Generator().manual_seed(row)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), generator=generator).to(device)
    batch = shard_batch(dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:]), cp)
    point = dict(seq_len=seq_len, context_parallel=cp_size, world_size=world)
    model = optimizer = None
    try:
        model = e2e.build_hybridlm(cfg, device, torch.float32).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        e2e.reset_peak_memory(device)
        times = e2e.time_steps(_step_fn(model, optimizer, batch, device), device, args.warmup, args.steps)
        step_s = torch.tensor(e2e.median(times), dtype=torch.float64, device=device)
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        peak = e2e.peak_memory_gib(device)
        point.update(step_s=float(step_s), tokens_per_s_per_gpu=(world // cp_size) * seq_len / float(step_s) / world,
                     peak_memory_gib_per_gpu=peak)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - out of memory is a result; anything else is re-raised
        if not e2e.is_oom(error):
            raise
        point["error"] = "out of memory"
    finally:
        del model, optimizer
        e2e.release_memory(device)
    return point


def run(args) -> None:
    import torch
    import torch.distributed as dist

    from hybridlm.evaluate.report import run_metadata, write_json

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if not args.smoke else torch.device("cpu")
    cfg = e2e.tiny_config() if args.smoke else e2e.load_model_config(args.model)
    cfg = e2e.dataclasses.replace(cfg, activation_checkpointing=args.activation_checkpointing,
                                  max_position_embeddings=max(cfg.max_position_embeddings, *args.seq_lens))
    world, is_main = dist.get_world_size(), dist.get_rank() == 0
    out = args.out or e2e.RESULTS / f"context_parallel_{e2e.device_tag(device)}{'_smoke' if args.smoke else ''}.json"
    report = {"benchmark": "context_parallel", **run_metadata(str(device)), "model": str(args.model),
              "activation_checkpointing": args.activation_checkpointing, "results": []}  # fmt: skip
    for seq_len in args.seq_lens:
        for cp_size in args.context_parallel:
            if world % cp_size:
                continue
            point = measure(args, cfg, device, seq_len, cp_size)
            if is_main:
                print(point, flush=True)
                report["results"].append(point)
                write_json(out, report)  # a run stopped early keeps what it measured
    if is_main:
        report["complete"] = True
        write_json(out, report)
        print(f"wrote {out}", flush=True)


def _smoke_rank(rank: int, port: int, args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smoke:
        e2e.prepare_cpu("cpu")
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.start_processes(_smoke_rank, args=(port, args), nprocs=2, start_method="spawn")
        return
    e2e.require_device("cuda", tiny=False)
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
