"""MQAR recall: pure Gated DeltaNet vs hybrid (GDN + attention) at about equal size, trained by train.py.

For every model (experiment `mqar_<name>`) and every training number of key-value pairs, trains a run with
`train.py data=mqar` (resumed or skipped when the run directory already holds its final checkpoint), then scores
greedy recall accuracy at each --eval-kv (sequence length = 4 x pairs). Writes JSON (command, date, device,
versions, parameter counts, accuracies) and a plot of accuracy against the number of pairs.

    python eval/recall.py --cpu-quick                     # the small CPU run committed under eval/results/
    python eval/recall.py --train-kv 16 64 --eval-kv 8 16 32 64 128 --steps 20000 --vocab-size 8192 \
        --override model.hidden_size=256 --out eval/results/mqar_gpu
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("gdn", "hybrid")
CPU_QUICK = {"train_kv": [8], "eval_kv": [4, 8, 12, 16, 24], "steps": 1500, "vocab_size": 64, "eval_examples": 256}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="experiments configs/experiment/mqar_<name>.yaml to train")
    parser.add_argument("--train-kv", type=int, nargs="+", default=[8], help="key-value pairs of each training run")
    parser.add_argument("--eval-kv", type=int, nargs="+", default=[4, 8, 12, 16, 24])
    parser.add_argument("--steps", type=int, default=1500, help="trainer.max_steps of every run")
    parser.add_argument("--vocab-size", type=int, default=64, help="MQAR vocabulary (= model.vocab_size)")
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234, help="trainer.seed")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every training run")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "recall")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "mqar",
                        help="writes OUT.json and OUT.png")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="torch threads of the training runs (0: torch's default); 1 is fastest for tiny models")
    parser.add_argument("--cpu-quick", action="store_true",
                        help=f"the small CPU setting: {CPU_QUICK}, one thread")
    args = parser.parse_args(argv)
    if args.cpu_quick:
        for key, value in CPU_QUICK.items():
            setattr(args, key, value)
        args.cpu_threads = args.cpu_threads or 1
    for name in ("steps", "vocab_size", "eval_examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    keys = (args.vocab_size - 1) // 2
    too_many = [k for k in args.train_kv + args.eval_kv if not 1 <= k <= keys]
    if too_many:
        parser.error(f"pairs {too_many} do not fit --vocab-size={args.vocab_size}: its {keys} keys allow 1..{keys} "
                     "pairs; raise --vocab-size")
    return args


def train(name: str, pairs: int, args: argparse.Namespace) -> tuple[Path, float]:
    """Train (or finish) one run; returns its directory and the wall time spent here."""
    overrides = [
        f"experiment=mqar_{name}", f"trainer.max_steps={args.steps}", f"trainer.seq_len={4 * pairs}",
        f"trainer.seed={args.seed}", f"data.mqar.num_kv_pairs={pairs}", f"data.mqar.vocab_size={args.vocab_size}",
        f"model.vocab_size={args.vocab_size}", "trainer.progress_bar=false", *args.override,
    ]
    # The directory is keyed by the experiment file and every override, so a changed setting never resumes an old run.
    key = hashlib.sha256(((REPO / "configs" / "experiment" / f"mqar_{name}.yaml").read_text()
                          + "\n".join(overrides)).encode()).hexdigest()[:8]
    out_dir = args.runs_dir / f"{name}_kv{pairs}_{key}"
    command = [sys.executable, str(REPO / "train.py"), *overrides, f"trainer.out_dir={out_dir}"]
    env = dict(os.environ)
    if args.cpu_threads:
        env["OMP_NUM_THREADS"] = str(args.cpu_threads)
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    return out_dir, time.perf_counter() - started


def final_val_loss(out_dir: Path) -> float | None:
    import json

    loss = None
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            loss = record.get("val_loss", loss)
    return loss


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"gdn": ("tab:blue", "o"), "hybrid": ("tab:red", "s")}
    dashes = ["-", "--", ":", "-."]
    train_kvs = sorted({run["train_kv"] for run in report["runs"]})
    for run in report["runs"]:
        color, marker = styles.get(run["model"], ("black", "x"))
        xs = [r["num_kv_pairs"] for r in run["results"]]
        ys = [r["accuracy"] for r in run["results"]]
        label = f"{run['model']} {run['layer_pattern']} ({run['parameters'] / 1e3:.1f}k), trained kv={run['train_kv']}"
        ax.plot(xs, ys, marker=marker, color=color, linestyle=dashes[train_kvs.index(run["train_kv"]) % 4],
                label=label)
    for pairs in train_kvs:
        ax.axvline(pairs, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("key-value pairs (sequence length = 4 x pairs)")
    ax.set_ylabel("recall accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"MQAR, vocab {report['setting']['vocab_size']}, {report['setting']['steps']} steps "
                 f"({report['device']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (REPO / "configs" / "experiment" / "mqar_hybrid.yaml").is_file():
        raise SystemExit(f"{REPO} has no configs/experiment/mqar_*.yaml; run from a hybridlm checkout")
    import torch

    from hybridlm.data.config import MQARConfig
    from hybridlm.evaluate.recall import mqar_sweep
    from hybridlm.evaluate.report import run_metadata, write_json
    from hybridlm.export.checkpoint import read_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []
    for pairs in args.train_kv:
        for name in args.models:
            out_dir, seconds = train(name, pairs, args)
            ckpt = read_checkpoint(out_dir)
            model = ckpt.build_model().to(device)
            results = mqar_sweep(model, MQARConfig(num_kv_pairs=pairs, vocab_size=args.vocab_size), args.eval_kv,
                                 num_examples=args.eval_examples)
            runs.append({
                "model": name, "layer_pattern": ckpt.config.layer_pattern, "train_kv": pairs,
                "train_seq_len": 4 * pairs, "steps": ckpt.metadata.get("step"), "run_dir": str(out_dir),
                "parameters": sum(p.numel() for p in model.parameters()), "train_wall_seconds": round(seconds, 1),
                "final_val_loss": final_val_loss(out_dir), "results": results,
            })
            print(name, f"kv={pairs}:", " ".join(f"{r['num_kv_pairs']}:{r['accuracy']:.3f}" for r in results),
                  flush=True)
    report = {
        "benchmark": "mqar_recall",
        **run_metadata(device),
        "note": "small CPU run (--cpu-quick): tiny models, short training; shows the method, not converged numbers"
        if args.cpu_quick else "",
        "setting": {"vocab_size": args.vocab_size, "steps": args.steps, "eval_examples": args.eval_examples,
                    "train_threads": args.cpu_threads or "default",
                    "train_kv": args.train_kv, "eval_kv": args.eval_kv, "overrides": args.override},
        "runs": runs,
    }
    json_path = write_json(args.out.with_suffix(".json"), report)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {json_path} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
