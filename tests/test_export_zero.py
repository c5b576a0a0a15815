"""Export from real DeepSpeed checkpoints (CPU, gloo ranks through train.py): the fp32 master weights of bf16 runs,
ZeRO-3 shards of two ranks consolidated, and the refusal of damaged ZeRO shards."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.launch import tiny_run, train

from hybridlm.checkpoint import CheckpointError
from hybridlm.checkpoint.init_from import load_pretrained_into
from hybridlm.checkpoint.layout import complete_checkpoints
from hybridlm.checkpoint.reader import read_checkpoint
from hybridlm.export import export_checkpoint
from hybridlm.model import HybridLM

pytestmark = pytest.mark.slow  # each DeepSpeed run takes 20-40 s on 2 cores


def one_step(data_cache, *overrides: str) -> list[str]:
    return [*tiny_run(data_cache), "trainer.max_steps=1", "optim.warmup_steps=0", *overrides]


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_bf16_run_exports_its_fp32_masters_not_the_rounded_weights(data_cache, tmp_path, zero_stage):
    """DeepSpeed's bf16 optimizers keep fp32 masters apart from the bf16 module: at ZeRO 0 in the model states'
    optimizer.fp32_groups, at ZeRO 1 (its BF16_Optimizer) in bf16_zero_pp_rank_* shards. --dtype fp32 must give
    the masters, and model.init_from too."""
    run_dir = tmp_path / "run"
    train(run_dir, one_step(data_cache, f"deepspeed=zero{zero_stage}", "deepspeed.precision=bf16"))
    engine = complete_checkpoints(run_dir)[-1] / "engine"
    states = torch.load(engine / "mp_rank_00_model_states.pt", weights_only=False)
    module = states["module"]
    assert all(t.dtype == torch.bfloat16 for t in module.values() if t.is_floating_point())

    exported = read_checkpoint(export_checkpoint(run_dir, tmp_path / "out", dtype="fp32")).state_dict
    params = [name for name, _ in HybridLM(read_checkpoint(run_dir).config).named_parameters()]
    assert all(exported[name].dtype == torch.float32 for name in params)
    # Each master rounds to its bf16 module weight, but holds bits the module lost in a step of fp32 updates.
    assert all(torch.equal(exported[name].bfloat16(), module[name]) for name in params)
    kept_bits = [name for name in params if not torch.equal(exported[name], module[name].float())]
    assert len(kept_bits) >= 0.9 * len(params), sorted(set(params) - set(kept_bits))
    if zero_stage == 0:  # the masters are the optimizer's own tensors, whatever their order
        masters = [t for group in states["optimizer"]["fp32_groups"] for t in group]
        assert all(any(m.shape == exported[n].shape and torch.equal(m, exported[n]) for m in masters) for n in params)

    model = HybridLM(read_checkpoint(run_dir).config)
    load_pretrained_into(model, run_dir)
    assert all(torch.equal(model.state_dict()[name], exported[name]) for name in params)


@pytest.fixture(scope="module")
def zero3_run(data_cache, tmp_path_factory):
    """Two gloo ranks under ZeRO-3; lr 1e-12 keeps the weights where the shared seed put them."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    train(run_dir, one_step(data_cache, "deepspeed=zero3", "optim.lr=1e-12"), nproc=2)
    return run_dir


def test_zero3_shards_consolidate_to_the_weights_of_a_zero0_run(data_cache, zero3_run, tmp_path):
    engine = complete_checkpoints(zero3_run)[-1] / "engine"
    for rank in (0, 1):
        assert (engine / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    placeholders = torch.load(engine / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(t.numel() == 0 for t in placeholders.values() if t.is_floating_point())  # the module holds nothing

    zero0_run = tmp_path / "zero0"
    train(zero0_run, one_step(data_cache, "optim.lr=1e-12"))
    sharded = read_checkpoint(export_checkpoint(zero3_run, tmp_path / "zero3_out", dtype="fp32")).state_dict
    single = read_checkpoint(export_checkpoint(zero0_run, tmp_path / "zero0_out", dtype="fp32")).state_dict
    assert sharded.keys() == single.keys()
    for name, tensor in single.items():
        assert torch.allclose(sharded[name], tensor, rtol=0, atol=1e-9), name


@pytest.mark.parametrize("damage", ["truncated_optimizer_shard", "missing_optimizer_shard", "truncated_model_shard"])
def test_damaged_zero_shards_are_refused(zero3_run, tmp_path, damage):
    run_dir = shutil.copytree(zero3_run, tmp_path / "run")
    engine = complete_checkpoints(run_dir)[-1] / "engine"
    part = "optim" if "optimizer" in damage else "model"
    shard = engine / f"zero_pp_rank_1_mp_rank_00_{part}_states.pt"
    if damage.startswith("missing"):
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{shard} is (truncated or corrupt|missing)"):  # the manifest
        export_checkpoint(run_dir, tmp_path / "out")
    (engine.parent / "manifest.json").unlink()  # no checksums (a hand-copied checkpoint): DeepSpeed's consolidation
    with pytest.raises(CheckpointError, match=rf"cannot consolidate the ZeRO shards in {engine}"):
        export_checkpoint(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
