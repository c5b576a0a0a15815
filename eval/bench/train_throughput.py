"""End-to-end training throughput on one GPU, bf16.

Suites (--suite, default both):
  transformers  hybridlm vs transformers' Qwen3NextForCausalLM on the same config, weights, documents and optimizer,
                in the same loop: forward -> loss (+ router aux loss) -> backward -> AdamW step, at --seq-len.
                hybridlm trains on packed rows with cu_seqlens, exactly as train.py feeds it (documents of random
                lengths, mean --doc-tokens, cut by hybridlm.data.packing). transformers runs twice: on the same packed
                documents in its own packed format (one flattened row, position ids restarting per document,
                cu_seq_lens_q/k: what DataCollatorWithFlattening gives it) and on plain rows that ignore document
                boundaries (its fastest path); the speedup is against the faster of the two. Its kernels are read back
                and recorded (fla for the gated delta rule, required on a GPU; causal-conv1d or its PyTorch
                fallback), and each experts implementation it registers is timed on a few steps, the fastest kept.
  crossover     hybridlm's hybrid (the config's layer pattern) vs a pure-attention model with the same parameter
                count (FFN width adjusted), at --crossover-seq-lens with the same tokens per step, one document per
                row (long-context training). Tokens/s and peak memory; shows from which length the hybrid wins.
Both loops: fp32 master weights, bf16 autocast, fused AdamW, tokens drawn once per shape (seeded). Out of memory is
recorded as such and the memory released before the next run. Writes JSON (command, date, device, versions, git
commit, kernels, results) and renders a plot beside it with plot.py.

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
EOS_ID = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--model", type=Path, default=e2e.REPO / "configs" / "model" / "gpu_1b.yaml",
                        help="model preset YAML (must fit the qwen3_next format for the transformers suite)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="batch = tokens-per-step / seq-len")
    parser.add_argument("--doc-tokens", type=int, default=1024,
                        help="mean document length of the packed data (exponential, at least 16 tokens)")
    parser.add_argument("--crossover-seq-lens", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    parser.add_argument("--crossover-tokens-per-step", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (kernel compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    parser.add_argument("--probe-steps", type=int, default=2,
                        help="timed steps per transformers experts implementation when picking the fastest")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU (0: from the GPU name)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="for both models")
    parser.add_argument("--tiny", action="store_true", help="tiny model, short sequences, 1+2 steps (smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default eval/bench/results/train_throughput_<gpu>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_len, args.tokens_per_step, args.doc_tokens = 64, 128, 24
        args.crossover_seq_lens, args.crossover_tokens_per_step = [32, 64], 128
        args.warmup, args.steps, args.probe_steps = 1, 2, 1
    for seq in [args.seq_len, *args.crossover_seq_lens]:
        if seq < 2:
            parser.error(f"sequence length {seq} must be >= 2")
    if args.tokens_per_step < args.seq_len or args.crossover_tokens_per_step < max(args.crossover_seq_lens):
        parser.error("tokens per step must be at least one sequence: raise --tokens-per-step / "
                     "--crossover-tokens-per-step or lower the sequence lengths")
    if args.steps < 1 or args.warmup < 0 or args.probe_steps < 1 or args.doc_tokens < 1:
        parser.error(f"--steps={args.steps} and --probe-steps={args.probe_steps} must be >= 1, --warmup="
                     f"{args.warmup} >= 0 and --doc-tokens={args.doc_tokens} >= 1")
    return args


# --- data: the same tokens for every implementation --------------------------------------------------------------


def packed_batch(vocab_size: int, seq_len: int, batch: int, mean_doc_tokens: int | None, seed: int = 0) -> dict:
    """`batch` rows of random-token documents packed by hybridlm.data.packing, as train.py's loader cuts them:
    input_ids, labels, position_ids [B,T] and cu_seqlens (every document start, row starts included). Document
    lengths are exponential with mean `mean_doc_tokens` (at least 16); None: one document longer than all the rows,
    so every row is a single segment (long-context training)."""
    import numpy as np

    from hybridlm.data.packing import PackedRows, collate
    from hybridlm.evaluate.ppl import InMemoryDocuments

    rng = np.random.default_rng(seed)
    documents, total = [], 0
    while total < batch * seq_len:
        length = batch * seq_len if mean_doc_tokens is None else max(16, int(rng.exponential(mean_doc_tokens)))
        documents.append(rng.integers(1, vocab_size, size=length, dtype=np.int64))  # id 0 is EOS
        total += length + 1
    stream = PackedRows(InMemoryDocuments(documents), lambda epoch: np.arange(len(documents)), seq_len=seq_len,
                        eos_token_id=EOS_ID, pack=True, infinite=True)
    return collate([stream.next_row() for _ in range(batch)])


def row_batch(vocab_size: int, seq_len: int, batch: int, seed: int = 0) -> dict:
    """Plain rows: each row one causal sequence of random tokens, labels shifted by one."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch, seq_len + 1), generator=generator)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def transformers_packed(batch: dict) -> dict:
    """Our packed batch in transformers' packed format: one row of all tokens, position ids restarting per document,
    labels = the inputs with -100 at each document start (transformers shifts them itself), cu_seq_lens_q/k."""
    import torch

    ids = batch["input_ids"].reshape(1, -1)
    cu = batch["cu_seqlens"]
    labels = ids.clone()
    labels[0, cu[:-1].long()] = -100
    longest = int(torch.diff(cu).max())
    return {"input_ids": ids, "labels": labels, "position_ids": batch["position_ids"].reshape(1, -1),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}


