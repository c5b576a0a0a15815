"""The Gated DeltaNet layer on the Triton kernels against the same layer on the PyTorch reference, and the chunk
layout API the model uses to build the packed-document layout once per batch.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), fp32, small shapes.
"""

import copy
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

from dataclasses import replace  # noqa: E402

from hybridlm import ops  # noqa: E402
from hybridlm.config import GatedDeltaNetConfig  # noqa: E402
from hybridlm.kernels.gated_delta import chunk_gated_delta_rule, prepare_chunk_layout  # noqa: E402
from hybridlm.kernels.tolerances import rel_err  # noqa: E402
from hybridlm.layers.gated_deltanet import GatedDeltaNet  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
# Two fp32 implementations of the same layer: each within ~1e-6 of float64, so their difference is too.
LAYER_REL_TOL = 1e-5


def packed_positions(cu_seqlens, total):
    index = torch.arange(total)
    starts = cu_seqlens[torch.searchsorted(cu_seqlens[1:], index, right=True)]
    return (index - starts)[None]


def test_layer_on_triton_matches_layer_on_torch_forward_and_grads():
    """Varlen with unaligned documents, raw gates, L2 norm, grouped value heads, through the layer's own qkv split
    (strided q/k/v) and a precomputed chunk layout: output and every parameter gradient."""
    cfg = GatedDeltaNetConfig(num_k_heads=1, num_v_heads=2, head_k_dim=16, head_v_dim=16, backend="torch")
    torch.manual_seed(0)
    reference = GatedDeltaNet(32, cfg, 1e-6)
    triton_layer = copy.deepcopy(reference)
    triton_layer.cfg = replace(cfg, backend="triton")
    cu_seqlens = torch.tensor([0, 45, 50, 130], dtype=torch.int32)
    x = torch.randn(1, 130, 32)
    positions = packed_positions(cu_seqlens, 130)

    def run(layer, **kwargs):
        layer.zero_grad()
        y = layer(x.to(DEVICE), cu_seqlens.to(DEVICE), positions.to(DEVICE), **kwargs)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y).to(DEVICE)).sum().backward()
        return y.detach().cpu(), {n: p.grad.detach().cpu() for n, p in layer.named_parameters()}

    y_ref, grads_ref = run(reference)
    layout = ops.prepare_gdn_chunk_layout(cu_seqlens.to(DEVICE), 130, backend="triton")
    y, grads = run(triton_layer.to(DEVICE), chunk_layout=layout)
    assert rel_err(y, y_ref) <= LAYER_REL_TOL
    for name, grad in grads_ref.items():
        assert rel_err(grads[name], grad) <= LAYER_REL_TOL, f"grad of {name}"


def test_prepare_gdn_chunk_layout_only_for_triton():
    cu_seqlens = torch.tensor([0, 10], dtype=torch.int32, device=DEVICE)
    assert ops.prepare_gdn_chunk_layout(cu_seqlens, 10, backend="torch") is None
    assert ops.prepare_gdn_chunk_layout(None, 10, backend="triton") is None
    assert ops.prepare_gdn_chunk_layout(cu_seqlens, 10, backend="triton").num_chunks == 1


