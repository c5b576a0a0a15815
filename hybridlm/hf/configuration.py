"""HybridLMConfig: our ModelConfig inside a transformers config (needs only transformers' configuration module)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transformers.configuration_utils import PretrainedConfig

from hybridlm.config import ModelConfig
from hybridlm.hf.remote_code import add_remote_code

MODEL_TYPE = "hybridlm"


class HybridLMConfig(PretrainedConfig):
    """Holds our ModelConfig as a plain dict under `model`; the usual HF fields are derived from it."""

    model_type = MODEL_TYPE

    model: dict | None = None
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        model = self.model_config()
        self.model = dataclasses.asdict(model)
        self.vocab_size, self.hidden_size = model.vocab_size, model.hidden_size
        self.num_hidden_layers = model.num_layers
        self.tie_word_embeddings = model.tie_embeddings
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**(self.model or {}))

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> HybridLMConfig:
        return cls(model=dataclasses.asdict(cfg), **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save (the model's save_pretrained calls it too), plus the auto_map shims: every saved copy
        loads with trust_remote_code like the export it came from."""
        super().save_pretrained(save_directory, *args, **kwargs)
        add_remote_code(Path(save_directory))

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Left a no-op: after a trust_remote_code load transformers would otherwise copy this file (not the shim)
        into every later save and point auto_map at that copy."""
