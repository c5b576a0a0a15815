"""Router kernel: fp32 logits -> scores (softmax | sigmoid) -> biased top-k choice -> (renormalised) weights.

One program handles BLOCK_T tokens with all E logits in registers: scores, choice and weights come out of a
single read of the logits. The backward recomputes the scores from the logits (cheaper than storing them) and
returns the gradient with respect to the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import RENORM_EPS


@triton.jit
def _scores(logits_ptr, tile, tile_mask, expert_mask, SIGMOID: tl.constexpr):
    """softmax | sigmoid of one [BLOCK_T, E_PAD] tile of logits (padding experts get score 0)."""
    logits = tl.load(logits_ptr + tile, mask=tile_mask, other=0.0)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        logits = tl.where(expert_mask[None, :], logits, float("-inf"))
        exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = exps / tl.sum(exps, axis=1)[:, None]
    return scores


@triton.jit
def _router_forward_kernel(
    logits_ptr, bias_ptr, scores_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    token_mask = tokens < num_tokens
    expert_mask = experts < num_experts
    tile = tokens[:, None].to(tl.int64) * num_experts + experts[None, :]
    tile_mask = token_mask[:, None] & expert_mask[None, :]
    scores = _scores(logits_ptr, tile, tile_mask, expert_mask, SIGMOID)
    tl.store(scores_ptr + tile, scores, mask=tile_mask)

    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + experts, mask=expert_mask, other=0.0)[None, :]
    choice = tl.where(expert_mask[None, :], choice, float("-inf"))
    slots = tl.arange(0, K_PAD)
    weights = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    ids = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    for slot in range(TOP_K):
        best = tl.argmax(choice, axis=1)  # ties go to the lowest expert id
        is_best = experts[None, :] == best[:, None]
        weight = tl.sum(tl.where(is_best, scores, 0.0), axis=1)
        weights = tl.where(slots[None, :] == slot, weight[:, None], weights)
        ids = tl.where(slots[None, :] == slot, best[:, None].to(tl.int32), ids)
        choice = tl.where(is_best, float("-inf"), choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + EPS)
    out = tokens[:, None].to(tl.int64) * TOP_K + slots[None, :]
    out_mask = token_mask[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights, mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


@triton.jit
def _router_backward_kernel(
    logits_ptr, ids_ptr, dweights_ptr, dscores_ptr, dlogits_ptr,
    num_tokens, num_experts,
    TOP_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_DSCORES: tl.constexpr, RENORMALIZE: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    token_mask = tokens < num_tokens
    expert_mask = experts < num_experts
    tile = tokens[:, None].to(tl.int64) * num_experts + experts[None, :]
    tile_mask = token_mask[:, None] & expert_mask[None, :]
    scores = _scores(logits_ptr, tile, tile_mask, expert_mask, SIGMOID)

    # Gradient w.r.t. the chosen (unnormalised) scores. With w_j = s_j / S, S = sum(s) + eps:
    # dL/ds_j = dw_j / S - sum_i(dw_i s_i) / S^2.
    pair = tokens.to(tl.int64) * TOP_K
    inv_total = tl.zeros((BLOCK_T,), tl.float32)
    weighted_dw = tl.zeros((BLOCK_T,), tl.float32)
    if RENORMALIZE:
        total = tl.zeros((BLOCK_T,), tl.float32)
        for slot in range(TOP_K):
            ids = tl.load(ids_ptr + pair + slot, mask=token_mask, other=0)
            dweight = tl.load(dweights_ptr + pair + slot, mask=token_mask, other=0.0)
            chosen = tl.sum(tl.where(experts[None, :] == ids[:, None], scores, 0.0), axis=1)
            total += chosen
            weighted_dw += dweight * chosen
        inv_total = 1.0 / (total + EPS)
    dscores = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    if HAS_DSCORES:
        dscores = tl.load(dscores_ptr + tile, mask=tile_mask, other=0.0)
    for slot in range(TOP_K):
        ids = tl.load(ids_ptr + pair + slot, mask=token_mask, other=0)
        dweight = tl.load(dweights_ptr + pair + slot, mask=token_mask, other=0.0)
        if RENORMALIZE:
            dweight = dweight * inv_total - weighted_dw * inv_total * inv_total
        dscores += tl.where(experts[None, :] == ids[:, None], dweight[:, None], 0.0)

    if SIGMOID:
        dlogits = dscores * scores * (1.0 - scores)
    else:
        dlogits = scores * (dscores - tl.sum(dscores * scores, axis=1)[:, None])
    tl.store(dlogits_ptr + tile, dlogits, mask=tile_mask)


def _block_tokens(num_experts: int) -> tuple[int, int]:
    """(E padded to a power of two, tokens per program) keeping a program's logits tile near 4K values."""
    e_pad = triton.next_power_of_2(num_experts)
    return e_pad, max(1, min(64, 4096 // e_pad))


class RouterFunction(torch.autograd.Function):
    """fp32 logits [T,E] -> (weights [T,k] fp32, expert_ids [T,k] int32, scores [T,E] fp32)."""

    @staticmethod
    def forward(ctx, logits, selection_bias, top_k, score_func, renormalize):
        num_tokens, num_experts = logits.shape
        scores = torch.empty_like(logits)
        weights = logits.new_empty(num_tokens, top_k)
        expert_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
        e_pad, block_t = _block_tokens(num_experts)
        bias = selection_bias.float().contiguous() if selection_bias is not None else logits
        ctx.mark_non_differentiable(expert_ids)
        ctx.save_for_backward(logits, expert_ids)
        ctx.config = (top_k, score_func, renormalize)
        if num_tokens == 0:
            return weights, expert_ids, scores
        _router_forward_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits, bias, scores, weights, expert_ids, num_tokens, num_experts,
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t,
            SIGMOID=score_func == "sigmoid", HAS_BIAS=selection_bias is not None,
            RENORMALIZE=renormalize, EPS=RENORM_EPS,
        )  # fmt: skip
        return weights, expert_ids, scores

    @staticmethod
    def backward(ctx, dweights, _dexpert_ids, dscores):
        logits, expert_ids = ctx.saved_tensors
        top_k, score_func, renormalize = ctx.config
        num_tokens, num_experts = logits.shape
        if dweights is None:  # only the scores were used
            dweights = torch.zeros_like(expert_ids, dtype=torch.float32)
        dweights = dweights.float().contiguous()
        dlogits = torch.empty_like(logits)
        if num_tokens == 0:
            return dlogits, None, None, None, None
        e_pad, block_t = _block_tokens(num_experts)
        _router_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits, expert_ids, dweights, dscores.contiguous() if dscores is not None else logits, dlogits,
            num_tokens, num_experts,
            TOP_K=top_k, E_PAD=e_pad, BLOCK_T=block_t, SIGMOID=score_func == "sigmoid",
            HAS_DSCORES=dscores is not None, RENORMALIZE=renormalize, EPS=RENORM_EPS,
        )  # fmt: skip
        return dlogits, None, None, None, None


def router_topk(
    logits: torch.Tensor, top_k: int, score_func: str, renormalize: bool, selection_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable w.r.t. `logits` (fp32 [T,E], contiguous): (weights, expert_ids, scores)."""
    return RouterFunction.apply(logits, selection_bias, top_k, score_func, renormalize)
