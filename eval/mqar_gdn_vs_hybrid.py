"""MQAR recall: pure Gated DeltaNet vs hybrid (GDN + attention) at equal size, trained by train.py data=mqar.

Every model (experiment configs/experiment/mqar_<name>.yaml) is trained through a curriculum of numbers of
key-value pairs, `--curriculum PAIRS:STEPS[:BATCH] ...`: one `train.py data=mqar` run per stage at sequence length
4 x PAIRS (BATCH rows per step, default the experiment's), each stage initialised from the previous stage's
weights (model.init_from): from easy to hard, so that the recall circuit is learnt on few pairs first. A run is
resumed or skipped when its directory already holds its final checkpoint; --jobs curricula train at once. The
last stage fixes the trained sequence length; greedy recall accuracy is then scored on held-out examples at each
--eval-kv, every example padded to that trained length (no length extrapolation). Writes JSON (command, date,
device, versions, git commit, parameter counts, recurrent state size, per-stage validation losses, accuracies) and
a plot of accuracy against the number of pairs.

A GDN layer keeps a fixed state of value heads x head_k_dim x head_v_dim numbers: the delta rule stores exactly
about as many independent key -> value associations as it has key dimensions (k heads x head_k_dim), so pure GDN
should lose recall once the pairs outnumber them, while the attention layer of the hybrid can look every key up
exactly at any number of pairs.

    python eval/mqar_gdn_vs_hybrid.py     # the CPU run committed under eval/results/ (~11 min of training, 2 cores)
    python eval/mqar_gdn_vs_hybrid.py --vocab-size 8192 --num-keys 4096 --curriculum 16:4000 64:2000 256:2000:32 \
        --eval-kv 16 32 64 128 192 256 --seeds 1 2 3 --override model.hidden_size=256 --out eval/results/mqar_gpu
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("gdn", "hybrid")


def parse_stage(text: str) -> tuple[int, int, int]:
    """PAIRS:STEPS[:BATCH] -> (pairs, steps, rows per step; 0 keeps the experiment's deepspeed.micro_batch_size)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not PAIRS:STEPS or PAIRS:STEPS:BATCH with all >= 1, e.g. 8:800")
    pairs, steps, *batch = (int(p) for p in parts)
    return pairs, steps, batch[0] if batch else 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="experiments configs/experiment/mqar_<name>.yaml to train")
    parser.add_argument("--curriculum", type=parse_stage, nargs="+",
                        default=[(8, 2000, 0), (16, 400, 0), (32, 600, 0), (64, 1000, 16), (96, 1500, 10)],
                        metavar="PAIRS:STEPS[:BATCH]", help="training stages in order (trainer.max_steps of each run)")
    parser.add_argument("--eval-kv", type=int, nargs="+", default=[8, 16, 32, 48, 64, 80, 96],
                        help="numbers of pairs to score (at most the last stage's: within the trained length)")
    parser.add_argument("--vocab-size", type=int, default=128, help="MQAR vocabulary (= model.vocab_size)")
    parser.add_argument("--num-keys", type=int, default=96,
                        help="key tokens; the other vocab_size - 1 - keys are values")
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234], help="trainer.seed; one curriculum each")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every training run")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "recall")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "mqar",
                        help="writes OUT.json and OUT.png")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads of the training runs (0: one per core); 1 is fastest for tiny models")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only redraw the plot of an existing results file (written beside it)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="curricula trained at the same time (one per model and seed; each stage's output then "
                             "goes to RUN_DIR/stdout.log)")
    args = parser.parse_args(argv)
    for name in ("vocab_size", "num_keys", "eval_examples", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.num_keys >= args.vocab_size - 1:
        parser.error(f"--num-keys={args.num_keys} leaves no value tokens in --vocab-size={args.vocab_size}")
    too_many = sorted({stage[0] for stage in args.curriculum} | set(args.eval_kv))
    too_many = [k for k in too_many if not 1 <= k <= args.num_keys]
    if too_many:
        parser.error(f"pairs {too_many} need more distinct keys than --num-keys={args.num_keys}; raise --num-keys "
                     "(and --vocab-size)")
    trained = args.curriculum[-1][0]
    beyond = [k for k in args.eval_kv if k > trained]
    if beyond:
        parser.error(f"--eval-kv {beyond} exceed the last stage's {trained} pairs: they would need sequences longer "
                     "than the trained length; end the curriculum with at least that many pairs")
    return args


def stage_overrides(name: str, stage: tuple[int, int, int], seed: int, init_from: Path | None,
                    args: argparse.Namespace) -> list[str]:
    pairs, steps, batch = stage
    return [
        f"experiment=mqar_{name}", f"trainer.max_steps={steps}", f"trainer.seq_len={4 * pairs}",
        *([f"deepspeed.micro_batch_size={batch}"] if batch else []),
        f"trainer.seed={seed}", f"data.mqar.num_kv_pairs={pairs}", f"data.mqar.vocab_size={args.vocab_size}",
        f"data.mqar.num_keys={args.num_keys}", f"model.vocab_size={args.vocab_size}", "trainer.progress_bar=false",
        *([f"model.init_from={init_from}"] if init_from else []), *args.override,
    ]


def train_stage(name: str, overrides: list[str], pairs: int, args: argparse.Namespace) -> tuple[Path, float]:
    """Train (or finish) one stage; returns its run directory and the wall time spent here."""
    # Keyed by the experiment file and every override (the previous stage's directory included), so a changed
    # setting anywhere in the curriculum never resumes an old run.
    key = hashlib.sha256(((REPO / "configs" / "experiment" / f"mqar_{name}.yaml").read_text()
                          + "\n".join(overrides)).encode()).hexdigest()[:8]
    out_dir = args.runs_dir / f"{name}_kv{pairs}_{key}"
    command = [sys.executable, str(REPO / "train.py"), *overrides, f"trainer.out_dir={out_dir}"]
    env = dict(os.environ)
    if args.cpu_threads:
        env["OMP_NUM_THREADS"] = str(args.cpu_threads)
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    if args.jobs == 1:
        subprocess.run(command, cwd=REPO, env=env, check=True)
    else:  # several curricula at once: keep their outputs apart
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "stdout.log").open("a") as log:
            done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"training {out_dir.name} failed (exit {done.returncode}); see {out_dir / 'stdout.log'}")
    return out_dir, time.perf_counter() - started


