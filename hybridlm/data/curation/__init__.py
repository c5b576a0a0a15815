"""Data curation for `prepare-data --curate`, on Hugging Face's datatrove (an optional extra: hybridlm[curation]).

read -> normalise -> exact dedup -> MinHash near-dedup -> Gopher repetition / Gopher quality / C4 filters ->
decontamination -> (tokenise, in store.py). Only components that need no download at run time are used.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from hybridlm.data.config import DataConfig
from hybridlm.data.curation.config import CurationConfig, MinhashSettings, parse_stages

__all__ = ["Curation", "CurationConfig", "MinhashSettings", "parse_stages"]


def _require_datatrove() -> None:
    try:
        import datatrove  # noqa: F401
        import spacy  # noqa: F401  (datatrove's English word tokenizer: spacy.blank("en"), no model download)
    except ImportError as error:
        raise ImportError(
            f"--curate needs datatrove and spaCy ({error.name} is missing): pip install 'hybridlm[curation]'"
        ) from None


class Curation:
    """One curation run for one output store: its work directory sits beside the store, `.{name}.curation`."""

    def __init__(self, cfg: DataConfig, curation: CurationConfig, files: list[Path], out_dir: Path,
                 source_identity: dict):  # fmt: skip
        from hybridlm.data.curation.pipeline import check_eval_sets

        _require_datatrove()
        self.cfg, self.curation, self.files = cfg, curation, files
        self.work = Path(out_dir).parent / f".{Path(out_dir).name}.curation"
        self.eval_counts = check_eval_sets(curation)
        self.identity = {"source": source_identity, "max_documents": cfg.max_documents,
                         "curation": curation.settings(), "tasks": curation.tasks}  # fmt: skip

    def run(self) -> None:
        from hybridlm.data.curation.pipeline import count_input, materialise_input, prepare_work_dir, run_pipelines
        from hybridlm.data.sources import iter_documents

        count = count_input(iter_documents(self.cfg, self.files))  # a bad or empty source fails before any work
        prepare_work_dir(self.work, self.identity)
        materialise_input(iter_documents(self.cfg, self.files), count, self.work / "input", self.curation.tasks)
        run_pipelines(self.curation, self.work)

    def documents(self) -> Iterator[str]:
        from hybridlm.data.curation.pipeline import curated_documents

        return curated_documents(self.work, self.curation.tasks)

    def publish_into(self, store_dir: Path, tokenizer, output_tokens: int) -> dict:
        """Write the report (JSON, funnel plot) and move removed/ into `store_dir`/curation; print the table.
        Returns the header's `curation` entry (settings and counts per stage)."""
        from hybridlm.data.curation.report import build_report, format_table, plot_funnel

        from hybridlm.data.tokenizer import encode_documents

        def encode_lengths(texts: list[str]) -> list[int]:
            return [len(ids) for ids in encode_documents(tokenizer, texts)] if texts else []

        report = build_report(self.curation, self.work, encode_lengths, self.eval_counts, output_tokens)
        out = Path(store_dir) / "curation"
        out.mkdir()
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_funnel(report, out / "funnel.png")
        if (self.work / "removed").is_dir():
            shutil.copytree(self.work / "removed", out / "removed")  # the work dir stays whole until publish
        print(format_table(report))
        counts = [{key: entry[key] for key in ("stage", "documents_in", "documents_out", "tokens_in", "tokens_out",
                                                 "removed_by_rule")} for entry in report["stages"]]  # fmt: skip
        return {**report["settings"], "counts": counts, "report": "curation/report.json"}

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
