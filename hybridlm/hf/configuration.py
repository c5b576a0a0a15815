"""HybridLMConfig: our ModelConfig inside a transformers config (needs only transformers' configuration module)."""

from __future__ import annotations

import dataclasses

from transformers.configuration_utils import PretrainedConfig

from hybridlm.config import ModelConfig

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
