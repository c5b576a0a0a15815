"""Hugging Face export: hybridlm format, native Qwen3-Next / Qwen3.5-MoE, Hub push. Reading checkpoints (and
importing HF directories, `model.init_from`) is hybridlm.checkpoint's."""

from hybridlm.checkpoint.formats import FORMATS, ExportError
from hybridlm.export.writer import export_checkpoint

__all__ = ["FORMATS", "ExportError", "export_checkpoint"]
