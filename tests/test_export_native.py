"""Native formats against transformers' own Qwen3NextForCausalLM / Qwen3_5MoeForCausalLM, the independent oracles.

transformers runs in one subprocess (tests/helpers/transformers_oracle.py) where hybridlm cannot be imported and fla
is hidden (so it takes its plain PyTorch paths on CPU). It
  1. builds random transformers models and saves them (the import direction), among them models of the shapes of
     our two presets, saved the way released checkpoints are;
  2. loads our exports, model and tokenizer, with the Auto classes (the export direction), the presets included;
  3. returns the logits of all of them on the same random tokens: 150 of them, across GDN chunk boundaries (64).
Tolerance: fp32 on CPU, max |logit difference| <= 1e-4. Import then export is compared file against file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers.launch import tiny_run, train
from helpers.transformers_oracle import LOADING_PROBLEMS, run_oracle
from transformers import AutoTokenizer

from hybridlm.checkpoint.formats import ExportError
from hybridlm.checkpoint.init_from import load_pretrained_into
from hybridlm.checkpoint.reader import Checkpoint, read_checkpoint
from hybridlm.cli import main as cli_main
from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig, MoEConfig
from hybridlm.data.tokenizer import train_byte_level_bpe
from hybridlm.export import FORMATS, export_checkpoint
from hybridlm.export.writer import write_model_dir
from hybridlm.model import HybridLM

pytestmark = pytest.mark.slow  # one transformers subprocess (~1 min on 2 cores) and one short training run

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
VOCAB = 300  # small configs; a byte-level BPE (>= 257 tokens) fits
SEQ_LEN = 150  # > 2 GDN chunks of 64
# Digits, runs of spaces, a newline and non-ASCII: where Qwen3.5's pre-tokenizer (imposed by transformers on every
# qwen3_5_moe checkpoint) differs from GPT-2's, so an export whose tokenizer changes ids fails here.
PROBE_TEXT = "def fibonacci(n): return n if n < 2 else 2024  # naïve\n\n    x = 31415"



def preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text()))


def small_config(fmt: str) -> ModelConfig:
    """Linear attention, full attention and MoE layers; dense layers where the target has them."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        num_layers=4,
        layer_pattern="GGAG",
        intermediate_size=40,
        gdn=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=12),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, partial_rotary_factor=0.25),
    )
    if fmt == "qwen3_next":  # dense layer 1 (mlp_only_layers), unnormalised top-k, attention biases
        return ModelConfig(
            mlp_pattern="MDMM",
            attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6,
                                      partial_rotary_factor=0.25, bias=True),
            moe=MoEConfig(num_experts=6, top_k=2, intermediate_size=20, shared_expert_intermediate_size=24,
                          renormalize=False),
            **{k: v for k, v in common.items() if k != "attention"},
        )
    return ModelConfig(  # Qwen3.5-MoE: every layer MoE; tied embeddings
        mlp_pattern="M",
        tie_embeddings=True,
        moe=MoEConfig(num_experts=6, top_k=3, intermediate_size=20, shared_expert_intermediate_size=24),
        **common,
    )


# Our models exported: (format, config). The presets as they are, to check they fit their formats exactly.
EXPORTS = {
    "qwen3_next": ("qwen3_next", small_config("qwen3_next")),
    "qwen3_5_moe": ("qwen3_5_moe", small_config("qwen3_5_moe")),
    "qwen3_next_tiny": ("qwen3_next", preset("qwen3_next_tiny")),
    "qwen3_5_moe_tiny": ("qwen3_5_moe", preset("qwen3_5_moe_tiny")),
}

