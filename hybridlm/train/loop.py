"""`run(cfg)`: build data, model and DeepSpeed engine, then train with logging, validation and checkpoints.

Every rank runs this function; rank 0 alone prints (the progress bar in a terminal, plain lines in a log file),
writes `out_dir/metrics.jsonl` (one JSON object per log or validation event; after a resume, events past the
checkpoint may appear twice: the later one counts) and talks to wandb.
"""

from __future__ import annotations

import json
import netrc
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from hybridlm.data import IGNORE_INDEX, build_data
from hybridlm.model import HybridLM
from hybridlm.train.checkpoint import (
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hybridlm.train.config import TrainConfig
from hybridlm.train.determinism import make_deterministic
from hybridlm.train.engine import DistInfo, build_engine, init_distributed, resolve_precision
from hybridlm.train.kernel_check import check_kernels
from hybridlm.train.metrics import MetricsWindow, peak_flops_per_device
from hybridlm.train.preemption import PreemptionHandler
from hybridlm.train.progress import Progress


def wandb_credentials_found() -> bool:
    """Whether wandb will find an API key without prompting: WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE, or a netrc
    entry (what `wandb login` writes) for the server's host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _init_wandb(cfg: TrainConfig):
    """The wandb run of rank 0. online: bounded by wandb.init_timeout_s (plus wandb's own ~10 s credential check),
    then offline with a warning, so a missing network never stalls or kills training; its final upload is bounded
    by wandb.finish_timeout_s, so a network lost mid-run cannot hold the job (or its requeue) at the end."""
    import wandb

    options = dict(
        project=cfg.wandb.project,
        name=cfg.wandb.name or Path(cfg.trainer.out_dir).resolve().name,
        entity=cfg.wandb.entity or None,
        tags=list(cfg.wandb.tags),
        dir=cfg.trainer.out_dir,
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )
    if cfg.wandb.mode == "online":
        try:
            settings = wandb.Settings(init_timeout=cfg.wandb.init_timeout_s, finish_timeout=cfg.wandb.finish_timeout_s)
            return wandb.init(mode="online", settings=settings, **options)
        except Exception as err:  # wandb raises CommError, UsageError, TimeoutError, ... depending on what failed
            print(
                f"WARNING: wandb could not start online ({type(err).__name__}: {str(err).splitlines()[0]}); "
                f"logging offline to {Path(cfg.trainer.out_dir) / 'wandb'} instead. Upload later with `wandb sync`.",
                file=sys.stderr,
                flush=True,
            )
    return wandb.init(mode="offline", **options)


def start_wandb(cfg: TrainConfig, info: DistInfo):
    """Collective: rank 0 starts its wandb run (None when disabled) and every rank learns the outcome, so that a
    failure stops all ranks at once instead of leaving the others waiting in their first collective."""
    run, failure = None, None
    if info.is_main and cfg.wandb.mode != "disabled":
        try:
            run = _init_wandb(cfg)
        except Exception as err:
            failure = f"{type(err).__name__}: {err}"
    outcome = [failure]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RuntimeError(f"wandb could not start on rank 0 ({outcome[0]}); set wandb.mode=disabled to train without")
    return run


class Reporter:
    """Rank-0 output: console (hybridlm.train.progress: the bar in a terminal, plain lines in a log file),
    metrics.jsonl and wandb."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, start_step: int, wandb_run=None):
        self.active = info.is_main
        trainer = cfg.trainer
        self.progress = Progress(
            max_steps=trainer.max_steps,
            end_step=trainer.stop_at_step or trainer.max_steps,
            start_step=start_step,
            show_bar=trainer.progress_bar,
            active=self.active,
        )
        self.metrics_file = Path(cfg.trainer.out_dir) / "metrics.jsonl"
        self.wandb = wandb_run

    def say(self, text: str) -> None:
        self.progress.say(text)

    def record(self, step: int, values: dict) -> None:
        if not self.active:
            return
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_data_in_turn(cfg: TrainConfig, info: DistInfo):
    """Rank 0 first (it may train the tokenizer and fill the token cache), then the first rank of each other node
    (node-local caches), then everyone else reads the cache."""
    turns = (info.rank == 0, info.rank != 0 and info.local_rank == 0, info.local_rank != 0)
    bundle = None
    for my_turn in turns:
        if my_turn:
            bundle = build_data(
                cfg.data,
                seq_len=cfg.trainer.seq_len,
                micro_batch_size=cfg.deepspeed.micro_batch_size,
                rank=info.rank,
                world_size=info.world_size,
                seed=cfg.trainer.seed,
                model_vocab_size=cfg.model.vocab_size,
                init_from=cfg.model.init_from,
            )
        dist.barrier()
    return bundle


def _validate(engine, bundle, max_batches: int, device: torch.device) -> tuple[float, float]:
    """Token-weighted mean cross-entropy of the model and of the unigram baseline on the same targets: `max_batches`
    validation batches per rank (spread over the split), over all ranks."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    unigram_log_probs = bundle.unigram_log_probs.to(device)
    engine.eval()
    with torch.no_grad():
        for batch in bundle.val_batches(max_batches):
            batch = {key: value.to(device) for key, value in batch.items()}
            out = engine(**batch)
            labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
            targets = torch.tensor(labels.numel(), dtype=torch.float64, device=device)
            sums += torch.stack([out.ce_loss.double() * targets, -unigram_log_probs[labels].sum(), targets])
    engine.train()
    dist.all_reduce(sums)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _step_batches(bundle, grad_accum_steps: int, info: DistInfo, token_mean: bool):
    """The optimizer step's micro-batches, and the divisor of each one's summed cross-entropy (None: its own target
    count). With `token_mean` the loss is the mean over the trained tokens of the whole global batch (every
    micro-batch of every rank), as transformers' Trainer computes it for TRL's SFTTrainer by default (its
    `num_items_in_batch` with `average_tokens_across_devices`): DeepSpeed divides each micro-batch's loss by the
    accumulation steps and averages gradients over ranks, so the divisor is the global count / (steps x ranks)."""
    batches = [next(bundle.train) for _ in range(grad_accum_steps)]
    if not token_mean:
        return batches, None
    count = torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)), device=info.device)
    if info.world_size > 1:
        dist.all_reduce(count)
    return batches, count.clamp(min=1) / (grad_accum_steps * info.world_size)


def _stop_if_signalled_during_start_up(preemption: PreemptionHandler, stage: str) -> None:
    """Collective. A preemption signal before the first step: nothing has changed since the last checkpoint (or
    since nothing, in a fresh run), so there is nothing to save; requeue (or exit) at once."""
    if preemption.agree():
        caught = preemption.received.name if preemption.received else "another rank's signal"
        print(f"[preemption] {caught} during start-up ({stage}): nothing trained since the last checkpoint, so "
              "nothing to save", flush=True)  # fmt: skip
        preemption.requeue()


def run(cfg: TrainConfig) -> dict:
    """Train until trainer.max_steps (or an early stop). Returns the final step, checkpoint and validation loss."""
    # First of all: until it is installed, the scheduler's warning signal would kill the job (FAILED, not requeued).
    # A signal during start-up is acted on at the start-up checks, before any training.
    preemption = PreemptionHandler(cfg.trainer.preempt_signals).install()
    try:
        return _train(cfg, preemption)
    finally:
        preemption.uninstall()


def _train(cfg: TrainConfig, preemption: PreemptionHandler) -> dict:
    trainer = cfg.trainer
    resume_from = resolve_resume(trainer.resume, trainer.out_dir)  # fail on a bad resume before any heavy work
    # What the config alone cannot check (TrainerConfig checked the values): the architecture against the format,
    # the token for a push. Fails now, not at the end.
    if trainer.export_format:
        from hybridlm.export.formats import FORMATS

        if trainer.export_format in FORMATS:
            FORMATS[trainer.export_format].check_fits(cfg.model)
        if trainer.export_push_to_hub:
            from hybridlm.export.hub import check_push_target

            check_push_target(trainer.export_push_to_hub)
    if cfg.wandb.mode == "online" and not wandb_credentials_found():
        raise ValueError(
            "wandb.mode=online but no wandb credentials are set (WANDB_API_KEY, or a netrc entry from `wandb login`) "
            "and wandb would stop to prompt for one; log in first, or use wandb.mode=offline (upload later with "
            "`wandb sync`) or wandb.mode=disabled"
        )
    info = init_distributed()
    cfg.parallel.check_world_size(cfg.model, info.world_size)
    if info.device.type == "cpu" and trainer.cpu_threads:
        torch.set_num_threads(trainer.cpu_threads)
    Path(trainer.out_dir).mkdir(parents=True, exist_ok=True)
    make_deterministic(trainer.deterministic)
    check_kernels(cfg, info)  # before anything trains: a wrong kernel stops the run here, naming the fix
    wandb_run = start_wandb(cfg, info)
    _seed_everything(trainer.seed)
    bundle = _build_data_in_turn(cfg, info)
    _stop_if_signalled_during_start_up(preemption, "data")
    _seed_everything(trainer.seed)  # same initial weights on every rank, whatever the data build consumed
    model = HybridLM(cfg.model)
    if cfg.model.init_from and resume_from is None:  # a resumed run's weights come from its checkpoint
        from hybridlm.export.load import load_pretrained_into

        source = load_pretrained_into(model, cfg.model.init_from)
        if info.is_main:
            print(f"initialised the weights from {source['source']} ({source['kind']})", flush=True)
    if bundle.vocab_size > cfg.model.vocab_size:  # SFT: chat tokens added to the checkpoint's tokenizer
        if info.is_main:
            print(f"embedding grown from {cfg.model.vocab_size} to the tokenizer's {bundle.vocab_size} tokens",
                  flush=True)
        model.resize_token_embeddings(bundle.vocab_size)
        cfg.model.vocab_size = bundle.vocab_size  # what the checkpoints' config records, so resume and export agree
    engine = build_engine(model, cfg, info)

    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from, info.rank, info.world_size)
        bundle.train.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
    _stop_if_signalled_during_start_up(preemption, "model, engine and checkpoint")

    report = Reporter(cfg, info, step, wandb_run)
    counts = cfg.model.parameter_counts()
    flops_per_token = cfg.model.flops_per_token(trainer.seq_len)
    peak_flops = peak_flops_per_device(info.device)
    ds = cfg.deepspeed
    tokens_per_step = ds.micro_batch_size * ds.grad_accum_steps * info.world_size * trainer.seq_len
    report.say(
        f"model: {counts['total'] / 1e6:.2f} M parameters, {counts['active'] / 1e6:.2f} M active per token, "
        f"{flops_per_token / 1e6:.1f} MFLOP/token | layers {cfg.model.layer_pattern} x mlp {cfg.model.mlp_pattern}, "
        f"{cfg.model.num_layers} deep"
    )
    report.say(
        f"data: {cfg.data.source}, vocab {bundle.vocab_size}, {bundle.stats} | unigram baseline "
        f"{bundle.unigram_loss:.4f} nats/token on the whole validation split"
    )
    report.say(
        f"engine: {info.world_size} rank(s) on {info.device.type}, ZeRO {ds.zero_stage}, "
        f"{resolve_precision(ds.precision, info.device)}, {tokens_per_step} tokens/step "
        f"({ds.micro_batch_size} x {trainer.seq_len} x {ds.grad_accum_steps} accum x {info.world_size} ranks)"
    )
    report.say(f"resumed from {resume_from} at step {step}" if resume_from else f"fresh run in {trainer.out_dir}")

    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    moe_layer_ids = [i for i, kind in enumerate(cfg.model.mlp_types) if kind == "moe"]
    window = MetricsWindow(info.device, moe_layer_ids)
    # ZeRO 0 in fp32 clips inside DeepSpeed without keeping the norm; measure it before the step instead.
    measure_grad_norm = ds.zero_stage == 0 and not engine.bfloat16_enabled()
    checkpoint, val_loss, unigram_loss, evaluated_step = resume_from, None, None, None
    # SFT rows carry very different numbers of trained tokens: the loss is their mean over the whole optimizer step
    # (see _step_batches). Pretraining rows are nearly full, and keep the per-micro-batch mean.
    step_token_mean = cfg.data.source == "sft"

    def save() -> Path:
        trainer_state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "loader": bundle.train.state_dict(),
            "rng": rng_state(),
        }
        return save_checkpoint(
            engine, trainer.out_dir, step, trainer_state, config_yaml, bundle.tokenizer, trainer.keep_last
        )

    start_time = time.perf_counter()
    stop_reason = "max_steps" if step >= trainer.max_steps else None
    window.reset()
    while stop_reason is None:
        lr = engine.lr_scheduler.get_last_lr()[0]
        step_batches, loss_divisor = _step_batches(bundle, ds.grad_accum_steps, info, step_token_mean)
        for batch in step_batches:
            batch = {key: value.to(info.device, non_blocking=True) for key, value in batch.items()}
            out = engine(**batch) if loss_divisor is None else engine(**batch, num_items_in_batch=loss_divisor)
            engine.backward(out.loss)
            if engine.is_gradient_accumulation_boundary():
                if measure_grad_norm:
                    window.add_grad_norm(
                        torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
                    )
                engine.step()
                if not measure_grad_norm:
                    window.add_grad_norm(engine.get_global_grad_norm())
            else:
                engine.step()
            window.add_micro_batch(out, batch["input_ids"].numel() * info.world_size)
        step += 1
        tokens_seen += tokens_per_step
        report.progress.step_done()

        if step >= trainer.max_steps:
            stop_reason = "max_steps"
        elif trainer.stop_at_step and step >= trainer.stop_at_step:
            stop_reason = f"trainer.stop_at_step={trainer.stop_at_step}"
        elif preemption.agree():  # collective: every rank stops after this same step
            stop_reason = "preemption signal"

        if step % trainer.log_every == 0 or stop_reason:
            metrics = window.summarize(flops_per_token, peak_flops, info.world_size)
            metrics.update(lr=lr, tokens_seen=tokens_seen)
            report.record(step, metrics)
            report.progress.log(step, metrics)

        final = stop_reason is not None
        validate = (trainer.eval_every and step % trainer.eval_every == 0) or (final and stop_reason == "max_steps")
        periodic_save = trainer.save_every and step % trainer.save_every == 0
        if not (validate or periodic_save or final):
            continue  # no clock reading (a CUDA synchronise) on plain training steps
        window.pause()
        if validate:
            val_loss, unigram_loss = _validate(engine, bundle, trainer.eval_batches, info.device)
            evaluated_step = step
            report.record(step, {"val_loss": val_loss, "unigram_loss": unigram_loss})
            report.say(
                f"step {step}: val loss {val_loss:.4f} (ppl {np.exp(min(val_loss, 50)):.1f}) | unigram baseline "
                f"{unigram_loss:.4f} | ratio {val_loss / unigram_loss:.3f}"
            )
            target = trainer.stop_at_val_below_unigram_ratio
            if not final and target and val_loss < target * unigram_loss:
                stop_reason = f"val loss below {target} x unigram baseline"
        if periodic_save or stop_reason:
            checkpoint = save()
        window.resume()

    report.close()
    elapsed = time.perf_counter() - start_time
    report.say(f"stopped at step {step}/{trainer.max_steps} ({stop_reason}) after {elapsed:.0f} s")
    if val_loss is not None:
        report.say(f"final val loss {val_loss:.4f} (step {evaluated_step}) vs unigram baseline {unigram_loss:.4f}")
    report.say(f"checkpoint: {checkpoint}")
    if stop_reason == "preemption signal":
        preemption.requeue()  # the checkpoint is saved on every rank; does not return
    preemption.uninstall()
    exported = None
    if trainer.export_format:
        exported = Path(trainer.out_dir) / "export" / f"{trainer.export_format}-step_{step:08d}"
        # Every rank's shards are on disk (save_checkpoint ends with a barrier). The export is written to a temporary
        # directory and renamed, so an existing one is complete: a rerun of a finished run keeps it, and retries a
        # push that failed.
        failure = None
        if info.is_main:
            from hybridlm.export import ExportError
            from hybridlm.export.writer import export_and_push_once

            try:
                pushed = export_and_push_once(
                    checkpoint, exported, format=trainer.export_format, dtype=trainer.export_dtype,
                    shard_size=trainer.export_shard_size, push_to_hub=trainer.export_push_to_hub or None,
                    private=trainer.export_private,
                )
            except ExportError as error:
                failure = error
            else:
                report.say(f"exported ({trainer.export_format}, {trainer.export_dtype}): {exported}")
                if pushed:
                    report.say(pushed)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's export, whether or not it failed
        if failure is not None:
            raise failure
    return {
        "step": step,
        "checkpoint": checkpoint,
        "val_loss": val_loss,
        "unigram_loss": unigram_loss,
        "stop_reason": stop_reason,
        "export": exported,
    }

