"""The one model definition: a stack of hybrid blocks built from the layer pattern, an LM head and the loss.

Packed batches: when `cu_seqlens` is given, the [B,T] batch is flattened to one row of B*T tokens and every mixer is
told where each document starts, so no state, convolution or attention crosses a document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridlm.config import ModelConfig
from hybridlm.layers.attention import Attention
from hybridlm.layers.gated_deltanet import GatedDeltaNet
from hybridlm.layers.mlp import SwiGLU
from hybridlm.layers.moe import RouterStats, SparseMoE
from hybridlm.layers.norm import RMSNorm, RMSNormGated

IGNORE_INDEX = -100
# Parameters never decayed, besides every 1-D tensor (norm weights, biases).
NO_DECAY_NAMES = ("A_log", "dt_bias")


class LMOutput(dict):
    """The model's outputs, read as attributes. A dict, not a dataclass: DeepSpeed ZeRO 3 re-gathers parameters for
    backward through the tensors it can find in a module's output, and it looks inside dicts."""

    def __init__(
        self,
        logits: torch.Tensor,  # [B,T,V] fp32
        loss: torch.Tensor | None = None,  # what to backpropagate: ce + aux_coef * aux + z_coef * z
        ce_loss: torch.Tensor | None = None,
        aux_loss: torch.Tensor | None = None,  # mean over MoE layers
        z_loss: torch.Tensor | None = None,  # mean over MoE layers
        expert_counts: list[torch.Tensor] | None = None,  # per MoE layer [E], summed over data-parallel ranks
    ):
        super().__init__(logits=logits, loss=loss, ce_loss=ce_loss, aux_loss=aux_loss, z_loss=z_loss,
                         expert_counts=expert_counts or [])

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value


@dataclass
class TokenLayout:
    """Where documents start, shared by every block of one forward pass."""

    position_ids: torch.Tensor  # [B,T] RoPE positions, restarting at 0 per document
    cu_seqlens: torch.Tensor | None = None  # [N+1] over the flattened row (B == 1 then)
    segment_ids: torch.Tensor | None = None  # [B,T] document index of each token
    position_in_doc: torch.Tensor | None = None  # [B,T] 0 at each document start
    padding_mask: torch.Tensor | None = None  # [B,T] 1 for tokens, 0 for left padding (batched generation)


class ModelCache:
    """Decoding state: per layer a dict (GDN: conv + recurrent state; attention: keys and values)."""

    def __init__(self, num_layers: int):
        self.layers: list[dict] = [{} for _ in range(num_layers)]
        self.seen_tokens = 0


class HybridBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, mlp_type: str):
        super().__init__()
        self.layer_type, self.mlp_type = layer_type, mlp_type
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.norm_eps, cfg.zero_centered_norm)
        if layer_type == "gated_deltanet":
            self.linear_attn = GatedDeltaNet(h, cfg.gdn, cfg.norm_eps)
        else:
            self.self_attn = Attention(h, cfg.attention, cfg.norm_eps, cfg.zero_centered_norm)
        self.post_attention_layernorm = RMSNorm(h, cfg.norm_eps, cfg.zero_centered_norm)
        self.mlp = SparseMoE(h, cfg.moe) if mlp_type == "moe" else SwiGLU(h, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, layout: TokenLayout, cache: dict | None = None
    ) -> tuple[torch.Tensor, RouterStats | None]:
        normed = self.input_layernorm(x)
        if self.layer_type == "gated_deltanet":
            if layout.padding_mask is not None:
                # A zero input adds nothing to the conv window or the recurrent state (no projection has a bias), so
                # left padding leaves every prompt's state exactly as if it had not been padded.
                normed = normed * layout.padding_mask[..., None].to(normed.dtype)
            mixed = self.linear_attn(normed, layout.cu_seqlens, layout.position_in_doc, cache)
        else:
            mixed = self.self_attn(normed, layout.position_ids, layout.segment_ids, cache)
        x = x + mixed
        normed = self.post_attention_layernorm(x)
        if self.mlp_type == "moe":
            out, stats = self.mlp(normed)
            return x + out, stats
        return x + self.mlp(normed), None


