"""Test-wide settings: offline, CPU by default, GPU tests skipped without a GPU."""

import os
import shutil
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    # Decided without importing torch: TRITON_INTERPRET must be set before triton (or fla) is first imported.
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """The tokenizer and token store of tests.helpers.launch.tiny_run, built by the first run and shared by all."""
    return tmp_path_factory.mktemp("data_cache")


class SDPASpy:
    """Records the shapes of every SDPA call (and whether a mask came with it), then runs it."""

    def __init__(self, monkeypatch):
        import torch.nn.functional as F

        self.calls = []
        self._sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, q, k, v, attn_mask=None, is_causal=False, **kwargs):
        self.calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), mask=attn_mask, is_causal=is_causal))
        return self._sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)


@pytest.fixture
def sdpa_spy(monkeypatch) -> SDPASpy:
    """torch.nn.functional.scaled_dot_product_attention, recording its calls in `.calls`."""
    return SDPASpy(monkeypatch)
