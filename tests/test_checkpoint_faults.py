"""Damaged checkpoints of a real run (train.py, tiny model, checkpoints at steps 2 and 4): a truncated or bit-rotted
newest model-states file, pickle payloads and NaN weights are named and refused on resume, export and init_from;
resume=auto falls back to the previous intact checkpoint, never deleting the bad one; a diverged run stops before
it saves. Issue 13 item 1 (a) and issue 19 items 1, 2 and 7."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.launch import tiny_run, train

from hybridlm.checkpoint import CheckpointError
from hybridlm.checkpoint.init_from import load_pretrained_into
from hybridlm.checkpoint.layout import complete_checkpoints, trainer_state_file
from hybridlm.checkpoint.manifest import write_manifest
from hybridlm.checkpoint.reader import read_checkpoint
from hybridlm.checkpoint.resume import resolve_resume
from hybridlm.model import HybridLM

STATES = Path("engine") / "mp_rank_00_model_states.pt"


def overrides(data_cache: Path, max_steps: int, *extra: str) -> list[str]:
    return tiny_run(data_cache) + [f"trainer.max_steps={max_steps}", "trainer.save_every=2", "trainer.keep_last=0",
                                   "trainer.kernel_check=false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, data_cache) -> Path:
    out_dir = tmp_path_factory.mktemp("faults") / "run"
    train(out_dir, overrides(data_cache, 4))
    assert [p.name for p in complete_checkpoints(out_dir)] == ["step_00000002", "step_00000004"]
    return out_dir


@pytest.fixture
def run(saved_run, tmp_path) -> Path:
    """A copy of the saved run to damage."""
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def newest(run: Path) -> Path:
    return run / "checkpoints" / "step_00000004"


def test_truncated_newest_checkpoint_resume_auto_falls_back_and_resume_path_refuses(run, data_cache):
    bad = newest(run) / STATES
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    size = bad.stat().st_size
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 5, "loss": 1.2')  # a line torn by a crash

    refused = train(run, overrides(data_cache, 5, f"trainer.resume={newest(run)}"), check=False)
    assert refused.returncode != 0
    assert f"cannot be resumed from: {bad} is truncated or corrupt" in refused.stderr, refused.stderr[-3000:]

    resumed = train(run, overrides(data_cache, 3))  # trainer.resume=auto
    assert f"skipping {newest(run)}: {bad} is truncated or corrupt" in resumed.stdout
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in resumed.stdout
    assert bad.stat().st_size == size  # kept as it was, for whoever looks into it
    assert "dropped its last line (23 bytes)" in resumed.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert records[-1]["step"] == 3 and not [record for record in records if record["step"] == 5]


def test_bit_rot_in_the_newest_model_states_is_detected_on_resume_and_export(run):
    bad = newest(run) / STATES
    data = bytearray(bad.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = b"\xff" * 4096
    bad.write_bytes(bytes(data))
    message = rf"{bad} is corrupt: its sha256 differs from the one in manifest.json"
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(run)  # export, generate and eval read through it
    with pytest.raises(CheckpointError, match=message):
        resolve_resume(str(newest(run)), run)
    assert resolve_resume("auto", run) == run / "checkpoints" / "step_00000002"


class Payload:
    """Unpickling it calls open(marker, "w"): the marker file appears if a load runs the pickle's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("target", ["trainer_state_rank0.pt", str(STATES)])
def test_a_pickle_payload_is_refused_on_resume_export_and_init_from(run, data_cache, tmp_path, target):
    marker = tmp_path / "payload-ran"
    path = newest(run) / target
    state = torch.load(path, weights_only=True)
    state["note"] = Payload(marker)
    torch.save(state, path)
    write_manifest(newest(run))  # whoever planted it can rewrite the checksums too
    refusal = rf"{path} holds objects other than tensors and plain containers"

    with pytest.raises(CheckpointError, match=refusal):
        resolve_resume(str(newest(run)), run)
    assert resolve_resume("auto", run) == run / "checkpoints" / "step_00000002"
    with pytest.raises(CheckpointError, match=refusal):
        read_checkpoint(run)
    model = HybridLM(read_checkpoint(run / "checkpoints" / "step_00000002").config)
    with pytest.raises(CheckpointError, match=refusal):
        load_pretrained_into(model, newest(run))
    if target == "trainer_state_rank0.pt":
        refused = train(run, overrides(data_cache, 5, f"trainer.resume={newest(run)}"), check=False)
        assert refused.returncode != 0 and "holds objects other than tensors" in refused.stderr, refused.stderr[-3000:]
    assert not marker.exists()


def test_nan_weights_stop_the_run_before_it_saves_naming_the_step_and_the_last_good_checkpoint(run, data_cache):
    states = newest(run) / STATES
    saved = torch.load(states, weights_only=True)
    saved["module"]["norm.weight"].fill_(float("nan"))  # damage the checksums do not see: written before them
    torch.save(saved, states)
    write_manifest(newest(run))

    diverged = train(run, overrides(data_cache, 8), check=False)  # trainer.resume=auto
    assert diverged.returncode != 0
    assert "step 5: the loss (nan)" in diverged.stderr, diverged.stderr[-3000:]
    assert "(trainer.max_bad_steps=1); the run stops without saving or pruning" in diverged.stderr
    assert f"every step since resuming from {newest(run)} diverged, so it may be damaged itself" in diverged.stderr
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_00000002'}" in diverged.stderr
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert torch.load(trainer_state_file(newest(run), 0), weights_only=True)["finite"] is True
