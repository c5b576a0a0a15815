"""`hybridlm` console script. Each subcommand lives beside the code it drives and registers its own parser."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (module, function that adds the subcommand's parser); imported lazily so `hybridlm --help` stays fast.
SUBCOMMANDS = [
    ("hybridlm.data.cli", "add_prepare_data_parser"),
    ("hybridlm.export.cli", "add_export_parser"),
    ("hybridlm.export.cli", "add_generate_parser"),
    ("hybridlm.evaluate.cli", "add_eval_parser"),
    ("hybridlm.evaluate.doctor", "add_doctor_parser"),
    ("hybridlm.parallel.plan", "add_plan_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlm", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name, function_name in SUBCOMMANDS:
        getattr(importlib.import_module(module_name), function_name)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():
        # As train.py: Triton runs on a CPU only in its interpreter, which must be chosen before triton is imported
        # (the subcommands' modules import it), so that `hybridlm doctor model.gdn.backend=triton` runs the kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
