"""Checkpoints every trainer.save_every steps and when the run stops for any reason (atomic, resumable:
hybridlm/checkpoint/save.py), with the loader position and RNG states that make a resumed run repeat the
uninterrupted one."""

from __future__ import annotations

from omegaconf import OmegaConf

from hybridlm.checkpoint.resume import rng_state
from hybridlm.checkpoint.save import save_checkpoint
from hybridlm.train.callbacks import Callback


class Checkpointing(Callback):
    def __init__(self, cfg):
        self.cfg = cfg

    def on_start(self, run) -> None:
        # After the build: SFT may have grown model.vocab_size to the tokenizer's, which resume and export must see.
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(self.cfg))

    def on_step_end(self, run) -> None:
        trainer = self.cfg.trainer
        if not ((trainer.save_every and run.step % trainer.save_every == 0) or run.stop_reason):
            return
        trainer_state = {
            "step": run.step,
            "tokens_seen": run.tokens_seen,
            "loader": run.bundle.train.state_dict(),
            "rng": rng_state(),
            "finite": run.finite,  # pruning keeps the newest finite checkpoint (hybridlm/checkpoint/save.py)
        }
        with run.clock_paused():
            run.checkpoint = save_checkpoint(
                run.engine, trainer.out_dir, run.step, trainer_state, self.config_yaml, run.bundle.tokenizer,
                trainer.keep_last,
            )  # fmt: skip
