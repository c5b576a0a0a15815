"""The distribution ships every package on disk under its installed name, and the console script works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def packages_on_disk() -> set[str]:
    found = set()
    for root, installed in (("hybridlm", "hybridlm"), ("kernels", "hybridlm.kernels")):
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / root).parts
            found.add(".".join((installed, *relative)))
    return found


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert packages_on_disk() == listed, "add new packages to [tool.setuptools] packages in pyproject.toml"


def test_kernels_are_importable_as_hybridlm_kernels_only():
    out = subprocess.run(
        [sys.executable, "-c", "import hybridlm.kernels.gated_delta, hybridlm.kernels.moe, importlib.util as u;"
         "print(u.find_spec('kernels') is None or 'hybridlm' not in (u.find_spec('kernels').origin or ''))"],
        capture_output=True, text=True, cwd="/", check=True,
    )
    assert out.stdout.strip() == "True"


def test_kernels_folder_is_no_top_level_package():
    # With an __init__.py, the repository root on sys.path makes `import kernels` ours instead of Hugging Face's.
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_repository_root_does_not_shadow_hugging_face_kernels(tmp_path):
    """From the repository root (as `python train.py` and `python -m pytest` run): HF's `kernels`, transformers'
    Qwen3-Next / Qwen3.5-MoE classes, fla and an AutoModel load of one of our exports all import as they should."""
    from hybridlm.config import ModelConfig
    from hybridlm.export import export_checkpoint
    from hybridlm.checkpoint.reader import Checkpoint
    from hybridlm.export.writer import write_model_dir
    from hybridlm.model import HybridLM

    cfg = ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / "qwen3_next_tiny.yaml").read_text()))
    torch.manual_seed(0)
    source = tmp_path / "ours"
    source.mkdir()
    write_model_dir(Checkpoint(cfg, HybridLM(cfg).state_dict(), source, "test"), source, "hybridlm", torch.float32,
                    10**9)
    export = export_checkpoint(source, tmp_path / "export", format="qwen3_next", dtype="fp32")
    probe = textwrap.dedent(f"""
        import kernels, sys
        assert "site-packages" in kernels.__file__ and hasattr(kernels, "CUDAProperties"), kernels.__file__
        from transformers import AutoModelForCausalLM, Qwen3NextForCausalLM, Qwen3_5MoeForCausalLM
        import fla
        model = AutoModelForCausalLM.from_pretrained({str(export)!r})
        assert type(model) is Qwen3NextForCausalLM, type(model)
        for name in ("kernels.gated_delta", "kernels.moe"):  # our sources, reached by their wrong name
            try:
                __import__(name)
            except ImportError:
                continue
            raise AssertionError(name + " imported as a top-level module")
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_non_editable_install_ships_the_kernels_under_hybridlm_only(tmp_path):
    """`pip install .` (not editable): the kernels import as hybridlm.kernels from the installed copy."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    assert not (target / "kernels").exists(), "a top-level kernels package was installed"
    probe = ("import hybridlm.kernels.gated_delta as g, hybridlm.kernels.moe as m, sys;"
             f"assert all(p.__file__.startswith({str(target)!r}) for p in (g, m)), (g.__file__, m.__file__);"
             "print('ok')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.stdout.strip() == "ok", out.stderr[-3000:]


def test_console_script_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "hybridlm.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("prepare-data", "export", "generate", "eval", "plan"):
        assert command in out.stdout
