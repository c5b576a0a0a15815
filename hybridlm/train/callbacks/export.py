"""The end-of-training export (trainer.export_*): the final checkpoint as a Hugging Face model in
out_dir/export/FORMAT-step_N, pushed to the Hub when asked. The export code (hybridlm.export.options) checks the
options at config time and, here, the model and the push target before any work, so nothing fails after training."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from hybridlm.train.callbacks import Callback


class ExportAtEnd(Callback):
    def __init__(self, cfg):
        self.cfg = cfg
        self.options = cfg.trainer.export_options()  # None: no export

    def check(self) -> None:
        if self.options is not None:
            self.options.check_before_work(self.cfg.model)

    def on_end(self, run) -> None:
        if self.options is None:
            return
        options = self.options
        run.export = Path(self.cfg.trainer.out_dir) / "export" / f"{options.format}-step_{run.step:08d}"
        # Every rank's shards are on disk (save_checkpoint ends with a barrier). The export is written to a temporary
        # directory and renamed, so an existing one is complete: a rerun of a finished run keeps it, and retries a
        # push that failed.
        failure = None
        if run.info.is_main:
            from hybridlm.checkpoint import CheckpointError
            from hybridlm.export.writer import export_and_push_once

            try:
                pushed = export_and_push_once(
                    run.checkpoint, run.export, format=options.format, dtype=options.dtype,
                    shard_size=options.shard_size, push_to_hub=options.push_to_hub, private=options.private,
                )  # fmt: skip
            except CheckpointError as error:  # ExportError included
                failure = error
            else:
                run.say(f"exported ({options.format}, {options.dtype}): {run.export}")
                if pushed:
                    run.say(pushed)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's export, whether or not it failed
        if failure is not None:
            raise failure
