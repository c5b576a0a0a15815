"""The backend registries: `auto` resolves by device, unknown names and missing packages are refused naming the
choices, and every op dispatches to the implementation it registered."""

from __future__ import annotations

import pytest
import torch

from hybridlm import ops
from hybridlm.config import ConfigError, GatedDeltaNetConfig
from hybridlm.ops.registry import BackendRegistry


def test_auto_resolves_by_device_type():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (ops.GATED_DELTA.resolve("auto", cpu), ops.GATED_DELTA.resolve("auto", cuda)) == ("torch", "triton")
    assert (ops.MOE.resolve("auto", cpu), ops.MOE.resolve("auto", cuda)) == ("torch", "triton")
    assert (ops.ATTENTION.resolve("auto", cpu), ops.ATTENTION.resolve("auto", cuda)) == ("sdpa", "flex")
    assert ops.GATED_DELTA.resolve("fla", cpu) == "fla"  # a name is taken as given


def test_a_call_with_an_unknown_backend_names_the_choices():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"model.moe.backend='fla'; choose one of \('auto', 'triton', 'torch'\) "
                                         r"\(the backends the routed MoE has\)"):
        ops.sparse_moe(x, torch.zeros(3, 4), torch.zeros(3, 4, 4), torch.zeros(3, 4, 2), 1, backend="fla")


def test_a_backend_whose_package_is_missing_is_refused_at_config_time(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "fla" else object())
    with pytest.raises(ConfigError, match=r"model.gdn.backend='fla' needs the 'fla' package, which is not installed; "
                                          r"install it or choose one of \('auto', 'triton', 'torch'\)"):
        GatedDeltaNetConfig(backend="fla")


def test_register_refuses_auto_and_duplicates():
    registry = BackendRegistry("an op", "model.op.backend", {}, "a")
    registry.register("a")(len)
    assert registry.choices == ("auto", "a") and registry.implementation("auto", torch.device("cpu")) is len
    for name in ("a", "auto"):
        with pytest.raises(ValueError, match="reserved or registered twice"):
            registry.register(name)(len)


def test_each_op_dispatches_to_the_implementation_it_registered(monkeypatch):
    """The reference backend of each op answers its entry point (a recorded call, not a re-implementation)."""
    calls = []
    monkeypatch.setitem(ops.MOE._implementations, "torch", lambda *args, **kwargs: calls.append("moe"))
    monkeypatch.setitem(ops.ATTENTION._implementations, "sdpa", lambda *args: calls.append("attention"))
    x = torch.zeros(2, 4)
    ops.sparse_moe(x, None, None, None, 1)
    ops.attend(torch.zeros(1, 1, 2, 4), x, x, pattern=type("Pattern", (), {"block_mask": None})())
    assert calls == ["moe", "attention"]
