"""The model definition on CPU: config validation, causality per layer type, packed documents, losses, init."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybridlm.config import AttentionConfig, ConfigError, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.model import HybridLM



@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def small_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        layer_pattern="GA",
        mlp_pattern="MD",
        intermediate_size=48,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, partial_rotary_factor=0.5),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, shared_expert_intermediate_size=16),
    )
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(cfg).eval()


# --- configuration errors name the key and the fix ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: small_config(layer_pattern="GXA"), r"layer_pattern='GXA' has unknown symbol\(s\) \['X'\]"),
        (lambda: small_config(layer_pattern="GGA"), "does not tile num_layers=2"),
        (lambda: small_config(mlp_pattern="Q"), "mlp_pattern='Q' has unknown"),
        (lambda: GatedDeltaNetConfig(num_k_heads=3, num_v_heads=4), "num_v_heads=4 is not a multiple"),
        (lambda: AttentionConfig(num_heads=6, num_kv_heads=4), "num_heads=6 is not a multiple"),
        (lambda: AttentionConfig(head_dim=8, partial_rotary_factor=0.1), "RoPE needs an even"),
        (lambda: MoEConfig(num_experts=4, top_k=5), r"top_k=5 > model.moe.num_experts=4; choose top_k <= 4"),
        (lambda: MoEConfig(score_func="relu"), "score_func='relu'"),
        (lambda: small_config(hidden_size=0), "model.hidden_size=0 must be > 0"),
        (lambda: GatedDeltaNetConfig(backend="cuda"), "model.gdn.backend='cuda'"),
        (lambda: AttentionConfig(backend="flash"), "model.attention.backend='flash'; choose one of"),
    ],
)
def test_config_errors_name_the_key(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_patterns_tile_and_explicit_lists():
    cfg = small_config(num_layers=8, layer_pattern="GGGA", mlp_pattern="DMMMMMMM")
    assert cfg.layer_types == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + ["attention"]
    assert cfg.mlp_types[0] == "dense" and cfg.mlp_types[1:] == ["moe"] * 7


def test_parameter_count_formula_matches_the_module():
    for cfg in (small_config(), small_config(tie_embeddings=True, mlp_pattern="M", attention=AttentionConfig(
            num_heads=2, num_kv_heads=1, head_dim=8, output_gate=False, qk_norm=False)),
                small_config(attention=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=8, bias=True))):
        model = build(cfg)
        counts = cfg.parameter_counts()
        assert counts["total"] == model.num_parameters()
        moe = cfg.moe
        inactive_experts = (moe.num_experts - moe.top_k) * 3 * cfg.hidden_size * moe.intermediate_size
        assert counts["total"] - counts["active"] == inactive_experts * cfg.mlp_types.count("moe")
        experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        assert counts["routed_experts"] == experts


# --- causality: changing future tokens leaves past logits unchanged ------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(layer_pattern="GG", mlp_pattern="D"),
        dict(layer_pattern="AA", mlp_pattern="D"),
        dict(layer_pattern="AA", mlp_pattern="D", attention=AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=8,
                                                                            sliding_window=5)),
        dict(layer_pattern="GA", mlp_pattern="M"),
        dict(layer_pattern="GA", mlp_pattern="M", moe=MoEConfig(num_experts=4, top_k=1, intermediate_size=16,
                                                                score_func="sigmoid", selection_bias=True)),
    ],
    ids=["gdn", "attention", "sliding-window", "hybrid-moe", "sigmoid-bias-moe"],
)
def test_causality(overrides):
    model = build(small_config(**overrides))
    x = torch.randint(0, 97, (2, 70))
    cut = 41
    y = x.clone()
    y[:, cut:] = torch.randint(0, 97, (2, 70 - cut))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-10)
    assert not torch.allclose(a[:, cut:], b[:, cut:])


# --- packed documents never see each other -------------------------------------------------------------------------


def test_packed_batch_equals_documents_run_separately():
    model = build(small_config(num_layers=4, layer_pattern="GA", mlp_pattern="MD"))
    lengths = [[9, 30, 1, 24], [64]]  # two rows of 64 tokens: four documents, then one
    docs = [[torch.randint(0, 97, (n,)) for n in row] for row in lengths]
    input_ids = torch.stack([torch.cat(row) for row in docs])
    bounds = [0]
    for row in lengths:
        for n in row:
            bounds.append(bounds[-1] + n)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids, cu_seqlens=cu_seqlens).logits.reshape(-1, 97)
        separate = torch.cat([model(doc[None]).logits[0] for row in docs for doc in row])
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-9)


def test_triton_gdn_gets_one_chunk_layout_per_forward_and_matches_the_reference(monkeypatch):
    from hybridlm import ops

    built, used = [], []
    prepare, chunk_rule = ops.prepare_gdn_chunk_layout, ops.chunk_gated_delta_rule
    monkeypatch.setattr(ops, "prepare_gdn_chunk_layout", lambda *a, **k: built.append(prepare(*a, **k)) or built[-1])
    monkeypatch.setattr(ops, "chunk_gated_delta_rule",
                        lambda *a, **k: used.append(k["chunk_layout"]) or chunk_rule(*a, **k))
    ids = torch.randint(0, 97, (2, 32))
    cu = torch.tensor([0, 10, 32, 50, 64], dtype=torch.int32)
    logits = {}
    for backend in ("torch", "triton"):  # triton: the interpreter on CPU (fp32)
        gdn = GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16, backend=backend)
        model = build(small_config(layer_pattern="GG", mlp_pattern="D", gdn=gdn)).float()
        with torch.no_grad():
            logits[backend] = model(ids, cu_seqlens=cu).logits
    assert len(built) == 2 and built[0] is None and built[1] is not None  # once per forward (none for torch)
    assert used == [None, None, built[1], built[1]]  # and shared by both GDN layers
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-5)


def test_position_ids_default_to_document_positions_when_packed():
    model = build(small_config(layer_pattern="AA", mlp_pattern="D"))
    ids = torch.randint(0, 97, (1, 20))
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cu_seqlens=cu).logits, model(ids, position_ids=pos, cu_seqlens=cu).logits)


# --- losses, optimizer groups, balancing ---------------------------------------------------------------------------


def test_loss_is_mean_cross_entropy_plus_router_terms():
    cfg = small_config()
    model = build(cfg)
    x = torch.randint(0, 97, (2, 16))
    labels = torch.randint(0, 97, (2, 16))
    labels[0, :5] = -100
    out = model(x, labels=labels, return_logits=True)
    mask = labels != -100
    expected_ce = torch.nn.functional.cross_entropy(out.logits[mask], labels[mask]).to(out.ce_loss.dtype)
    torch.testing.assert_close(out.ce_loss, expected_ce, rtol=1e-6, atol=1e-7)  # the logits are fp32, the loss fp64
    torch.testing.assert_close(out.loss, expected_ce + cfg.moe.aux_loss_coef * out.aux_loss
                               + cfg.moe.z_loss_coef * out.z_loss)
    (counts,) = out.expert_counts
    assert counts.sum().item() == 2 * 16 * cfg.moe.top_k
    out.loss.backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_chunked_loss_equals_cross_entropy_of_the_logits_with_the_same_gradients(monkeypatch, tie_embeddings):
    import hybridlm.loss

    monkeypatch.setattr(hybridlm.loss, "LOSS_CHUNK_LOGITS", 97 * 5)  # 5 tokens per chunk: 33 = 6 chunks + 3
    model = build(small_config(tie_embeddings=tie_embeddings))
    x = torch.randint(0, 97, (3, 11))
    labels = torch.randint(0, 97, (3, 11))
    labels[1, 3:7] = -100

    def grads(loss):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, materialize_grads=True)])

    out = model(x, labels=labels)
    assert out.logits is None  # the loss alone never builds [B,T,V] logits
    logits = model(x).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, expected.to(out.ce_loss.dtype), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads(out.ce_loss), grads(expected).to(torch.float64), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(x, labels=labels).ce_loss, out.ce_loss.detach())


def test_logits_to_keep_gives_the_last_positions():
    model = build(small_config())
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits_to_keep=2).logits, model(x).logits[:, -2:])


def test_balanced_router_gives_aux_loss_top_k():
    # transformers' load_balancing_loss_func form: uniform probabilities and counts give E * sum_e (k/E) (1/E) = k.
    from hybridlm.layers.moe import load_balancing_loss

    num_tokens, num_experts, top_k = 8, 4, 2
    probability_sums = torch.full((num_experts,), num_tokens / num_experts)
    counts = torch.full((num_experts,), num_tokens * top_k // num_experts)
    torch.testing.assert_close(load_balancing_loss(probability_sums, num_tokens, counts, top_k), torch.tensor(2.0))


def test_no_weight_decay_on_norms_biases_and_decay_parameters():
    model = build(small_config(attention=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=8, bias=True)))
    decay, no_decay = model.param_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("A_log") for n in no_decay_names) and any(n.endswith("dt_bias") for n in no_decay_names)
    assert any("layernorm" in n for n in no_decay_names) and any(n.endswith("q_proj.bias") for n in no_decay_names)
    decay_names = {names[id(p)] for p in decay["params"]}
    assert all(p.dim() >= 2 for p in decay["params"]) and not any("A_log" in n for n in decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gdn_decay_initialisation_ranges():
    cfg = small_config()
    gdn = build(cfg).layers[0].linear_attn
    A = gdn.A_log.exp()
    assert (A >= cfg.gdn.a_init_min).all() and (A <= cfg.gdn.a_init_max).all()
    dt = torch.nn.functional.softplus(gdn.dt_bias)
    assert (dt >= cfg.gdn.dt_init_min * 0.999).all() and (dt <= cfg.gdn.dt_init_max * 1.001).all()


def test_selection_bias_moves_choice_towards_underloaded_experts():
    cfg = small_config(layer_pattern="G", num_layers=1, mlp_pattern="M",
                       moe=MoEConfig(num_experts=4, top_k=1, intermediate_size=8, score_func="sigmoid",
                                     selection_bias=True, bias_update_rate=0.05))
    model = build(cfg).train()
    moe = model.layers[0].mlp
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.3)
        moe.gate.weight[0] += 2.0  # expert 0 is favoured for most tokens
    x = torch.randint(0, 97, (4, 32))
    before = model(x).expert_counts[0]
    loads = []
    for _ in range(60):
        loads.append(model(x).expert_counts[0].max().item())
        model.after_optimizer_step()
    assert before.max() > 1.5 * before.float().mean()
    assert max(loads[-10:]) < before.max() and sum(loads[-10:]) / 10 < 1.3 * before.float().mean()
    assert moe.expert_bias.abs().sum() > 0 and moe.expert_bias.dtype == torch.float32


def step_scope_config(**overrides) -> ModelConfig:
    return small_config(moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, aux_loss_scope="step"), **overrides)


def test_step_scope_balances_the_counts_of_the_whole_optimizer_step():
    """aux_loss_scope=step: a micro-batch's routed fractions include the step's earlier micro-batches (P stays its
    own); after_optimizer_step starts the next step; in eval the loss is the micro-batch's alone."""
    from hybridlm.layers.moe import load_balancing_loss

    model = build(step_scope_config()).train()
    moe = model.layers[0].mlp
    with torch.no_grad():
        moe.gate.weight.normal_(std=1.0)  # far from uniform, so that which counts are balanced shows in the loss
    captured = []
    moe.register_forward_hook(lambda module, args, output: captured.append(output[1]))
    first, second = (torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    model(first, labels=first)
    out = model(second, labels=second)
    counts_1, counts_2 = captured[0].expert_counts, captured[1].expert_counts
    assert not torch.equal(counts_1, counts_2)
    assert torch.equal(moe.counts_since_step, counts_1 + counts_2)
    assert out.expert_counts[0] is counts_2  # what the metrics see stays per micro-batch

    # P of the second micro-batch, from its router logits; f from both micro-batches' counts.
    def balance_probabilities(tokens):
        inputs = []
        handle = moe.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        with torch.no_grad():
            model(tokens)
        handle.remove()
        return (inputs[0].reshape(-1, 32) @ moe.gate.weight.T).softmax(-1).sum(0)

    model.eval()
    probability_sums = balance_probabilities(second)
    pooled = load_balancing_loss(probability_sums, second.numel(), counts_1 + counts_2, top_k=2)
    alone = load_balancing_loss(probability_sums, second.numel(), counts_2, top_k=2)
    torch.testing.assert_close(captured[1].aux_loss.detach(), pooled.to(captured[1].aux_loss.dtype))
    assert not torch.isclose(pooled, alone)
    assert torch.equal(moe.counts_since_step, counts_1 + counts_2)  # eval forwards leave the step's counts alone
    torch.testing.assert_close(captured[-1].aux_loss, alone.to(captured[-1].aux_loss.dtype))  # eval: its own

    model.train()
    model.after_optimizer_step()
    assert not moe.counts_since_step.any()
    model(second, labels=second)
    torch.testing.assert_close(captured[-1].aux_loss.detach(), alone.to(captured[-1].aux_loss.dtype))


def test_step_scope_gradients_are_the_same_with_activation_checkpointing():
    """The checkpointed block is recomputed after the model has counted its micro-batch: the recomputation must see
    the counts from before it, as the first forward did."""
    x, y = (torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(s)) for s in (3, 4))
    grads = []
    for ckpt in (False, True):
        model = build(step_scope_config(activation_checkpointing=ckpt)).train()
        model(x, labels=x)  # the step's first micro-batch, no backward needed
        model(y, labels=y).aux_loss.backward()
        grads.append(model.layers[0].mlp.gate.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = small_config()
    x = torch.randint(0, 97, (2, 24))
    grads = []
    for ckpt in (False, True):
        model = build(dataclasses.replace(cfg, activation_checkpointing=ckpt)).train()
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
