"""`hybridlm export` and `hybridlm generate` subcommands."""

from __future__ import annotations

import argparse
import logging

from hybridlm.generate import add_generate_parser  # noqa: F401 - registered by hybridlm.cli from here


def add_export_parser(subparsers) -> None:
    from hybridlm.export.writer import DTYPES, EXPORT_FORMATS

    parser = subparsers.add_parser(
        "export",
        help="export a run / checkpoint as a Hugging Face model (hybridlm, qwen3_next or qwen3_5_moe format)",
        description="Export a run directory, DeepSpeed checkpoint (any ZeRO stage) or exported model to OUT.",
    )
    parser.add_argument("src", metavar="RUN_OR_CKPT", help="run directory (latest checkpoint), checkpoint or export")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="hybridlm")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="also upload OUT to this Hub repo (token from HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from hybridlm.export.formats import ExportError
    from hybridlm.export.writer import export_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_checkpoint(args.src, args.out, format=args.format, dtype=args.dtype,
                                shard_size=args.shard_size, push_to_hub=args.push_to_hub, private=args.private)
    except ExportError as error:
        raise SystemExit(f"hybridlm export: {error}") from None
    print(out)
    return 0
