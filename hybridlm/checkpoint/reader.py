"""Read any checkpoint we can export or import into our config + state dict (our parameter names).

Sources, found from the path given:
- a run directory (`out_dir`) or its `checkpoints/`: the newest complete checkpoint, picked as resume picks it; a
  DeepSpeed save directory (with `latest`) or one DeepSpeed checkpoint tag directory. The weights read are the fp32
  masters: ZeRO-1/2/3 optimizer shards consolidated with DeepSpeed's own `zero_to_fp32`, or at ZeRO 0 the masters
  of DeepSpeed's bf16/fp16 optimizer (the module holds their rounded copies), or the module itself in fp32 runs;
- a Hugging Face directory (config.json + safetensors) in the `hybridlm`, `qwen3_next` or `qwen3_5_moe` format.
Every read is validated: the checkpoint's manifest checksums (hybridlm/checkpoint/manifest.py), no missing or
truncated shard, `.pt` files loaded with weights_only=True (no code runs), tensors that match the config, no NaN or
inf. Every refusal is a CheckpointError naming the path and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybridlm.checkpoint.experts import EXPERT_SHARD_FILE, read_expert_shards
from hybridlm.checkpoint.formats import expected_shapes, expert_layout_of, format_for_model_type
from hybridlm.checkpoint.layout import (
    LATEST,
    MANIFEST_FILE,
    METRICS_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    checkpoints_root,
    complete_checkpoints,
    run_dir_of,
    trainer_state_file,
)
from hybridlm.checkpoint.manifest import verify_manifest
from hybridlm.checkpoint.safe_load import deepspeed_loads_weights_only, load_tensors_file
from hybridlm.config import ConfigError, ModelConfig
from hybridlm.model import HybridLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HYBRIDLM_PREFIX = "model."  # the HF wrapper holds HybridLM as `.model`


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # our parameter names
    source: Path  # the directory the tensors were read from
    kind: str  # deepspeed | hybridlm | qwen3_next | qwen3_5_moe
    tokenizer_dir: Path | None = None
    metadata: dict = field(default_factory=dict)  # step, tokens_trained, eval: whatever the source records
    expert_layout: str | None = None  # a native source's; kept when it is exported to its own format again

    def build_model(self) -> HybridLM:
        model = HybridLM(self.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Find, read and validate the checkpoint at `path` (see the module docstring for what `path` may be)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint path {str(root)!r} does not exist")
    location = _locate(root)
    if (location / "config.json").is_file():
        ckpt = _read_hf_dir(location)
    else:
        if (location.parent / MANIFEST_FILE).is_file():  # the trainer's step_N/engine/: its checksums first
            verify_manifest(location.parent)
        ckpt = _read_deepspeed(location)
    validate_state_dict(ckpt.config, ckpt.state_dict, str(location))
    return ckpt


def _locate(path: Path) -> Path:
    """The directory that holds the tensors: run dir -> newest complete step_N -> engine/, or a DeepSpeed save
    directory -> its `latest` tag."""
    for _ in range(5):
        if (path / "config.json").is_file() or any(path.glob("*model_states.pt")):
            return path
        engine_dirs = [d for d in path.iterdir() if d.is_dir() and any(d.glob("*model_states.pt"))]
        run = run_dir_of(path)
        published = complete_checkpoints(run) if run is not None else []
        if len(engine_dirs) == 1:  # the trainer's step_XXXXXXXX/engine/
            path = engine_dirs[0]
        elif published:  # not `latest`, which can lag one rename behind (hybridlm/checkpoint/save.py)
            path = published[-1]
        elif (path / LATEST).is_file():
            tag = (path / LATEST).read_text().strip()
            if not (path / tag).is_dir():
                raise CheckpointError(f"{path / LATEST} points to {tag!r}, but {path / tag} does not exist")
            path = path / tag
        elif run is not None:
            raise CheckpointError(
                f"{run} holds no complete checkpoint in {checkpoints_root(run)} (a save cut short leaves only a "
                ".tmp- directory); export an earlier run or train until a checkpoint is saved"
            )
        else:
            break
    raise CheckpointError(
        f"no checkpoint found at {str(path)!r}: expected a run directory (with checkpoints/step_N), a DeepSpeed "
        "checkpoint directory (*model_states.pt) or an exported model (config.json + *.safetensors)"
    )


# --- Hugging Face directories --------------------------------------------------------------------------------------


def load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (sharded with an index, or one file), refusing missing or damaged
    shards before returning anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{directory}: shard(s) {missing} listed in {index_path.name} are missing; re-copy them"
            )
    elif (directory / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory} has a config.json but no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            tensors.update(load_file(directory / shard))
        except (SafetensorError, OSError, RuntimeError) as error:
            message = f"{directory / shard} is truncated or corrupt ({error}); re-copy or re-export it"
            raise CheckpointError(message) from error
    if weight_map is not None:
        absent = sorted(set(weight_map) - tensors.keys())
        if absent:
            raise CheckpointError(f"{directory}: tensors {absent[:8]} listed in the index are not in their shards")
    return tensors


def _read_hf_dir(directory: Path) -> Checkpoint:
    hf = json.loads((directory / "config.json").read_text())
    model_type = hf.get("model_type")
    tensors = load_safetensors_dir(directory)
    tokenizer_dir = directory if _has_tokenizer(directory) else None
    metadata = hf.get("hybridlm_metadata", {})
    if model_type == "hybridlm":
        config = _model_config(hf.get("model") or {}, str(directory / "config.json"))
        unprefixed = [k for k in tensors if not k.startswith(HYBRIDLM_PREFIX)]
        if unprefixed:
            raise CheckpointError(
                f"{directory}: hybridlm tensors must start with {HYBRIDLM_PREFIX!r}; found {unprefixed[:4]}"
            )
        state = {k.removeprefix(HYBRIDLM_PREFIX): v for k, v in tensors.items()}
        return Checkpoint(config, state, directory, "hybridlm", tokenizer_dir, metadata)
    fmt = format_for_model_type(model_type)
    if fmt is None:
        raise CheckpointError(
            f"{directory / 'config.json'} has model_type={model_type!r}; readable types are 'hybridlm', "
            "'qwen3_next', 'qwen3_5_moe' and 'qwen3_5_moe_text'"
        )
    try:
        config = fmt.model_config(hf)
    except ConfigError as error:  # a value our config refuses, e.g. an odd number of rotary dims
        raise CheckpointError(f"cannot import {directory / 'config.json'}: {error}") from error
    state = fmt.to_ours(config, tensors)
    return Checkpoint(config, state, directory, fmt.name, tokenizer_dir, metadata, expert_layout_of(tensors))


# --- DeepSpeed checkpoints -----------------------------------------------------------------------------------------


def _read_deepspeed(tag_dir: Path) -> Checkpoint:
    config, config_path = _find_run_config(tag_dir)
    zero_shards = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    # Not an expert-parallel rank's expert shard (layer_L_expert_R_mp_rank_00_model_states.pt) beside it.
    model_states_path = next(p for p in sorted(tag_dir.glob("*model_states.pt")) if not EXPERT_SHARD_FILE.match(p.name))
    model_states = load_tensors_file(model_states_path)
    experts, expert_parallel_size = read_expert_shards(tag_dir)
    if expert_parallel_size > 1:
        # Expert parallelism (ZeRO 1/2 only): zero_to_fp32 cannot consolidate optimizer partitions cut per
        # expert-data-parallel group, so the weights are the module's: DP rank 0's for the rest, every
        # expert-parallel rank's files for the experts (hybridlm/checkpoint/experts.py).
        module = model_states.get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{model_states_path} has no 'module' state dict; is it a DeepSpeed checkpoint?")
        state = {_strip_wrappers(k): v for k, v in {**module, **experts}.items()}
    elif zero_shards:
        # ZeRO-1/2/3: the fp32 master weights live in the optimizer partitions; DeepSpeed consolidates them.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with deepspeed_loads_weights_only():
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"cannot consolidate the ZeRO shards in {tag_dir}: {error}") from error
        state = {_strip_wrappers(k): v for k, v in state.items()}
    else:
        state = _zero0_masters(model_states, config, model_states_path)
    state = {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    metadata = _training_metadata(model_states, tag_dir)
    return Checkpoint(config, state, tag_dir, "deepspeed", _find_tokenizer(tag_dir), metadata)


def _zero0_masters(model_states: dict, config: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """A ZeRO-0 checkpoint's weights: `module`, with each parameter replaced by its fp32 master when DeepSpeed's
    bf16/fp16 optimizer kept one (its `fp32_groups`: per param group, the masters in the group's order)."""
    module = model_states.get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{path} has no 'module' state dict; is it a DeepSpeed checkpoint?")
    state = {_strip_wrappers(k): v for k, v in module.items()}
    masters = (model_states.get("optimizer") or {}).get("fp32_groups")
    if masters is None:  # fp32 training: the module is the master copy
        return state
    groups = _optimizer_group_names(config)
    if [len(names) for names in groups] != [len(group) for group in masters]:
        raise CheckpointError(
            f"{path}: optimizer.fp32_groups holds {[len(g) for g in masters]} masters per param group, the model "
            f"config's param groups {[len(n) for n in groups]}; the checkpoint does not match its config"
        )
    for names, group in zip(groups, masters):
        for name, master in zip(names, group):
            weight = state.get(name)
            # A master rounds to its module weight: refuse a mapping that is off rather than mislabel rounded copies.
            if weight is None or weight.shape != master.shape or not torch.equal(master.to(weight.dtype), weight):
                raise CheckpointError(
                    f"{path}: the fp32 master for {name} in optimizer.fp32_groups does not round to the module's "
                    "weight; the checkpoint was not written by hybridlm's trainer with its saved model config"
                )
            state[name] = master
    return state


def _optimizer_group_names(config: ModelConfig) -> list[list[str]]:
    """Parameter names of the trainer's AdamW groups, in order (DeepSpeed drops empty groups)."""
    with torch.device("meta"):
        model = HybridLM(config)
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in model.param_groups(0.0) if group["params"]]


