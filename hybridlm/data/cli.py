"""`hybridlm prepare-data`: tokenise a text source once into a token store for `data.source=memmap`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hybridlm.data.config import DEFAULT_SHARD_TOKENS, DataConfig


def add_prepare_data_parser(subparsers) -> argparse.ArgumentParser:
    defaults = DataConfig()
    parser = subparsers.add_parser(
        "prepare-data",
        help="tokenise stdlib / text files into a memmap token store",
        description=(
            "Tokenise a text source into a directory of memory-mapped token shards, a train/val split and the "
            "tokenizer, for training with data.source=memmap data.paths=[OUT]."
        ),
    )
    parser.add_argument("--source", choices=("stdlib", "text_files"), default=defaults.source)
    parser.add_argument("--paths", nargs="*", default=[], help="text_files: globs of .txt/.jsonl/.parquet files")
    parser.add_argument("--text-field", default=defaults.text_field, help="jsonl/parquet field holding the text")
    parser.add_argument(
        "--tokenizer", default=defaults.tokenizer, help='"bpe" (train a byte-level BPE) or a tokenizer.json / dir'
    )
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="size of the trained BPE")
    parser.add_argument("--tokenizer-train-chars", type=int, default=defaults.tokenizer_train_chars)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--max-documents", type=int, default=defaults.max_documents, help="0 = all")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per .bin shard")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    parser.set_defaults(func=_prepare_data_command)
    return parser


def _prepare_data_command(args: argparse.Namespace) -> int:
    run_prepare_data(args)
    return 0


def run_prepare_data(args: argparse.Namespace) -> dict:
    """Write the store described by parsed `prepare-data` arguments; returns its header."""
    from hybridlm.data.store import write_text_store  # imports transformers: keep `hybridlm --help` fast

    cfg = DataConfig(
        source=args.source,
        paths=list(args.paths),
        text_field=args.text_field,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        tokenizer_train_chars=args.tokenizer_train_chars,
        val_fraction=args.val_fraction,
        max_documents=args.max_documents,
    )
    if args.shard_tokens < 1:
        raise ValueError(f"--shard-tokens={args.shard_tokens} must be >= 1")
    if args.out.exists():
        raise FileExistsError(f"--out {args.out} already exists; remove it or choose another directory")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    header = write_text_store(cfg, args.out, shard_tokens=args.shard_tokens)
    print(
        f"wrote {args.out}: vocab {header['vocab_size']}, "
        f"train {header['splits']['train']['num_tokens']} tokens / {header['splits']['train']['num_documents']} docs, "
        f"val {header['splits']['val']['num_tokens']} tokens / {header['splits']['val']['num_documents']} docs; "
        f"train with data.source=memmap data.paths=[{args.out}] data.val_fraction={cfg.val_fraction}"
    )
    return header
