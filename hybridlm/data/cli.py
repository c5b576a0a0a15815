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
    _add_curation_arguments(parser)
    parser.set_defaults(func=_prepare_data_command)
    return parser


def _add_curation_arguments(parser: argparse.ArgumentParser) -> None:
    from hybridlm.data.curation.config import (  # no datatrove import: `hybridlm --help` stays fast
        DEFAULT_STAGES, STAGES, CurationConfig, MinhashSettings,
    )  # fmt: skip

    defaults, minhash = CurationConfig(), MinhashSettings()
    group = parser.add_argument_group("curation (needs hybridlm[curation]: datatrove)")
    group.add_argument("--curate", default="none", metavar="STAGES",
                       help=f"none (default: tokenise as given), default ({','.join(DEFAULT_STAGES)}) or a comma "
                            f"list of {','.join(STAGES)}")  # fmt: skip
    group.add_argument("--curate-option", action="append", default=[], metavar="STAGE.NAME=VALUE",
                       help="a Gopher/C4/FineWeb setting, e.g. gopher_quality.min_doc_words=20, "
                            "c4.filter_curly_bracket=false, gopher_repetition.dup_line_frac=null (off); "
                            "repeatable")  # fmt: skip
    group.add_argument("--decontaminate", nargs="+", default=[], metavar="PATH",
                       help="eval sets (.jsonl / .txt): drop training documents sharing an n-gram window with them")
    group.add_argument("--decontaminate-field", default=defaults.decontaminate_field, help="text field of .jsonl")
    group.add_argument("--decontaminate-ngram", type=int, default=defaults.decontaminate_ngram)
    group.add_argument("--minhash-ngram", type=int, default=minhash.ngram, help="words per shingle")
    group.add_argument("--minhash-bands", type=int, default=minhash.bands)
    group.add_argument("--minhash-rows", type=int, default=minhash.rows, help="hashes per band")
    group.add_argument("--minhash-threshold", type=float, default=None,
                       help="Jaccard similarity to place the LSH S-curve at: sets --minhash-rows for the bands")
    group.add_argument("--executor", choices=("local", "slurm"), default=defaults.executor)
    group.add_argument("--tasks", type=int, default=defaults.tasks, help="input shards / parallel tasks")
    group.add_argument("--workers", type=int, default=defaults.workers, help="local: tasks run at once")
    group.add_argument("--slurm-partition", default=defaults.slurm_partition)
    group.add_argument("--slurm-time", default=defaults.slurm_time)
    group.add_argument("--slurm-cpus-per-task", type=int, default=defaults.slurm_cpus_per_task)
    group.add_argument("--slurm-mem-per-cpu-gb", type=int, default=defaults.slurm_mem_per_cpu_gb)


def curation_config(args: argparse.Namespace):
    """The CurationConfig of parsed arguments (checked: bad values fail here, before any work)."""
    from hybridlm.data.curation.config import CurationConfig, MinhashSettings, parse_stages

    if args.minhash_threshold is not None and args.minhash_rows != MinhashSettings.rows:
        raise ValueError("give --minhash-threshold or --minhash-rows, not both (the threshold sets the rows)")
    curation = CurationConfig(
        stages=parse_stages(args.curate),
        minhash=MinhashSettings(ngram=args.minhash_ngram, bands=args.minhash_bands, rows=args.minhash_rows,
                                threshold=args.minhash_threshold),  # fmt: skip
        decontaminate=list(args.decontaminate),
        decontaminate_field=args.decontaminate_field,
        decontaminate_ngram=args.decontaminate_ngram,
        executor=args.executor,
        tasks=args.tasks,
        workers=args.workers,
        slurm_partition=args.slurm_partition,
        slurm_time=args.slurm_time,
        slurm_cpus_per_task=args.slurm_cpus_per_task,
        slurm_mem_per_cpu_gb=args.slurm_mem_per_cpu_gb,
    )
    for assignment in args.curate_option:
        curation.set_option(assignment)
    return curation


def _prepare_data_command(args: argparse.Namespace) -> int:
    try:
        run_prepare_data(args)
    except (ValueError, OSError) as error:  # a bad input file or option: its message names it and the fix
        raise SystemExit(f"hybridlm prepare-data: {error}") from None
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
    curation = curation_config(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    header = write_text_store(cfg, args.out, shard_tokens=args.shard_tokens, curation=curation)
    print(
        f"wrote {args.out}: vocab {header['vocab_size']}, "
        f"train {header['splits']['train']['num_tokens']} tokens / {header['splits']['train']['num_documents']} docs, "
        f"val {header['splits']['val']['num_tokens']} tokens / {header['splits']['val']['num_documents']} docs; "
        f"train with data.source=memmap data.paths=[{args.out}] data.val_fraction={cfg.val_fraction}"
    )
    return header