def train_curriculum(name: str, seed: int, args: argparse.Namespace) -> tuple[Path, list[dict]]:
    """Every stage of one model's curriculum in order; returns the last run directory and the stages' records."""
    stages, init_from = [], None
    for stage in args.curriculum:
        pairs, steps, batch = stage
        overrides = stage_overrides(name, stage, seed, init_from, args)
        init_from, seconds = train_stage(name, overrides, pairs, args)
        stages.append({"pairs": pairs, "steps": steps, "batch": batch or "experiment default", "seq_len": 4 * pairs,
                       "run_dir": str(init_from), "train_wall_seconds": round(seconds, 1),
                       "final_val_loss": final_val_loss(init_from)})
        print(f"{name} seed {seed}: stage {pairs} pairs done, val loss {stages[-1]['final_val_loss']}", flush=True)
    return init_from, stages


def final_val_loss(out_dir: Path) -> float | None:
    loss = None
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            loss = json.loads(line).get("val_loss", loss)
    return loss


def recurrent_state(config) -> dict:
    """What each GDN layer carries from token to token, i.e. what must hold every key -> value association: a
    head_k_dim x head_v_dim matrix per value head. The delta rule stores up to as many independent associations
    exactly as there are key dimensions (num_k_heads x head_k_dim); more pairs must share them."""
    gdn = config.gdn
    return {"gdn_layers": config.layer_types.count("gated_deltanet"), "k_heads": gdn.num_k_heads,
            "v_heads": gdn.num_v_heads, "head_k_dim": gdn.head_k_dim, "head_v_dim": gdn.head_v_dim,
            "key_dims": gdn.num_k_heads * gdn.head_k_dim,
            "numbers_per_layer": gdn.num_v_heads * gdn.head_k_dim * gdn.head_v_dim}


