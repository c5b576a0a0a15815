"""Two shim modules written into every hybridlm-format export, named by config.json's `auto_map`, so tools that load
models with `trust_remote_code=True` and import nothing of ours (`lm_eval --model hf`, plain scripts) find our
classes. Each shim imports the class from the installed hybridlm package: no copy of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

_SHIM = '''"""Shim for `trust_remote_code=True`: the {what} of this export is hybridlm's own (pip install hybridlm);
this file only imports it, so the model is defined once, in the installed package."""

from {module} import {name}

__all__ = ["{name}"]
'''

# auto class -> (shim file stem, what it holds, hybridlm module, class)
_SHIMS = {
    "AutoConfig": ("configuration_hybridlm", "configuration", "hybridlm.hf.configuration", "HybridLMConfig"),
    "AutoModelForCausalLM": ("modeling_hybridlm", "model", "hybridlm.hf.modeling", "HybridLMForCausalLM"),
}


def add_remote_code(directory: Path) -> None:
    """Write the shims into `directory` and name them in the `auto_map` of its config.json."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {}
    for auto_class, (stem, what, module, name) in _SHIMS.items():
        (directory / f"{stem}.py").write_text(_SHIM.format(what=what, module=module, name=name))
        config["auto_map"][auto_class] = f"{stem}.{name}"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
