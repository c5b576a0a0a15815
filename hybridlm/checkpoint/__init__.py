"""Checkpoints, both directions: the one owner of the on-disk layout (layout.py: every file name), atomic saves
with checksums (save.py, manifest.py), resume (resume.py: the newest intact checkpoint), expert-parallel shards
(experts.py), reading any source (reader.py: a run directory, a DeepSpeed tag at any ZeRO stage, an HF directory in
any of our formats via formats.py's Rule table) and `model.init_from` (init_from.py). Every `.pt` file loads with
weights_only=True (safe_load.py). Nothing here imports hybridlm.train or hybridlm.export: both import it."""

from hybridlm.checkpoint.layout import CheckpointError

__all__ = ["CheckpointError"]