# --- one measured training loop ----------------------------------------------------------------------------------


def hybridlm_loss(model, batch):
    return model(**batch).loss


def transformers_loss(model, batch):
    batch = dict(batch)
    if "position_ids" not in batch:  # plain rows: transformers shifts labels itself, give it the inputs
        batch["labels"] = batch["input_ids"]
    return model(**batch, output_router_logits=True).loss


def measure(model, loss_fn, batch: dict, cfg, *, seq_len: int, device, dtype, warmup: int, steps: int,
            peak: float | None) -> dict:
    """Median step time of one training loop on `batch`; tokens/s, MFU (model FLOPs of rows of `seq_len` tokens, the
    same count for every implementation) and peak memory, or {"oom": True}."""
    import torch

    batch = to_device(batch, device)
    tokens = batch["input_ids"].numel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=str(device).startswith("cuda"))
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()

    def step():
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    e2e.reset_peak_memory(device)
    try:
        times = e2e.time_steps(step, device, warmup, steps)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not e2e.is_oom(error):
            raise
        result = {"tokens": tokens, "oom": True}
    else:
        seconds = e2e.median(times)
        tokens_per_s = tokens / seconds
        flops = cfg.flops_per_token(seq_len) * tokens_per_s
        result = {"tokens": tokens, "step_s": seconds, "tokens_per_s": tokens_per_s, "tflops": flops / 1e12,
                  "mfu": flops / (peak * 1e12) if peak else None, "peak_memory_gib": e2e.peak_memory_gib(device),
                  "oom": False}
    # After an out-of-memory error in backward the gradients are still allocated: drop them with the optimizer.
    model.zero_grad(set_to_none=True)
    del optimizer
    e2e.release_memory(device)
    return result


# --- suites ------------------------------------------------------------------------------------------------------


def pick_experts_implementation(twin, batch, cfg, args, device, dtype, peak) -> tuple[str, list[dict]]:
    """Time every experts implementation transformers registers on a few steps; the fastest that runs wins."""
    probes = []
    for name in e2e.transformers_kernels()["experts_implementations"]:
        try:
            twin.set_experts_implementation(name)
            result = measure(twin, transformers_loss, batch, cfg, seq_len=args.seq_len, device=device, dtype=dtype,
                             warmup=1, steps=args.probe_steps, peak=peak)
        except Exception as error:  # a missing optional package (deepgemm, sonicmoe) or a kernel refusing the shape
            e2e.release_memory(device)
            probes.append({"experts_implementation": name, "error": f"{type(error).__name__}: {error}"[:300]})
            continue
        probes.append({"experts_implementation": name, "step_s": result.get("step_s"), "oom": result["oom"]})
    timed = [p for p in probes if p.get("step_s")]
    if not timed:
        sys.exit(f"no transformers experts implementation ran on this model: {probes}")
    fastest = min(timed, key=lambda p: p["step_s"])["experts_implementation"]
    twin.set_experts_implementation(fastest)
    return fastest, probes


