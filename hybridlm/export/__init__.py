"""Hugging Face export and import: hybridlm format, native Qwen3-Next / Qwen3.5-MoE, Hub push."""

from hybridlm.export.formats import FORMATS, ExportError
from hybridlm.export.load import load_pretrained_into
from hybridlm.export.writer import export_checkpoint

__all__ = ["FORMATS", "ExportError", "export_checkpoint", "load_pretrained_into"]
