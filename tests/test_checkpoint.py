"""hybridlm.checkpoint in-process: the package's layering, manifests, pruning that keeps the newest finite checkpoint,
disk-full saves (both error forms torch.save gives, one rank or two), weights_only loads (DeepSpeed's included), the
divergence guard and metrics.jsonl's line-atomic writes. The same faults on real runs: test_checkpoint_faults.py."""

from __future__ import annotations

import ast
import errno
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.distributed import run_distributed_test

import hybridlm.checkpoint.save as save_module
from hybridlm.checkpoint import CheckpointError
from hybridlm.checkpoint.layout import complete_checkpoints, trainer_state_file
from hybridlm.checkpoint.manifest import verify_manifest, write_manifest
from hybridlm.checkpoint.resume import resolve_resume, verify_checkpoint
from hybridlm.checkpoint.safe_load import deepspeed_loads_weights_only, load_tensors_file
from hybridlm.checkpoint.save import prune, save_checkpoint
from hybridlm.config import ConfigError
from hybridlm.train.config import TrainerConfig
from hybridlm.train.divergence import DivergenceGuard, TrainingDiverged
from hybridlm.train.metrics import append_line, drop_torn_last_line

PACKAGE = Path(__file__).resolve().parents[1] / "hybridlm"
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4176"


# --- layering -----------------------------------------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether at module level) for every import in `path`."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


def _imports_of(package: str) -> dict[str, list[tuple[str, bool]]]:
    return {str(p.relative_to(PACKAGE.parent)): _imports(p) for p in sorted((PACKAGE / package).rglob("*.py"))}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_checkpoint_package_imports_neither_train_nor_export_and_export_never_imports_train():
    checkpoint = {
        (path, module) for path, imports in _imports_of("checkpoint").items() for module, _ in imports
        if _within(module, "hybridlm.train") or _within(module, "hybridlm.export")
    }  # fmt: skip
    assert not checkpoint, checkpoint
    export = {
        (path, module) for path, imports in _imports_of("export").items() for module, _ in imports
        if _within(module, "hybridlm.train")
    }  # fmt: skip
    assert not export, export
    # The trainer reaches the export code only where a run asks for an export (the options' validator, the
    # end-of-training export), inside those functions: importing hybridlm.train never imports hybridlm.export.
    eager = {
        (path, module) for path, imports in _imports_of("train").items() for module, top in imports
        if top and _within(module, "hybridlm.export")
    }  # fmt: skip
    assert not eager, eager
    assert not (PACKAGE / "train" / "checkpoint.py").exists() and not (PACKAGE / "export" / "checkpoint.py").exists()
    assert not (PACKAGE / "parallel" / "checkpoint.py").exists() and not (PACKAGE / "export" / "load.py").exists()


def test_every_torch_load_in_hybridlm_is_weights_only():
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((str(path.relative_to(PACKAGE)), keywords.get("weights_only")))
    assert calls and all(value == "True" for _, value in calls), calls


# --- manifests and verification -----------------------------------------------------------------------------------


def _fake_checkpoint(root: Path, step: int, finite: bool = True) -> Path:
    path = root / "checkpoints" / f"step_{step:08d}"
    (path / "engine").mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(4096.0)}}, path / "engine" / "mp_rank_00_model_states.pt")
    torch.save({"step": step, "finite": finite}, trainer_state_file(path, 0))
    write_manifest(path)
    return path


def test_manifest_names_the_file_whose_bytes_changed(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path, 1)
    verify_manifest(checkpoint)
    states = checkpoint / "engine" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x01
    states.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{states} is corrupt: its sha256 differs"):
        verify_checkpoint(checkpoint)
    states.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=rf"{states} is truncated or corrupt: 100 bytes"):
        verify_checkpoint(checkpoint)


def test_a_truncated_file_without_a_manifest_is_named(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path, 1)
    (checkpoint / "manifest.json").unlink()
    state = trainer_state_file(checkpoint, 0)
    state.write_bytes(state.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=rf"{state} is truncated or corrupt"):
        verify_checkpoint(checkpoint)


