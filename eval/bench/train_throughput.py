"""End-to-end training throughput on one GPU, bf16.

Suites (--suite, default both):
  transformers  hybridlm vs transformers' Qwen3NextForCausalLM (fla kernels for Gated DeltaNet, grouped_mm experts)
                on the same config, weights, data and optimizer, in the same loop: forward -> loss (+ router aux
                loss) -> backward -> AdamW step. Tokens/s, MFU, peak memory at --seq-len (4096).
  crossover     hybridlm's hybrid (the config's layer pattern) vs a pure-attention model with the same parameter
                count (FFN width adjusted), at --crossover-seq-lens (2K..64K) with the same tokens per step.
                Tokens/s and peak memory; shows from which length the hybrid wins.
Both loops: fp32 master weights, bf16 autocast, fused AdamW, random tokens drawn once per step size (seeded).
Writes JSON (command, date, device, versions, results) and renders a plot beside it with plot.py.

    python eval/bench/train_throughput.py                          # GPU: the 1B preset, both suites
    python eval/bench/train_throughput.py --device cpu --tiny      # CPU smoke: plumbing only, numbers meaningless
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e  # noqa: E402

SUITES = ("transformers", "crossover")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--model", type=Path, default=e2e.REPO / "configs" / "model" / "gpu_1b.yaml",
                        help="model preset YAML (must fit the qwen3_next format for the transformers suite)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="batch = tokens-per-step / seq-len")
    parser.add_argument("--crossover-seq-lens", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    parser.add_argument("--crossover-tokens-per-step", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (kernel autotuning happens here)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU (0: from the GPU name)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="for both models")
    parser.add_argument("--tiny", action="store_true", help="tiny model, short sequences, 1+2 steps (smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default eval/bench/results/train_throughput_<gpu>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_len, args.tokens_per_step = 64, 128
        args.crossover_seq_lens, args.crossover_tokens_per_step = [32, 64], 128
        args.warmup, args.steps = 1, 2
    for seq in [args.seq_len, *args.crossover_seq_lens]:
        if seq < 2:
            parser.error(f"sequence length {seq} must be >= 2")
    if args.tokens_per_step < args.seq_len or args.crossover_tokens_per_step < max(args.crossover_seq_lens):
        parser.error("tokens per step must be at least one sequence: raise --tokens-per-step / "
                     "--crossover-tokens-per-step or lower the sequence lengths")
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")
    return args


def hybridlm_loss(model, ids, labels):
    return model(ids, labels=labels).loss


def transformers_loss(model, ids, labels):
    # transformers shifts labels itself: give it the inputs (T-1 targets per row instead of T, a negligible gap).
    return model(input_ids=ids, labels=ids, output_router_logits=True).loss


def measure(model, loss_fn, cfg, *, device, dtype, seq_len: int, tokens_per_step: int, warmup: int, steps: int,
            peak: float | None, seed: int = 0) -> dict:
    """Median step time of one training loop; tokens/s, MFU and peak memory."""
    import torch

    batch = tokens_per_step // seq_len
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=generator).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    fused = str(device).startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()

    def step():
        with autocast:
            loss = loss_fn(model, inputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    e2e.reset_peak_memory(device)
    try:
        times = e2e.time_steps(step, device, warmup, steps)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not e2e.is_oom(error):
            raise
        del optimizer
        e2e.reset_peak_memory(device)
        return {"seq_len": seq_len, "batch": batch, "oom": True}
    seconds = e2e.median(times)
    tokens_per_s = batch * seq_len / seconds
    flops = cfg.flops_per_token(seq_len) * tokens_per_s
    result = {"seq_len": seq_len, "batch": batch, "step_s": seconds, "tokens_per_s": tokens_per_s,
              "tflops": flops / 1e12, "mfu": flops / (peak * 1e12) if peak else None,
              "peak_memory_gib": e2e.peak_memory_gib(device), "oom": False}
    del optimizer
    return result


def suite_transformers(cfg, args, device, dtype, peak) -> list[dict]:
    import torch

    rows = []
    model = e2e.build_hybridlm(cfg, device, torch.float32)
    rows.append({"impl": "hybridlm", **measure(model, hybridlm_loss, cfg, device=device, dtype=dtype,
                                               seq_len=args.seq_len, tokens_per_step=args.tokens_per_step,
                                               warmup=args.warmup, steps=args.steps, peak=peak)})
    twin = e2e.build_transformers_twin(model, device, torch.float32)
    del model
    if args.activation_checkpointing:
        twin.gradient_checkpointing_enable()
    rows.append({"impl": "transformers", **measure(twin, transformers_loss, cfg, device=device, dtype=dtype,
                                                   seq_len=args.seq_len, tokens_per_step=args.tokens_per_step,
                                                   warmup=args.warmup, steps=args.steps, peak=peak)})
    del twin
    ours, theirs = rows[0].get("tokens_per_s"), rows[1].get("tokens_per_s")
    if ours and theirs:
        rows[0]["speedup_vs_transformers"] = ours / theirs
    return rows


def suite_crossover(cfg, args, device, dtype, peak) -> list[dict]:
    import torch

    attention_only = e2e.match_parameters(cfg, "A")
    rows = []
    for name, model_cfg in (("hybrid", cfg), ("attention", attention_only)):
        model = e2e.build_hybridlm(model_cfg, device, torch.float32)
        for seq_len in args.crossover_seq_lens:
            result = measure(model, hybridlm_loss, model_cfg, device=device, dtype=dtype, seq_len=seq_len,
                             tokens_per_step=args.crossover_tokens_per_step, warmup=args.warmup, steps=args.steps,
                             peak=peak)
            rows.append({"model": name, "layer_pattern": model_cfg.layer_pattern,
                         "parameters": model_cfg.parameter_counts()["total"], **result})
        del model
    by_len = {}
    for row in rows:
        by_len.setdefault(row["seq_len"], {})[row["model"]] = row.get("tokens_per_s")
    for row in rows:
        pair = by_len[row["seq_len"]]
        if row["model"] == "hybrid" and pair.get("hybrid") and pair.get("attention"):
            row["speedup_vs_attention"] = pair["hybrid"] / pair["attention"]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    e2e.prepare_cpu(args.device)
    e2e.require_device(args.device, args.tiny)
    import torch

    from hybridlm.evaluate.report import run_metadata, write_json

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = e2e.tiny_config() if args.tiny else e2e.load_model_config(args.model)
    if args.activation_checkpointing:
        import dataclasses

        cfg = dataclasses.replace(cfg, activation_checkpointing=True)
    peak = e2e.peak_tflops(device, args.peak_tflops)
    report = {"benchmark": "train_throughput", **run_metadata(str(device)),
              "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
              "model": {"preset": "tiny" if args.tiny else str(args.model.relative_to(e2e.REPO)
                                                               if args.model.is_relative_to(e2e.REPO) else args.model),
                        "layer_pattern": cfg.layer_pattern, **cfg.parameter_counts()},
              "peak_tflops": peak}
    if "transformers" in args.suite:
        report["transformers"] = suite_transformers(cfg, args, device, dtype, peak)
    if "crossover" in args.suite:
        report["crossover"] = suite_crossover(cfg, args, device, dtype, peak)
    tag = e2e.device_tag(device)
    out = args.out or e2e.RESULTS / f"train_throughput_{tag}{'_tiny' if args.tiny else ''}.json"
    write_json(out, report)
    from plot import render

    png = render(out)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
