"""Hydra configs: every preset composes and validates; typos, wrong types and bad values fail naming the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from hybridlm.config import ConfigError
from hybridlm.train.config import OptimConfig, TrainConfig, register_configs, to_train_config
from hybridlm.train.engine import deepspeed_config
from hybridlm.train.metrics import expert_load_ratio
from hybridlm.train.schedule import lr_multiplier

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
register_configs()


def load(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides))
    return to_train_config(cfg)


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", group_options("model"))
def test_model_presets_validate(model):
    cfg = load(f"model={model}")
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.parameter_counts()["total"] > 0


@pytest.mark.parametrize("deepspeed", group_options("deepspeed"))
@pytest.mark.parametrize("optim", group_options("optim"))
def test_optim_and_deepspeed_presets_validate(optim, deepspeed):
    cfg = load(f"optim={optim}", f"deepspeed={deepspeed}")
    assert cfg.deepspeed.zero_stage == int(deepspeed.removeprefix("zero"))
    assert cfg.optim.schedule == {"adamw_cosine": "cosine", "adamw_wsd": "wsd"}[optim]


def test_data_presets_validate_and_file_sources_demand_paths():
    assert load("data=stdlib").data.source == "stdlib"
    assert load("data=mqar").data.source == "mqar"
    for source in ("text_files", "memmap"):
        with pytest.raises(ValueError, match=r"needs data\.paths"):
            load(f"data={source}")
        assert load(f"data={source}", "data.paths=[/some/where]").data.paths == ["/some/where"]


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiments_validate(experiment):
    cfg = load(f"experiment={experiment}")
    assert cfg.trainer.out_dir.endswith(experiment)


def test_smoke_experiment_is_the_cpu_tiny_run():
    cfg = load("experiment=smoke")
    assert (cfg.data.source, cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == ("stdlib", 0, "auto")
    assert cfg.model.layer_pattern == "GGGA" and set(cfg.model.mlp_types) == {"dense", "moe"}
    assert cfg.trainer.stop_at_val_below_unigram_ratio > 0
    assert 1e6 <= cfg.model.parameter_counts()["total"] <= 5e6
    assert cfg.model.vocab_size == 4096 >= cfg.data.vocab_size


def test_qwen3_next_tiny_follows_qwen3_next_conventions():
    model = load("model=qwen3_next_tiny").model
    assert model.layer_types[:4] == ["gated_deltanet"] * 3 + ["attention"]
    assert set(model.mlp_types) == {"moe"} and model.zero_centered_norm and not model.tie_embeddings
    assert model.attention.output_gate and model.attention.qk_norm and model.attention.partial_rotary_factor == 0.25
    assert model.moe.score_func == "softmax" and model.moe.renormalize and model.moe.shared_expert_intermediate_size > 0


def test_gpu_1b_is_about_1b_total_200m_active():
    counts = load("model=gpu_1b").model.parameter_counts()
    assert 0.85e9 <= counts["total"] <= 1.15e9, counts
    assert 0.17e9 <= counts["active"] <= 0.23e9, counts


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_step=5", "max_step"),  # typo of an existing key
        ("+trainer.max_step=5", "max_step"),  # adding an unknown key
        ("model.hiden_size=64", "hiden_size"),
        ("deepspeed.zero=3", "zero"),
    ],
)
def test_unknown_keys_fail_naming_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ConfigError)) as error:
        load(override)
    assert key in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize(
    "override, key", [("trainer.max_steps=many", "max_steps"), ("model.moe.renormalize=maybe", "renormalize")]
)
def test_wrong_types_fail_naming_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        load(override)
    assert key in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_steps=0"], "trainer.max_steps=0"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4"),
        (["deepspeed.precision=fp8"], "deepspeed.precision='fp8'"),
        (["deepspeed.offload_param=cpu"], "zero_stage=3"),
        (["optim.schedule=linear"], "optim.schedule='linear'"),
        (["optim.warmup_steps=100", "trainer.max_steps=50"], "optim.warmup_steps=100"),
        (["optim=adamw_wsd", "optim.warmup_steps=90", "trainer.max_steps=100"], "WSD decay"),
        (["wandb.mode=sometimes"], "wandb.mode='sometimes'"),
        (["trainer.preempt_signals=[SIGUSR1,SIGNOPE]"], "SIGNOPE"),
        (["trainer.stop_at_step=2000"], "trainer.stop_at_step=2000"),
        (["model.moe.top_k=9"], "model.moe.top_k=9"),
        (["model.layer_pattern=GGX"], "model.layer_pattern"),
        (["model.layer_pattern=[G,G,X,A]"], "unknown symbol(s) ['X']"),
        (["model.layer_pattern=7"], "must be a string such as GGGA or a list of symbols"),
        (["model.moe.selection_bias=true", "model.moe.bias_update_rate=0"], "bias_update_rate > 0"),
        (["model.moe.aux_loss_scope=window"], "model.moe.aux_loss_scope='window'; choose one of"),
        # Each op's backends are the ones it registered in hybridlm.ops: fla has no MoE, flex is attention's only.
        (["model.moe.backend=fla"], "model.moe.backend='fla'; choose one of ('auto', 'triton', 'torch')"),
        (["model.gdn.backend=flex"], "model.gdn.backend='flex'; choose one of ('auto', 'triton', 'fla', 'torch')"),
        (["model.attention.backend=triton"], "model.attention.backend='triton'; choose one of ('auto', 'flex', 'sdpa')"),
        (["wandb.finish_timeout_s=0"], "wandb.finish_timeout_s=0"),
        (["trainer.seq_len=8192"], "max_position_embeddings"),
        # Checked whether or not the run uses them (no export format, no push, a source that ignores the key).
        (["trainer.export_shard_size=lots"], "trainer.export_shard_size: shard_size='lots' is not a size"),
        (["trainer.export_shard_size=0GB"], "trainer.export_shard_size: shard_size='0GB' must be positive"),
        (["trainer.export_format=hybridlm", "trainer.export_push_to_hub=no-slash"],
         "trainer.export_push_to_hub: --push-to-hub 'no-slash': give the repository as ORG/NAME"),
        (["trainer.export_private=true"], "trainer.export_private=true needs trainer.export_push_to_hub"),
        (["data=mqar", "data.tokenizer=tok.json"], "data.tokenizer='tok.json' is not used by data.source=mqar"),
        (["data=memmap", "data.paths=[d]", "data.tokenizer=tok.json"], "is not used by data.source=memmap"),
    ],
)
def test_bad_values_fail_before_any_work(overrides, message):
    with pytest.raises((ConfigError, ValueError)) as error:
        load(*overrides)
    assert message in str(error.value)


def test_layer_and_mlp_patterns_accept_a_yaml_list():
    model = load("model.num_layers=8", "model.layer_pattern=[G,G,G,A]", "model.mlp_pattern=[D,M,M,M,M,M,M,M]").model
    assert model.layer_pattern == "GGGA" and model.mlp_pattern == "DMMMMMMM"  # kept in the string form
    assert model.layer_types == (["gated_deltanet"] * 3 + ["attention"]) * 2
    assert model.mlp_types == ["dense"] + ["moe"] * 7
    assert load("model.num_layers=8", "model.layer_pattern=GGGA").model.layer_types == model.layer_types


def test_lr_schedules_against_closed_forms():
    warmup, max_steps, floor = 10, 110, 0.1
    cosine = lr_multiplier(OptimConfig(schedule="cosine", warmup_steps=warmup, min_lr_ratio=floor), max_steps)
    assert [cosine(s) for s in range(warmup)] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert cosine(warmup) == pytest.approx(1.0)
    assert cosine(max_steps - 1) == pytest.approx(floor)
    middle = warmup + (max_steps - 1 - warmup) / 2  # half way along the cosine: the mean of 1 and the floor
    assert cosine(int(middle)) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=0.02)
    values = [cosine(s) for s in range(warmup, max_steps)]
    assert all(a >= b for a, b in zip(values, values[1:]))

    wsd = lr_multiplier(OptimConfig(schedule="wsd", warmup_steps=warmup, decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert [wsd(s) for s in range(warmup, 80)] == [1.0] * (80 - warmup)  # stable until the last 20 steps
    assert [wsd(s) for s in (80, 89, 99)] == pytest.approx([1 - 1 / 20, 1 - 10 / 20, 0.0])

    constant = lr_multiplier(OptimConfig(schedule="constant", warmup_steps=0), 100)
    assert {constant(s) for s in range(100)} == {1.0}


def test_deepspeed_config_dict_and_extra_merge():
    import torch

    cfg = load(
        "deepspeed=zero3",
        "deepspeed.grad_accum_steps=4",
        "deepspeed.offload_param=cpu",
        "+deepspeed.extra.zero_optimization.stage3_max_live_parameters=1000",
        "+deepspeed.extra.bf16.enabled=true",
    )
    config = deepspeed_config(cfg.deepspeed, cfg.optim, torch.device("cpu"))
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == cfg.optim.grad_clip
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_max_live_parameters"] == 1000  # merged in, siblings kept
    assert config["bf16"]["enabled"] is True  # extra wins over precision=auto (fp32 on CPU)
    assert deepspeed_config(load().deepspeed, cfg.optim, torch.device("cpu"))["bf16"]["enabled"] is False


def test_expert_load_ratio():
    import torch

    assert expert_load_ratio(torch.tensor([5, 5, 5, 5])) == 1.0
    assert expert_load_ratio(torch.tensor([8, 0, 0, 0])) == 4.0
    assert expert_load_ratio(torch.tensor([3, 1, 2, 2])) == 1.5


def test_flops_per_token_matches_a_hand_count():
    """Counted independently: the matmul weights a token goes through in the built model (routed experts: top_k of
    num_experts), 2 FLOPs each forward and 4 backward, plus causal attention scores and the GDN chunk recurrence."""
    import torch

    from hybridlm.config import ModelConfig
    from hybridlm.model import HybridLM

    cfg = ModelConfig(
        vocab_size=64, hidden_size=16, num_layers=2, layer_pattern="GA", mlp_pattern="DM", intermediate_size=24,
        gdn=dict(num_k_heads=1, num_v_heads=2, head_k_dim=8, head_v_dim=8),
        attention=dict(num_heads=2, num_kv_heads=1, head_dim=8),
        moe=dict(num_experts=4, top_k=2, intermediate_size=8, shared_expert_intermediate_size=8),
    )  # fmt: skip
    seq_len = 32
    with torch.device("meta"):
        model = HybridLM(cfg)
    per_token = 0.0
    for name, param in model.named_parameters():
        if name == "embed_tokens.weight":
            continue  # a lookup, no FLOPs (untied: the LM head is a separate matmul)
        share = 2 / 4 if ".experts." in name else 1.0  # each token visits top_k = 2 of the 4 routed experts
        per_token += 6 * param.numel() * share  # every other weight (norms, conv taps, gates) is counted alike
    # Attention (1 layer): QK^T and AV, 2 FLOPs per multiply-add over T/2 keys on average (causal), 2 heads of 8.
    per_token += 3 * (2 * 2) * (seq_len / 2) * 8 * 2
    # GDN (1 layer, 2 value heads): intra-chunk attention-like work over the 32-token chunk with K + V = 16 columns,
    # plus the 8 x 8 state update and read-out.
    per_token += 3 * 2 * (2 * 32 * 16 + 4 * 8 * 8)
    assert cfg.flops_per_token(seq_len) == pytest.approx(per_token, rel=1e-12)


def test_mfu_is_model_flops_over_the_devices_peak(monkeypatch):
    """tokens/s over the window's training time only (the clock stops for validation), MFU = FLOPs/token x tokens/s
    / (peak x devices)."""
    from types import SimpleNamespace

    import torch

    import hybridlm.train.metrics as metrics

    # start, pause (10 s of training), resume, summarize (5 s more), the next window's start
    clock = iter([0.0, 10.0, 15.0, 20.0, 20.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(metrics.dist, "all_reduce", lambda tensor: tensor.mul_(2))  # a second, identical rank
    window = metrics.MetricsWindow(torch.device("cpu"), moe_layer_ids=[1])
    out = SimpleNamespace(loss=torch.tensor(2.0), ce_loss=torch.tensor(1.5), aux_loss=torch.tensor(1.0),
                          z_loss=torch.tensor(0.5), expert_counts=[torch.tensor([3, 1, 2, 2])])  # fmt: skip
    window.add_micro_batch(out, tokens=3000)  # input tokens of all ranks together
    window.pause()
    window.resume()
    window.add_micro_batch(out, tokens=3000)
    result = window.summarize(flops_per_token=1e6, peak_flops=1e9, world_size=2)
    assert result["tokens_per_s"] == pytest.approx(6000 / 15)
    assert result["mfu"] == pytest.approx(1e6 * 400 / (1e9 * 2))
    assert result["loss"] == pytest.approx(2.0) and result["z_loss"] == pytest.approx(0.5)  # mean over 2 x 2
    assert result["moe_load_max_over_mean/layer1"] == result["moe_load_max_over_mean/worst"] == 1.5


def test_metrics_expert_load_is_over_all_ranks(monkeypatch):
    """The logged load ratio is over the data-parallel ranks even when the model kept its counts per rank (no aux
    loss, no selection bias): rank 0 sees [4, 0], the other rank [0, 4]; together the load is even."""
    from types import SimpleNamespace

    import torch

    import hybridlm.train.metrics as metrics

    monkeypatch.setattr(metrics.dist, "all_reduce", lambda tensor: tensor.add_(tensor.flip(-1)))
    window = metrics.MetricsWindow(torch.device("cpu"), moe_layer_ids=[0])
    out = SimpleNamespace(loss=torch.tensor(1.0), ce_loss=torch.tensor(1.0), aux_loss=torch.tensor(0.0),
                          z_loss=torch.tensor(0.0), expert_counts=[torch.tensor([4, 0])])  # fmt: skip
    window.add_micro_batch(out, tokens=8)
    assert window.summarize(flops_per_token=1.0, peak_flops=None, world_size=2)["moe_load_max_over_mean/worst"] == 1.0
    window.add_micro_batch(out, tokens=8)
    assert window.summarize(flops_per_token=1.0, peak_flops=None, world_size=1)["moe_load_max_over_mean/worst"] == 2.0


def test_online_wandb_bounds_its_start_and_its_final_upload(monkeypatch, tmp_path):
    """Both timeouts reach wandb's settings: finish_timeout makes wandb.finish give up uploading (the rest stays on
    disk for `wandb sync`) instead of blocking the end of a run, or a preempted job's requeue, on a lost network."""
    import wandb

    from hybridlm.train.callbacks import wandb as wandb_callback

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or "run")
    cfg = load("wandb.mode=online", "wandb.init_timeout_s=7", "wandb.finish_timeout_s=45",
               f"trainer.out_dir={tmp_path}")  # fmt: skip
    assert wandb_callback.init_wandb(cfg) == "run"
    (call,) = calls
    assert call["mode"] == "online"
    assert call["settings"].init_timeout == 7 and call["settings"].finish_timeout == 45


def test_metrics_window_reads_the_clock_once_per_log(monkeypatch):
    """Each clock reading is a CUDA synchronise: a logging step takes one (its end is the next window's start), and
    adding micro-batches takes none."""
    from types import SimpleNamespace

    import torch

    import hybridlm.train.metrics as metrics

    readings = []
    monkeypatch.setattr(metrics.MetricsWindow, "_clock", lambda self: readings.append(len(readings)) or len(readings))
    window = metrics.MetricsWindow(torch.device("cpu"), moe_layer_ids=[])
    out = SimpleNamespace(expert_counts=[], **{name: torch.tensor(1.0) for name in metrics.MetricsWindow.LOSSES})
    for _ in range(3):
        window.add_micro_batch(out, tokens=4)
    assert len(readings) == 1  # the window's start
    window.summarize(flops_per_token=1.0, peak_flops=None, world_size=1)
    assert len(readings) == 2
