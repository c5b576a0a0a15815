"""The export options and their one validator, used by `hybridlm export` (writer.export_checkpoint) and by the
trainer's end-of-training export (trainer.export_*): values when the options are made (the trainer: at config
time), the model and the Hub target before any work (the trainer: before step 1, not after the last)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from hybridlm.checkpoint.formats import FORMATS, ExportError
from hybridlm.config import ModelConfig

EXPORT_FORMATS = ("hybridlm", *FORMATS)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}  # fmt: skip


class ExportOptionError(ExportError):
    """A bad export option; `option` is its ExportOptions field name, so a caller can name its own key for it."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000000 -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ExportError(f"shard_size={size!r} is not a size; write e.g. '5GB', '500MB' or a number of bytes")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise ExportError(f"shard_size={size!r} must be positive")
    return value


@dataclass(frozen=True)
class ExportOptions:
    """format: 'hybridlm' (our model type, loads after `import hybridlm`), 'qwen3_next' or 'qwen3_5_moe' (plain
    transformers); dtype of the weights; largest safetensors shard; Hub repository ORG/NAME to push to (None: no
    push) and whether to create it private. Refuses bad values when made (ExportOptionError)."""

    format: str = "hybridlm"
    dtype: str = "bf16"
    shard_size: str | int = "5GB"
    push_to_hub: str | None = None
    private: bool = False

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ExportOptionError("format", f"format={self.format!r}; choose one of {EXPORT_FORMATS}")
        if self.dtype not in DTYPES:
            raise ExportOptionError("dtype", f"dtype={self.dtype!r}; choose one of {tuple(DTYPES)}")
        try:
            parse_size(self.shard_size)
        except ExportError as error:
            raise ExportOptionError("shard_size", str(error)) from None
        if self.push_to_hub is not None:
            from hybridlm.export.hub import check_repo_id

            try:
                check_repo_id(self.push_to_hub)
            except ExportError as error:
                raise ExportOptionError("push_to_hub", str(error)) from None

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_push_target(self) -> None:
        """With a push: a token is available and huggingface_hub is online (hub.check_push_target)."""
        if self.push_to_hub is not None:
            from hybridlm.export.hub import check_push_target

            check_push_target(self.push_to_hub)

    def check_fits(self, cfg: ModelConfig) -> None:
        """A native format refuses an architecture it cannot express, listing every mismatch."""
        if self.format in FORMATS:
            FORMATS[self.format].check_fits(cfg)

    def check_before_work(self, cfg: ModelConfig) -> None:
        """Everything that can be known before exporting (or before training a model to export)."""
        self.check_fits(cfg)
        self.check_push_target()
