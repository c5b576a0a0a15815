"""The run's log: what was built (at the start), the training figures every trainer.log_every steps and at the last
step (metrics.jsonl, wandb through on_metrics, the console line with the ETA), and how it ended."""

from __future__ import annotations

import time

from hybridlm.train.callbacks import Callback
from hybridlm.train.engine import resolve_precision
from hybridlm.train.metrics import peak_flops_per_device


class MetricsLog(Callback):
    def __init__(self, cfg):
        self.cfg = cfg
        self.flops_per_token = cfg.model.flops_per_token(cfg.trainer.seq_len)

    def on_start(self, run) -> None:
        cfg, info, ds, trainer = self.cfg, run.info, self.cfg.deepspeed, self.cfg.trainer
        self.peak_flops = peak_flops_per_device(info.device)
        counts = cfg.model.parameter_counts()
        run.say(
            f"model: {counts['total'] / 1e6:.2f} M parameters, {counts['active'] / 1e6:.2f} M active per token, "
            f"{self.flops_per_token / 1e6:.1f} MFLOP/token | layers {cfg.model.layer_pattern} x mlp "
            f"{cfg.model.mlp_pattern}, {cfg.model.num_layers} deep"
        )
        run.say(
            f"data: {cfg.data.source}, vocab {run.bundle.vocab_size}, {run.bundle.stats} | unigram baseline "
            f"{run.bundle.unigram_loss:.4f} nats/token on the whole validation split"
        )
        ep = cfg.parallel.expert_parallel_size_for(cfg.model)
        experts = f", expert parallel {ep} ({cfg.model.moe.num_experts // ep} experts per rank)" if ep > 1 else ""
        run.say(
            f"engine: {info.world_size} rank(s) on {info.device.type}, ZeRO {ds.zero_stage}{experts}, "
            f"{resolve_precision(ds.precision, info.device)}, {run.tokens_per_step} tokens/step "
            f"({ds.micro_batch_size} x {trainer.seq_len} x {ds.grad_accum_steps} accum x {info.world_size} ranks)"
        )
        run.say(
            f"resumed from {run.resume_from} at step {run.step}" if run.resume_from
            else f"fresh run in {trainer.out_dir}"
        )  # fmt: skip
        self.started = time.perf_counter()

    def on_step_end(self, run) -> None:
        run.progress.step_done()
        if run.step % self.cfg.trainer.log_every and run.stop_reason is None:
            return
        metrics = run.window.summarize(self.flops_per_token, self.peak_flops, run.info.world_size)  # collective
        metrics.update(lr=run.lr, tokens_seen=run.tokens_seen)
        run.record(run.step, metrics)
        run.progress.log(run.step, metrics)

    def on_end(self, run) -> None:
        run.progress.close()
        elapsed = time.perf_counter() - self.started
        run.say(f"stopped at step {run.step}/{self.cfg.trainer.max_steps} ({run.stop_reason}) after {elapsed:.0f} s")
        if run.val_loss is not None:
            run.say(f"final val loss {run.val_loss:.4f} (step {run.evaluated_step}) vs unigram baseline "
                    f"{run.unigram_loss:.4f}")  # fmt: skip
        run.say(f"checkpoint: {run.checkpoint}")
