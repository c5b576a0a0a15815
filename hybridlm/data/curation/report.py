"""The curation report: per-stage funnel, removals by rule with examples, duplicate clusters, eval matches.

Written as `curation/report.json` and `curation/funnel.png` inside the store, and printed as a table.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from hybridlm.data.curation.config import FILTER_SETTINGS, STAGES, CurationConfig
from hybridlm.data.curation.pipeline import removed_documents

EXAMPLE_CHARS = 300
ENCODE_BATCH = 512


def _tally(work: Path, stage: str) -> dict:
    total = {"documents": 0, "chars": 0, "code_documents": 0, "histogram": Counter()}
    for path in sorted((work / "tally" / stage).glob("*.json")):
        part = json.loads(path.read_text())
        for key in ("documents", "chars", "code_documents"):
            total[key] += part[key]
        total["histogram"].update({int(key): value for key, value in part["histogram"].items()})
    return total


def _cluster_sizes(histogram: Counter, *, counts_copies: bool) -> dict:
    """{cluster size: clusters}. Exact dedup tags each kept document with its removed copies (size = copies + 1);
    MinHash tags it with its cluster's size, and documents outside any cluster carry size 1."""
    sizes = Counter()
    for value, documents in histogram.items():
        size = value + 1 if counts_copies else value
        if size > 1:
            sizes[size] += documents
    return {str(size): sizes[size] for size in sorted(sizes)}


def _batched_token_count(texts, encode_lengths) -> int:
    total, batch = 0, []
    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            total += sum(encode_lengths(batch))
            batch.clear()
    return total + sum(encode_lengths(batch))


def build_report(curation: CurationConfig, work: Path, encode_lengths, eval_counts: dict, output_tokens: int) -> dict:
    """`encode_lengths(texts) -> list[int]`: token counts under the store's tokenizer; `output_tokens`: the store's.

    Tokens per stage are counted back from the output: a stage's input is its output plus the tokens of the documents
    it removed and of the lines it cut (C4; removed/c4_trimmed holds those documents as they were)."""
    stages = []
    before = _tally(work, "input")
    report = {"settings": curation.settings(), "input": {"documents": before["documents"], "chars": before["chars"],
                                                        "code_documents": before["code_documents"]}}  # fmt: skip
    for stage in (stage for stage in STAGES if stage in curation.stages):
        after = _tally(work, stage)
        # One streaming pass over the removed documents: counts by rule, examples, eval items hit; tokens batched.
        reasons, eval_items, examples = Counter(), Counter(), {}

        def removed_texts():
            for doc in removed_documents(work, stage):
                reason = doc["metadata"].get("filter_reason", "duplicate")
                reasons[reason] += 1
                if "eval_item" in doc["metadata"]:
                    eval_items[doc["metadata"]["eval_item"]] += 1
                if len(examples.setdefault(reason, [])) < curation.examples_per_rule:
                    example = {"id": doc["id"], "text": doc["text"][:EXAMPLE_CHARS]}
                    if "eval_item" in doc["metadata"]:
                        example.update(eval_item=doc["metadata"]["eval_item"], ngram=doc["metadata"]["eval_ngram"])
                    examples[reason].append(example)
                yield doc["text"]

        tokens_removed = _batched_token_count(removed_texts(), encode_lengths)
        trimmed = list(removed_documents(work, f"{stage}_trimmed")) if stage == "c4" else []
        tokens_trimmed = _batched_token_count((doc["text"] for doc in trimmed), encode_lengths) - _batched_token_count(
            (doc["metadata"]["trimmed_text"] for doc in trimmed), encode_lengths
        )
        entry = {
            "stage": stage,
            "documents_in": before["documents"],
            "documents_out": after["documents"],
            "chars_in": before["chars"],
            "chars_out": after["chars"],
            "tokens_removed": int(tokens_removed),
            "tokens_trimmed": int(tokens_trimmed),
            "documents_trimmed": len(trimmed),
            "removed_by_rule": dict(reasons.most_common()),
            "examples": examples,
        }
        if stage in ("exact", "minhash"):
            entry["cluster_sizes"] = _cluster_sizes(after["histogram"], counts_copies=stage == "exact")
        if stage in FILTER_SETTINGS:
            entry["code_documents_passed"] = before["code_documents"]
        if stage == "decontaminate":
            entry["eval_items_matched"] = dict(eval_items.most_common())
            entry.update(eval_counts)
        stages.append(entry)
        before = after
    tokens = output_tokens
    for entry in reversed(stages):
        entry["tokens_out"] = tokens
        tokens += entry["tokens_removed"] + entry["tokens_trimmed"]
        entry["tokens_in"] = tokens
    report["input"]["tokens"] = tokens
    report["stages"] = stages
    report["output"] = {"documents": before["documents"], "chars": before["chars"], "tokens": output_tokens}
    return report


def format_table(report: dict) -> str:
    rows = [("stage", "docs in", "docs out", "removed", "tokens in", "tokens out", "top rules")]
    for entry in report["stages"]:
        rules = ", ".join(f"{rule} {count}" for rule, count in list(entry["removed_by_rule"].items())[:3])
        if entry["documents_trimmed"]:
            rules += f"{', ' if rules else ''}{entry['documents_trimmed']} trimmed"
        rows.append((entry["stage"], str(entry["documents_in"]), str(entry["documents_out"]),
                     str(entry["documents_in"] - entry["documents_out"]), str(entry["tokens_in"]),
                     str(entry["tokens_out"]), rules or "-"))  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def plot_funnel(report: dict, path: Path) -> None:
    """Documents and tokens left after each stage, as a share of the input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["input"] + [entry["stage"] for entry in report["stages"]]
    documents = [report["input"]["documents"]] + [entry["documents_out"] for entry in report["stages"]]
    tokens = [report["input"]["tokens"]] + [entry["tokens_out"] for entry in report["stages"]]
    figure, axis = plt.subplots(figsize=(1.4 * len(labels) + 2, 4))
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], [100 * d / max(1, documents[0]) for d in documents], 0.4,
             label="documents")  # fmt: skip
    axis.bar([p + 0.2 for p in positions], [100 * t / max(1, tokens[0]) for t in tokens], 0.4, label="tokens")
    for position, count in zip(positions, documents):
        axis.annotate(str(count), (position - 0.2, 100 * count / max(1, documents[0])), ha="center", va="bottom",
                      fontsize=8)  # fmt: skip
    axis.set_xticks(list(positions), labels, rotation=20)
    axis.set_ylabel("% of input left")
    axis.set_title("curation funnel")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
