"""Attention patterns: the FlexAttention block mask equals torch's own, the flex path equals the SDPA path, and packed
batches attend per row (masks of B*T^2, never (B*T)^2). FlexAttention on CPU runs forward only (torch has no CPU
backward for it): eager here, compiled (inductor, fp32) in a slow test; its backward is checked on CUDA only."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.kernels.tolerances import ATTENTION_REL_TOL
from hybridlm.layers import attention
from hybridlm.layers.attention import dense_mask, document_block_mask, visibility_rule
from hybridlm.model import HybridLM
from hybridlm.ops import attention as attention_ops

CPU = torch.device("cpu")


def sorted_segments(batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Document ids that never decrease along a row, as packing gives."""
    ids = torch.randint(0, 6, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    return ids.sort(dim=1).values


def eager_flex(*args, **kwargs):
    with warnings.catch_warnings():  # "called without torch.compile": eager flex is the unfused reference
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(*args, **kwargs)


@pytest.mark.parametrize("seq_len", [64, 70])
@pytest.mark.parametrize("window", [0, 5, 20])
@pytest.mark.parametrize("packed", [False, True])
def test_block_mask_from_block_boundaries_equals_create_block_mask(seq_len, window, packed):
    segments = sorted_segments(3, seq_len, seed=seq_len + window) if packed else None
    ours = document_block_mask(segments, seq_len, window, CPU, block_size=16)
    theirs = create_block_mask(visibility_rule(segments, window), 3 if packed else 1, 1, seq_len, seq_len,
                               device="cpu", BLOCK_SIZE=16)
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    if packed:
        assert ours.sparsity() > theirs.sparsity() - 1e-9 > 0  # blocks across documents are skipped


@pytest.mark.parametrize("window", [0, 7])
def test_flex_with_the_block_mask_equals_sdpa_with_the_dense_mask(window):
    B, T = 2, 70
    segments = sorted_segments(B, T, seed=window)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, 4, T, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(B, 2, T, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(B, 2, T, 8, generator=gen, dtype=torch.float64)
    index = torch.arange(T)
    block_mask = document_block_mask(segments, T, window, CPU, block_size=16)
    flex = eager_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(segments, window, index, index),
                                          enable_gqa=True)
    torch.testing.assert_close(flex, sdpa)


def packed_model(backend: str, window: int = 0, seed: int = 0, dtype: torch.dtype = torch.float64) -> HybridLM:
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=3,
        layer_pattern="GAA",
        mlp_pattern="D",
        intermediate_size=48,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=window, backend=backend),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16),
    )
    torch.manual_seed(seed)
    return HybridLM(cfg).to(dtype).eval()


def packed_batch(lengths: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of documents with these lengths -> (input_ids [B,T], cu_seqlens over the flattened tokens)."""
    bounds = [0]
    for row in lengths:
        for n in row:
            bounds.append(bounds[-1] + n)
    ids = torch.randint(0, 97, (len(lengths), sum(lengths[0])), generator=torch.Generator().manual_seed(2))
    return ids, torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize("window", [0, 6])
def test_flex_model_equals_sdpa_model_on_a_packed_batch(monkeypatch, window):
    monkeypatch.setattr(attention_ops, "compiled_flex_attention", lambda: eager_flex)
    monkeypatch.setattr(attention, "FLEX_BLOCK_SIZE", 16)  # several blocks at T = 48
    ids, cu = packed_batch([[9, 30, 9], [48], [20, 28]])
    with torch.no_grad():
        sdpa = packed_model("sdpa", window)(ids, cu_seqlens=cu).logits
        flex = packed_model("flex", window)(ids, cu_seqlens=cu).logits
    torch.testing.assert_close(flex, sdpa)


@pytest.mark.slow
def test_compiled_flex_model_equals_sdpa_model():
    # The real torch.compile path, on CPU (inductor, which takes fp32 at most; tens of seconds to build).
    ids, cu = packed_batch([[20, 44], [64]])
    with torch.no_grad():
        sdpa = packed_model("sdpa", dtype=torch.float32)(ids, cu_seqlens=cu).logits
        flex = packed_model("flex", dtype=torch.float32)(ids, cu_seqlens=cu).logits
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-5)


def test_packed_attention_runs_per_row_with_one_mask_for_all_layers(sdpa_spy):
    B, T = 8, 32
    ids, cu = packed_batch([[10, 22]] * B)
    with torch.no_grad():
        packed_model("sdpa")(ids, cu_seqlens=cu)
    assert len(sdpa_spy.calls) == 2  # two attention layers
    for call in sdpa_spy.calls:
        assert call["q"] == (B, 4, T, 8) and call["k"] == (B, 2, T, 8)
        assert tuple(call["mask"].shape) == (B, 1, T, T)  # B*T^2 entries, not (B*T)^2
    assert sdpa_spy.calls[0]["mask"] is sdpa_spy.calls[1]["mask"]  # built once per forward


def test_rows_of_one_document_take_the_mask_free_causal_kernel(sdpa_spy):
    ids, cu = packed_batch([[32]] * 4)  # the unpacked loader: cu_seqlens holds just the row starts
    with torch.no_grad():
        packed = packed_model("auto")(ids, cu_seqlens=cu).logits
        plain = packed_model("auto")(ids).logits
    assert all(call["mask"] is None and call["is_causal"] for call in sdpa_spy.calls)
    torch.testing.assert_close(packed, plain)


def test_documents_crossing_rows_are_refused():
    ids = torch.randint(0, 97, (2, 8))
    with pytest.raises(ValueError, match=r"contain every row start \(a multiple of T=8\)"):
        packed_model("sdpa")(ids, cu_seqlens=torch.tensor([0, 5, 12, 16], dtype=torch.int32))


# --- CUDA: the compiled flex kernels, their memory at gpu_1b size, and which SDPA kernels decoding takes ----------


def cuda_qkv(batch: int, q_len: int, k_len: int, dtype=torch.bfloat16, requires_grad: bool = False):
    """Query/key/value at gpu_1b's attention shape: 8 query heads, 2 KV heads, head_dim 128."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((batch, 8, q_len, 128), (batch, 2, k_len, 128), (batch, 2, k_len, 128))
    return [torch.randn(s, device="cuda", dtype=dtype, generator=gen).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 300])
