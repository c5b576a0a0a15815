"""A backend registry per op, after fla's `fla/ops/*/backends` + `dispatch`: each implementation registers under a
name, the config checks `model.<op>.backend` against those names at start-up, and every call resolves `auto` for the
device of its tensors."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any


class BackendRegistry:
    def __init__(self, op: str, config_key: str, auto: dict[str, str], auto_otherwise: str):
        """`auto` maps a device type ("cuda") to the backend `auto` means there; `auto_otherwise` is the rest."""
        self.op, self.config_key = op, config_key
        self._auto, self._auto_otherwise = auto, auto_otherwise
        self._implementations: dict[str, Any] = {}
        self._requires: dict[str, str] = {}

    def register(self, name: str, requires: str = "") -> Callable[[Any], Any]:
        """Decorator: `implementation` answers this op as backend `name`; `requires` names the package it imports
        (checked at start-up, never imported there)."""

        def decorator(implementation):
            if name == "auto" or name in self._implementations:
                raise ValueError(f"{self.op}: backend {name!r} is reserved or registered twice")
            self._implementations[name] = implementation
            if requires:
                self._requires[name] = requires
            return implementation

        return decorator

    @property
    def choices(self) -> tuple[str, ...]:
        return ("auto", *self._implementations)

    def refusal(self, backend: str) -> str | None:
        """Why `backend` cannot run here (naming the choices or the missing package), None when it can."""
        if backend not in self.choices:
            return f"{self.config_key}={backend!r}; choose one of {self.choices} (the backends {self.op} has)"
        package = self._requires.get(backend)
        if package and importlib.util.find_spec(package) is None:
            return (f"{self.config_key}={backend!r} needs the {package!r} package, which is not installed; install it "
                    f"or choose one of {tuple(name for name in self.choices if name not in self._requires)}")
        return None

    def resolve(self, backend: str, device) -> str:
        """The backend `backend` means for tensors on `device` (a torch.device): `auto` by device type."""
        refusal = self.refusal(backend)
        if refusal:
            raise ValueError(refusal)
        if backend == "auto":
            return self._auto.get(device.type, self._auto_otherwise)
        return backend

    def implementation(self, backend: str, device) -> Any:
        return self._implementations[self.resolve(backend, device)]


GATED_DELTA = BackendRegistry("the gated delta rule", "model.gdn.backend", {"cuda": "triton"}, "torch")
MOE = BackendRegistry("the routed MoE", "model.moe.backend", {"cuda": "triton"}, "torch")
ATTENTION = BackendRegistry("attention", "model.attention.backend", {"cuda": "flex"}, "sdpa")
