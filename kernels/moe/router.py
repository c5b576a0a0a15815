# Cites: Switch balancing loss (arXiv 2101.03961), ST-MoE z-loss (2202.08906), DeepSeek-V3 bias (2412.19437).
"""Router kernel: fp32 logits -> scores (softmax | sigmoid) -> biased top-k choice -> (renormalised) weights,
plus what the z-loss and the load-balancing loss need (see `RouterLossStats`).

One program handles BLOCK_T tokens with all E logits in registers: scores, choice, weights, each token's
logsumexp and the program's per-expert sum of balancing probabilities come out of a single read of the logits.
The per-program sums are added in a fixed order afterwards (no atomics, so repeats are bitwise equal). The
backward recomputes the scores from the logits (cheaper than storing them) and returns the gradient with respect
to the logits from the gradients of all outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import RENORM_EPS


@triton.jit
def _router_probabilities(logits_ptr, tile, tile_mask, expert_mask, SIGMOID: tl.constexpr):
    """(scores, softmax, logsumexp) of one [BLOCK_T, E_PAD] tile of logits; padding experts get probability 0."""
    logits = tl.load(logits_ptr + tile, mask=tile_mask, other=0.0)
    masked = tl.where(expert_mask[None, :], logits, float("-inf"))
    row_max = tl.max(masked, axis=1)
    exps = tl.exp(masked - row_max[:, None])
    total = tl.sum(exps, axis=1)
    softmax = exps / total[:, None]
    if SIGMOID:
        scores = tl.where(expert_mask[None, :], tl.sigmoid(logits), 0.0)
    else:
        scores = softmax
    return scores, softmax, row_max + tl.log(total)


@triton.jit
def _router_forward_kernel(
    logits_ptr, bias_ptr, scores_ptr, weights_ptr, ids_ptr, logsumexp_ptr, probability_partials_ptr,
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
    scores, _, logsumexp = _router_probabilities(logits_ptr, tile, tile_mask, expert_mask, SIGMOID)
    tl.store(scores_ptr + tile, scores, mask=tile_mask)
    tl.store(logsumexp_ptr + tokens, logsumexp, mask=token_mask)
    balancing = scores
    if SIGMOID:
        balancing = scores / (tl.sum(scores, axis=1)[:, None] + EPS)
    partial = tl.sum(tl.where(token_mask[:, None], balancing, 0.0), axis=0)
    tl.store(probability_partials_ptr + tl.program_id(0) * num_experts + experts, partial, mask=expert_mask)

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
    logits_ptr, ids_ptr, dweights_ptr, dscores_ptr, dlogsumexp_ptr, dprobability_sums_ptr, dlogits_ptr,
    num_tokens, num_experts,
    TOP_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SIGMOID: tl.constexpr,
    HAS_DWEIGHTS: tl.constexpr, HAS_DSCORES: tl.constexpr, HAS_DLOGSUMEXP: tl.constexpr,
    HAS_DPROBABILITY_SUMS: tl.constexpr, RENORMALIZE: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    token_mask = tokens < num_tokens
    expert_mask = experts < num_experts
    tile = tokens[:, None].to(tl.int64) * num_experts + experts[None, :]
    tile_mask = token_mask[:, None] & expert_mask[None, :]
    scores, softmax, _ = _router_probabilities(logits_ptr, tile, tile_mask, expert_mask, SIGMOID)

    # dscores: the gradient w.r.t. the scores from every output that depends on them.
    dscores = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    if HAS_DSCORES:
        dscores = tl.load(dscores_ptr + tile, mask=tile_mask, other=0.0)
    if HAS_DWEIGHTS:
        # The chosen (unnormalised) scores. With w_j = s_j / S, S = sum(s) + eps:
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
        for slot in range(TOP_K):
            ids = tl.load(ids_ptr + pair + slot, mask=token_mask, other=0)
            dweight = tl.load(dweights_ptr + pair + slot, mask=token_mask, other=0.0)
            if RENORMALIZE:
                dweight = dweight * inv_total - weighted_dw * inv_total * inv_total
            dscores += tl.where(experts[None, :] == ids[:, None], dweight[:, None], 0.0)
    if HAS_DPROBABILITY_SUMS:
        # Every token's balancing probabilities q feed sum_t q_t; q = s (softmax) or s / (sum(s) + eps) (sigmoid).
        dprob = tl.load(dprobability_sums_ptr + experts, mask=expert_mask, other=0.0)[None, :]
        if SIGMOID:
            inv_sum = 1.0 / (tl.sum(scores, axis=1) + EPS)
            dot = tl.sum(dprob * scores, axis=1) * inv_sum
            dscores += (dprob - dot[:, None]) * inv_sum[:, None]
        else:
            dscores += dprob

    if SIGMOID:
        dlogits = dscores * scores * (1.0 - scores)
    else:
        dlogits = scores * (dscores - tl.sum(dscores * scores, axis=1)[:, None])
    if HAS_DLOGSUMEXP:  # d logsumexp / d logits = softmax, whatever the score function
        dlogsumexp = tl.load(dlogsumexp_ptr + tokens, mask=token_mask, other=0.0)
        dlogits += dlogsumexp[:, None] * softmax
    tl.store(dlogits_ptr + tile, dlogits, mask=tile_mask)


def _block_tokens(num_experts: int) -> tuple[int, int]:
    """(E padded to a power of two, tokens per program) keeping a program's logits tile near 1K values: 4K-value
    tiles spill registers in the backward on sm_90 (E = 64, or sigmoid at E = 128)."""
    e_pad = triton.next_power_of_2(num_experts)
    return e_pad, max(1, min(64, 1024 // e_pad))


class RouterFunction(torch.autograd.Function):
    """fp32 logits [T,E] -> (weights [T,k] fp32, expert_ids [T,k] int32, scores [T,E] fp32,
    logsumexp [T] fp32, probability_sums [E] fp32)."""

    @staticmethod
    def forward(ctx, logits, selection_bias, top_k, score_func, renormalize):
        num_tokens, num_experts = logits.shape
        scores = torch.empty_like(logits)
        weights = logits.new_empty(num_tokens, top_k)
        expert_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
        logsumexp = logits.new_empty(num_tokens)
        e_pad, block_t = _block_tokens(num_experts)
        num_programs = triton.cdiv(num_tokens, block_t)
        probability_partials = logits.new_zeros(max(1, num_programs), num_experts)
        bias = selection_bias.float().contiguous() if selection_bias is not None else logits
        ctx.mark_non_differentiable(expert_ids)
        ctx.set_materialize_grads(False)  # outputs nobody differentiates cost no backward work
        ctx.save_for_backward(logits, expert_ids)
        ctx.config = (top_k, score_func, renormalize)
        if num_tokens:
            _router_forward_kernel[(num_programs,)](
                logits, bias, scores, weights, expert_ids, logsumexp, probability_partials, num_tokens, num_experts,
                TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t,
                SIGMOID=score_func == "sigmoid", HAS_BIAS=selection_bias is not None,
                RENORMALIZE=renormalize, EPS=RENORM_EPS,
            )  # fmt: skip
        # A fixed-order sum over programs: deterministic, unlike atomics.
        return weights, expert_ids, scores, logsumexp, probability_partials.sum(dim=0)

    @staticmethod
    def backward(ctx, dweights, _dexpert_ids, dscores, dlogsumexp, dprobability_sums):
        logits, expert_ids = ctx.saved_tensors
        top_k, score_func, renormalize = ctx.config
        num_tokens, num_experts = logits.shape
        dlogits = torch.empty_like(logits)
        if num_tokens == 0:
            return dlogits, None, None, None, None
        e_pad, block_t = _block_tokens(num_experts)
        grads = [g.float().contiguous() if g is not None else None
                 for g in (dweights, dscores, dlogsumexp, dprobability_sums)]  # fmt: skip
        _router_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits, expert_ids, *(g if g is not None else logits for g in grads), dlogits, num_tokens, num_experts,
            TOP_K=top_k, E_PAD=e_pad, BLOCK_T=block_t, SIGMOID=score_func == "sigmoid",
            HAS_DWEIGHTS=grads[0] is not None, HAS_DSCORES=grads[1] is not None,
            HAS_DLOGSUMEXP=grads[2] is not None, HAS_DPROBABILITY_SUMS=grads[3] is not None,
            RENORMALIZE=renormalize, EPS=RENORM_EPS,
        )  # fmt: skip
        return dlogits, None, None, None, None


def router_topk(
    logits: torch.Tensor, top_k: int, score_func: str, renormalize: bool, selection_bias: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Differentiable w.r.t. `logits` (fp32 [T,E], contiguous): (weights, expert_ids, scores, logsumexp,
    probability_sums)."""
    return RouterFunction.apply(logits, selection_bias, top_k, score_func, renormalize)
