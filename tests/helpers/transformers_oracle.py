"""transformers' own models as the oracle of our exports and imports, in a subprocess where hybridlm cannot be
imported (`sys.modules["hybridlm"] = None`, checked at its end) and fla is hidden (`sys.modules["fla"] = None`, so
transformers takes its plain PyTorch paths on CPU).

`run_oracle(job, workdir)`: job["create"] lists transformers models to build at random and save (model_type, config,
out, seed); job["load"] lists model directories to load with the Auto classes; every one is run on job["ids"] (a
saved [B, T] tensor) and the loaded ones' tokenizers on job["text"]. Returns {path: {"logits", "class", "info"
(loading problems), "encoded"}}."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

# Keys of transformers' output_loading_info that a faithful export leaves empty.
LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")

ORACLE = r"""
import json, sys
sys.modules["fla"] = None  # transformers would otherwise send CPU tensors to fla's GPU kernels
sys.modules["hybridlm"] = None  # plain transformers: `import hybridlm` (or of anything in it) fails here
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

job = json.load(open(sys.argv[1]))
ids = torch.load(job["ids"])
results = {}
for spec in job["create"]:
    torch.manual_seed(spec["seed"])
    config = AutoConfig.for_model(spec["model_type"], **spec["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # every tensor random, norms and decay parameters included
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.1 if param.dim() == 1 else 0.02))
    model.save_pretrained(spec["out"])
    with torch.no_grad():
        results[spec["out"]] = {"logits": model(ids % config.vocab_size).logits, "class": type(model).__name__}
for path in job["load"]:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    model.eval()
    with torch.no_grad():
        logits = model(ids % model.config.vocab_size).logits
    results[path] = {"class": type(model).__name__, "info": {k: sorted(map(str, v)) for k, v in info.items()},
                     "logits": logits, "encoded": AutoTokenizer.from_pretrained(path).encode(job["text"])}
loaded = sorted(name for name, module in sys.modules.items() if name.startswith("hybridlm") and module is not None)
assert not loaded, f"hybridlm was imported: {loaded}"
torch.save(results, job["result"])
"""


def run_oracle(job: dict, workdir: Path) -> dict:
    job_path = workdir / "job.json"
    job["result"] = str(workdir / "result.pt")
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-c", ORACLE, str(job_path)], capture_output=True, text=True,
                          timeout=900, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(job["result"])
