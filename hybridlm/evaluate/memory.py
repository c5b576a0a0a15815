"""Activation memory as autograd sees it: what a forward saves for its backward."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_for_backward(fn: Callable, leaves: Iterable[torch.Tensor]):
    """Run `fn()`; return its output and {storage pointer: bytes} of the tensors autograd saved for backward that are
    not stored in one of `leaves` (one entry per storage, so views of one buffer count once)."""
    leaf_storages = {t.untyped_storage().data_ptr() for t in leaves}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in leaf_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, saved
