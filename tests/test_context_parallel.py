"""Context parallelism (issue 17) on gloo ranks: each rank holds a contiguous slice of every row, and the sharded
computation equals the whole-row one (the float64 recurrence for the GDN op alone)."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed import run_distributed_test

# Two rows of 120 tokens, over 3 ranks shards of 40: [0, 40), [40, 80), [80, 120) of each row.
ROW = 120
# Row 0: a document [25, 110) spanning all three shards; row 1: a document ending at a shard boundary (40), one
# [45, 120) crossing from shard 1 into shard 2.
CU_SEQLENS = [0, 25, 110, 120, 160, 165, 240]
H, HV, DK, DV = 1, 2, 16, 16  # grouped value heads: two value heads per q/k head


def _gdn_inputs(dtype):
    # Slow decays (exp(A_log) ~ 0.05, ~3% per token): a shard's state still matters two shards later.
    torch.manual_seed(0)
    total = 2 * ROW
    raw = dict(
        q=torch.randn(1, total, H, DK), k=torch.randn(1, total, H, DK), v=torch.randn(1, total, HV, DV),
        a=torch.randn(1, total, HV) * 0.3, b=torch.randn(1, total, HV), A_log=torch.randn(HV) * 0.3 - 3.0,
        dt_bias=torch.randn(HV) * 0.3,
    )  # fmt: skip
    probe = torch.randn(1, total, HV, DV)
    return {key: value.to(dtype) for key, value in raw.items()}, probe.to(dtype)


def _gdn_op_worker(rank: int, world_size: int) -> dict:
    from hybridlm.ops import prepare_gdn_chunk_layout
    from hybridlm.parallel.context import ContextParallelGroup, context_parallel_gated_delta_rule, shard_layout

    cp = ContextParallelGroup(group=None, size=world_size, rank=rank)
    shard = shard_layout(torch.tensor(CU_SEQLENS), 2, ROW, cp)
    local = slice(shard.start, shard.start + shard.local_len)
    results = {}
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        inputs, probe = _gdn_inputs(dtype)
        leaves = {key: value.clone().requires_grad_(True) for key, value in inputs.items()}
        per_token = {key: leaves[key].view(1, 2, ROW, *leaves[key].shape[2:])[:, :, local].reshape(
            1, 2 * shard.local_len, *leaves[key].shape[2:]) for key in ("q", "k", "v", "a", "b")}  # fmt: skip
        chunk_layout = prepare_gdn_chunk_layout(shard.cu_seqlens, 2 * shard.local_len, backend=backend)
        o = context_parallel_gated_delta_rule(
            per_token["q"], per_token["k"], per_token["v"], shard, a=per_token["a"], b=per_token["b"],
            A_log=leaves["A_log"], dt_bias=leaves["dt_bias"], use_qk_l2norm_in_kernel=True, backend=backend,
            chunk_layout=chunk_layout,
        )  # fmt: skip
        local_probe = probe.view(1, 2, ROW, HV, DV)[:, :, local].reshape(o.shape)
        (o * local_probe).sum().backward()
        grads = {key: leaf.grad for key, leaf in leaves.items()}
        for grad in grads.values():  # each rank's gradients of the whole-row loss's share it computed
            torch.distributed.all_reduce(grad)
        results[backend] = dict(o=o.detach(), grads=grads, start=shard.start, local_len=shard.local_len)
    return results


@pytest.fixture(scope="module")
def gdn_op_results():
    return run_distributed_test(_gdn_op_worker, 3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_state_passing_gdn_op_matches_the_float64_recurrence_on_the_whole_rows(gdn_op_results, backend):
    from hybridlm.kernels.gated_delta import naive_recurrent_gated_delta_rule

    inputs, probe = _gdn_inputs(torch.float64)
    leaves = {key: value.clone().requires_grad_(True) for key, value in inputs.items()}
    o, _ = naive_recurrent_gated_delta_rule(
        leaves["q"], leaves["k"], leaves["v"], a=leaves["a"], b=leaves["b"], A_log=leaves["A_log"],
        dt_bias=leaves["dt_bias"], use_qk_l2norm_in_kernel=True, cu_seqlens=torch.tensor(CU_SEQLENS),
    )  # fmt: skip
    (o * probe).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10) if backend == "torch" else dict(rtol=2e-5, atol=2e-5)
    rows = o.detach().view(2, ROW, HV, DV)
    assert len(gdn_op_results) == 3
    for result in gdn_op_results:
        got = result[backend]
        local = slice(got["start"], got["start"] + got["local_len"])
        torch.testing.assert_close(got["o"].double().view(2, -1, HV, DV), rows[:, local], **tol)
        for key, leaf in leaves.items():
            torch.testing.assert_close(got["grads"][key].double(), leaf.grad, **tol, msg=key)


# --- the whole model: CP = 2 and CP = 4 against CP = 1 on the same rows ---------------------------------------------

SEQ = 128  # CP = 4: shards of 32 tokens, boundaries at 32, 64, 96 of each row
# Row 0: a document [10, 100) over all four shards of CP = 4 (three of CP = 2); row 1: a document ending at a shard
# boundary, a one-token document, then one crossing the rest.
MODEL_CU_SEQLENS = [0, 10, 100, 128, 160, 161, 256]


def _cp_model():
    from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, MoEConfig, ModelConfig
    from hybridlm.model import HybridLM

    cfg = ModelConfig(
        vocab_size=97, hidden_size=32, initializer_range=0.1, num_layers=4, layer_pattern="GGGA", mlp_pattern="MMMD",
        intermediate_size=48,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8, backend="torch"),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, backend="sdpa"),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, aux_loss_coef=0.01, z_loss_coef=0.001,
                      backend="torch"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = HybridLM(cfg).train()
    for name, param in model.named_parameters():
        if name.endswith("A_log"):  # slow decays (~2% per token): state from two shards back still counts
            param.data.copy_(0.3 * torch.randn_like(param) - 3.0)
        elif name.endswith("dt_bias") or "norm" in name:  # beyond the init: every parameter's gradient visible
            param.data.add_(0.3 * torch.randn_like(param))
    return model


def _model_batch():
    torch.manual_seed(1)
    input_ids = torch.randint(0, 97, (2, SEQ))
    labels = torch.randint(0, 97, (2, SEQ))
    labels[0, 99] = labels[1, 0] = -100  # no target at a document's last token, as packing leaves them
    return input_ids, labels, torch.tensor(MODEL_CU_SEQLENS)


def _model_run(model, **inputs) -> dict:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_logits=True)
    out.loss.backward()
    return dict(logits=out.logits.detach(), loss=out.loss.detach(), ce=out.ce_loss.detach(),
                aux=out.aux_loss.detach(), grads={n: p.grad.clone() for n, p in model.named_parameters()})


def _model_worker(rank: int, world_size: int) -> dict:
    from hybridlm.parallel.context import ContextParallelGroup, shard_batch, sum_over_shards

    torch.set_default_dtype(torch.float32)
    model = _cp_model()
    input_ids, labels, cu_seqlens = _model_batch()
    results = {"cp1": _model_run(model, input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens),
               "cp1_rows": _model_run(model, input_ids=input_ids, labels=labels)}
    pairs = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]  # every rank creates both
    # Packed documents; and one document per row (no cu_seqlens: the mask-free causal attention path).
    for name, size, group, documents in (("cp2", 2, pairs[rank // 2], cu_seqlens), ("cp4", 4, None, cu_seqlens),
                                         ("cp4_rows", 4, None, None)):  # fmt: skip
        cp = ContextParallelGroup(group=group, size=size, rank=rank % size)
        inputs = shard_batch(dict(input_ids=input_ids, labels=labels, cu_seqlens=documents), cp)
        run = _model_run(model, **inputs)
        shard = inputs["context"]
        for key in ("loss", "ce", "aux"):
            run[key] = sum_over_shards(run[key], shard)
        for grad in run["grads"].values():
            torch.distributed.all_reduce(grad, group=group)
        run["window"] = (shard.start, shard.start + shard.local_len)
        results[name] = run
    results["saved"] = _saved_bytes(model, pairs[rank // 2], rank)
    return results


def _saved_bytes(model, pair_group, rank: int) -> dict:
    """Bytes one rank's GDN (on our Triton kernels, the GPU path), MoE and dense MLP layers save for backward, for
    CP = 1, 2, 4 on the same rows."""
    from hybridlm.evaluate.memory import saved_for_backward
    from hybridlm.parallel.context import ContextParallelGroup, context_layout, shard_layout

    model.config.gdn.backend = "triton"
    _, _, cu_seqlens = _model_batch()
    x = torch.randn(2, SEQ, model.config.hidden_size)
    gdn, moe, dense = model.layers[0].linear_attn, model.layers[0].mlp, model.layers[3].mlp
    params = list(model.parameters())
    full = model._layout(torch.zeros(2, SEQ, dtype=torch.long), None, cu_seqlens, None, None)

    def measure(fn):
        return sum(saved_for_backward(fn, params)[1].values())

    flat = x.reshape(1, 2 * SEQ, -1)
    saved = {1: dict(gdn=measure(lambda: gdn(flat.clone().requires_grad_(), full.cu_seqlens, full.position_in_doc,
                                             chunk_layout=full.gdn_chunk_layout)),
                     moe=measure(lambda: moe(x.clone().requires_grad_())),
                     dense=measure(lambda: dense(x.clone().requires_grad_())))}  # fmt: skip
    for size, group in ((2, pair_group), (4, None)):
        shard = shard_layout(cu_seqlens, 2, SEQ, ContextParallelGroup(group=group, size=size, rank=rank % size))
        layout, local = context_layout(shard, model.config), shard.local(x)
        saved[size] = dict(
            gdn=measure(lambda: gdn(local.clone().requires_grad_(), chunk_layout=layout.gdn_chunk_layout,
                                    context=shard)),
            moe=measure(lambda: moe(local.clone().requires_grad_())),
            dense=measure(lambda: dense(local.clone().requires_grad_())),
        )  # fmt: skip
    return saved


@pytest.fixture(scope="module")
def model_results():
    return run_distributed_test(_model_worker, 4)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


@pytest.mark.parametrize("size, documents", [(2, ""), (4, ""), (4, "_rows")])
def test_context_parallel_model_matches_the_whole_rows(model_results, size, documents):
    for rank, result in enumerate(model_results):
        want, got = result[f"cp1{documents}"], result[f"cp{size}{documents}"]
        start, end = got["window"]
        assert end - start == SEQ // size and start == (rank % size) * (SEQ // size)
        assert _relative_error(got["logits"], want["logits"][:, start:end]) <= 1e-5
        for key in ("loss", "ce", "aux"):
            assert _relative_error(got[key], want[key]) <= 1e-5, key
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            assert grad.norm() > 0, name  # every parameter takes part
            assert _relative_error(got["grads"][name], grad) <= 1e-5, name


# --- training through train.py: CP 2 x DP 2 on 4 gloo ranks against DP 2 ------------------------------------------

TRAIN_STEPS = 10


def _train_overrides(cache, cp: int) -> list[str]:
    from helpers.launch import tiny_run

    # 128-token rows of packed stdlib documents, which cross the shard boundary at 64.
    return tiny_run(cache) + [
        f"trainer.max_steps={TRAIN_STEPS}", "trainer.seq_len=128", f"parallel.context_parallel_size={cp}",
        "trainer.kernel_check=false", "model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001",
        "model.activation_checkpointing=true",  # the recompute in backward repeats the shards' exchanges
    ]  # fmt: skip


def test_context_and_data_parallel_training_matches_data_parallel_resumes_and_exports(tmp_path, data_cache):
    from helpers.launch import read_metrics, train

    from hybridlm.checkpoint.reader import read_checkpoint
    from hybridlm.model import HybridLM

    dp_dir, cp_dir = tmp_path / "dp2", tmp_path / "cp2_dp2"
    train(dp_dir, _train_overrides(data_cache, 1), nproc=2)
    # CP 2 x DP 2 stops half-way, then resumes from its checkpoint like any run.
    train(cp_dir, _train_overrides(data_cache, 2) + [f"trainer.stop_at_step={TRAIN_STEPS // 2}"], nproc=4)
    train(cp_dir, _train_overrides(data_cache, 2), nproc=4)
    dp, cp = read_metrics(dp_dir), read_metrics(cp_dir)
    assert sorted(cp) == list(range(1, TRAIN_STEPS + 1))
    for step in cp:
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert cp[step][key] == pytest.approx(dp[step][key], rel=1e-5), (step, key)
    # Each token counted once: the same tokens per step, on twice the ranks.
    assert cp[TRAIN_STEPS]["tokens_seen"] == dp[TRAIN_STEPS]["tokens_seen"] == TRAIN_STEPS * 2 * 2 * 128
    # The checkpoint reads back (export's and init_from's reader) as the whole model, with DP 2's weights.
    sharded, plain = read_checkpoint(cp_dir), read_checkpoint(dp_dir)
    assert sharded.state_dict.keys() == plain.state_dict.keys()
    for name, tensor in plain.state_dict.items():
        torch.testing.assert_close(sharded.state_dict[name].float(), tensor.float(), rtol=1e-4, atol=1e-5, msg=name)
    HybridLM(sharded.config).load_state_dict(sharded.state_dict, strict=True)


def test_saved_for_backward_bytes_per_rank_fall_as_one_over_cp(model_results):
    for result in model_results:
        saved = result["saved"]
        for size in (2, 4):
            for kind in ("moe", "dense"):  # per token: the shard's share (MoE: a few routing bytes more)
                assert saved[size][kind] == pytest.approx(saved[1][kind] / size, rel=0.01), (size, kind)
            # Per token as CP = 1 plus the carry: K value channels more in the chunked call, and the carry read-out
            # q^T P kept for the state's gradient (state passing's price), plus the shard's few K x (V + K) states.
            assert saved[size]["gdn"] <= 1.4 * saved[1]["gdn"] / size, size
        assert saved[4]["gdn"] <= 0.6 * saved[2]["gdn"]