def _strip_wrappers(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        name = name.removeprefix(prefix)
    return name


def _training_metadata(model_states: dict, tag_dir: Path) -> dict:
    """Step, tokens trained and eval numbers: DeepSpeed's step count, then the trainer's state beside the engine
    directory (`trainer_state_rank0.pt`: step, tokens_seen), then the run's last validation in metrics.jsonl."""
    meta = {}
    if "global_steps" in model_states:
        meta["step"] = int(model_states["global_steps"])
    trainer_state_path = trainer_state_file(tag_dir.parent, 0)
    if trainer_state_path.is_file():
        trainer_state = load_tensors_file(trainer_state_path)
        for key, name in (("step", "step"), ("tokens_seen", "tokens_trained")):
            if key in trainer_state:
                meta[name] = trainer_state[key]
    evals = _last_validation(tag_dir, meta.get("step"))
    if evals:
        meta["eval"] = evals
    return meta


def _last_validation(tag_dir: Path, step: int | None) -> dict:
    """The newest validation record at or before `step` in the run's metrics.jsonl (run/checkpoints/step/engine)."""
    for directory in tag_dir.parents[:4]:
        metrics = directory / METRICS_FILE
        if metrics.is_file():
            break
    else:
        return {}
    found = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if "val_loss" in record and (step is None or record.get("step", 0) <= step):
            found = {"step": record.get("step"), "val_loss": round(record["val_loss"], 4),
                     "val_perplexity": round(math.exp(min(record["val_loss"], 50.0)), 2)}
    return found


def _find_run_config(tag_dir: Path) -> tuple[ModelConfig, Path]:
    """The resolved training config saved beside the checkpoint (or in the run directory above it)."""
    import yaml

    for directory in (tag_dir, tag_dir.parent, tag_dir.parent.parent):
        for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
            data = yaml.safe_load(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                return _model_config(data["model"], str(path)), path
    raise CheckpointError(
        f"no config YAML with a `model:` section beside {tag_dir} or in the run directory; the trainer writes one "
        "with each checkpoint, copy it there"
    )


def _model_config(values: dict, where: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown model config key(s) {unknown}")
    try:
        return ModelConfig(**values)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{where}: invalid model config: {error}") from error


def find_tokenizer_dir(path: str | Path) -> Path | None:
    """The tokenizer directory of the checkpoint at `path` (found as read_checkpoint finds it), without reading any
    weights; None when it has none."""
    location = _locate(Path(path).expanduser())
    if (location / "config.json").is_file():
        return location if _has_tokenizer(location) else None
    return _find_tokenizer(location)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _find_tokenizer(tag_dir: Path) -> Path | None:
    for directory in (tag_dir, tag_dir.parent, tag_dir.parent.parent):
        for candidate in (directory, directory / TOKENIZER_DIR):
            if candidate.is_dir() and _has_tokenizer(candidate):
                return candidate
    return None


# --- validation ----------------------------------------------------------------------------------------------------


def validate_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse tensors that do not match the config (every missing, extra or misshapen one listed) or are not finite."""
    expected = expected_shapes(cfg)
    problems = [f"missing {name} {tuple(shape)}" for name, shape in expected.items() if name not in state]
    problems += [f"unexpected {name} {tuple(state[name].shape)}" for name in state if name not in expected]
    problems += [
        f"{name} has shape {tuple(state[name].shape)}, the config needs {tuple(shape)}"
        for name, shape in expected.items()
        if name in state and state[name].shape != shape
    ]
    if problems:
        raise CheckpointError(f"{where}: the tensors do not match the model config:\n  - " + "\n  - ".join(problems))
    not_finite = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if not_finite:
        raise CheckpointError(f"{where}: NaN or inf in {not_finite}; export a checkpoint from before the divergence")
