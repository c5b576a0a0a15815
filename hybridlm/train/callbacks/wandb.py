"""Weights & Biases from rank 0: credentials checked before any work; online starts bounded by wandb.init_timeout_s
and falls back to offline; every metrics.jsonl record is logged; the final upload is bounded by
wandb.finish_timeout_s, so a network lost mid-run cannot hold the job (or its requeue) at the end."""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch.distributed as dist
from omegaconf import OmegaConf

from hybridlm.train.callbacks import Callback


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


def init_wandb(cfg):
    """The wandb run of rank 0. online: bounded by wandb.init_timeout_s (plus wandb's own ~10 s credential check),
    then offline with a warning, so a missing network never stalls or kills training."""
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


class Wandb(Callback):
    def __init__(self, cfg):
        self.cfg = cfg
        self.run = None

    def check(self) -> None:
        if self.cfg.wandb.mode == "online" and not wandb_credentials_found():
            raise ValueError(
                "wandb.mode=online but no wandb credentials are set (WANDB_API_KEY, or a netrc entry from `wandb "
                "login`) and wandb would stop to prompt for one; log in first, or use wandb.mode=offline (upload "
                "later with `wandb sync`) or wandb.mode=disabled"
            )

    def on_start(self, run) -> None:
        """Collective: rank 0 starts its wandb run and every rank learns the outcome, so that a failure stops all
        ranks at once instead of leaving the others waiting in their first collective."""
        failure = None
        if run.info.is_main and self.cfg.wandb.mode != "disabled":
            try:
                self.run = init_wandb(self.cfg)
            except Exception as err:
                failure = f"{type(err).__name__}: {err}"
        outcome = [failure]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise RuntimeError(
                f"wandb could not start on rank 0 ({outcome[0]}); set wandb.mode=disabled to train without"
            )

    def on_metrics(self, step: int, values: dict) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def on_end(self, run) -> None:
        if self.run is not None:
            self.run.finish()
