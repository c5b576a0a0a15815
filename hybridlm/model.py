"""The one model definition: a stack of hybrid blocks built from the layer pattern, an LM head and the loss.

The token layout of packed batches (no state, convolution or attention crosses a document) is hybridlm.layout; the
chunked LM-head loss is hybridlm.loss.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from hybridlm.config import ModelConfig
from hybridlm.layers.attention import Attention, append_along, cached_pattern, sequence_pattern
from hybridlm.layers.gated_deltanet import GatedDeltaNet
from hybridlm.layers.mlp import SwiGLU
from hybridlm.layers.moe import RouterStats, SparseMoE
from hybridlm.layers.norm import RMSNorm, RMSNormGated
from hybridlm.layout import TokenLayout, packed_layout
from hybridlm.loss import IGNORE_INDEX, linear_cross_entropy

# Parameters never decayed, besides every 1-D tensor (norm weights, biases).
NO_DECAY_NAMES = ("A_log", "dt_bias")


class LMOutput(dict):
    """The model's outputs, read as attributes. A dict, not a dataclass: DeepSpeed ZeRO 3 re-gathers parameters for
    backward through the tensors it can find in a module's output, and it looks inside dicts."""

    def __init__(
        self,
        logits: torch.Tensor | None,  # [B,T,V] fp32; None when the loss was asked for without them (see forward)
        loss: torch.Tensor | None = None,  # what to backpropagate: ce + aux_coef * aux + z_coef * z
        ce_loss: torch.Tensor | None = None,
        aux_loss: torch.Tensor | None = None,  # mean over MoE layers
        z_loss: torch.Tensor | None = None,  # mean over MoE layers
        expert_counts: list[torch.Tensor] | None = None,  # per MoE layer [E]; see RouterStats.expert_counts
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


class ModelCache:
    """Decoding state: per layer a dict (GDN: "conv" and "recurrent" states; attention: "k" and "v" buffers); every
    tensor is batch-first. `max_length` (prompt + new tokens, if known) sizes the key/value buffers up front."""

    def __init__(self, num_layers: int, max_length: int = 0):
        self.layers: list[dict] = [{} for _ in range(num_layers)]
        self.seen_tokens = 0
        self.max_length = max_length
        # [B, capacity] 0 for padding, 1 for tokens, once any padding was seen; None while there is none.
        self.key_segments: torch.Tensor | None = None

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows `keep` (e.g. drop finished sequences)."""
        for layer in self.layers:
            for key, value in layer.items():
                layer[key] = value.index_select(0, keep)
        if self.key_segments is not None:
            self.key_segments = self.key_segments.index_select(0, keep)


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
        self, x: torch.Tensor, layout: TokenLayout, cache: dict | None = None,
        earlier_step_counts: torch.Tensor | None = None,  # MoE: see SparseMoE.forward
    ) -> tuple[torch.Tensor, RouterStats | None]:
        normed = self.input_layernorm(x)
        if self.layer_type == "gated_deltanet":
            if layout.padding_mask is not None:
                # A zero input adds nothing to the conv window or the recurrent state (no projection has a bias), so
                # left padding leaves every prompt's state exactly as if it had not been padded.
                normed = normed * layout.padding_mask[..., None].to(normed.dtype)
            if layout.context is not None:  # this rank's slice of each row; the layer flattens it itself
                mixed = self.linear_attn(normed, chunk_layout=layout.gdn_chunk_layout, context=layout.context)
            elif layout.cu_seqlens is not None:  # packed: one flattened row, restarting at every document
                B, T, H = normed.shape
                flat = self.linear_attn(normed.reshape(1, B * T, H), layout.cu_seqlens, layout.position_in_doc, cache,
                                        chunk_layout=layout.gdn_chunk_layout)
                mixed = flat.reshape(B, T, H)
            else:
                mixed = self.linear_attn(normed, None, None, cache)
        else:
            mixed = self.self_attn(normed, layout.position_ids, layout.attention, cache, layout.context)
        x = x + mixed
        normed = self.post_attention_layernorm(x)
        if self.mlp_type == "moe":
            out, stats = self.mlp(normed, earlier_step_counts)
            return x + out, stats
        return x + self.mlp(normed), None


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

    def new_cache(self, max_length: int = 0) -> ModelCache:
        """An empty decoding cache; `max_length` (prompt + new tokens, if known) allocates its buffers once."""
        return ModelCache(len(self.layers), max_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: float | torch.Tensor | None = None,
        context=None,
    ) -> LMOutput:
        """input_ids [B,T]; labels [B,T] are next-token targets already aligned with the inputs (-100: no target);
        cu_seqlens [N+1] marks document starts over the flattened B*T tokens (row starts included; documents never
        cross rows). attention_mask [B,T] (1: token, 0: left padding) covers this call's tokens; padding is its own
        segment for attention and a zero input for GDN. When decoding with a cache, pass it on every call (and
        position_ids); a call after the first needs attention_mask only if its own tokens include padding.
        Logits [B,T,V] fp32 are returned when there are no labels, or with return_logits=True (the loss alone never
        materialises them); `logits_to_keep` > 0 computes them for the last that many positions only.
        `num_items_in_batch` (transformers' name) divides the summed cross-entropy instead of this batch's target
        count: the trainer passes the optimizer step's count so that the loss is a mean over all its tokens.
        `context` (hybridlm.parallel.context.shard_batch): the inputs and labels are this rank's slice of each row;
        every loss is then this shard's share, and their sums over the context-parallel group are the whole rows'."""
        B, T = input_ids.shape
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError("pass attention_mask (padded batch) or cu_seqlens (packed documents), not both")
        if cu_seqlens is not None and cache is not None:
            raise ValueError("cu_seqlens (packed documents) is for training and scoring; decode without it")
        if context is not None:
            if cache is not None or attention_mask is not None or cu_seqlens is not None:
                raise ValueError("context= (hybridlm.parallel.context.shard_batch) carries the documents itself; "
                                 "pass no cu_seqlens, attention_mask or cache with it")
            from hybridlm.parallel.context import context_layout

            layout = context_layout(context, self.config)
            if position_ids is not None:  # the shard's slice, as packed rows' given positions
                layout.position_ids = position_ids
        else:
            layout = self._layout(input_ids, position_ids, cu_seqlens, cache, attention_mask)
        x = self.embed_tokens(input_ids)

        stats: list[RouterStats] = []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            earlier_counts = block.mlp.earlier_step_counts() if block.mlp_type == "moe" else None
            if self.config.activation_checkpointing and self.training and cache is None:
                x, layer_stats = checkpoint(block, x, layout, None, earlier_counts, use_reentrant=False)
            else:
                x, layer_stats = block(x, layout, layer_cache, earlier_counts)
            if layer_stats is not None:
                stats.append(layer_stats)
                block.mlp.count_step(layer_stats.expert_counts)
        if cache is not None:
            cache.seen_tokens += T

        x = self.norm(x)
        head_weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = None
        if return_logits or (return_logits is None and labels is None):
            kept = x[:, -logits_to_keep:] if logits_to_keep else x
            logits = F.linear(kept, head_weight).float()
        out = LMOutput(logits=logits, expert_counts=[s.expert_counts for s in stats])
        if labels is None:
            return out

        targets = labels.reshape(-1)
        summed = linear_cross_entropy(x.reshape(B * T, -1), head_weight, targets)
        if num_items_in_batch is None:
            num_items_in_batch = (targets != IGNORE_INDEX).sum()
            if context is not None:  # the targets of the whole rows
                from hybridlm.parallel.context import sum_over_shards

                num_items_in_batch = sum_over_shards(num_items_in_batch, context)
            num_items_in_batch = num_items_in_batch.clamp(min=1)
        out.ce_loss = summed / num_items_in_batch
        zero = summed.new_zeros(())
        shards = 1 if context is None else context.cp.size  # the router losses are means over equal shards
        out.aux_loss = torch.stack([s.aux_loss for s in stats]).mean() / shards if stats else zero
        out.z_loss = torch.stack([s.z_loss for s in stats]).mean() / shards if stats else zero
        moe = self.config.moe
        out.loss = out.ce_loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss
        return out

    def _layout(self, input_ids, position_ids, cu_seqlens, cache, attention_mask) -> TokenLayout:
        B, T = input_ids.shape
        device = input_ids.device
        attn = self.config.attention
        if cu_seqlens is not None:
            layout = packed_layout(cu_seqlens, B, T, self.config)
            if position_ids is not None:
                layout.position_ids = position_ids
            return layout
        if position_ids is None:
            start = 0 if cache is None else cache.seen_tokens
            position_ids = torch.arange(start, start + T, device=device).expand(B, T)
        # All-ones masks (HF passes one on every call) change nothing; dropping them keeps the mask-free kernels.
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if cache is None:
            segments = None if padding is None else padding.to(torch.int64)
            attention = sequence_pattern(T, device, window=attn.sliding_window, backend=attn.backend,
                                         segment_ids=segments)
            return TokenLayout(position_ids=position_ids, attention=attention, padding_mask=padding)
        past = cache.seen_tokens
        capacity = max(cache.max_length, past + T)
        if padding is not None or cache.key_segments is not None:
            if cache.key_segments is None:  # the first padding: the tokens cached so far were all real
                cache.key_segments = torch.ones(B, past, dtype=torch.int64, device=device)
            step = padding if padding is not None else torch.ones_like(input_ids)
            cache.key_segments = append_along(cache.key_segments, past, step.to(torch.int64), dim=1, capacity=capacity)
        key_segments = None if cache.key_segments is None else cache.key_segments[:, : past + T]
        attention = cached_pattern(past, T, device, window=attn.sliding_window, key_segments=key_segments,
                                   cache_capacity=capacity)
        return TokenLayout(position_ids=position_ids, attention=attention, padding_mask=padding)

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the embedding (and an untied LM head) to `vocab_size` rows, e.g. for chat tokens added to the
        tokenizer. New rows are the mean of the old ones (Hewitt 2021, "Initializing new word embeddings"; what
        transformers' mean_resizing starts from), so new tokens start with an average rather than a random score."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"resize_token_embeddings({vocab_size}) would drop tokens: the model has {old}")
        if vocab_size == old:
            return
        modules = [self.embed_tokens] + ([] if self.lm_head is None else [self.lm_head])
        for module in modules:
            weight = module.weight
            grown = weight.new_empty(vocab_size, weight.shape[1])
            grown[:old] = weight
            grown[old:] = weight.mean(dim=0, keepdim=True)
            module.weight = nn.Parameter(grown, requires_grad=weight.requires_grad)
        self.embed_tokens.num_embeddings = vocab_size
        if self.lm_head is not None:
            self.lm_head.out_features = vocab_size
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

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
    def after_optimizer_step(self) -> None:
        """Updates the MoE selection bias and starts the next step's expert counts. The optimizer hook
        (`register_optimizer_hook`) calls it; a loop with an optimizer of its own calls it after each step. A second
        call before the next forward changes nothing: the counts it would use are already cleared."""
        for moe in self.moe_layers:
            moe.after_optimizer_step()

    def register_optimizer_hook(self, optimizer: torch.optim.Optimizer) -> RemovableHandle | None:
        """Run `after_optimizer_step` after every step of `optimizer`, so that no training loop can forget it
        (torchtitan's register_moe_load_balancing_hook, torchtitan/components/optimizer/optimizer.py).

        Under DeepSpeed the hook sits on the torch optimizer inside the engine: ZeRO 1-3 step it once per parameter
        group (or partition sub-group), which the idempotence above absorbs, and a step DeepSpeed skips (non-finite
        gradients, an fp16 overflow) never reaches it, so the bias moves exactly once per applied step."""
        if not self.moe_layers:
            return None
        return optimizer.register_step_post_hook(lambda optimizer, args, kwargs: self.after_optimizer_step())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
