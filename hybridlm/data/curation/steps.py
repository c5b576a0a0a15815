"""The datatrove pipeline steps that datatrove lacks: our input shards, per-stage tallies, prose-only filtering and
n-gram decontamination. They are pickled into Slurm jobs, so they hold only plain settings and build state lazily."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
# A line that reads as source code: indented, an assignment, starting with an import / definition / decorator, or
# ending in a bracket, colon, comma, semicolon or backslash (prose lines end in words or sentence punctuation).
# Comment lines count for neither side, so hashtag spam ('# deals #tag ...') stays prose.
_CODE_LINE = re.compile(
    r"^(?:[ \t]+\S|(?:import|from|def|class|return|raise)\s|@\w|[\w.\[\]]+\s*[-+*/|&]?=\s)|[:;,{}()\[\]\\]\s*$"
)
_COMMENT_LINE = re.compile(r"^(?:#|//)")
CODE_LINE_FRACTION = 0.5


def shard_name(rank: int) -> str:
    return f"{rank:05d}.jsonl.gz"  # the name datatrove's JsonlWriter gives rank `rank` (${rank}.jsonl + .gz)


def normalise_text(text: str) -> str:
    """The text that curation and tokenisation see: Unicode NFC with \\n line ends."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def exact_dedup_key(doc: Document) -> str:
    """Exact duplicates are equal after collapsing whitespace runs (copies that differ only in layout)."""
    return _WHITESPACE.sub(" ", doc.text).strip()


def looks_like_code(text: str) -> bool:
    """At least half of the non-blank, non-comment lines read as source code (see _CODE_LINE)."""
    lines = [line for line in text.splitlines() if line.strip() and not _COMMENT_LINE.match(line)]
    code_lines = sum(bool(_CODE_LINE.search(line)) for line in lines)
    return code_lines > 0 and code_lines >= CODE_LINE_FRACTION * len(lines)


def words(text: str) -> list[str]:
    """Lower-cased word tokens for decontamination n-grams (punctuation and layout ignored, as in GPT-3's)."""
    return _WORD.findall(text.lower())


class ShardReader(PipelineStep):
    """Reads exactly `{folder}/{rank:05d}.jsonl.gz` for task `rank` (none if absent), so a task's document indices
    match those its signatures were written with even when another task's shard came out empty."""

    type = "📖 - READER"
    name = "🗂 shard reader"

    def __init__(self, folder: str | Path, stage: str):
        super().__init__()
        self.folder = str(folder)
        self.stage = stage

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / shard_name(rank)
        if not path.is_file():
            return
        from tqdm import tqdm

        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in tqdm(handle, desc=f"{self.stage} (task {rank})", unit=" docs", mininterval=5, leave=False):
                record = json.loads(line)
                self.stat_update("documents")
                yield Document(text=record["text"], id=record["id"], metadata=record.get("metadata", {}))


class StageTally(PipelineStep):
    """Counts the documents and characters leaving a stage, plus a histogram of one metadata field, into
    `{folder}/{stage}/{rank:05d}.json`."""

    type = "📊 - STATS"
    name = "🧮 tally"

    def __init__(self, folder: str | Path, stage: str, histogram_field: str | None = None):
        super().__init__()
        self.folder = str(folder)
        self.stage = stage
        self.histogram_field = histogram_field

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        documents = chars = code = 0
        histogram: Counter = Counter()
        for doc in data:
            documents += 1
            chars += len(doc.text)
            code += doc.metadata.get("kind") == "code"
            if self.histogram_field and self.histogram_field in doc.metadata:
                histogram[int(doc.metadata[self.histogram_field])] += 1
            yield doc
        out = Path(self.folder) / self.stage
        out.mkdir(parents=True, exist_ok=True)
        tally = {"documents": documents, "chars": chars, "code_documents": code,
                 "histogram": {str(key): value for key, value in sorted(histogram.items())}}  # fmt: skip
        (out / f"{rank:05d}.json").write_text(json.dumps(tally))


class ProseOnly(BaseFilter):
    """Applies a prose filter (Gopher, C4: rules written for web text) to prose and passes source code through:
    on the Python standard library they drop most modules (curly brackets, non-alphabetic tokens, repeated lines).

    A kept document whose text the filter trimmed (C4 drops lines) goes to `trimmed_writer` as it was, with the
    trimmed text in metadata `trimmed_text`, so nothing is lost and the report can count the trimmed tokens."""

    def __init__(self, inner: BaseFilter, exclusion_writer=None, trimmed_writer=None):
        super().__init__(exclusion_writer)
        self.inner = inner
        self.name = inner.name
        self.trimmed_writer = trimmed_writer

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("kind") == "code":
            self.stat_update("code_passed")
            return True
        original = doc.text
        result = self.inner.filter(doc)
        if doc.text != original:
            doc.metadata["_untrimmed"] = original
        return result

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.trimmed_writer if self.trimmed_writer else contextlib.nullcontext() as trimmed:
            for doc in super().run(data, rank, world_size):
                original = doc.metadata.pop("_untrimmed", None)
                if original is not None and trimmed:
                    self.stat_update("trimmed")
                    trimmed.write(Document(text=original, id=doc.id,
                                           metadata={**doc.metadata, "trimmed_text": doc.text}), rank)  # fmt: skip
                yield doc


class DecontaminationFilter(BaseFilter):
    """Drops documents that share a `ngram`-word window with an eval item (GPT-3, Brown et al. 2020, appendix C).
    Eval items are the `field` of each .jsonl line or each non-blank line of a .txt; items shorter than `ngram` words
    cannot match and are counted in the report. A dropped document records the first item it matched."""

    name = "🧪 decontamination"

    def __init__(self, eval_sets: list[str], field: str, ngram: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.eval_sets = [str(path) for path in eval_sets]
        self.field = field
        self.ngram = ngram
        self._index: dict[str, str] | None = None

    def _build_index(self) -> dict[str, str]:
        index: dict[str, str] = {}
        for label, text in iter_eval_items(self.eval_sets, self.field):
            tokens = words(text)
            for start in range(len(tokens) - self.ngram + 1):
                index.setdefault(" ".join(tokens[start : start + self.ngram]), label)
        return index

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._index is None:
            self._index = self._build_index()
        tokens = words(doc.text)
        for start in range(len(tokens) - self.ngram + 1):
            window = " ".join(tokens[start : start + self.ngram])
            if window in self._index:
                doc.metadata["eval_item"] = self._index[window]
                doc.metadata["eval_ngram"] = window
                return False, "eval_overlap"
        return True


def iter_eval_items(eval_sets: list[str], field: str) -> Iterator[tuple[str, str]]:
    """(label `path:line`, text) of every eval item; a clear error for a bad line."""
    for path in map(Path, eval_sets):
        with path.expanduser().open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"--decontaminate {path}:{line_number} is not valid JSON ({error})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(field), str):
                        raise ValueError(
                            f"--decontaminate {path}:{line_number} has no text field {field!r}; "
                            "name it with --decontaminate-field"
                        )
                    yield f"{path.name}:{line_number}", record[field]
                else:
                    yield f"{path.name}:{line_number}", line