# transformers models to import, written as transformers' own config keys (not through our translation).
PRESET_SHAPES = dict(  # the shapes of both presets (configs/model/qwen3_*_tiny.yaml)
    vocab_size=4096, hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
    layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
CREATED = {
    "qwen3_next": ("qwen3_next", dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                             "partial_rotary_factor": 0.25},
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=20, shared_expert_intermediate_size=24,
        mlp_only_layers=[2], norm_topk_prob=True,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    )),
    "qwen3_5_moe_text": ("qwen3_5_moe", dict(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                      "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        num_experts=5, num_experts_per_tok=2, moe_intermediate_size=20, shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    )),
    # As released Qwen3-Next checkpoints: no dense layer, but an intermediate_size (unused) that is not the preset's.
    "qwen3_next_tiny": ("qwen3_next", dict(
        PRESET_SHAPES, intermediate_size=5120, mlp_only_layers=[], norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    )),
    # Qwen3.5-MoE has no dense layers and no intermediate_size at all.
    "qwen3_5_moe_tiny": ("qwen3_5_moe", dict(
        PRESET_SHAPES, rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                        "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )),
}
CREATED_MODEL_TYPE = {"qwen3_next": "qwen3_next", "qwen3_5_moe": "qwen3_5_moe_text"}


def random_model(cfg: ModelConfig, seed: int) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    with torch.no_grad():  # norms away from their (trivial) initial values
        for name, param in model.named_parameters():
            if param.dim() == 1 and "A_log" not in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def our_logits(model: HybridLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids % model.config.vocab_size).logits


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    work = tmp_path_factory.mktemp("native")
    ids = torch.randint(0, 4096, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    tokenizer = train_byte_level_bpe([PROBE_TEXT, "the quick brown fox jumps over the lazy dog"] * 20, VOCAB)
    tokenizer.save_pretrained(str(work / "tokenizer"))

    ours, exports = {}, {}
    for seed, (name, (fmt, cfg)) in enumerate(EXPORTS.items()):
        model = random_model(cfg, seed)
        source = work / f"ours_{name}"
        source.mkdir()
        write_model_dir(Checkpoint(cfg, model.state_dict(), source, "test", work / "tokenizer"), source, "hybridlm",
                        torch.float32, 10**9)
        # A small shard size so the export is sharded with an index.
        exports[name] = export_checkpoint(source, work / f"export_{name}", format=fmt, dtype="fp32", shard_size="60KB")
        ours[name] = our_logits(model, ids)

    created = {name: str(work / f"hf_{name}") for name in CREATED}
    results = run_oracle(
        {
            "ids": str(work / "ids.pt"),
            "text": PROBE_TEXT,
            "create": [
                {"model_type": CREATED_MODEL_TYPE[fmt], "config": config, "out": created[name], "seed": 7}
                for name, (fmt, config) in CREATED.items()
            ],
            "load": [str(path) for path in exports.values()],
        },
        work,
    )
    return dict(work=work, ids=ids, tokenizer=tokenizer, ours=ours, exports=exports, created=created,
                results=results)


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_plain_transformers_with_the_same_logits(oracle, name):
    fmt, _ = EXPORTS[name]
    result = oracle["results"][str(oracle["exports"][name])]
    assert result["class"] == FORMATS[fmt].architecture
    assert not any(result["info"].get(k) for k in LOADING_PROBLEMS), result["info"]
    diff = (result["logits"] - oracle["ours"][name]).abs().max().item()
    assert diff <= TOLERANCE, f"{name}: max |logit diff| {diff:.2e} > {TOLERANCE} over {SEQ_LEN} tokens"
    assert result["encoded"] == oracle["tokenizer"].encode(PROBE_TEXT)  # AutoTokenizer, from the export


def test_a_tokenizer_that_transformers_would_retokenize_is_refused_for_qwen3_5_moe(oracle, tmp_path):
    """A GPT-2 style byte-level BPE (our tokenizer before Qwen3.5's pre-tokenizer): qwen3_next keeps it, but
    transformers would load a qwen3_5_moe export of it as Qwen3_5Tokenizer, splitting 2024 into digits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hybridlm.data.tokenizer import EOS_TOKEN, wrap_tokenizer

    gpt2_style = Tokenizer(models.BPE())
    gpt2_style.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2_style.decoder = decoders.ByteLevel()
    gpt2_style.train_from_iterator([PROBE_TEXT] * 20, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrap_tokenizer(gpt2_style).save_pretrained(str(tmp_path / "tokenizer"))
    fmt, cfg = EXPORTS["qwen3_5_moe"]
    source = tmp_path / "ours"
    source.mkdir()
    write_model_dir(Checkpoint(cfg, random_model(cfg, 0).state_dict(), source, "test", tmp_path / "tokenizer"),
                    source, "hybridlm", torch.float32, 10**9)
    refusal = r"(?s)loads this export's tokenizer as Qwen3_5Tokenizer.*--format qwen3_next"
    with pytest.raises(ExportError, match=refusal):
        export_checkpoint(source, tmp_path / "refused", format=fmt, dtype="fp32")
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused.tmp-*"))  # nothing half-written
    export_checkpoint(source, tmp_path / "next", format="qwen3_next", dtype="fp32")


@pytest.mark.parametrize("name", ["qwen3_next_tiny", "qwen3_5_moe_tiny"])
def test_the_presets_fit_their_formats_exactly(name):
    fmt, cfg = EXPORTS[name]
    assert FORMATS[fmt].mismatches(cfg) == []


def test_export_is_sharded_with_an_index(oracle):
    for path in oracle["exports"].values():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and all((path / s).is_file() for s in shards)


def test_exports_use_the_released_tensor_layout(oracle):
    """One module per expert (as released checkpoints and transformers' own save_pretrained), Qwen3-Next's grouped
    GDN projections and dense mlp_only_layers."""
    def names(name):
        return json.loads((oracle["exports"][name] / "model.safetensors.index.json").read_text())["weight_map"]

    assert "model.layers.0.mlp.experts.5.down_proj.weight" in names("qwen3_next")
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in names("qwen3_5_moe")
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in names("qwen3_next")
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in names("qwen3_5_moe")
    assert "model.layers.1.mlp.gate_proj.weight" in names("qwen3_next")  # the dense layer
    config = json.loads((oracle["exports"]["qwen3_next"] / "config.json").read_text())
    assert config["mlp_only_layers"] == [1] and config["norm_topk_prob"] is False


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_moe_text"])  # the presets' shapes: the next test
def test_import_gives_transformers_logits(oracle, name):
    path = oracle["created"][name]
    diff = (our_logits(read_checkpoint(path).build_model(), oracle["ids"]) - oracle["results"][path]["logits"])
    assert diff.abs().max().item() <= TOLERANCE, f"{name}: max |logit diff| {diff.abs().max().item():.2e}"


@pytest.mark.parametrize("name", ["qwen3_next_tiny", "qwen3_5_moe_tiny"])
def test_init_from_a_transformers_checkpoint_into_the_preset(oracle, name):
    """`model=NAME model.init_from=PATH`: the preset's unused intermediate_size differs from the checkpoint's (5120
    in Qwen3-Next's config.json, none in Qwen3.5-MoE's); the weights load and give transformers' logits."""
    model = HybridLM(preset(name))
    meta = load_pretrained_into(model, oracle["created"][name])
    assert meta["kind"] == CREATED[name][0]
    diff = (our_logits(model.eval(), oracle["ids"]) - oracle["results"][oracle["created"][name]]["logits"]).abs()
    assert diff.max().item() <= TOLERANCE


def safetensors_tensors(directory: Path) -> dict[str, tuple]:
    """name -> (dtype, shape, raw bytes) of every tensor in a checkpoint directory, however it is sharded."""
    from safetensors import safe_open

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                tensors[name] = (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return tensors


@pytest.mark.parametrize("name", list(CREATED))
def test_import_then_export_reproduces_the_files_bitwise(oracle, tmp_path, name):
    """Directly, and through our own format in between (as after continued training): the same tensor names
    (transformers' per-expert layout), dtypes, shapes and bytes."""
    fmt = CREATED[name][0]
    original = safetensors_tensors(Path(oracle["created"][name]))
    direct = export_checkpoint(oracle["created"][name], tmp_path / "direct", format=fmt, dtype="fp32")
    assert safetensors_tensors(direct) == original
    ours = export_checkpoint(oracle["created"][name], tmp_path / "ours", format="hybridlm", dtype="fp32")
    again = export_checkpoint(ours, tmp_path / "again", format=fmt, dtype="fp32")
    assert safetensors_tensors(again) == original


def test_training_initialised_from_a_transformers_checkpoint(oracle, data_cache, tmp_path):
    """The user's path: `python train.py model=qwen3_5_moe_tiny model.init_from=PATH` (ZeRO-2: the masters are in
    the optimizer partitions), then `hybridlm export RUN OUT --format qwen3_5_moe`. With lr 1e-12 one step leaves
    every weight where the checkpoint put it."""
    source = oracle["created"]["qwen3_5_moe_tiny"]
    run_dir = tmp_path / "run"
    data_and_loop = [o for o in tiny_run(data_cache) if not o.startswith(("model.", "optim."))]
    proc = train(run_dir, ["model=qwen3_5_moe_tiny", f"model.init_from={source}", *data_and_loop, "deepspeed=zero2",
                           "trainer.max_steps=1", "optim.lr=1e-12", "optim.warmup_steps=0"])
    assert f"initialised the weights from {source} (qwen3_5_moe)" in proc.stdout
    step_dir = run_dir / "checkpoints" / "step_00000001"
    assert list((step_dir / "engine").glob("*zero_pp_rank_0_*optim_states.pt")), "expected ZeRO optimizer shards"

    out = tmp_path / "out"
    assert cli_main(["export", str(run_dir), str(out), "--format", "qwen3_5_moe", "--dtype", "fp32"]) == 0
    original, exported = safetensors_tensors(Path(source)), safetensors_tensors(out)
    assert exported.keys() == original.keys()
    for name, (dtype, shape, data) in original.items():
        before = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
        after = torch.frombuffer(bytearray(exported[name][2]), dtype=dtype).reshape(shape)
        assert torch.allclose(after, before, rtol=0, atol=1e-9), name
    card = (out / "README.md").read_text()
    assert "optimizer steps: 1" in card and "tokens trained: 128" in card  # 1 step x 2 rows x 64 tokens
    run_tokenizer = AutoTokenizer.from_pretrained(step_dir / "tokenizer")
    assert AutoTokenizer.from_pretrained(out).encode(PROBE_TEXT) == run_tokenizer.encode(PROBE_TEXT)
