"""`run(cfg)`: build data, model and DeepSpeed engine, then the step loop; everything around it (logging,
validation, checkpoints, wandb, preemption, the final export) is a callback (hybridlm/train/callbacks/).

Every rank runs this function; rank 0 alone prints (the progress bar in a terminal, plain lines in a log file),
writes `out_dir/metrics.jsonl` (one JSON object per log or validation event; after a resume, events past the
checkpoint may appear twice: the later one counts) and talks to wandb.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hybridlm.checkpoint.init_from import load_pretrained_into
from hybridlm.checkpoint.layout import metrics_file
from hybridlm.checkpoint.resume import load_checkpoint, resolve_resume, set_rng_state
from hybridlm.data import build_data
from hybridlm.loss import IGNORE_INDEX
from hybridlm.model import HybridLM
from hybridlm.parallel.context import scale_shares_for_data_parallel, shard_batch
from hybridlm.parallel.groups import build_parallel_groups
from hybridlm.train.callbacks import Callback, default_callbacks
from hybridlm.train.config import TrainConfig
from hybridlm.train.determinism import make_deterministic
from hybridlm.train.divergence import DivergenceGuard
from hybridlm.train.engine import DistInfo, build_engine, init_distributed
from hybridlm.train.kernel_check import check_kernels
from hybridlm.train.metrics import MetricsWindow, drop_torn_last_line
from hybridlm.train.preemption import PreemptionHandler
from hybridlm.train.progress import Progress
from hybridlm.train.state import RunState


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_data_in_turn(cfg: TrainConfig, info: DistInfo):
    """Rank 0 first (it may train the tokenizer and fill the token cache), then the first rank of each other node
    (node-local caches), then everyone else reads the cache. The ranks of a context-parallel group read the same
    rows: the data is sharded over the data-parallel ranks (rank // CP of world / CP)."""
    cp = cfg.parallel.context_parallel_size
    turns = (info.rank == 0, info.rank != 0 and info.local_rank == 0, info.local_rank != 0)
    bundle = None
    for my_turn in turns:
        if my_turn:
            bundle = build_data(
                cfg.data,
                seq_len=cfg.trainer.seq_len,
                micro_batch_size=cfg.deepspeed.micro_batch_size,
                rank=info.rank // cp,
                world_size=cfg.parallel.data_parallel_size(info.world_size),
                seed=cfg.trainer.seed,
                model_vocab_size=cfg.model.vocab_size,
                init_from=cfg.model.init_from,
            )
        dist.barrier()
    return bundle


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
        return _train(cfg, preemption, default_callbacks(cfg, preemption))
    finally:
        preemption.uninstall()


def _train(cfg: TrainConfig, preemption: PreemptionHandler, callbacks: list[Callback]) -> dict:
    resume_from = resolve_resume(cfg.trainer.resume, cfg.trainer.out_dir)  # a bad resume fails before heavy work
    for callback in callbacks:
        callback.check()  # what the config alone cannot check (export target, wandb credentials): now, not at the end
    run = _build(cfg, preemption, resume_from, callbacks)
    for callback in callbacks:
        callback.on_start(run)
    engine, info, ds = run.engine, run.info, cfg.deepspeed
    # ZeRO 0 in fp32 clips inside DeepSpeed without keeping the norm; measure it before the step instead.
    measure_grad_norm = ds.zero_stage == 0 and not engine.bfloat16_enabled()
    # SFT rows carry very different numbers of trained tokens: the loss is their mean over the whole optimizer step
    # (see _step_batches). Pretraining rows are nearly full, and keep the per-micro-batch mean.
    step_token_mean = cfg.data.source == "sft"
    run.stop_reason = "max_steps" if run.step >= cfg.trainer.max_steps else None
    run.window.reset()
    divergence = DivergenceGuard(cfg.trainer.max_bad_steps, cfg.trainer.out_dir, run.resume_from)
    while run.stop_reason is None:
        run.lr = engine.lr_scheduler.get_last_lr()[0]
        step_batches, loss_divisor = _step_batches(run.bundle, ds.grad_accum_steps, info, step_token_mean)
        step_loss, grad_norm = torch.zeros((), device=info.device), None
        for batch in step_batches:
            batch = {key: value.to(info.device, non_blocking=True) for key, value in batch.items()}
            if run.context_parallel is not None:
                batch = shard_batch(batch, run.context_parallel)
            out = engine(**batch) if loss_divisor is None else engine(**batch, num_items_in_batch=loss_divisor)
            if run.context_parallel is not None:
                scale_shares_for_data_parallel(out, run.context_parallel)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary and measure_grad_norm:
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads)
            engine.step()  # the model's optimizer-step hook updates the MoE selection bias (HybridLM)
            if boundary and not measure_grad_norm:
                grad_norm = engine.get_global_grad_norm()
            run.window.add_micro_batch(out, batch["input_ids"].numel() * info.world_size)
            step_loss += out.loss.detach()
        run.window.add_grad_norm(grad_norm)
        run.step += 1
        run.tokens_seen += run.tokens_per_step
        run.finite = divergence.check(run.step, step_loss, grad_norm)  # raises before any save of a diverged run
        run.stop_reason = _stop_reason(run, callbacks)
        for callback in callbacks:
            callback.on_step_end(run)
    for callback in callbacks:
        callback.on_end(run)
    return run.result()


