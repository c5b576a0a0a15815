"""`hybridlm export` and `hybridlm generate` subcommands. A checkpoint that cannot be read or exported ends the
command with its message on stderr and exit status 1, not a traceback."""

from __future__ import annotations

import argparse
import functools
import logging


def _exit_cleanly_on_checkpoint_errors(command: str, run):
    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        from hybridlm.checkpoint import CheckpointError

        try:
            return run(args)
        except CheckpointError as error:  # the reader's, and ExportError
            raise SystemExit(f"hybridlm {command}: {error}") from None

    return wrapped


def add_export_parser(subparsers) -> None:
    from hybridlm.export.options import DTYPES, EXPORT_FORMATS

    parser = subparsers.add_parser(
        "export",
        help="export a run / checkpoint as a Hugging Face model (hybridlm, qwen3_next or qwen3_5_moe format)",
        description="Export a run directory, DeepSpeed checkpoint (any ZeRO stage) or exported model to OUT.",
    )
    parser.add_argument("src", metavar="RUN_OR_CKPT", help="run directory (newest checkpoint), checkpoint or export")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="hybridlm")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="also upload OUT to this Hub repo (token from HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.set_defaults(func=_exit_cleanly_on_checkpoint_errors("export", _run_export))


def add_generate_parser(subparsers) -> None:
    from hybridlm.generate import add_generate_parser as add_parser

    add_parser(subparsers)
    parser = subparsers.choices["generate"]
    parser.set_defaults(func=_exit_cleanly_on_checkpoint_errors("generate", parser.get_default("func")))


def _run_export(args: argparse.Namespace) -> int:
    from hybridlm.export.writer import export_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export_checkpoint(args.src, args.out, format=args.format, dtype=args.dtype,
                            shard_size=args.shard_size, push_to_hub=args.push_to_hub, private=args.private)
    print(out)
    return 0