def layout_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> TokenLayout:
    """Segment ids and in-document positions of a row of `total` packed tokens."""
    index = torch.arange(total, device=cu_seqlens.device)
    segment_ids = torch.searchsorted(cu_seqlens[1:].to(torch.int64), index, right=True)
    position_in_doc = index - cu_seqlens.to(torch.int64)[segment_ids]
    return TokenLayout(
        position_ids=position_in_doc[None],
        cu_seqlens=cu_seqlens,
        segment_ids=segment_ids[None],
        position_in_doc=position_in_doc[None],
    )


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            HybridBlock(config, layer_type, mlp_type)
            for layer_type, mlp_type in zip(config.layer_types, config.mlp_types)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.zero_centered_norm)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices; output projections scaled by 1/sqrt(2 * num_layers) so the
        residual stream does not grow with depth; norms, conv and the GDN decay keep their own initialisation."""
        std = self.config.initializer_range
        out_std = std / (2 * self.config.num_layers) ** 0.5
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("o_proj", "out_proj", "down_proj"))
                nn.init.normal_(module.weight, std=out_std if is_output else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, SparseMoE):
                nn.init.normal_(module.experts.gate_up_proj, std=std)
                nn.init.normal_(module.experts.down_proj, std=out_std)
            elif isinstance(module, (RMSNorm, RMSNormGated)):
                module.reset_parameters()
            elif isinstance(module, GatedDeltaNet):
                module.reset_decay_parameters()
                module.conv1d.reset_parameters()

    @property
    def moe_layers(self) -> list[SparseMoE]:
        return [block.mlp for block in self.layers if isinstance(block.mlp, SparseMoE)]

    def new_cache(self) -> ModelCache:
        return ModelCache(len(self.layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> LMOutput:
        """input_ids [B,T]; labels [B,T] are next-token targets already aligned with the inputs (-100: no target);
        cu_seqlens [N+1] marks document starts over the flattened B*T tokens (row starts included).
        attention_mask [B,T] (1: token, 0: left padding) covers this call's tokens; padding is its own segment for
        attention and a zero input for GDN. When decoding with a cache, pass it on every call (and position_ids)."""
        B, T = input_ids.shape
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError("pass attention_mask (padded batch) or cu_seqlens (packed documents), not both")
        if cu_seqlens is not None:
            layout = layout_from_cu_seqlens(cu_seqlens, B * T)
            if position_ids is not None:
                layout.position_ids = position_ids.reshape(1, B * T)
            x = self.embed_tokens(input_ids.reshape(1, B * T))
        else:
            if position_ids is None:
                start = 0 if cache is None else cache.seen_tokens
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            layout = TokenLayout(position_ids=position_ids)
            if attention_mask is not None:
                layout.padding_mask = attention_mask
                layout.segment_ids = attention_mask.to(torch.int64)
            x = self.embed_tokens(input_ids)

        stats: list[RouterStats] = []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.config.activation_checkpointing and self.training and cache is None:
                x, layer_stats = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x, layer_stats = block(x, layout, layer_cache)
            if layer_stats is not None:
                stats.append(layer_stats)
                if self.training and block.mlp.cfg.selection_bias:
                    block.mlp._load_since_update += layer_stats.expert_counts.to(block.mlp._load_since_update.dtype)
        if cache is not None:
            cache.seen_tokens += T

        x = self.norm(x)
        head_weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head_weight).float().reshape(B, T, -1)
        out = LMOutput(logits=logits, expert_counts=[s.expert_counts for s in stats])
        if labels is None:
            return out

        targets = labels.reshape(-1)
        summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        out.ce_loss = summed / (targets != IGNORE_INDEX).sum().clamp(min=1)
        zero = logits.new_zeros(())
        out.aux_loss = torch.stack([s.aux_loss for s in stats]).mean() if stats else zero
        out.z_loss = torch.stack([s.z_loss for s in stats]).mean() if stats else zero
        moe = self.config.moe
        out.loss = out.ce_loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss
        return out

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on norms, biases (every 1-D tensor), A_log and dt_bias."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            skip = param.dim() < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
            (no_decay if skip else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def update_moe_selection_bias(self) -> None:
        """Call once after each optimizer step."""
        for moe in self.moe_layers:
            moe.update_selection_bias()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
