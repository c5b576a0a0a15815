"""Loading `.pt` files without running code: every torch.load in hybridlm uses weights_only=True (torch's restricted
unpickler: tensors, plain containers and allow-listed classes only), DeepSpeed's own loads included (issue 19).

DeepSpeed calls `torch.load(..., weights_only=False)` itself (its TorchCheckpointEngine and zero_to_fp32), so its
loads run inside `deepspeed_loads_weights_only()`, which forces weights_only=True and allow-lists the few classes
its checkpoints hold (found by trying every ZeRO stage)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
from pathlib import Path

import torch

from hybridlm.checkpoint.layout import CheckpointError


def load_tensors_file(path: Path):
    """`path`'s contents, loaded with weights_only=True; a clear CheckpointError for a damaged file or one holding
    anything else than tensors and plain containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(refused_pickle_message(path, error)) from error
    except (EOFError, RuntimeError, OSError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({error})") from error


def refused_pickle_message(path: Path | str, error: BaseException | str) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"{path} holds objects other than tensors and plain containers ({reason}); refused, since loading it could "
        "run arbitrary code. Only load checkpoints you trust, written by hybridlm's trainer"
    )


def check_tensors_file(path: Path) -> None:
    """Without loading any tensor or running any code: refuse a `.pt` file that is not a whole torch archive (its
    central directory sits at the end, so truncation loses it) or whose pickle names a class outside torch's
    weights_only set and DeepSpeed's allow-list."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({error})") from error
    refused = sorted(set(unsafe) - set(DEEPSPEED_SAFE_GLOBALS))
    if refused:
        raise CheckpointError(refused_pickle_message(path, f"it names {refused}"))


# What DeepSpeed's ZeRO optimizer states pickle besides tensors (torch.serialization.get_unsafe_globals_in_checkpoint
# on ZeRO 0-3 saves, fp32 and bf16): its stage enum, its static loss scaler and the parameter-fragment addresses.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _deepspeed_safe_globals() -> list:
    classes = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attribute = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attribute))
    return classes


@contextlib.contextmanager
def deepspeed_loads_weights_only():
    """Within it, every torch.load (DeepSpeed's included) runs with weights_only=True and DeepSpeed's few classes
    allow-listed; a refused file becomes a CheckpointError naming it."""
    original = torch.load

    @functools.wraps(original)
    def weights_only_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise CheckpointError(refused_pickle_message(f, error)) from error

    torch.load = weights_only_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original