def suite_transformers(cfg, args, device, dtype, peak, report: dict, save) -> None:
    """Fills report["transformers"] (one row per implementation and data layout) and the kernels used, saving the
    report after every row so a run stopped early keeps what it measured."""
    import torch

    batch_rows = args.tokens_per_step // args.seq_len
    packed = packed_batch(cfg.vocab_size, args.seq_len, batch_rows, args.doc_tokens)
    rows = row_batch(cfg.vocab_size, args.seq_len, batch_rows)
    kernels = e2e.transformers_kernels()
    if str(device).startswith("cuda"):
        e2e.require_fla(kernels)
    report["documents"] = {"mean_tokens": args.doc_tokens, "segments": int(packed["cu_seqlens"].numel() - 1)}
    report["hybridlm_kernels"] = e2e.hybridlm_kernels(cfg, device)
    report["transformers_kernels"] = {**kernels, "attention": "sdpa"}
    results = report["transformers"] = []
    common = dict(cfg=cfg, seq_len=args.seq_len, device=device, dtype=dtype, warmup=args.warmup, steps=args.steps,
                  peak=peak)
    model = e2e.build_hybridlm(cfg, device, torch.float32)
    for data, batch in (("packed", packed), ("rows", rows)):
        results.append({"impl": "hybridlm", "data": data, "seq_len": args.seq_len, "batch": batch_rows,
                        **measure(model, hybridlm_loss, batch, **common)})
        save()
    twin = e2e.build_transformers_twin(model, device, torch.float32)
    del model
    e2e.release_memory(device)
    if args.activation_checkpointing:
        twin.gradient_checkpointing_enable()
    experts, probes = pick_experts_implementation(twin, rows, cfg, args, device, dtype, peak)
    report["transformers_kernels"].update(experts_implementation=experts, experts_probes=probes)
    for data, batch in (("packed", transformers_packed(packed)), ("rows", rows)):
        row = {"impl": "transformers", "data": data, "seq_len": args.seq_len, "batch": batch_rows,
               "experts_implementation": experts}
        try:
            row.update(measure(twin, transformers_loss, batch, **common))
        except ValueError as error:  # e.g. packed sequences without fla (the CPU smoke run)
            e2e.release_memory(device)
            row.update(error=str(error)[:300], oom=False)
        results.append(row)
        save()
    del twin
    e2e.release_memory(device)
    ours = results[0].get("tokens_per_s")  # hybridlm on packed rows, what train.py runs
    theirs = [r["tokens_per_s"] for r in results if r["impl"] == "transformers" and r.get("tokens_per_s")]
    if ours and theirs:
        results[0]["speedup_vs_transformers"] = ours / max(theirs)
    save()


def suite_crossover(cfg, args, device, dtype, peak, report: dict, save) -> None:
    """Fills report["crossover"]: hybrid and pure attention at every length, saved after every row."""
    import torch

    attention_only = e2e.match_parameters(cfg, "A")
    rows = report["crossover"] = []
    for name, model_cfg in (("hybrid", cfg), ("attention", attention_only)):
        model = e2e.build_hybridlm(model_cfg, device, torch.float32)
        for seq_len in args.crossover_seq_lens:
            batch_rows = args.crossover_tokens_per_step // seq_len
            # One segment per row (cu_seqlens = the row starts), as train.py's loader cuts documents longer than a row.
            batch = packed_batch(model_cfg.vocab_size, seq_len, batch_rows, mean_doc_tokens=None)
            result = measure(model, hybridlm_loss, batch, model_cfg, seq_len=seq_len, device=device, dtype=dtype,
                             warmup=args.warmup, steps=args.steps, peak=peak)
            rows.append({"model": name, "layer_pattern": model_cfg.layer_pattern, "seq_len": seq_len,
                         "batch": batch_rows, "parameters": model_cfg.parameter_counts()["total"], **result})
            save()
        del model
        e2e.release_memory(device)
    by_len = {}
    for row in rows:
        by_len.setdefault(row["seq_len"], {})[row["model"]] = row.get("tokens_per_s")
    for row in rows:
        pair = by_len[row["seq_len"]]
        if row["model"] == "hybrid" and pair.get("hybrid") and pair.get("attention"):
            row["speedup_vs_attention"] = pair["hybrid"] / pair["attention"]
    save()


def main(argv=None) -> int:
    args = parse_args(argv)
    e2e.prepare_cpu(args.device)
    e2e.require_device(args.device, args.tiny)
    import dataclasses

    import torch

    from hybridlm.evaluate.report import run_metadata, write_json

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = e2e.tiny_config() if args.tiny else e2e.load_model_config(args.model)
    if args.activation_checkpointing:
        cfg = dataclasses.replace(cfg, activation_checkpointing=True)
    if "transformers" in args.suite:
        e2e.check_exportable(cfg)
    peak = e2e.peak_tflops(device, args.peak_tflops)
    tag = e2e.device_tag(device)
    out = args.out or e2e.RESULTS / f"train_throughput_{tag}{'_tiny' if args.tiny else ''}.json"
    report = {"benchmark": "train_throughput", **run_metadata(str(device)),
              "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny, "complete": False,
              "model": {"preset": "tiny" if args.tiny else str(args.model.relative_to(e2e.REPO)
                                                               if args.model.is_relative_to(e2e.REPO) else args.model),
                        "layer_pattern": cfg.layer_pattern, **cfg.parameter_counts()},
              "peak_tflops": peak, "warmup_steps": args.warmup, "timed_steps": args.steps}

    def save() -> None:
        write_json(out, report)

    if "transformers" in args.suite:
        suite_transformers(cfg, args, device, dtype, peak, report, save)
    if "crossover" in args.suite:
        suite_crossover(cfg, args, device, dtype, peak, report, save)
    report["complete"] = True
    save()
    from plot import render

    png = render(out)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
