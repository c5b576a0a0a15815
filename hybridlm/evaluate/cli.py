"""`hybridlm eval ppl|recall|deepconf`: score a run directory, checkpoint or export."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="perplexity, MQAR recall or DeepConf voting of a trained model",
                                   description=__doc__)
    tasks = parser.add_subparsers(dest="eval_task", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("model", metavar="RUN_OR_EXPORT",
                         help="run directory (its latest checkpoint), DeepSpeed checkpoint or exported model")
        sub.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
        sub.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations")
        sub.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")

    ppl = tasks.add_parser("ppl", help="token-weighted perplexity over held-out documents",
                           description="Token-weighted perplexity: documents packed into rows with boundaries "
                                       "(cu_seqlens), every target token weighted equally.")
    common(ppl)
    ppl.add_argument("--data", nargs="+", required=True,
                     help="a token store directory (hybridlm prepare-data) or globs of .txt/.jsonl/.parquet files")
    ppl.add_argument("--split", default="val", help="split of a token store: val (default) or train")
    ppl.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text")
    ppl.add_argument("--sft", action="store_true",
                     help="--data are SFT conversation files (.jsonl/.parquet, messages or prompt/completion): "
                          "score the assistant tokens only, rendered with the model's chat template")
    ppl.add_argument("--train-on", choices=("assistant", "completion", "all"), default="assistant",
                     help="with --sft: which tokens are scored (as data.sft.train_on)")
    ppl.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row")
    ppl.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    ppl.add_argument("--max-documents", type=int, default=0, help="score only the first N documents (0 = all)")
    ppl.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")
    ppl.set_defaults(func=run_ppl)

    recall = tasks.add_parser("recall", help="MQAR accuracy at several numbers of key-value pairs",
                              description="Multi-query associative recall accuracy (greedy) of a model trained with "
                                          "data=mqar, at each --num-kv-pairs (an example of N pairs is 4 x N tokens).")
    common(recall)
    recall.add_argument("--num-kv-pairs", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    recall.add_argument("--mqar-vocab-size", type=int, default=0,
                        help="MQAR vocabulary; 0 reads data.mqar.vocab_size from the run's config.yaml "
                             "(which also gives num_keys and the examples' seed)")
    recall.add_argument("--num-examples", type=int, default=256)
    recall.add_argument("--batch-size", type=int, default=64)
    recall.add_argument("--seq-len", type=int, default=0,
                        help="pad every example to this many tokens, e.g. the trained length (0: its own length)")
    recall.set_defaults(func=run_recall)

    deepconf = tasks.add_parser(
        "deepconf", help="DeepConf confidence-filtered voting vs majority voting on problems with known answers",
        description="For each problem of a JSONL file ({\"prompt\": ..., \"answer\": ...}), sample N traces, "
                    "then compare majority voting with DeepConf (early stopping + confidence-weighted vote).")
    common(deepconf)
    deepconf.add_argument("--problems", type=Path, required=True, help="JSONL with 'prompt' and 'answer' fields")
    deepconf.add_argument("--answer-pattern", default=r"(-?\d+)",
                          help="regex; the last match's first group in a trace is its answer")
    from hybridlm.evaluate.deepconf import DeepConfConfig

    defaults = DeepConfConfig()
    deepconf.add_argument("--num-traces", type=int, default=defaults.num_traces)
    deepconf.add_argument("--num-warmup", type=int, default=defaults.num_warmup)
    deepconf.add_argument("--keep-fraction", type=float, default=defaults.keep_fraction,
                          help="share of warm-up traces above the threshold: 0.9 DeepConf-high, 0.1 DeepConf-low")
    deepconf.add_argument("--window", type=int, default=defaults.window, help="tokens per group confidence")
    deepconf.add_argument("--top-k", type=int, default=defaults.top_k, help="candidates per token confidence")
    deepconf.add_argument("--temperature", type=float, default=defaults.temperature)
    deepconf.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling (1: off)")
    deepconf.add_argument("--consensus", type=float, default=defaults.consensus,
                          help="stop once the leading answer holds this share of the vote (the paper: 0.95; 0: off)")
    deepconf.add_argument("--round-size", type=int, default=defaults.round_size,
                          help="traces decoded together after the warm-up; consensus is checked between rounds "
                               "(0: all at once)")
    deepconf.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    deepconf.add_argument("--seed", type=int, default=0)
    deepconf.set_defaults(func=run_deepconf)
    return parser


def resolve_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    return device


def load_model(path: str, device_spec: str, dtype: str):
    """(model on device in eval mode, tokenizer or None, checkpoint) of a run, checkpoint or export."""
    import torch

    from hybridlm.checkpoint import CheckpointError
    from hybridlm.checkpoint.reader import read_checkpoint

    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as error:
        raise SystemExit(f"hybridlm eval: {error}") from None
    model = ckpt.build_model().to(resolve_device(device_spec), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    tokenizer = None
    if ckpt.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    return model.eval(), tokenizer, ckpt


def _finish(args: argparse.Namespace, result: dict) -> int:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


def run_ppl(args: argparse.Namespace) -> int:
    from hybridlm.evaluate.ppl import InMemoryDocuments, evaluate_perplexity, load_documents, num_document_rows, \
        packed_batches

    if args.seq_len < 2 or args.batch_size < 1 or args.max_documents < 0:
        raise SystemExit(f"--seq-len={args.seq_len} must be >= 2, --batch-size={args.batch_size} >= 1 and "
                         f"--max-documents={args.max_documents} >= 0")
    model, tokenizer, ckpt = load_model(args.model, args.device, args.dtype)
    if args.sft:
        return _run_sft_ppl(args, model, tokenizer, ckpt)
    documents, eos = load_documents(args.data, tokenizer, split=args.split, text_field=args.text_field)
    if args.max_documents:
        count = min(args.max_documents, documents.num_documents)
        documents = InMemoryDocuments([documents.document(i) for i in range(count)])
    if documents.num_documents == 0:
        raise SystemExit(f"--data {args.data} holds no documents in split {args.split!r}")
    total = -(-num_document_rows(documents, args.seq_len) // args.batch_size)
    batches = packed_batches(documents, seq_len=args.seq_len, batch_size=args.batch_size, eos_token_id=eos)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    result = evaluate_perplexity(model, batches, progress=progress, total=total)
    result.documents = documents.num_documents
    return _finish(args, {"model": str(ckpt.source), "data": args.data, "split": args.split,
                          "seq_len": args.seq_len, **result.to_dict()})


def _run_sft_ppl(args: argparse.Namespace, model, tokenizer, ckpt) -> int:
    """Loss and perplexity over the assistant tokens of held-out conversations (every conversation whole, packed as
    in training; one longer than --seq-len is cut at the end)."""
    from hybridlm.data.config import SFTConfig
    from hybridlm.data.sft import BadRowsError, conversation_batches
    from hybridlm.evaluate.ppl import evaluate_perplexity

    if tokenizer is None or not tokenizer.chat_template:
        raise SystemExit(f"--sft: {args.model} has no tokenizer with a chat template; score a model fine-tuned "
                         "with `train.py experiment=sft` (which adds one)")
    try:
        batches, split = conversation_batches(args.data, tokenizer, SFTConfig(train_on=args.train_on),
                                              seq_len=args.seq_len, batch_size=args.batch_size)
    except (BadRowsError, FileNotFoundError) as error:
        raise SystemExit(f"hybridlm eval ppl --sft: {error}") from None
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    result = evaluate_perplexity(model, batches, progress=progress, total=-(-len(split.bins) // args.batch_size))
    result.documents = len(split.conversations)
    return _finish(args, {"model": str(ckpt.source), "data": args.data, "scored": args.train_on,
                          "seq_len": args.seq_len, "truncated": split.truncated, **result.to_dict()})


def run_config_section(source: Path, section: str) -> dict | None:
    """A section of the training config saved beside a checkpoint (config.yaml in it or up to two levels up)."""
    import yaml

    for directory in (source, *list(source.parents)[:2]):
        path = directory / "config.yaml"
        if path.is_file():
            values = yaml.safe_load(path.read_text())
            if isinstance(values, dict) and isinstance(values.get(section), dict):
                return values[section]
    return None


def run_recall(args: argparse.Namespace) -> int:
    from hybridlm.data.config import MQARConfig
    from hybridlm.evaluate.recall import mqar_sweep

    model, _, ckpt = load_model(args.model, args.device, args.dtype)
    # The token layout (vocabulary, which ids are keys, the examples' seed) is the run's; the pairs are ours.
    layout = {}
    data = run_config_section(Path(ckpt.source), "data")
    if data is not None and data.get("source") == "mqar":
        layout = {key: int(data["mqar"][key]) for key in ("vocab_size", "num_keys", "seed") if key in data["mqar"]}
    if args.mqar_vocab_size:
        layout["vocab_size"] = args.mqar_vocab_size
    if "vocab_size" not in layout:
        raise SystemExit(f"{args.model} has no data=mqar training config beside it; pass --mqar-vocab-size")
    try:
        base = MQARConfig(num_kv_pairs=min(args.num_kv_pairs), **layout)
        results = mqar_sweep(model, base, args.num_kv_pairs, num_examples=args.num_examples,
                             batch_size=args.batch_size, seq_len=args.seq_len)
    except ValueError as error:
        raise SystemExit(f"hybridlm eval recall: {error}") from None
    return _finish(args, {"model": str(ckpt.source), "mqar_vocab_size": base.vocab_size, "mqar_num_keys": base.keys,
                          "results": results})


def read_problems(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"--problems {path} does not exist")
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or "prompt" not in record or "answer" not in record:
            raise SystemExit(f"{path}:{number} needs the fields 'prompt' and 'answer'")
        problems.append(record)
    if not problems:
        raise SystemExit(f"--problems {path} holds no problems")
    return problems


def run_deepconf(args: argparse.Namespace) -> int:
    from hybridlm.evaluate.deepconf import DeepConfConfig, evaluate_deepconf

    try:
        cfg = DeepConfConfig(num_traces=args.num_traces, num_warmup=args.num_warmup, keep_fraction=args.keep_fraction,
                             window=args.window, top_k=args.top_k, temperature=args.temperature, top_p=args.top_p,
                             consensus=args.consensus, round_size=args.round_size,
                             max_new_tokens=args.max_new_tokens)
        pattern = re.compile(args.answer_pattern)
    except (ValueError, re.error) as error:
        raise SystemExit(f"hybridlm eval deepconf: {error}") from None
    if pattern.groups < 1:
        raise SystemExit(f"--answer-pattern {args.answer_pattern!r} needs a capture group around the answer")
    problems = read_problems(args.problems)
    model, tokenizer, ckpt = load_model(args.model, args.device, args.dtype)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer beside it; DeepConf needs one to encode the prompts")

    def answer_fn(ids: list[int]) -> str | None:
        matches = list(pattern.finditer(tokenizer.decode(ids, skip_special_tokens=True)))
        return matches[-1].group(1) if matches else None

    encoded = [(tokenizer.encode(p["prompt"], add_special_tokens=False), str(p["answer"])) for p in problems]
    report = evaluate_deepconf(model, encoded, answer_fn, stop_token_ids=[tokenizer.eos_token_id], cfg=cfg,
                               seed=args.seed, progress=sys.stderr.isatty())
    return _finish(args, {"model": str(ckpt.source), **report.to_dict()})
