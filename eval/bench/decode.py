"""Decoding throughput at long context, one GPU, bf16: hybridlm vs transformers' Qwen3NextForCausalLM.

Both hold the same weights (the qwen3_next export of one random model). Each prefills a --context-token prompt per
row (ours in chunks of --prefill-chunk tokens with its cache, so only a chunk's logits exist at once; transformers
in one pass with logits_to_keep=1), then decodes --new-tokens greedily, one token per step with its cache.
Reported: decode tokens/s (batch x new tokens / decode time), prefill time, peak memory, and whether both produced
the same tokens.

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
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--impls", nargs="+", choices=("hybridlm", "transformers"),
                        default=["hybridlm", "transformers"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 48-token context, 8 new tokens")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default eval/bench/results/decode_<gpu>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.context, args.new_tokens, args.batch, args.prefill_chunk = 48, 8, [1, 2], 16
    for name in ("context", "new_tokens", "prefill_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if min(args.batch) < 1:
        parser.error(f"--batch {args.batch}: every batch size must be >= 1")
    return args


def decode_hybridlm(model, prompt, new_tokens: int, chunk: int):
    import torch

    cache = model.new_cache()
    with torch.no_grad():
        for start in range(0, prompt.shape[1], chunk):
            logits = model(prompt[:, start : start + chunk], cache=cache).logits[:, -1]
        e2e.synchronize(prompt.device)
        prefilled = time.perf_counter()
        tokens = []
        for _ in range(new_tokens):
            token = logits.argmax(dim=-1)
            tokens.append(token)
            logits = model(token[:, None], cache=cache).logits[:, -1]
    return prefilled, torch.stack(tokens, dim=1)


def decode_transformers(model, prompt, new_tokens: int, chunk: int):
    import torch

    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        logits, past = out.logits[:, -1], out.past_key_values
        e2e.synchronize(prompt.device)
        prefilled = time.perf_counter()
        tokens = []
        for _ in range(new_tokens):
            token = logits.argmax(dim=-1)
            tokens.append(token)
            out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
            logits, past = out.logits[:, -1], out.past_key_values
    return prefilled, torch.stack(tokens, dim=1)


def measure(name: str, model, decode, prompt, args, device) -> tuple[dict, object]:
    e2e.reset_peak_memory(device)
    decode(model, prompt[:, : min(prompt.shape[1], args.prefill_chunk)], 2, args.prefill_chunk)  # warm-up
    e2e.reset_peak_memory(device)
    e2e.synchronize(device)
    try:
        started = time.perf_counter()
        prefilled, tokens = decode(model, prompt, args.new_tokens, args.prefill_chunk)
        e2e.synchronize(device)
        finished = time.perf_counter()
    except (RuntimeError, MemoryError) as error:
        if not e2e.is_oom(error):
            raise
        return {"impl": name, "batch": prompt.shape[0], "oom": True}, None
    batch = prompt.shape[0]
    return {
        "impl": name, "batch": batch, "context": prompt.shape[1], "new_tokens": args.new_tokens, "oom": False,
        "prefill_s": prefilled - started, "decode_s": finished - prefilled,
        "decode_tokens_per_s": batch * args.new_tokens / (finished - prefilled),
        "peak_memory_gib": e2e.peak_memory_gib(device),
    }, tokens


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
    model = e2e.build_hybridlm(cfg, device, dtype).eval()
    models = {"hybridlm": (model, decode_hybridlm)}
    if "transformers" in args.impls:
        models["transformers"] = (e2e.build_transformers_twin(model, device, dtype).eval(), decode_transformers)
    if "hybridlm" not in args.impls:
        del models["hybridlm"]
    generator = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for batch in args.batch:
        prompt = torch.randint(0, cfg.vocab_size, (batch, args.context), generator=generator).to(device)
        outputs = {}
        for name, (impl_model, decode) in models.items():
            row, outputs[name] = measure(name, impl_model, decode, prompt, args, device)
            rows.append(row)
        if all(t is not None for t in outputs.values()) and len(outputs) == 2:
            same = bool(torch.equal(outputs["hybridlm"], outputs["transformers"]))
            for row in rows[-2:]:
                row["same_tokens"] = same
            ours, theirs = rows[-2].get("decode_tokens_per_s"), rows[-1].get("decode_tokens_per_s")
            rows[-2]["speedup_vs_transformers"] = ours / theirs
    report = {"benchmark": "decode", **run_metadata(str(device)), "dtype": str(dtype).removeprefix("torch."),
              "tiny": args.tiny, "model": {"layer_pattern": cfg.layer_pattern, **cfg.parameter_counts()},
              "results": rows}
    tag = e2e.device_tag(device)
    out = args.out or e2e.RESULTS / f"decode_{tag}{'_tiny' if args.tiny else ''}.json"
    write_json(out, report)
    from plot import render

    png = render(out)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
