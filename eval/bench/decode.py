"""Decoding throughput at long context, one GPU, bf16: hybridlm vs transformers' Qwen3NextForCausalLM.

Both hold the same weights (the qwen3_next export of one random model) and run the same way: prefill a
--context-token prompt per row with the cache (in one pass, or in chunks of --prefill-chunk tokens; logits of the
last position only), then decode --new-tokens greedily, one token per step with the cache. Reported: decode tokens/s
(batch x new tokens / decode time), prefill time, peak memory during the prefill and during decoding (reset in
between, so the two columns compare like with like), and whether both produced the same tokens. After an
out-of-memory error the run's tensors are released before the next one.

    python eval/bench/decode.py                               # GPU: the 1B preset, 32K context
    python eval/bench/decode.py --device cpu --tiny           # CPU smoke: plumbing only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=e2e.REPO / "configs" / "model" / "gpu_1b.yaml",
                        help="model preset YAML (must fit the qwen3_next format)")
    parser.add_argument("--context", type=int, default=32768, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="rows decoded together")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prefill in chunks of this many tokens, both implementations (0: one pass)")
    parser.add_argument("--impls", nargs="+", choices=("hybridlm", "transformers"),
                        default=["hybridlm", "transformers"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 48-token context, 8 new tokens")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default eval/bench/results/decode_<gpu>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.context, args.new_tokens, args.batch = 48, 8, [1, 2]
        args.prefill_chunk = args.prefill_chunk and 16
    for name in ("context", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.prefill_chunk < 0:
        parser.error(f"--prefill-chunk={args.prefill_chunk} must be >= 0 (0: one pass)")
    if min(args.batch) < 1:
        parser.error(f"--batch {args.batch}: every batch size must be >= 1")
    return args


def chunks(prompt, chunk: int):
    """The prompt in pieces of `chunk` tokens along the sequence (one piece when chunk is 0)."""
    step = chunk or prompt.shape[1]
    return [prompt[:, start : start + step] for start in range(0, prompt.shape[1], step)]


def prefill_hybridlm(model, prompt, chunk: int, new_tokens: int):
    cache = model.new_cache(max_length=prompt.shape[1] + new_tokens)
    for piece in chunks(prompt, chunk):
        logits = model(piece, cache=cache, logits_to_keep=1).logits[:, -1]
    return logits, cache


def step_hybridlm(model, token, cache):
    return model(token[:, None], cache=cache).logits[:, -1], cache


def prefill_transformers(model, prompt, chunk: int, new_tokens: int):
    past = None
    for piece in chunks(prompt, chunk):
        out = model(input_ids=piece, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
    return out.logits[:, -1], past


def step_transformers(model, token, past):
    out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
    return out.logits[:, -1], out.past_key_values


IMPLEMENTATIONS = {"hybridlm": (prefill_hybridlm, step_hybridlm),
                   "transformers": (prefill_transformers, step_transformers)}


def generate(name: str, model, prompt, new_tokens: int, chunk: int, device) -> dict:
    """Greedy generation with timings and the peak memory of each phase; "tokens" [B, new_tokens]."""
    import torch

    prefill, step = IMPLEMENTATIONS[name]
    e2e.reset_peak_memory(device)
    e2e.synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        logits, state = prefill(model, prompt, chunk, new_tokens)
        e2e.synchronize(device)
        prefilled = time.perf_counter()
        prefill_peak = e2e.peak_memory_gib(device)
        e2e.reset_peak_memory(device)
        tokens = []
        for _ in range(new_tokens):
            token = logits.argmax(dim=-1)
            tokens.append(token)
            logits, state = step(model, token, state)
        e2e.synchronize(device)
    finished = time.perf_counter()
    return {"tokens": torch.stack(tokens, dim=1), "prefill_s": prefilled - started, "decode_s": finished - prefilled,
            "prefill_peak_memory_gib": prefill_peak, "decode_peak_memory_gib": e2e.peak_memory_gib(device)}


def measure(name: str, model, prompt, args, device) -> tuple[dict, object]:
    """One implementation at one batch size: a short warm-up (kernel compilation), then the timed run."""
    import torch

    row = {"impl": name, "batch": prompt.shape[0], "context": prompt.shape[1], "new_tokens": args.new_tokens}
    try:
        generate(name, model, prompt[:, : min(prompt.shape[1], 1024)], 2, args.prefill_chunk, device)
        run = generate(name, model, prompt, args.new_tokens, args.prefill_chunk, device)
    except (RuntimeError, MemoryError, torch.OutOfMemoryError) as error:
        if not e2e.is_oom(error):
            raise
        e2e.release_memory(device)
        return {**row, "oom": True}, None
    tokens = run.pop("tokens")
    e2e.release_memory(device)
    return {**row, "oom": False, **run,
            "decode_tokens_per_s": prompt.shape[0] * args.new_tokens / run["decode_s"]}, tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    e2e.prepare_cpu(args.device)
    e2e.require_device(args.device, args.tiny)
    import torch

    from hybridlm.evaluate.report import run_metadata, write_json

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = e2e.tiny_config() if args.tiny else e2e.load_model_config(args.model)
    if cfg.max_position_embeddings < args.context + args.new_tokens:
        import dataclasses

        cfg = dataclasses.replace(cfg, max_position_embeddings=args.context + args.new_tokens)
    if "transformers" in args.impls:
        e2e.check_exportable(cfg)
    model = e2e.build_hybridlm(cfg, device, dtype).eval()
    models = {"hybridlm": model}
    kernels = {"hybridlm": e2e.hybridlm_kernels(cfg, device)}
    if "transformers" in args.impls:
        kernels["transformers"] = e2e.transformers_kernels()
        if device.type == "cuda":
            e2e.require_fla(kernels["transformers"])
        models["transformers"] = e2e.build_transformers_twin(model, device, dtype).eval()
    if "hybridlm" not in args.impls:
        del models["hybridlm"]
    tag = e2e.device_tag(device)
    out = args.out or e2e.RESULTS / f"decode_{tag}{'_tiny' if args.tiny else ''}.json"
    rows = []
    report = {"benchmark": "decode", **run_metadata(str(device)), "dtype": str(dtype).removeprefix("torch."),
              "tiny": args.tiny, "complete": False,
              "model": {"layer_pattern": cfg.layer_pattern, **cfg.parameter_counts()},
              "prefill_chunk": args.prefill_chunk, "kernels": kernels, "results": rows}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for batch in args.batch:
        prompt = torch.randint(0, cfg.vocab_size, (batch, args.context), generator=generator).to(device)
        outputs = {}
        for name, impl_model in models.items():
            row, outputs[name] = measure(name, impl_model, prompt, args, device)
            rows.append(row)
            write_json(out, report)  # a run stopped early keeps what it measured
        if all(t is not None for t in outputs.values()) and len(outputs) == 2:
            same = bool(torch.equal(outputs["hybridlm"], outputs["transformers"]))
            for row in rows[-2:]:
                row["same_tokens"] = same
            rows[-2]["speedup_vs_transformers"] = rows[-2]["decode_tokens_per_s"] / rows[-1]["decode_tokens_per_s"]
        del prompt, outputs
        e2e.release_memory(device)
    report["complete"] = True
    write_json(out, report)
    from plot import render

    png = render(out)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
