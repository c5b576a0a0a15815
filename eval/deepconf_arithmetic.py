"""DeepConf vs majority voting on column addition learnt here by a tiny hybrid model (CPU, a few minutes).

Trains the model of `hybridlm.evaluate.arithmetic` for --steps (stopping early on purpose: a partly trained model
makes mistakes, so voting has something to fix), then for each setting of keep_fraction (0.9 "DeepConf-high",
0.1 "DeepConf-low") runs, per problem, majority voting over N full traces and online DeepConf with the same budget
and sampler (warm-up traces, then rounds with early stopping until the vote reaches --consensus), and reports
accuracy, tokens generated and how well confidence separates right from wrong traces here. Seeded: the same
command gives the same numbers on the same machine and code. Writes OUT.json and OUT.png.

    python eval/deepconf_arithmetic.py                         # the small CPU run committed under eval/results/
    python eval/deepconf_arithmetic.py --digits 3 --steps 1500 --problems 200 --num-traces 64 --num-warmup 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="training steps (batch 32)")
    parser.add_argument("--layer-pattern", default="GA")
    parser.add_argument("--problems", type=int, default=60)
    parser.add_argument("--num-traces", type=int, default=32, help="N, the budget of traces per problem")
    parser.add_argument("--num-warmup", type=int, default=8, help="warm-up traces that calibrate the threshold")
    parser.add_argument("--round-size", type=int, default=8, help="traces decoded together after the warm-up")
    parser.add_argument("--consensus", type=float, default=0.95,
                        help="no new round once the leading answer holds this share of the vote (0: off)")
    parser.add_argument("--keep-fractions", type=float, nargs="+", default=[0.9, 0.1])
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling, for both methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "deepconf_arithmetic")
    args = parser.parse_args(argv)
    for name in ("steps", "problems", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    return args


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    first = report["settings"][0]
    ax.scatter([first["majority_tokens"]], [first["majority_accuracy"]], color="black", marker="o", s=60,
               label=f"majority vote, N={report['num_traces']}")
    ax.scatter([first["majority_tokens"]], [first["single_trace_accuracy"]], color="grey", marker="x", s=60,
               label="one trace (mean)")
    for setting, color in zip(report["settings"], ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        ax.scatter([setting["deepconf_tokens"]], [setting["deepconf_accuracy"]], color=color, marker="s", s=60,
                   label=f"DeepConf keep {setting['keep_fraction']:.0%} "
                         f"({setting['tokens_saved']:.0%} tokens saved)")
    ax.set_xlabel("tokens generated (all problems)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    config = report["config"]
    ax.set_title(f"{report['digits']}-digit addition, {report['problems']} problems, tiny model "
                 f"({report['training']['steps']} steps, {report['device']})\nwarm-up {config['num_warmup']}, rounds "
                 f"of {config['round_size']}, consensus {config['consensus']}, top-p {config['top_p']}, "
                 f"window {config['window']}, top-{config['top_k']} confidence", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def deepconf_config(args: argparse.Namespace, task):
    """The DeepConf settings of this run (keep_fraction is set per setting)."""
    from hybridlm.evaluate.deepconf import DeepConfConfig

    return DeepConfConfig(num_traces=args.num_traces, num_warmup=args.num_warmup, window=args.window,
                          top_k=args.top_k, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=task.example_length, consensus=args.consensus, round_size=args.round_size)


def train_model(args: argparse.Namespace, task):
    """The tiny model of this run, trained (seeded, deterministic on CPU); returns it and a training summary."""
    import torch

    from hybridlm.evaluate.arithmetic import tiny_model_config, train_on_task
    from hybridlm.model import HybridLM

    torch.manual_seed(args.seed)
    model = HybridLM(tiny_model_config(task, args.layer_pattern))
    started = time.perf_counter()
    losses = train_on_task(model, task, steps=args.steps, batch_size=32, seed=args.seed)
    training = {"steps": args.steps, "batch_size": 32, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                "seconds": round(time.perf_counter() - started, 1), "layer_pattern": args.layer_pattern,
                "parameters": sum(p.numel() for p in model.parameters())}
    return model, training


def main(argv=None) -> int:
    args = parse_args(argv)
    import dataclasses

    import torch

    from hybridlm.evaluate.arithmetic import ArithmeticTask
    from hybridlm.evaluate.deepconf import evaluate_deepconf
    from hybridlm.evaluate.report import run_metadata, write_json

    torch.set_num_threads(args.threads)
    task = ArithmeticTask(args.digits)
    base = deepconf_config(args, task)
    model, training = train_model(args, task)
    print(f"trained {args.steps} steps in {training['seconds']} s, loss {training['final_loss']:.3f}", flush=True)
    problems = task.problems(args.problems, seed=args.seed + 1)
    settings = []
    for keep in args.keep_fractions:
        cfg = dataclasses.replace(base, keep_fraction=keep)
        result = evaluate_deepconf(model, problems, task.answer, stop_token_ids=task.stop_token_ids, cfg=cfg,
                                   seed=args.seed, progress=sys.stderr.isatty())
        row = result.to_dict()
        row.pop("config")
        settings.append({"keep_fraction": keep, **row})
        print(f"keep {keep:.0%}: majority {result.majority_accuracy:.3f} ({result.majority_tokens} tokens), "
              f"DeepConf {result.deepconf_accuracy:.3f} ({result.deepconf_tokens} tokens, "
              f"{result.tokens_saved:.1%} saved, {result.traces_generated} traces, {result.traces_stopped_early} "
              f"stopped early), weighted vote on full traces {result.weighted_vote_full_traces_accuracy:.3f}, "
              f"one trace {result.single_trace_accuracy:.3f}, confidence AUC "
              f"{'n/a' if result.confidence_auc is None else format(result.confidence_auc, '.3f')}",
              flush=True)
    report = {
        "benchmark": "deepconf_arithmetic", **run_metadata("cpu"),
        "note": "small CPU run: a tiny model trained for a few hundred steps; shows the method, not a paper number",
        "digits": args.digits, "problems": args.problems, "num_traces": args.num_traces,
        "config": {k: v for k, v in dataclasses.asdict(base).items() if k != "keep_fraction"},
        "training": training, "settings": settings,
    }
    write_json(args.out.with_suffix(".json"), report)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
