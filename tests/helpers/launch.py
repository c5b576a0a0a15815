"""Run train.py in a subprocess (one process, or N gloo ranks through torchrun) and read back what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "train.py"

# A ~60 k parameter model with every layer kind (GDN + attention, dense + MoE) and 64-token rows: fast on a CPU.
TINY_MODEL = [
    "model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.layer_pattern=GA",
    "model.mlp_pattern=DM", "model.intermediate_size=64",
    "model.gdn.num_k_heads=1", "model.gdn.num_v_heads=2", "model.gdn.head_k_dim=16", "model.gdn.head_v_dim=16",
    "model.attention.num_heads=2", "model.attention.num_kv_heads=1", "model.attention.head_dim=16",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.intermediate_size=32",
    "model.moe.shared_expert_intermediate_size=32",
]  # fmt: skip


def tiny_run(cache_dir: Path) -> list[str]:
    """Overrides for a short, logged-every-step CPU run on a few stdlib files with a 512-token BPE."""
    return TINY_MODEL + [
        "data=stdlib", "data.vocab_size=512", "data.max_documents=40", "data.val_fraction=0.1",
        f"data.cache_dir={cache_dir}",
        "deepspeed=zero0", "deepspeed.micro_batch_size=2",
        "optim.lr=3e-3", "optim.warmup_steps=2",
        "trainer.seq_len=64", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2",
        "trainer.save_every=0", "trainer.progress_bar=false",
    ]  # fmt: skip


def compose_train_config(overrides: list[str]):
    """The validated TrainConfig that train.py would build from `overrides` (for scripts that build parts of a run)."""
    from hydra import compose, initialize_config_dir

    from hybridlm.train import register_configs, to_train_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return to_train_config(compose(config_name="train", overrides=overrides))


def train_command(
    out_dir: Path, overrides: list[str], *, nproc: int = 1, prefix: list[str] | None = None
) -> list[str]:
    """`python [prefix] train.py trainer.out_dir=OUT ...`, or under torchrun with `nproc` gloo ranks.

    `prefix` replaces `train.py` by a wrapper script that takes the train.py arguments (see crash_during_save.py).
    """
    script = [str(s) for s in prefix] if prefix else [str(TRAIN_PY)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    else:
        command = [sys.executable, *script]
    return command + [f"trainer.out_dir={out_dir}", *overrides]


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
        "OMP_NUM_THREADS": "1",  # tiny ops: thread hand-offs cost more than they save, more so on a busy CPU
        "TOKENIZERS_PARALLELISM": "false",
        **(extra or {}),
    }


def train(
    out_dir: Path,
    overrides: list[str],
    *,
    nproc: int = 1,
    prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """Run train_command(...) to its end with `env` added to the environment. With check=True a non-zero exit
    raises with the run's output."""
    command = train_command(out_dir, overrides, nproc=nproc, prefix=prefix)
    result = subprocess.run(
        command, cwd=out_dir.parent, env=train_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}"
            f"\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def read_metrics(out_dir: Path, key: str = "loss") -> dict[int, dict]:
    """The last record per step holding `key` from out_dir/metrics.jsonl (a resumed run may repeat steps)."""
    records: dict[int, dict] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            records[record["step"]] = record
    return records