def _stop_reason(run: RunState, callbacks: list[Callback]) -> str | None:
    trainer = run.cfg.trainer
    if run.step >= trainer.max_steps:
        return "max_steps"
    if trainer.stop_at_step and run.step >= trainer.stop_at_step:
        return f"trainer.stop_at_step={trainer.stop_at_step}"
    return next((reason for callback in callbacks if (reason := callback.should_stop(run))), None)


def _build(cfg: TrainConfig, preemption: PreemptionHandler, resume_from: Path | None, callbacks) -> RunState:
    """Process group, data, model (initialised from model.init_from or resumed) and engine, with preemption checks
    in between: a signal during start-up requeues before any training."""
    trainer = cfg.trainer
    info = init_distributed()
    cfg.parallel.check_world_size(cfg.model, info.world_size)
    if info.device.type == "cpu" and trainer.cpu_threads:
        torch.set_num_threads(trainer.cpu_threads)
    Path(trainer.out_dir).mkdir(parents=True, exist_ok=True)
    make_deterministic(trainer.deterministic)
    check_kernels(cfg, info)  # before anything trains: a wrong kernel stops the run here, naming the fix
    _seed_everything(trainer.seed)
    bundle = _build_data_in_turn(cfg, info)
    _stop_if_signalled_during_start_up(preemption, "data")
    _seed_everything(trainer.seed)  # same initial weights on every rank, whatever the data build consumed
    model = HybridLM(cfg.model)
    if cfg.model.init_from and resume_from is None:  # a resumed run's weights come from its checkpoint
        source = load_pretrained_into(model, cfg.model.init_from)
        if info.is_main:
            print(f"initialised the weights from {source['source']} ({source['kind']})", flush=True)
    if bundle.vocab_size > cfg.model.vocab_size:  # SFT: chat tokens added to the checkpoint's tokenizer
        if info.is_main:
            print(f"embedding grown from {cfg.model.vocab_size} to the tokenizer's {bundle.vocab_size} tokens",
                  flush=True)
        model.resize_token_embeddings(bundle.vocab_size)
        cfg.model.vocab_size = bundle.vocab_size  # what the checkpoints' config records, so resume and export agree
    groups = build_parallel_groups(cfg.parallel, cfg.model)
    engine = build_engine(model, cfg, info, groups)

    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from, info.rank, info.world_size)
        bundle.train.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
    _stop_if_signalled_during_start_up(preemption, "model, engine and checkpoint")
    if info.is_main and (dropped := drop_torn_last_line(metrics_file(trainer.out_dir))):
        print(f"{metrics_file(trainer.out_dir)}: dropped its last line ({dropped} bytes), cut short by an "
              "interrupted write", flush=True)  # fmt: skip

    ds = cfg.deepspeed
    progress = Progress(max_steps=trainer.max_steps, end_step=trainer.stop_at_step or trainer.max_steps,
                        start_step=step, show_bar=trainer.progress_bar, active=info.is_main)  # fmt: skip
    moe_layer_ids = [i for i, kind in enumerate(cfg.model.mlp_types) if kind == "moe"]
    return RunState(
        cfg=cfg, info=info, engine=engine, bundle=bundle, window=MetricsWindow(info.device, moe_layer_ids),
        progress=progress, callbacks=callbacks, resume_from=resume_from, checkpoint=resume_from, step=step,
        tokens_seen=tokens_seen, context_parallel=groups.context,
        tokens_per_step=(ds.micro_batch_size * ds.grad_accum_steps * trainer.seq_len
                         * cfg.parallel.data_parallel_size(info.world_size)),
    )  # fmt: skip
