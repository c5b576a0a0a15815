"""hybridlm: hybrid Gated DeltaNet + sparse MoE language models.

Importing hybridlm registers the `hybridlm` model type with transformers' AutoConfig and AutoModelForCausalLM,
lazily: transformers is slow to import, so each registration runs right after the transformers module it extends
has loaded (or at once, if it already has).
"""

import importlib
import importlib.abc
import sys

# transformers module -> the hybridlm.hf function that registers with it
_REGISTRATIONS = {
    "transformers.models.auto.configuration_auto": "register_config",
    "transformers.models.auto.modeling_auto": "register_model",
}


def _register(module_name: str) -> None:
    getattr(importlib.import_module("hybridlm.hf"), _REGISTRATIONS[module_name])()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of the watched transformers modules so registration runs once each has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _REGISTRATIONS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register(fullname)

        spec.loader.exec_module = exec_then_register
        return spec


_pending = [name for name in _REGISTRATIONS if name not in sys.modules]
for _name in _REGISTRATIONS:
    if _name in sys.modules:
        _register(_name)
if _pending:
    sys.meta_path.insert(0, _RegisterAfterImport())
