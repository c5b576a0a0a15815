"""HybridLMForCausalLM: a PreTrainedModel + GenerationMixin wrapper that delegates to the one model definition
(`hybridlm.model.HybridLM`, held as `.model`)."""

from __future__ import annotations

import dataclasses

import torch
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from hybridlm.generate import positions_from_mask
from hybridlm.hf.configuration import HybridLMConfig
from hybridlm.layers.moe import SparseMoE
from hybridlm.layers.rope import RotaryEmbedding
from hybridlm.loss import IGNORE_INDEX
from hybridlm.model import HybridLM, ModelCache

# transformers 5.24 renamed the cache argument and output field from `past_key_values` (now deprecated, with a
# warning) to `cache`; earlier 5.x releases know only `past_key_values`. The wrapper speaks this transformers' name.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class HybridLMCache:
    """Our ModelCache, in the shape transformers' generate passes around as `cache` (`past_key_values`)."""

    def __init__(self, cache: ModelCache):
        self.cache = cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.seen_tokens


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["HybridBlock"]
    _is_stateful = True  # the GDN state cannot be rolled back: no assisted decoding
    _supports_sdpa = True

    def __init__(self, config: HybridLMConfig):
        super().__init__(config)
        self.model = HybridLM(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own cache is created in prepare_inputs_for_generation

    @torch.no_grad()
    def _init_weights(self, module):
        # Weights come from the checkpoint (HybridLM initialises itself when built directly); the RoPE table and the
        # MoE step counts are unsaved buffers that from_pretrained leaves uninitialised after building on the meta
        # device.
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()
        elif isinstance(module, SparseMoE) and hasattr(module, "counts_since_step"):
            module.counts_since_step.zero_()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridLMCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: HybridLMCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """HF conventions: `labels` are the input ids (shifted here), `attention_mask` may span past + new tokens;
        the cache comes as `cache` or, from older callers, `past_key_values`."""
        cache = cache if cache is not None else past_key_values
        T = input_ids.shape[1]
        if attention_mask is not None:
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)[:, -T:]
            attention_mask = attention_mask[:, -T:]
        if use_cache and cache is None:
            cache = HybridLMCache(self.model.new_cache())
        model_cache = cache.cache if cache is not None else None
        # With labels every position's logits are needed for the loss; otherwise only the ones asked for.
        keep = 0 if labels is not None else logits_to_keep
        out = self.model(input_ids, position_ids=position_ids, cache=model_cache, attention_mask=attention_mask,
                         logits_to_keep=keep)
        logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        loss = None
        if labels is not None:
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
            loss = torch.nn.functional.cross_entropy(
                out.logits.reshape(-1, out.logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache})

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, attention_mask=None, use_cache=True, past_key_values=None, **kwargs
    ) -> dict:
        cache = cache if cache is not None else past_key_values
        seen = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return {
            "input_ids": input_ids[:, seen:],
            "attention_mask": attention_mask,
            CACHE_NAME: cache,
            "use_cache": use_cache,
            "logits_to_keep": kwargs.get("logits_to_keep", 0),  # generate asks for the last position only
        }
