"""End-to-end training through train.py (CPU, fp32, tiny model on a few stdlib files).

One uninterrupted reference run serves several tests: it must lower the loss and leave pruned, complete checkpoints;
a run that crashes in the middle of a save and is then auto-resumed must reproduce its losses exactly.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.crash_during_save import CRASH_EXIT_CODE
from helpers.launch import REPO, TINY_MODEL, read_metrics, tiny_run, train, train_env

import hybridlm.checkpoint.save as checkpoint_module
from hybridlm.checkpoint.layout import complete_checkpoints, is_checkpoint
from hybridlm.checkpoint.resume import resolve_resume
from hybridlm.checkpoint.save import publish, sweep_leftovers

MAX_STEPS, SAVE_EVERY, KEEP_LAST = 30, 5, 2
CRASH_STEP = 10  # dies while publishing this step's checkpoint: step 5's stays the newest complete one


def run_overrides(data_cache: Path) -> list[str]:
    return tiny_run(data_cache) + [
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.save_every={SAVE_EVERY}",
        f"trainer.keep_last={KEEP_LAST}",
    ]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_cache):
    out_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(out_dir, run_overrides(data_cache) + ["trainer.export_format=hybridlm", "trainer.export_dtype=fp32"])
    return out_dir, result


def test_training_lowers_the_loss_and_saves_complete_checkpoints(reference_run):
    out_dir, result = reference_run
    losses = [record["loss"] for _, record in sorted(read_metrics(out_dir).items())]
    assert len(losses) == MAX_STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, f"loss did not drop: first steps {losses[:4]}, last steps {losses[-4:]}"

    (val,) = read_metrics(out_dir, key="val_loss").values()
    assert val["step"] == MAX_STEPS and val["val_loss"] < losses[0]
    assert val["unigram_loss"] > 0 and "unigram baseline" in result.stdout

    # Every logged step has throughput and the expert load of each MoE layer (block 1 of "DM"); no MFU on CPU.
    for record in read_metrics(out_dir).values():
        assert record["tokens_per_s"] > 0 and "mfu" not in record
        assert record["moe_load_max_over_mean/layer1"] == record["moe_load_max_over_mean/worst"]
        assert 1.0 <= record["moe_load_max_over_mean/worst"] <= 4.0  # 4 experts: 1 = even, 4 = one takes all
    assert "MFU n/a" in result.stdout and "tok/s" in result.stdout

    checkpoints = complete_checkpoints(out_dir)
    assert [path.name for path in checkpoints] == ["step_00000025", "step_00000030"]  # keep_last=2 pruned 5 ... 20
    final = checkpoints[-1]
    assert (final.parent / "latest").read_text().strip() == final.name
    assert f"checkpoint: {final}" in result.stdout
    assert (final / "config.yaml").is_file() and (final / "tokenizer" / "tokenizer.json").is_file()
    state = torch.load(final / "trainer_state_rank0.pt", weights_only=False)
    assert state["step"] == MAX_STEPS and state["tokens_seen"] == MAX_STEPS * 2 * 64
    assert {"python", "numpy", "torch"} <= set(state["rng"]) and "loader" in state
    assert not list((out_dir / "checkpoints").glob(".tmp-*"))


def test_crash_mid_save_then_auto_resume_reproduces_the_uninterrupted_losses(reference_run, data_cache, tmp_path):
    reference_dir, _ = reference_run
    out_dir = tmp_path / "run"
    crashed = train(
        out_dir,
        run_overrides(data_cache),
        prefix=[REPO / "tests" / "helpers" / "crash_during_save.py", CRASH_STEP],
        check=False,
    )
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]
    assert [path.name for path in complete_checkpoints(out_dir)] == ["step_00000005"]
    assert (out_dir / "checkpoints" / f".tmp-step_{CRASH_STEP:08d}").is_dir()  # written, never published
    assert resolve_resume("auto", out_dir).name == "step_00000005"

    resumed = train(out_dir, run_overrides(data_cache))  # trainer.resume=auto
    assert f"resumed from {out_dir / 'checkpoints' / 'step_00000005'} at step 5" in resumed.stdout
    expected, got = read_metrics(reference_dir), read_metrics(out_dir)
    for step in range(6, MAX_STEPS + 1):
        for key in ("loss", "ce_loss", "aux_loss", "z_loss", "grad_norm", "lr"):
            assert got[step][key] == expected[step][key], f"step {step} {key}: {got[step][key]} != {expected[step][key]}"
    assert not list((out_dir / "checkpoints").glob(".tmp-*"))  # the next save cleared the crash's leftovers
    assert [path.name for path in complete_checkpoints(out_dir)] == ["step_00000025", "step_00000030"]


def test_init_from_a_checkpoint_starts_from_its_weights(reference_run, data_cache, tmp_path):
    reference_dir, _ = reference_run
    source = complete_checkpoints(reference_dir)[-1]
    overrides = tiny_run(data_cache) + ["trainer.max_steps=1", "optim.warmup_steps=0", f"model.init_from={source}"]
    result = train(tmp_path / "run", overrides)
    assert "initialised the weights from" in result.stdout
    (first,) = read_metrics(tmp_path / "run").values()
    reference = read_metrics(reference_dir)
    # The first loss is that of trained weights (a fresh model starts near ln(512) = 6.24).
    assert first["ce_loss"] < reference[1]["ce_loss"] - 0.3, (first["ce_loss"], reference[1]["ce_loss"])


def test_wandb_offline_logs_locally(data_cache, tmp_path):
    out_dir = tmp_path / "run"
    train(out_dir, tiny_run(data_cache) + ["trainer.max_steps=3", "wandb.mode=offline"])
    (run_dir,) = (out_dir / "wandb").glob("offline-run-*")
    assert any(run_dir.glob("*.wandb"))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed: connections are refused


def test_wandb_online_without_a_reachable_server_goes_offline_and_trains(data_cache, tmp_path):
    """Before: wandb.init blocked ~100 s against an unreachable server, then raised and killed the run."""
    out_dir = tmp_path / "run"
    unreachable = {"WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}", "WANDB_API_KEY": "0" * 40}
    started = time.monotonic()
    result = train(
        out_dir,
        tiny_run(data_cache) + ["trainer.max_steps=3", "wandb.mode=online", "wandb.init_timeout_s=2"],
        env=unreachable,
    )
    elapsed = time.monotonic() - started
    assert "wandb could not start online" in result.stderr and "logging offline" in result.stderr
    assert sorted(read_metrics(out_dir)) == [1, 2, 3]
    (run_dir,) = (out_dir / "wandb").glob("offline-run-*")
    assert any(run_dir.glob("*.wandb"))
    # ~10 s of wandb's credential check + 2 s init timeout + the run itself (~10 s here), far below wandb's 90 s.
    assert elapsed < 60, elapsed


def test_wandb_online_without_credentials_fails_before_any_work(data_cache, tmp_path):
    out_dir = tmp_path / "run"
    no_credentials = {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")}
    result = train(out_dir, tiny_run(data_cache) + ["trainer.max_steps=3", "wandb.mode=online"], env=no_credentials,
                   check=False)  # fmt: skip
    assert result.returncode != 0
    assert "wandb.mode=online but no wandb credentials" in result.stderr, result.stderr[-3000:]
    assert not (out_dir / "metrics.jsonl").exists() and not (out_dir / "wandb").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_steps=0"], "trainer.max_steps=0 must be > 0"),
        (["model.moe.top_k=9"], "model.moe.top_k=9"),
        (["+trainer.max_step=5"], "unknown config key 'trainer.max_step'"),
        (["trainer.resume=/no/such/checkpoint"], "is not a checkpoint directory"),
        (["data=text_files", "data.paths=[/no/such/dir/*.txt]", "data.cache_dir=/tmp"], "/no/such/dir"),
        (["model.vocab_size=300"], "vocab_size"),  # the 512-token BPE does not fit the model
    ],
)
def test_bad_input_fails_before_training(overrides, message, data_cache, tmp_path):
    out_dir = tmp_path / "run"
    result = train(out_dir, tiny_run(data_cache) + ["trainer.max_steps=5", *overrides], check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr, result.stderr[-3000:]
    assert not (out_dir / "metrics.jsonl").exists() and not (out_dir / "checkpoints").exists()


def test_resume_never_refuses_a_run_directory_with_checkpoints(reference_run, data_cache):
    out_dir, _ = reference_run
    before = sorted(path.name for path in complete_checkpoints(out_dir))
    result = train(out_dir, run_overrides(data_cache) + ["trainer.resume=never"], check=False)
    assert result.returncode != 0 and "trainer.resume=never" in result.stderr
    assert sorted(path.name for path in complete_checkpoints(out_dir)) == before
    assert all(is_checkpoint(path) for path in complete_checkpoints(out_dir))


@pytest.mark.slow
def test_resume_is_exact_with_zero2_accumulation_selection_bias_and_activation_checkpointing(data_cache, tmp_path):
    """The paths a plain fp32 ZeRO 0 resume does not touch: ZeRO 2 optimizer shards, a gradient-accumulation window
    whose counts the balancing loss pools (aux_loss_scope=step), the selection bias (a buffer updated outside
    autograd), recomputed activations and the WSD schedule."""
    steps, stop = 8, 4
    overrides = tiny_run(data_cache) + [
        f"trainer.max_steps={steps}", "deepspeed=zero2", "deepspeed.grad_accum_steps=2", "optim=adamw_wsd",
        "model.moe.selection_bias=true", "model.moe.aux_loss_scope=step", "model.activation_checkpointing=true",
    ]  # fmt: skip
    train(tmp_path / "uninterrupted", overrides)
    train(tmp_path / "resumed", overrides + [f"trainer.stop_at_step={stop}"])
    resumed = train(tmp_path / "resumed", overrides)
    assert f"at step {stop}" in resumed.stdout
    expected, got = read_metrics(tmp_path / "uninterrupted"), read_metrics(tmp_path / "resumed")
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(stop + 1, steps + 1):
        for key in ("loss", "ce_loss", "aux_loss", "z_loss", "grad_norm", "lr", "moe_load_max_over_mean/worst"):
            assert got[step][key] == expected[step][key], f"step {step} {key}: {got[step][key]} != {expected[step][key]}"


TWO_RANK_STEPS = 6


@pytest.fixture(scope="module")
def single_process_accumulation(tmp_path_factory, data_cache) -> Path:
    out_dir = tmp_path_factory.mktemp("single") / "run"
    train(out_dir, tiny_run(data_cache) + [f"trainer.max_steps={TWO_RANK_STEPS}", "deepspeed.grad_accum_steps=2"])
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero_stage, checkpointing", [(2, False), (3, True)], ids=["zero2", "zero3-activation-checkpointing"]
)
def test_two_rank_zero_matches_single_process_gradient_accumulation(
    zero_stage, checkpointing, single_process_accumulation, data_cache, tmp_path
):
    """2 gloo ranks x 2 rows under ZeRO 2/3 see the same rows per step as 1 process x 2 micro-batches of 2 rows:
    same losses and gradient norms up to summation order (ZeRO 3 also with activation checkpointing, which must not
    change them: ZeRO 3 gathers the parameters again for the recomputation); then a resume of the sharded
    checkpoint continues."""
    steps = TWO_RANK_STEPS
    base = tiny_run(data_cache) + [f"trainer.max_steps={steps}"]
    sharding = [f"deepspeed=zero{zero_stage}", "deepspeed.micro_batch_size=2",
                f"model.activation_checkpointing={str(checkpointing).lower()}"]  # fmt: skip
    sharded_dir = tmp_path / f"zero{zero_stage}"
    sharded = train(sharded_dir, base + sharding, nproc=2)
    assert "2 rank(s) on cpu" in sharded.stdout
    expected, got = read_metrics(single_process_accumulation), read_metrics(sharded_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step in got:
        assert got[step]["ce_loss"] == pytest.approx(expected[step]["ce_loss"], rel=1e-4), step
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-3), step
        assert got[step]["tokens_seen"] == expected[step]["tokens_seen"]
    final = complete_checkpoints(sharded_dir)[-1]
    assert sorted(p.name for p in final.glob("trainer_state_rank*.pt")) == [
        "trainer_state_rank0.pt",
        "trainer_state_rank1.pt",
    ]
    more = train(sharded_dir, base[:-1] + [f"trainer.max_steps={steps + 2}", *sharding], nproc=2)
    assert f"at step {steps}" in more.stdout
    assert max(read_metrics(sharded_dir)) == steps + 2


def test_export_at_the_end_of_training_loads_with_auto_classes(reference_run):
    from transformers import AutoModelForCausalLM

    import hybridlm  # noqa: F401 - registers the hybridlm model type
    from hybridlm.checkpoint.reader import read_checkpoint

    out_dir, result = reference_run
    exported = out_dir / "export" / f"hybridlm-step_{MAX_STEPS:08d}"
    assert f"exported (hybridlm, fp32): {exported}" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    trained = read_checkpoint(complete_checkpoints(out_dir)[-1]).state_dict
    exported_state = model.state_dict()
    assert trained
    for name, tensor in trained.items():
        assert torch.equal(exported_state[f"model.{name}"], tensor), name  # fp32 export: bit for bit


def test_an_export_format_that_does_not_fit_fails_before_training(data_cache, tmp_path):
    # Qwen3-Next has no sliding-window attention: the run must stop before building data or a model.
    failed = train(
        tmp_path / "run",
        run_overrides(data_cache) + ["trainer.export_format=qwen3_next", "model.attention.sliding_window=16"],
        check=False,
    )
    assert failed.returncode != 0
    assert "sliding_window" in failed.stderr + failed.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.export_shard_size=5 parsecs"], "trainer.export_shard_size"),
        (["trainer.export_push_to_hub=just-a-name"], "ORG/NAME"),
        (["trainer.export_push_to_hub=org/name"], "token"),
    ],
    ids=["shard-size", "repo-id", "no-token"],
)
def test_end_of_training_export_options_fail_before_training(data_cache, tmp_path, overrides, message):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home")}  # no token anywhere
    failed = train(tmp_path / "run", run_overrides(data_cache) + ["trainer.export_format=hybridlm"] + overrides,
                   check=False, env=env)
    assert failed.returncode != 0
    assert message in failed.stderr + failed.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_publish_fsyncs_before_and_after_the_rename_and_replaces_a_resaved_step(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    final, tmp = root / "step_00000005", root / ".tmp-step_00000005"
    (final / "engine").mkdir(parents=True)
    (final / "engine" / "old.pt").write_text("old")
    (tmp / "engine").mkdir(parents=True)
    (tmp / "engine" / "new.pt").write_text("new")
    synced = []
    monkeypatch.setattr(checkpoint_module, "_fsync_path", lambda path: synced.append(Path(path)))
    publish(tmp, final)
    assert (final / "engine" / "new.pt").read_text() == "new" and not tmp.exists()
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_00000005"]
    assert (root / "latest").read_text() == "step_00000005\n"
    # The directories' entries reach the disk before the rename publishes them; the rename itself right after.
    assert synced[:2] == [tmp / "engine", tmp] and synced[2:] == [root, root]


def test_sweep_removes_unfinished_saves_and_only_superseded_replacements(tmp_path):
    root = tmp_path / "checkpoints"
    for name in (".tmp-step_00000010", ".tmp-replaced-step_00000005", ".tmp-replaced-step_00000007", "step_00000005"):
        (root / name).mkdir(parents=True)
    sweep_leftovers(root)
    # step 7's replaced copy is the only one of that step left (a crash between publish()'s two renames): kept.
    assert sorted(path.name for path in root.iterdir()) == [".tmp-replaced-step_00000007", "step_00000005"]


def test_bf16_engine_keeps_the_fp32_buffers_fp32(tmp_path):
    """DeepSpeed >= 0.19.2 casts only parameters under bf16 (older releases ran module.bfloat16()): the selection
    bias, whose 1e-3 steps would vanish in bf16 once |bias| >= 0.5, and RoPE's inverse frequencies stay fp32."""
    steps = 3
    overrides = TINY_MODEL + ["deepspeed=zero0", "deepspeed.precision=bf16", "deepspeed.micro_batch_size=2",
                              "trainer.seq_len=32", "model.moe.selection_bias=true"]  # fmt: skip
    result = subprocess.run([sys.executable, REPO / "tests" / "helpers" / "engine_buffer_dtypes.py", str(steps),
                             *overrides], cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["parameters"] == {"torch.bfloat16": report["parameters"]["torch.bfloat16"]}  # bf16 really is on
    buffers = report["buffers"]
    by_kind = {name.rsplit(".", 1)[-1]: dtype for name, dtype in buffers.items()}
    assert by_kind.keys() == {"expert_bias", "inv_freq", "counts_since_step"}, buffers
    assert by_kind.pop("counts_since_step") == "torch.int64"  # exact counts, never cast
    assert set(by_kind.values()) == {"torch.float32"}, buffers
    # Each step moves every bias by exactly +-1e-3 (sign of the load imbalance): exact multiples only in fp32.
    bias = report["expert_bias"]
    assert any(bias) and all(abs(value * 1000 - round(value * 1000)) < 1e-6 for value in bias), bias


@pytest.mark.slow
def test_smoke_experiment_reaches_its_target_and_prints_the_checkpoint(tmp_path):
    """`make smoke`'s run (`train.py experiment=smoke`) from a cold data cache: ~4 min on a busy 2-core machine."""
    out_dir = tmp_path / "smoke"
    result = train(out_dir, ["experiment=smoke", f"data.cache_dir={tmp_path / 'cache'}", "trainer.progress_bar=false"],
                   timeout=900)  # fmt: skip
    assert "(val loss below 0.88 x unigram baseline)" in result.stdout, result.stdout[-3000:]
    last = read_metrics(out_dir, key="val_loss")[max(read_metrics(out_dir, key="val_loss"))]
    assert last["val_loss"] < 0.88 * last["unigram_loss"]
    assert f"final val loss {last['val_loss']:.4f} (step {last['step']}) vs unigram baseline" in result.stdout
    checkpoint = complete_checkpoints(out_dir)[-1]
    assert checkpoint.name == f"step_{last['step']:08d}" and f"checkpoint: {checkpoint}" in result.stdout


def test_moe_balancing_runs_once_per_applied_optimizer_step_under_every_zero_stage(tmp_path):
    """The model's optimizer-step hook, never called by hand: under ZeRO 0-3 with 2 micro-batches per step the
    selection bias moves exactly once per applied step (ZeRO 1-3 step the torch optimizer once per parameter group:
    the update must not double), never on a micro-batch, and not on the step ZeRO 1-3 skip for a NaN gradient."""
    steps = 3
    overrides = TINY_MODEL + ["deepspeed.micro_batch_size=2", "deepspeed.grad_accum_steps=2", "trainer.seq_len=32",
                              "model.moe.selection_bias=true", "model.moe.aux_loss_scope=step"]  # fmt: skip
    result = subprocess.run([sys.executable, REPO / "tests" / "helpers" / "optimizer_hook_steps.py", str(steps),
                             *overrides], cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rate = report.pop("rate")
    for stage, records in report.items():
        assert len(records) == 2 * steps and [r["boundary"] for r in records] == [False, True] * steps, stage
        for index, record in enumerate(records):
            where = f"ZeRO {stage}, engine.step() {index}"
            counts, bias = torch.tensor(record["counts_before"]), torch.tensor(record["bias_before"])
            assert counts.sum() > 0, where  # the step's micro-batches were counted
            if record["applied"]:
                expected = bias + rate * torch.sign(counts.double().mean() - counts).float()
                assert torch.equal(torch.tensor(record["bias_after"]), expected), where
                assert not any(record["counts_after"]), where  # the next step counts afresh
            else:  # a micro-batch, or a skipped step: nothing moves, the counts carry on
                assert record["bias_after"] == record["bias_before"], where
                assert record["counts_after"] == record["counts_before"], where
        applied = [r["applied"] for r in records if r["boundary"]]
        # ZeRO 0 in fp32 applies even a NaN step (DeepSpeed checks no norm there); ZeRO 1-3 skip it.
        assert applied == [True] * (steps - 1) + [stage == "0"], (stage, applied)
