"""`hybridlm doctor`: on a CPU it checks the PyTorch references and says no kernel ran on a GPU; a kernel that
returns wrong values is reported as FAIL, with the fix, and the exit status is non-zero."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

import hybridlm.kernels.gated_delta as gated_delta
from hybridlm.cli import main
from hybridlm.config import ConfigError
from hybridlm.evaluate.doctor import load_train_config

TINY_OPS = ["gdn.chunk fwd+bwd", "gdn.decode step", "moe.router fwd+bwd", "moe.permutation",
            "moe.experts+combine fwd+bwd", "moe.path fwd+bwd", "attention fwd+bwd"]


def doctor(capsys, *args) -> tuple[int, str]:
    status = main(["doctor", *args, "--device", "cpu"])
    return status, capsys.readouterr().out


def test_on_cpu_every_op_is_checked_as_the_reference_and_no_kernel_ran(tmp_path, capsys):
    status, out = doctor(capsys, "model=tiny", "--json", str(tmp_path / "doctor.json"))
    assert status == 0, out
    for name in ("torch", "triton", "fla", "deepspeed", "transformers", "CUDA", "GPU: none"):
        assert name in out
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert [r["op"] for r in report["results"]] == TINY_OPS and report["ok"] and report["dtype"] == "fp32"
    for result in report["results"]:
        assert result["op"] in out and not result["on_gpu"] and not result["kernel"]
        # The references have no permutation or expert kernels of their own: those two are covered by moe.path.
        assert result["status"] == ("skipped" if result["op"] in TINY_OPS[3:5] else "pass"), result
    assert "kernels run on a GPU: none\n  (every op here is a PyTorch reference" in out
    assert "kernels run on the CPU only" not in out


def test_a_broken_kernel_is_reported_as_fail_with_the_fix_and_a_non_zero_exit(monkeypatch, capsys):
    """Our GDN chunk kernel replaced by one 0.1 % off (the reference, scaled: no interpreter time)."""

    def wrong_by_a_little(*args, chunk_layout=None, **kwargs):
        o, final_state = gated_delta.chunk_gated_delta_rule_ref(*args, **kwargs)
        return o * 1.001, final_state

    monkeypatch.setattr(gated_delta, "chunk_gated_delta_rule", wrong_by_a_little)
    status, out = doctor(capsys, "model=tiny", "model.gdn.backend=triton")
    assert status == 1
    lines = {op: next(line for line in out.splitlines() if op in line) for op in TINY_OPS}
    assert lines["gdn.chunk fwd+bwd"].split()[0] == "FAIL"
    assert "our Triton kernel in the CPU interpreter: output: error 1.00e-03 > 1e-05" in lines["gdn.chunk fwd+bwd"]
    assert "fix: model.gdn.backend=fla or model.gdn.backend=torch" in lines["gdn.chunk fwd+bwd"]
    assert lines["gdn.decode step"].split()[0] == "pass"  # the real decode kernel, in the interpreter
    assert ("kernels run on the CPU only (Triton interpreter, eager FlexAttention), not on a GPU: gdn.chunk fwd+bwd, "
            "gdn.decode step\n") in out
    assert "FAILED: 1 of 7 checks: gdn.chunk fwd+bwd" in out


def test_a_run_directory_config_takes_dotted_overrides(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    composed = load_train_config(None, ["model=gpu_1b"])
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(composed)))
    cfg = load_train_config(str(run), ["model.moe.backend=torch"])
    assert cfg.model.gdn.head_k_dim == 128 and cfg.model.moe.backend == "torch"
    with pytest.raises(ValueError, match="dotted keys"):
        load_train_config(str(run), ["model=tiny"])
    with pytest.raises(ValueError, match="no config found"):
        load_train_config(str(tmp_path / "missing"), [])
    with pytest.raises(ConfigError, match="model.moe.backend"):
        load_train_config(str(run), ["model.moe.backend=cuda"])


@pytest.mark.gpu
def test_on_a_gpu_every_op_of_gpu_1b_passes_in_bf16_on_the_gpu(tmp_path, capsys):
    status = main(["doctor", "model=gpu_1b", "--json", str(tmp_path / "doctor.json")])
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["dtype"] == "bf16" and report["environment"]["gpu"]["capability"].startswith("sm_")
    assert [r["op"] for r in report["results"]] == TINY_OPS  # gpu_1b uses the same kinds of layers as tiny
    for result in report["results"]:
        assert result["status"] == "pass" and result["on_gpu"] and result["kernel"], result
