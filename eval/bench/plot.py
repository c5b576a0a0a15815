"""Render benchmark results JSON (eval/bench/results/*.json) as PNG plots beside them and Markdown tables.

    python eval/bench/plot.py                       # every results file: PNGs, and the tables on stdout
    python eval/bench/plot.py results.json --markdown-only

Handles the files written by train_throughput.py ("train_throughput") and decode.py ("decode"); other files are
skipped with a note. Missing values (out of memory, CPU runs without MFU) show as "-" / "OOM".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _header(report: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    tiny = " (tiny smoke run: numbers are meaningless)" if report.get("tiny") else ""
    return f"{report['device']}, {report.get('dtype', '')}, {report['date']}{tiny}\n`{report['command']}`; {versions}"


def _oom_or(row: dict, key: str, spec: str = ".0f") -> str:
    return "OOM" if row.get("oom") else _fmt(row.get(key), spec)


def markdown(report: dict) -> str:
    lines = [_header(report), ""]
    if report["benchmark"] == "train_throughput":
        model = report["model"]
        if report.get("transformers"):
            lines += [f"Training, {model['layer_pattern']} ({model['total'] / 1e6:.0f}M total / "
                      f"{model['active'] / 1e6:.0f}M active), seq {report['transformers'][0]['seq_len']}:", "",
                      "| implementation | tokens/s | MFU | peak memory (GiB) | speedup |", "|---|---:|---:|---:|---:|"]
            for row in report["transformers"]:
                mfu = "OOM" if row.get("oom") else ("-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%")
                lines.append(f"| {row['impl']} | {_oom_or(row, 'tokens_per_s')} | {mfu} | "
                             f"{_oom_or(row, 'peak_memory_gib', '.1f')} | {_fmt(row.get('speedup_vs_transformers'), '.2f')} |")
            lines.append("")
        if report.get("crossover"):
            lines += ["Hybrid vs pure attention at equal parameter count:", "",
                      "| model | params | seq len | tokens/s | peak memory (GiB) | hybrid speedup |",
                      "|---|---:|---:|---:|---:|---:|"]
            for row in report["crossover"]:
                lines.append(f"| {row['model']} ({row['layer_pattern']}) | {row['parameters'] / 1e6:.1f}M | "
                             f"{row['seq_len']} | {_oom_or(row, 'tokens_per_s')} | "
                             f"{_oom_or(row, 'peak_memory_gib', '.1f')} | {_fmt(row.get('speedup_vs_attention'), '.2f')} |")
            lines.append("")
    elif report["benchmark"] == "decode":
        lines += ["| implementation | batch | context | decode tokens/s | prefill (s) | peak memory (GiB) | speedup |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in report["results"]:
            lines.append(f"| {row['impl']} | {row['batch']} | {row.get('context', '-')} | "
                         f"{_oom_or(row, 'decode_tokens_per_s', '.1f')} | {_oom_or(row, 'prefill_s', '.2f')} | "
                         f"{_oom_or(row, 'peak_memory_gib', '.1f')} | {_fmt(row.get('speedup_vs_transformers'), '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def _bars(ax, labels, values, title, ylabel):
    shown = [0.0 if v is None else v for v in values]
    bars = ax.bar(labels, shown, color=["tab:red", "tab:blue", "tab:green", "tab:grey"][: len(labels)])
    for bar, value in zip(bars, values):
        ax.annotate("OOM" if value is None else f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)


def render(path: str | Path) -> Path | None:
    """Write PATH.png for a results file; returns it, or None for an unknown kind of file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    report = json.loads(path.read_text())
    kind = report.get("benchmark")
    if kind == "train_throughput":
        panels = [name for name in ("transformers", "crossover") if report.get(name)]
        columns = ("transformers" in panels) + 2 * ("crossover" in panels)
        fig, axes = plt.subplots(1, columns, figsize=(4.5 * columns, 4), squeeze=False)
        axes = list(axes[0])
        if "transformers" in panels:
            rows = report["transformers"]
            _bars(axes.pop(0), [r["impl"] for r in rows], [r.get("tokens_per_s") for r in rows],
                  f"training tokens/s, seq {rows[0]['seq_len']}", "tokens/s")
        if "crossover" in panels:
            speed, memory = axes
            for model in ("hybrid", "attention"):
                rows = [r for r in report["crossover"] if r["model"] == model]
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
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        labels = [f"{r['impl']}\nbatch {r['batch']}" for r in rows]
        _bars(axes[0], labels, [r.get("decode_tokens_per_s") for r in rows],
              f"decode tokens/s at {rows[0].get('context', '?')} context", "tokens/s")
        _bars(axes[1], labels, [r.get("peak_memory_gib") for r in rows], "peak memory", "GiB")
    else:
        print(f"{path}: not a train_throughput / decode results file, skipped", file=sys.stderr)
        return None
    fig.suptitle(f"{report['device']} | {report.get('dtype', '')} | {report['date'][:10]}"
                 + (" | tiny smoke run" if report.get("tiny") else ""), fontsize=9)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help=f"results JSON files (default: {RESULTS}/*.json)")
    parser.add_argument("--markdown-only", action="store_true", help="print the tables, write no PNG")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.json"))
    if not files:
        print(f"no results in {RESULTS}; run eval/bench/train_throughput.py or decode.py first", file=sys.stderr)
        return 1
    for path in files:
        report = json.loads(path.read_text())
        if report.get("benchmark") not in ("train_throughput", "decode"):
            continue
        if not args.markdown_only:
            render(path)
        print(f"### {path.name}\n\n{markdown(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
