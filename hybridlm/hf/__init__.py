"""The `hybridlm` Hugging Face format: HybridLMConfig + HybridLMForCausalLM, and their registration with
transformers' AutoConfig / AutoModelForCausalLM (done lazily by `import hybridlm`, see hybridlm/__init__.py)."""

from hybridlm.hf.configuration import MODEL_TYPE, HybridLMConfig


def register_config() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    CONFIG_MAPPING.register(MODEL_TYPE, HybridLMConfig, exist_ok=True)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from hybridlm.hf.modeling import HybridLMForCausalLM

    MODEL_FOR_CAUSAL_LM_MAPPING.register(HybridLMConfig, HybridLMForCausalLM, exist_ok=True)


def register() -> None:
    register_config()
    register_model()


def __getattr__(name: str):
    if name in ("HybridLMForCausalLM", "HybridLMCache"):
        from hybridlm.hf import modeling

        return getattr(modeling, name)
    raise AttributeError(name)


__all__ = ["MODEL_TYPE", "HybridLMCache", "HybridLMConfig", "HybridLMForCausalLM", "register"]
