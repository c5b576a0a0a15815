"""The float64 oracle of the sparse-MoE tests (tests/helpers/moe_oracle.py), checked against the per-token formula."""

from __future__ import annotations

import torch
from helpers.moe_oracle import moe_loop, random_moe_inputs


def test_oracle_matches_per_token_formula():
    """The oracle itself, checked on a tiny case against the formula written per token and per slot."""
    x, router_weight, gate_up, down = random_moe_inputs(5, 4, 3, 4, dtype=torch.float64, seed=1)
    y, logits, counts, _, expert_ids, weights = moe_loop(x, router_weight, gate_up, down, top_k=2)
    for token in range(5):
        probs = torch.softmax(x[token] @ router_weight.T, dim=-1)
        top = sorted(range(4), key=lambda e: -probs[e].item())[:2]
        assert expert_ids[token].tolist() == top
        expected = torch.zeros(4, dtype=torch.float64)
        for expert in top:
            gate, up = gate_up[expert, :3] @ x[token], gate_up[expert, 3:] @ x[token]
            hidden = gate * torch.sigmoid(gate) * up
            expected += probs[expert] / probs[top].sum() * (down[expert] @ hidden)
        torch.testing.assert_close(y[token], expected, rtol=1e-12, atol=1e-12)
    assert counts.sum().item() == 10
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(5, dtype=torch.float64))