def test_chunk_layout_lists_every_chunk_of_every_document():
    lengths = [30, 0, 64, 65, 1, 200]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64, device=DEVICE)
    layout = prepare_chunk_layout(cu_seqlens, sum(lengths))
    expected = [(n, t) for n, length in enumerate(lengths) for t in range(-(-length // 64))]
    assert layout.num_docs == len(lengths) and layout.num_chunks == len(expected)
    assert layout.chunk_indices.tolist() == [list(pair) for pair in expected]
    first_chunks = [sum(-(-n // 64) for n in lengths[:i]) for i in range(len(lengths))]
    assert layout.chunk_offsets.tolist() == first_chunks
    assert layout.cu_seqlens.dtype == torch.int32 and layout.cu_seqlens.tolist() == cu_seqlens.tolist()


@pytest.mark.parametrize("bounds", [[0, 4, 9], [0, 6, 4, 10], [1, 10]])
def test_chunk_layout_rejects_bad_cu_seqlens(bounds):
    with pytest.raises(ValueError, match="rise from 0 to T=10"):
        prepare_chunk_layout(torch.tensor(bounds, dtype=torch.int32, device=DEVICE), 10)


def test_chunk_layout_must_match_the_call():
    q = torch.randn(1, 20, 1, 16, device=DEVICE)
    args = dict(q=q, k=q, v=torch.randn(1, 20, 1, 16, device=DEVICE), g=torch.zeros(1, 20, 1, device=DEVICE),
                beta=torch.ones(1, 20, 1, device=DEVICE))
    cu_seqlens = torch.tensor([0, 5, 20], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="built for T=30"):
        chunk_gated_delta_rule(**args, chunk_layout=prepare_chunk_layout(torch.tensor([0, 30], device=DEVICE), 30))
    with pytest.raises(ValueError, match="same cu_seqlens"):
        chunk_gated_delta_rule(**args, cu_seqlens=cu_seqlens,
                               chunk_layout=prepare_chunk_layout(torch.tensor([0, 20], device=DEVICE), 20))
    # The layout alone stands for cu_seqlens, and gives the same result.
    o, _ = chunk_gated_delta_rule(**args, cu_seqlens=cu_seqlens)
    o_layout, _ = chunk_gated_delta_rule(**args, chunk_layout=prepare_chunk_layout(cu_seqlens, 20))
    assert torch.equal(o, o_layout)


def test_fla_backend_gets_fp32_log_decay_without_dt_bias(monkeypatch):
    """hybridlm.ops with backend="fla" computes g = -exp(A_log) softplus(a) (+ dt_bias when given) in fp32, as fla's
    own layer does (a bf16 g would round every token's decay), and beta = sigmoid(b) in the activations' dtype."""
    import fla.ops.gated_delta_rule as fla_gdn

    seen = {}
    monkeypatch.setattr(fla_gdn, "chunk_gated_delta_rule",
                        lambda q, k, v, g, beta, **kwargs: seen.update(g=g, beta=beta, kwargs=kwargs) or (v, None))
    q = torch.randn(1, 8, 1, 16, dtype=torch.bfloat16)
    a, b = torch.randn(1, 8, 2, dtype=torch.bfloat16), torch.randn(1, 8, 2, dtype=torch.bfloat16)
    A_log = torch.tensor([0.5, 2.0])
    v = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    ops.chunk_gated_delta_rule(q, q, v, a=a, A_log=A_log, dt_bias=None, b=b, backend="fla",
                               use_qk_l2norm_in_kernel=True)
    assert seen["g"].dtype == torch.float32 and seen["beta"].dtype == torch.bfloat16
    torch.testing.assert_close(seen["g"], -A_log.exp() * torch.nn.functional.softplus(a.float()))
    assert seen["kwargs"] == {"use_qk_l2norm_in_kernel": True}


def test_fla_backend_decode_passes_beta_as_beta(monkeypatch):
    """fla's recurrent signature is (q, k, v, g, gk, gv, beta, ...): beta passed fourth by position would be its gk."""
    import fla.ops.gated_delta_rule as fla_gdn

    seen = {}

    def fla_recurrent(q, k, v, g=None, gk=None, gv=None, beta=None, **kwargs):
        seen.update(gk=gk, gv=gv, beta=beta)
        return v, None

    monkeypatch.setattr(fla_gdn, "fused_recurrent_gated_delta_rule", fla_recurrent)
    q, v = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 2, 16)
    g, beta = -torch.rand(1, 1, 2), torch.rand(1, 1, 2)
    ops.fused_recurrent_gated_delta_rule(q, q, v, g=g, beta=beta, backend="fla")
    assert seen["gk"] is None and seen["gv"] is None and torch.equal(seen["beta"], beta)
