"""Write a checkpoint as a Hugging Face model directory: sharded safetensors + index, config.json, tokenizer, model
card; into a temporary directory that is renamed to OUT only when everything was written."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from hybridlm.checkpoint.formats import DEFAULT_EXPERT_LAYOUT, FORMATS, ExportError, config_to_dict, own_storage
from hybridlm.checkpoint.reader import Checkpoint, read_checkpoint
from hybridlm.config import ModelConfig
from hybridlm.export.options import ExportOptions

log = logging.getLogger(__name__)


def export_checkpoint(
    src: str | Path,
    out: str | Path,
    format: str = "hybridlm",  # noqa: A002 - the CLI's --format
    dtype: str = "bf16",
    shard_size: str | int = "5GB",
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Export the checkpoint at `src` (run dir, DeepSpeed checkpoint or exported model) to the directory `out`.

    The options are ExportOptions' (checked there); a native format is refused with every mismatch listed when the
    architecture does not fit. Pushes `out` to the Hub repo `push_to_hub` when given (token from HF_TOKEN or the
    login cache). Returns `out`.
    """
    options = ExportOptions(format, dtype, shard_size, push_to_hub, private)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; remove it or choose another output directory")
    options.check_push_target()
    ckpt = read_checkpoint(src)
    options.check_fits(ckpt.config)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_model_dir(ckpt, staging, format, options.torch_dtype, options.max_shard_bytes)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s as %s, %s", src, ckpt.kind, out, format, dtype)
    if push_to_hub is not None:
        from hybridlm.export.hub import push_folder

        push_folder(out, push_to_hub, private=private)
    return out


def export_and_push_once(
    src: str | Path, out: Path, *, push_to_hub: str | None = None, private: bool = False, **options
) -> str | None:
    """The end-of-training export, safe to rerun: OUT is written unless it exists (exports are renamed into place,
    so an existing one is complete), then pushed unless its push record says it already went to `push_to_hub`. A
    rerun after a failed push therefore retries the push. `options` as export_checkpoint's; returns how the push
    went (None without one)."""
    from hybridlm.export.hub import PUSH_RECORD, push_folder, pushed_to

    out = Path(out)
    if not out.exists():
        export_checkpoint(src, out, **options)
    if push_to_hub is None:
        return None
    if pushed_to(out) == push_to_hub:
        return f"already pushed to {push_to_hub} ({out / PUSH_RECORD})"
    return f"pushed to {push_folder(out, push_to_hub, private=private)}"