def plot(report: dict, path: Path) -> None:
    """Accuracy against pairs (left) and the error rate on its own scale (right, where small gaps show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy, errors) = plt.subplots(1, 2, figsize=(10, 4.2))
    styles = {"gdn": ("tab:blue", "o"), "hybrid": ("tab:red", "s")}
    xs = report["setting"]["eval_kv"]
    for name in report["setting"]["models"]:
        runs = [run for run in report["runs"] if run["model"] == name]
        color, marker = styles.get(name, ("black", "x"))
        mean = [sum(run["results"][i]["accuracy"] for run in runs) / len(runs) for i in range(len(xs))]
        first = runs[0]
        label = (f"{name} {first['layer_pattern']} ({first['parameters'] / 1e3:.1f}k params)"
                 + (f", mean of {len(runs)} seeds" if len(runs) > 1 else ""))
        accuracy.plot(xs, mean, marker=marker, color=color, label=label)
        errors.plot(xs, [1 - m for m in mean], marker=marker, color=color, label=label)
        if len(runs) > 1:
            for run in runs:
                values = [r["accuracy"] for r in run["results"]]
                accuracy.scatter(xs, values, color=color, marker=marker, s=10, alpha=0.4)
                errors.scatter(xs, [1 - v for v in values], color=color, marker=marker, s=10, alpha=0.4)
    state = report["runs"][0]["recurrent_state"]
    for ax in (accuracy, errors):
        ax.axvline(state["key_dims"], color="tab:blue", linewidth=0.8, linestyle=":",
                   label=f"key dimensions of one GDN layer ({state['k_heads']} x {state['head_k_dim']})")
        ax.set_xlabel(f"key-value pairs (examples padded to the trained {report['trained_seq_len']} tokens)")
        ax.grid(alpha=0.3)
    accuracy.axhline(report["chance"], color="grey", linewidth=0.8, linestyle="--", label="chance (1 / values)")
    accuracy.set_ylim(-0.02, 1.02)
    accuracy.set_ylabel("recall accuracy (greedy)")
    accuracy.legend(fontsize=7, loc="center right")
    errors.set_ylim(bottom=0)
    errors.set_ylabel("error rate (1 - accuracy)")
    errors.legend(fontsize=7, loc="upper left")
    stages = " -> ".join(f"{s['pairs']}:{s['steps']}" for s in report["setting"]["curriculum"])
    fig.suptitle(f"MQAR, vocabulary {report['setting']['vocab_size']} ({report['setting']['num_keys']} keys), "
                 f"curriculum pairs:steps {stages}\n{report['device']}, {report['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        print(f"wrote {args.replot.with_suffix('.png')}")
        return 0
    if not (REPO / "configs" / "experiment" / "mqar_hybrid.yaml").is_file():
        raise SystemExit(f"{REPO} has no configs/experiment/mqar_*.yaml; run from a hybridlm checkout")
    import torch

    from hybridlm.checkpoint.reader import read_checkpoint
    from hybridlm.data.config import MQARConfig
    from hybridlm.evaluate.recall import mqar_sweep
    from hybridlm.evaluate.report import run_metadata, write_json

    device = "cuda" if torch.cuda.is_available() else "cpu"
    trained_seq_len = 4 * args.curriculum[-1][0]
    layout = MQARConfig(num_kv_pairs=args.curriculum[-1][0], vocab_size=args.vocab_size, num_keys=args.num_keys)
    jobs = [(seed, name) for seed in args.seeds for name in args.models]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        trained = list(pool.map(lambda job: train_curriculum(job[1], job[0], args), jobs))
    runs = []
    for (seed, name), (run_dir, stages) in zip(jobs, trained):
        ckpt = read_checkpoint(run_dir)
        model = ckpt.build_model().to(device)
        results = mqar_sweep(model, layout, args.eval_kv, num_examples=args.eval_examples, seq_len=trained_seq_len)
        runs.append({
            "model": name, "layer_pattern": ckpt.config.layer_pattern, "seed": seed,
            "parameters": sum(p.numel() for p in model.parameters()),
            "recurrent_state": recurrent_state(ckpt.config), "run_dir": str(run_dir), "stages": stages,
            "results": results,
        })
        print(f"{name} seed {seed}:", " ".join(f"{r['num_kv_pairs']}:{r['accuracy']:.3f}" for r in results),
              flush=True)
    report = {
        "benchmark": "mqar_recall",
        **run_metadata(device),
        "setting": {"models": args.models, "vocab_size": args.vocab_size, "num_keys": args.num_keys,
                    "curriculum": [{"pairs": p, "steps": s, "batch": b} for p, s, b in args.curriculum],
                    "eval_kv": args.eval_kv,
                    "eval_examples": args.eval_examples, "seeds": args.seeds, "overrides": args.override,
                    "train_threads": args.cpu_threads or "one per core", "jobs": args.jobs},
        "trained_seq_len": trained_seq_len,
        "chance": 1.0 / (args.vocab_size - 1 - args.num_keys),
        "runs": runs,
    }
    json_path = write_json(args.out.with_suffix(".json"), report)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {json_path} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
