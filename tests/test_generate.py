"""Cached decoding: the cache gives the logits of a full forward pass, greedy cached == uncached, and left-padded
batches give each prompt's own continuation."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.generate import generate, left_pad, positions_from_mask
from hybridlm.model import HybridLM

# fp32 on CPU; the cached path runs the recurrent form of the delta rule, the full pass the chunked form.
TOLERANCE = 1e-4


def make_model(seed: int = 0, **overrides) -> HybridLM:
    values = dict(
        vocab_size=101,
        hidden_size=32,
        num_layers=4,
        layer_pattern="GGAG",
        mlp_pattern="MD",
        intermediate_size=48,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, partial_rotary_factor=0.5),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, shared_expert_intermediate_size=16),
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return HybridLM(ModelConfig(**values)).eval()


PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [11, 2, 60], [9]]


@torch.no_grad()
def test_cache_gives_the_full_forward_logits_step_by_step():
    model = make_model()
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    full = model(tokens).logits
    cache = model.new_cache()
    prefix = model(tokens[:, :5], cache=cache).logits
    steps = [model(tokens[:, t : t + 1], cache=cache).logits for t in range(5, 9)]
    assert (prefix - full[:, :5]).abs().max() <= TOLERANCE
    assert (torch.cat(steps, dim=1) - full[:, 5:]).abs().max() <= TOLERANCE
    assert cache.seen_tokens == 9
    assert {"conv", "recurrent"} <= cache.layers[0].keys() and {"k", "v"} <= cache.layers[2].keys()


@pytest.mark.parametrize("overrides", [{}, {"attention": AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=8,
                                                                           sliding_window=4)}])
def test_greedy_cached_equals_uncached_on_a_padded_batch(overrides):
    model = make_model(**overrides)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    cached = generate(model, ids, mask, max_new_tokens=8, use_cache=True)
    uncached = generate(model, ids, mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : ids.shape[1]], ids)


def test_each_padded_prompt_continues_as_if_alone():
    model = make_model(seed=3)
    ids, mask = left_pad(PROMPTS, pad_id=1)
    batched = generate(model, ids, mask, max_new_tokens=8)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=8)
        assert torch.equal(batched[row, -8:], alone[0, -8:]), f"prompt {row} changed by batching"


@torch.no_grad()
def test_padding_does_not_change_the_prompt_logits():
    model = make_model(seed=4)
    ids, mask = left_pad(PROMPTS, pad_id=7)
    padded = model(ids, position_ids=positions_from_mask(mask), attention_mask=mask).logits
    for row, prompt in enumerate(PROMPTS):
        alone = model(torch.tensor([prompt])).logits[0]
        assert (padded[row, -len(prompt) :] - alone).abs().max() <= TOLERANCE


def test_eos_stops_a_row_and_sampling_is_seeded():
    model = make_model(seed=5)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    greedy = generate(model, ids, mask, max_new_tokens=6)
    eos = int(greedy[0, ids.shape[1]])  # row 0's first new token
    stopped = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos)
    assert (stopped[0, ids.shape[1] :] == eos).all()
    draws = [generate(model, ids, mask, max_new_tokens=6, temperature=1.0, top_k=5,
                      generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: generate(m, torch.tensor([[1, 2]]), torch.tensor([[1, 0]])), "left-padded"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=-1), "max_new_tokens=-1"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), temperature=-0.5), "temperature=-0.5"),
        (lambda m: left_pad([[1], []], 0), "empty prompt"),
        (lambda m: m(torch.tensor([[1, 2]]), cu_seqlens=torch.tensor([0, 2]), attention_mask=torch.ones(1, 2)),
         "not both"),
    ],
)
def test_bad_generation_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_model())


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@torch.no_grad()
def test_chunked_prefill_gives_the_full_forward_logits(window, padded):
    model = make_model(seed=6, attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8,
                                                         sliding_window=window))
    if padded:
        ids, mask = left_pad([[4, 8, 15, 16, 23, 42, 7, 9, 10, 11], [5, 6, 7, 8, 9]], pad_id=0)
    else:
        ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(7))
        mask = torch.ones_like(ids)
    positions = positions_from_mask(mask)
    full = model(ids, position_ids=positions, attention_mask=mask).logits
    cache = model.new_cache()
    chunks = [(0, 4), (4, 7), (7, 8), (8, 10)]  # past > 0 with several new tokens, and single tokens
    steps = [model(ids[:, a:b], position_ids=positions[:, a:b], cache=cache, attention_mask=mask[:, a:b]).logits
             for a, b in chunks]
    real = mask.bool()
    assert (torch.cat(steps, dim=1) - full)[real].abs().max() <= TOLERANCE


def test_unpadded_decoding_needs_no_mask(sdpa_spy):
    model = make_model()
    generate(model, torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]), max_new_tokens=3)
    (prefill_q, prefill_mask, prefill_causal), *steps = [(c["q"], c["mask"], c["is_causal"]) for c in sdpa_spy.calls]
    assert prefill_q[2] == 5 and prefill_mask is None and prefill_causal
    assert len(steps) == 2 and all(q[2] == 1 and mask is None and not causal for q, mask, causal in steps)


def test_key_value_buffers_grow_geometrically_or_not_at_all():
    model = make_model()
    prompt = torch.tensor([[1, 2, 3]])
    for max_length, allocations in ((0, 3), (3 + 20, 1)):  # without a length hint: 3 -> 6 -> 12 -> 24 keys
        cache = model.new_cache(max_length=max_length)
        buffers = set()
        with torch.no_grad():
            model(prompt, cache=cache)
            for step in range(20):
                model(torch.tensor([[step]]), cache=cache)
                buffers.add(cache.layers[2]["k"].data_ptr())
        assert len(buffers) == allocations
        assert cache.layers[2]["k"].shape[2] >= 23


@torch.no_grad()
def test_dropping_cache_rows_leaves_the_others_decoding_as_before():
    model = make_model(seed=8)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    positions = positions_from_mask(mask)
    cache = model.new_cache()
    model(ids, position_ids=positions, cache=cache, attention_mask=mask)
    cache.select_rows(torch.tensor([0, 2]))
    step = model(torch.tensor([[5], [6]]), position_ids=positions[[0, 2], -1:] + 1, cache=cache).logits
    for row, (prompt, token) in enumerate(zip((PROMPTS[0], PROMPTS[2]), (5, 6))):
        alone = model(torch.tensor([prompt + [token]])).logits[0, -1]
        assert (step[row, -1] - alone).abs().max() <= TOLERANCE


KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                 reason="Triton on CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_generation_on_the_triton_kernels_matches_the_reference(device, monkeypatch):
    """The Triton chunked kernel (prefill, uncached steps), its recurrent decode kernel (cached steps) and the Triton
    MoE path, fp32: left-padded greedy decoding, cached or not, gives the tokens of the PyTorch reference model, and
    each prompt's own continuation. On CPU through Triton's interpreter; head dims of 16 so that tl.dot can tile them
    on a GPU."""
    import hybridlm.kernels.gated_delta as gated_delta_kernels
    import hybridlm.kernels.moe as moe_kernels

    calls = {}
    for module, name in ((gated_delta_kernels, "chunk_gated_delta_rule"),
                         (gated_delta_kernels, "fused_recurrent_gated_delta_rule"), (moe_kernels, "sparse_moe")):
        def counted(*args, _kernel=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)
        calls[name] = 0
        monkeypatch.setattr(module, name, counted)

    sizes = dict(hidden_size=64, gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16),
                 attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, partial_rotary_factor=0.5))
    reference = make_model(seed=10, **sizes)
    on_kernels = make_model(seed=10, **{**sizes, "gdn": replace(sizes["gdn"], backend="triton")},
                            moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16,
                                          shared_expert_intermediate_size=16, backend="triton")).to(device)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    new_tokens = 4
    expected = generate(reference, ids, mask, max_new_tokens=new_tokens)
    assert not any(calls.values())
    cached = generate(on_kernels, ids.to(device), mask.to(device), max_new_tokens=new_tokens, use_cache=True).cpu()
    assert all(calls.values()), calls  # the prefill's chunked kernel, the steps' recurrent one, the MoE kernels
    uncached = generate(on_kernels, ids.to(device), mask.to(device), max_new_tokens=new_tokens, use_cache=False).cpu()
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(on_kernels, torch.tensor([prompt], device=device), max_new_tokens=new_tokens).cpu()
        assert torch.equal(alone[0, -new_tokens:], expected[row, -new_tokens:]), f"prompt {row} changed by batching"