def test_compiled_flex_on_cuda_equals_sdpa_forward_and_backward(window):
    B, T = 2, 1024
    segments = sorted_segments(B, T, seed=3).cuda()
    q, k, v = cuda_qkv(B, T, T, torch.float32, requires_grad=True)
    flex_pattern = attention.sequence_pattern(T, q.device, window=window, backend="flex", segment_ids=segments,
                                              sorted_segments=True)
    assert flex_pattern.block_mask is not None
    sdpa_pattern = attention.sequence_pattern(T, q.device, window=window, backend="sdpa", segment_ids=segments)
    flex, sdpa = attention.attend(q, k, v, flex_pattern), attention.attend(q, k, v, sdpa_pattern)
    tol = ATTENTION_REL_TOL[torch.float32]
    torch.testing.assert_close(flex, sdpa, rtol=tol, atol=tol)
    grad = torch.randn_like(flex)
    for ours, reference in zip(torch.autograd.grad(flex, (q, k, v), grad), torch.autograd.grad(sdpa, (q, k, v), grad)):
        torch.testing.assert_close(ours, reference, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_packed_attention_at_gpu_1b_size_4k_x_8_needs_no_quadratic_memory():
    # Over one flattened row of 32768 tokens, the dense bool mask alone was 1 GiB and the math kernel's scores ~34 GB.
    B, T = 8, 4096
    segments = sorted_segments(B, T, seed=4).cuda()
    q, k, v = cuda_qkv(B, T, T, requires_grad=True)
    pattern = attention.sequence_pattern(T, q.device, window=0, backend="auto", segment_ids=segments,
                                         sorted_segments=True)
    attention.attend(q, k, v, pattern).sum().backward()  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    attention.attend(q, k, v, pattern).backward(torch.ones(B, 8, T, 128, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 2**30, f"attention forward + backward took {extra / 2**20:.0f} MiB beyond its inputs"


@pytest.mark.gpu
def test_decoding_patterns_take_the_fused_sdpa_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.device("cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if a call cannot run on the flash kernel
        attention.attend(*cuda_qkv(2, 16, 16), attention.cached_pattern(0, 16, cuda, window=0))  # prefill
        attention.attend(*cuda_qkv(2, 1, 64), attention.cached_pattern(63, 1, cuda, window=0))  # one new token
        attention.attend(*cuda_qkv(2, 16, 64), attention.cached_pattern(48, 16, cuda, window=0))  # chunked prefill
    key_segments = torch.ones(2, 64, dtype=torch.int64, device=cuda)
    key_segments[0, :5] = 0  # left padding
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # a padded batch's step: masked, GQA folded into the queries
        pattern = attention.cached_pattern(63, 1, cuda, window=0, key_segments=key_segments)
        attention.attend(*cuda_qkv(2, 1, 64), pattern)