def test_pruning_keeps_the_newest_finite_checkpoint(tmp_path):
    for step, finite in ((1, True), (2, True), (3, False), (4, False)):
        _fake_checkpoint(tmp_path, step, finite)
    prune(tmp_path / "checkpoints", keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000004"]


# --- disk full ----------------------------------------------------------------------------------------------------


class FakeEngine:
    """What save_checkpoint asks of a DeepSpeed engine: its save and its module."""

    module = torch.nn.Linear(2, 2)

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        (Path(save_dir) / tag).mkdir(exist_ok=True)
        if dist.get_rank() == 0:  # DeepSpeed writes the module from data-parallel rank 0
            torch.save({"module": self.module.state_dict()}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")


def _save(out_dir: Path, step: int) -> Path:
    return save_checkpoint(FakeEngine(), out_dir, step, {"step": step, "finite": True}, "model: {}\n", None, 0)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("failure", [RuntimeError(TORCH_SHORT_WRITE), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))])
def test_disk_full_during_a_save_names_enospc_the_place_and_the_newest_intact_checkpoint(
    tmp_path, one_rank_group, monkeypatch, failure
):
    out_dir = tmp_path / "run"
    first = _save(out_dir, 1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "trainer_state" in str(f):
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(save_module.torch, "save", full_disk)
    tmp = out_dir / "checkpoints" / ".tmp-step_00000002"
    with pytest.raises(CheckpointError) as error:
        _save(out_dir, 2)
    message = str(error.value)
    assert "the disk is full (ENOSPC" in message and f"while writing {tmp}" in message
    assert f"the newest intact checkpoint is {first}" in message
    assert tmp.is_dir() and complete_checkpoints(out_dir) == [first]  # half-written: left, and ignored
    assert resolve_resume("auto", out_dir) == first
    monkeypatch.setattr(save_module.torch, "save", real_save)
    assert _save(out_dir, 2).name == "step_00000002" and not tmp.exists()  # the next save sweeps it


def _rank_1_runs_out_of_disk(rank: int, world_size: int, out_dir: str) -> str:
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if rank == 1 and "trainer_state" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    save_module.torch.save = full_disk
    try:
        _save(Path(out_dir), 1)
    except CheckpointError as error:
        return str(error)
    finally:
        save_module.torch.save = real_save
    return "saved"


def test_disk_full_on_one_rank_stops_every_rank_with_a_message(tmp_path):
    messages = run_distributed_test(_rank_1_runs_out_of_disk, world_size=2, func_args=(str(tmp_path),), timeout_s=60)
    assert "another rank failed to write" in messages[0] and "there is no intact checkpoint yet" in messages[0]
    assert "the disk is full (ENOSPC" in messages[1]
    assert complete_checkpoints(tmp_path) == []


# --- weights_only -------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling it calls open(marker, "w"): the marker file appears if a load runs the pickle's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_payloads_are_refused_by_our_loads_and_by_deepspeed_s(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=rf"{path} holds objects other than tensors"):
        load_tensors_file(path)
    with deepspeed_loads_weights_only(), pytest.raises(CheckpointError, match="could run arbitrary code"):
        TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert not marker.exists()
    assert torch.load.__name__ == "load"  # restored after the block


# --- divergence and metrics.jsonl ---------------------------------------------------------------------------------


def test_non_finite_steps_stop_after_max_bad_steps_in_a_row_naming_the_last_good_checkpoint(tmp_path):
    good = _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4, finite=False)
    guard = DivergenceGuard(max_bad_steps=2, out_dir=tmp_path, resumed_from=None)
    assert guard.check(5, torch.tensor(float("nan")), 1.0) is False
    assert guard.check(6, torch.tensor(2.0), 1.0) is True  # a finite step resets the count
    assert guard.check(7, torch.tensor(2.0), float("inf")) is False
    with pytest.raises(TrainingDiverged, match=rf"step 8: .*2 step\(s\) in a row .*last good checkpoint is {good}"):
        guard.check(8, torch.tensor(float("inf")), 1.0)
    with pytest.raises(ConfigError, match="trainer.max_bad_steps=0 must be >= 1"):
        TrainerConfig(max_bad_steps=0)


def test_metrics_lines_are_whole_and_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert drop_torn_last_line(path) == 0  # no file yet
    append_line(path, json.dumps({"step": 1, "loss": 2.0}))
    append_line(path, json.dumps({"step": 2, "loss": 1.5}))
    whole = path.read_bytes()
    assert drop_torn_last_line(path) == 0 and path.read_bytes() == whole
    with path.open("ab") as f:
        f.write(b'{"step": 3, "lo')  # a write cut short by a full disk
    assert drop_torn_last_line(path) == len(b'{"step": 3, "lo') and path.read_bytes() == whole
    path.write_bytes(b'{"step": 1')
    assert drop_torn_last_line(path) == 10 and path.read_bytes() == b""