def write_model_dir(
    ckpt: Checkpoint, directory: Path, format: str, dtype: torch.dtype, max_shard_bytes: int  # noqa: A002
) -> None:
    """Weights, config, tokenizer and model card of `ckpt` in `format` into the existing directory."""
    from huggingface_hub import save_torch_state_dict

    cfg = ckpt.config
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    _refuse_overflow(ckpt.state_dict, state, dtype)
    token_ids = _save_tokenizer(ckpt.tokenizer_dir, directory)
    if format == "hybridlm":
        tensors = {f"model.{name}": own_storage(t) for name, t in state.items()}  # ZeRO gives views of flat groups
        config = _hybridlm_config(cfg, dtype, token_ids, ckpt.metadata)
    else:
        # Re-exporting a native checkpoint to its own format keeps its expert layout: the same files come out.
        layout = ckpt.expert_layout if ckpt.kind == format and ckpt.expert_layout else DEFAULT_EXPERT_LAYOUT
        tensors = FORMATS[format].to_theirs(cfg, state, layout)
        config = _checked_native_config(FORMATS[format].hf_config(cfg, dtype, token_ids), format)
    save_torch_state_dict(tensors, directory, max_shard_size=max_shard_bytes, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if token_ids and format != "hybridlm":  # hybridlm's config names its tokenizer class through remote code
        _refuse_retokenization(ckpt.tokenizer_dir, directory, format)
    if format == "hybridlm":
        from hybridlm.hf.remote_code import add_remote_code

        add_remote_code(directory)
    if token_ids:
        generation = {"bos_token_id": token_ids.get("bos_token_id"), "eos_token_id": token_ids.get("eos_token_id")}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    from hybridlm.export.card import model_card

    (directory / "README.md").write_text(model_card(cfg, format, dtype, ckpt.metadata))


def _refuse_overflow(source: dict[str, torch.Tensor], cast: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The source is finite (validate_state_dict), but a value beyond the export dtype's range becomes inf in the
    cast (bf16 and fp32 share the exponent range, yet fp32 values within half a bf16 ulp of its max round up)."""
    overflowed = [name for name, t in cast.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if overflowed:
        details = ", ".join(f"{name} (largest |value| {source[name].abs().max().item():.4g})" for name in overflowed)
        raise ExportError(
            f"casting to {str(dtype).removeprefix('torch.')} turns values of {details} into inf (largest finite "
            f"value {torch.finfo(dtype).max:.4g}); export with --dtype fp32 (trainer.export_dtype=fp32)"
        )


def _hybridlm_config(cfg: ModelConfig, dtype: torch.dtype, token_ids: dict, metadata: dict) -> dict:
    from hybridlm.hf import HybridLMConfig

    config = HybridLMConfig.from_model_config(
        cfg, architectures=["HybridLMForCausalLM"], dtype=str(dtype).removeprefix("torch."), **token_ids
    ).to_dict()
    config["model"] = config_to_dict(cfg)
    if metadata:
        config["hybridlm_metadata"] = _jsonable(metadata)
    return config


def _checked_native_config(config: dict, format: str) -> dict:  # noqa: A002
    """Round-trip through transformers' own config class so a value it rejects fails here, not at load time."""
    from transformers import AutoConfig

    values = {k: v for k, v in config.items() if k != "model_type"}
    checked = AutoConfig.for_model(config["model_type"], **values)
    if checked.layer_types != config["layer_types"]:
        raise ExportError(f"transformers rewrote layer_types for {format}: {checked.layer_types}")
    return config


def _save_tokenizer(tokenizer_dir: Path | None, directory: Path) -> dict:
    """Save the tokenizer beside the weights (loaded and re-saved, so AutoTokenizer can read it); its special ids."""
    if tokenizer_dir is None:
        log.warning("no tokenizer found beside the checkpoint; the export will not include one")
        return {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.save_pretrained(str(directory), save_jinja_files=False)  # the chat template in tokenizer_config.json
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


# Digits, contractions, runs of spaces and newlines, punctuation and non-ASCII: where pre-tokenizers disagree.
TOKENIZER_PROBE = "The 2024's results: 12 + 30 = 42.\n\n  Déjà vu, naïve café!  x=3.14;\ttabs\r\nI'll say \"ok\"..."


def _refuse_retokenization(tokenizer_dir: Path, directory: Path, format: str) -> None:  # noqa: A002
    """The export's tokenizer, as AutoTokenizer loads it beside the export's config.json, must give the ids the
    model was trained on. transformers 5 loads every qwen3_5_moe checkpoint with Qwen3_5Tokenizer, whatever
    tokenizer_config.json names (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS in models/auto/tokenization_auto.py), and
    that class replaces tokenizer.json's normaliser and pre-tokenizer with Qwen3.5's (NFC, one digit per pre-token):
    a tokenizer trained otherwise would feed the exported model other tokens than it learnt."""
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    theirs = AutoTokenizer.from_pretrained(str(directory))
    texts = [TOKENIZER_PROBE]
    if ours.chat_template:
        texts.append(ours.apply_chat_template([{"role": "user", "content": TOKENIZER_PROBE}], tokenize=False))
    for text in texts:
        expected, loaded = ours.encode(text, add_special_tokens=False), theirs.encode(text, add_special_tokens=False)
        if expected != loaded:
            first = next((i for i, (a, b) in enumerate(zip(expected, loaded)) if a != b), len(expected))
            raise ExportError(
                f"--format {format}: transformers loads this export's tokenizer as {type(theirs).__name__}, which "
                f"tokenizes differently from the tokenizer the model was trained with ({tokenizer_dir}: "
                f"{type(ours).__name__}); from token {first} of {text[:60]!r}… it gives "
                f"{loaded[first:first + 6]} instead of {expected[first:first + 6]}. Export with --format qwen3_next "
                "or hybridlm, or train with a tokenizer that has Qwen3.5's pre-tokenizer (an imported Qwen3.5 "
                "checkpoint's)"
            )


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
