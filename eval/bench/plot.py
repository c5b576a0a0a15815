"""Render benchmark results (eval/bench/results/*.json) as PNG plots beside them and Markdown tables.

    python eval/bench/plot.py                       # every results file: PNGs, and the tables on stdout
    python eval/bench/plot.py results.json --markdown-only
    python eval/bench/plot.py --markdown-out eval/bench/results/README.md --readme README.md   # what run_all.sh does

Plots and tables for the end-to-end files of train_throughput.py ("train_throughput") and decode.py ("decode"),
whatever parts of them exist (a suite left out, a run stopped early, out-of-memory rows); the kernel benchmarks
(gated_delta.py, moe.py) print their own tables and are listed with their device and date. Missing values show as
"-" or "OOM". --readme replaces what lies between the markers `<!-- bench-results:begin -->` and
`<!-- bench-results:end -->` of that file with the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RENDERED = ("train_throughput", "decode")
README_BEGIN, README_END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"


def _fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _header(report: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    commit = (report.get("git") or {}).get("commit")
    notes = []
    if report.get("tiny"):
        notes.append("tiny smoke run: numbers are meaningless")
    if report.get("complete") is False:
        notes.append("incomplete: the run stopped before the end")
    note = f" ({'; '.join(notes)})" if notes else ""
    return (f"{report.get('device', '?')}, {report.get('dtype', '')}, {report.get('date', '?')}{note}\n"
            f"`{report.get('command', '?')}`; {versions}" + (f"; commit {commit[:10]}" if commit else ""))


def _cell(row: dict, key: str, spec: str = ".0f") -> str:
    if row.get("oom"):
        return "OOM"
    if row.get("error"):
        return "error"
    return _fmt(row.get(key), spec)


def markdown(report: dict) -> str:
    lines = [_header(report), ""]
    if report["benchmark"] == "train_throughput":
        model = report.get("model", {})
        size = (f"{model['layer_pattern']} ({model['total'] / 1e6:.0f}M total / {model['active'] / 1e6:.0f}M active)"
                if model else "")
        if report.get("transformers"):
            experts = (report.get("transformers_kernels") or {}).get("experts_implementation", "-")
            lines += [f"Training {size}, seq {report['transformers'][0]['seq_len']} (transformers experts: "
                      f"{experts}; hybridlm on packed rows as train.py feeds it):", "",
                      "| implementation | data | tokens/s | MFU | peak memory (GiB) | speedup |",
                      "|---|---|---:|---:|---:|---:|"]
            for row in report["transformers"]:
                mfu = _cell(row, "mfu", ".1%") if row.get("mfu") is not None or row.get("oom") else "-"
                lines.append(f"| {row['impl']} | {row.get('data', 'rows')} | {_cell(row, 'tokens_per_s')} | {mfu} | "
                             f"{_cell(row, 'peak_memory_gib', '.1f')} | "
                             f"{_fmt(row.get('speedup_vs_transformers'), '.2f')} |")
            lines.append("")
        if report.get("crossover"):
            lines += ["Hybrid vs pure attention at equal parameter count, one document per row:", "",
                      "| model | params | seq len | tokens/s | peak memory (GiB) | hybrid speedup |",
                      "|---|---:|---:|---:|---:|---:|"]
            for row in report["crossover"]:
                lines.append(f"| {row['model']} ({row['layer_pattern']}) | {row['parameters'] / 1e6:.1f}M | "
                             f"{row['seq_len']} | {_cell(row, 'tokens_per_s')} | "
                             f"{_cell(row, 'peak_memory_gib', '.1f')} | "
                             f"{_fmt(row.get('speedup_vs_attention'), '.2f')} |")
            lines.append("")
    elif report["benchmark"] == "decode":
        lines += ["| implementation | batch | context | decode tokens/s | prefill (s) | prefill peak (GiB) | "
                  "decode peak (GiB) | same tokens | speedup |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for row in report["results"]:
            same = row.get("same_tokens")
            lines.append(f"| {row['impl']} | {row['batch']} | {row.get('context', '-')} | "
                         f"{_cell(row, 'decode_tokens_per_s', '.1f')} | {_cell(row, 'prefill_s', '.2f')} | "
                         f"{_cell(row, 'prefill_peak_memory_gib', '.1f')} | "
                         f"{_cell(row, 'decode_peak_memory_gib', '.1f')} | "
                         f"{'-' if same is None else ('yes' if same else 'no')} | "
                         f"{_fmt(row.get('speedup_vs_transformers'), '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def _bars(ax, labels, values, title, ylabel):
    shown = [0.0 if v is None else v for v in values]
    colors = ["tab:red", "tab:orange", "tab:blue", "tab:cyan", "tab:green", "tab:grey"]
    bars = ax.bar(labels, shown, color=(colors * len(labels))[: len(labels)])
    for bar, value in zip(bars, values):
        ax.annotate("n/a" if value is None else f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=7)


def render(path: str | Path) -> Path | None:
    """Write PATH.png for an end-to-end results file; returns it, or None for another kind of file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    report = json.loads(path.read_text())
    kind = report.get("benchmark")
    if kind == "train_throughput":
        panels = [name for name in ("transformers", "crossover") if report.get(name)]
        if not panels:
            return None
        columns = ("transformers" in panels) + 2 * ("crossover" in panels)
        fig, axes = plt.subplots(1, columns, figsize=(4.5 * columns, 4), squeeze=False)
        axes = list(axes[0])
        if "transformers" in panels:
            rows = report["transformers"]
            _bars(axes.pop(0), [f"{r['impl']}\n{r.get('data', 'rows')}" for r in rows],
                  [r.get("tokens_per_s") for r in rows], f"training tokens/s, seq {rows[0]['seq_len']}", "tokens/s")
        if "crossover" in panels:
            speed, memory = axes
            for model in ("hybrid", "attention"):
                rows = [r for r in report["crossover"] if r["model"] == model]
                if not rows:
                    continue
                label = f"{model} {rows[0]['layer_pattern']} ({rows[0]['parameters'] / 1e6:.1f}M)"
                speed.plot([r["seq_len"] for r in rows], [r.get("tokens_per_s") for r in rows], marker="o",
                           label=label)
                memory.plot([r["seq_len"] for r in rows], [r.get("peak_memory_gib") for r in rows], marker="o",
                            label=label)
            for ax, ylabel in ((speed, "training tokens/s"), (memory, "peak memory (GiB)")):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("sequence length")
                ax.set_ylabel(ylabel)
                ax.legend(fontsize=7)
                ax.grid(alpha=0.3)
            speed.set_title("hybrid vs pure attention, equal parameters", fontsize=9)
    elif kind == "decode":
        rows = report["results"]
        if not rows:
            return None
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        labels = [f"{r['impl']}\nbatch {r['batch']}" for r in rows]
        _bars(axes[0], labels, [r.get("decode_tokens_per_s") for r in rows],
              f"decode tokens/s at {rows[0].get('context', '?')} context", "tokens/s")
        _bars(axes[1], labels, [r.get("decode_peak_memory_gib") for r in rows], "peak memory while decoding", "GiB")
    else:
        return None
    fig.suptitle(f"{report['device']} | {report.get('dtype', '')} | {report['date'][:10]}"
                 + (" | tiny smoke run" if report.get("tiny") else "")
                 + (" | incomplete" if report.get("complete") is False else ""), fontsize=9)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def tables(files: list[Path], render_png: bool) -> str:
    """Markdown for every file: tables for the end-to-end ones, a line for each kernel benchmark."""
    sections, others = [], []
    for path in files:
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            others.append(f"- `{path.name}`: unreadable ({error})")
            continue
        kind = report.get("benchmark", "?")
        if kind in RENDERED:
            if render_png:
                render(path)
            sections.append(f"#### {path.name}\n\n{markdown(report)}")
        else:
            others.append(f"- `{path.name}`: {kind}, {report.get('device', '?')}, {report.get('date', '?')} "
                          "(its own script prints the table)")
    if others:
        sections.append("Other results files (kernel benchmarks):\n\n" + "\n".join(others) + "\n")
    return "\n".join(sections)


def update_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    begin, end = content.find(README_BEGIN), content.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} markers to put the tables between")
    readme.write_text(content[: begin + len(README_BEGIN)] + "\n" + text.rstrip() + "\n" + content[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help=f"results JSON files (default: {RESULTS}/*.json)")
    parser.add_argument("--markdown-only", action="store_true", help="print the tables, write no PNG")
    parser.add_argument("--markdown-out", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--readme", type=Path, default=None,
                        help=f"replace the text between {README_BEGIN} and {README_END} in this file with the tables")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.json"))
    if not files:
        print(f"no results in {RESULTS}; run eval/bench/run_all.sh (or train_throughput.py / decode.py) first",
              file=sys.stderr)
        return 1
    text = tables(files, render_png=not args.markdown_only)
    print(text)
    if args.markdown_out is not None:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(text + "\n")
    if args.readme is not None:
        update_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
