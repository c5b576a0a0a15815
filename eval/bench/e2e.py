"""Shared pieces of the benchmarks: device checks (all), and for the end-to-end ones (train_throughput.py,
decode.py) model presets, the transformers twin of a hybridlm model with identical weights, and timing."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "eval" / "bench" / "results"
# Dense bf16 tensor-core peak (TFLOP/s) for MFU, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


def require_device(device: str, tiny: bool) -> None:
    """Exit with a clear message when the benchmark cannot run here."""
    import torch

    if device == "cpu" and not tiny:
        sys.exit("the full benchmark needs a CUDA GPU (bf16, fla kernels); on CPU only the smoke mode runs: "
                 "add --tiny (with --device cpu)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible (torch.cuda.is_available() is False): run this on a GPU machine, or try "
                 "the plumbing with --device cpu --tiny")


def kernel_bench_device(script: str, smoke: bool) -> str:
    """For the kernel benchmarks: 'cuda' when a GPU is there, else with `smoke` 'cpu' through the Triton interpreter
    (set here, before triton is imported), else exit with what to do."""
    import os
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        return "cuda"
    if not smoke:
        sys.exit(f"{script}: no CUDA GPU found. The benchmark needs one (an H100/H200); `--smoke` checks the "
                 "plumbing on CPU.")
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def prepare_cpu(device: str) -> None:
    """On CPU, hide fla from transformers (its Triton kernels need a GPU) and use Triton's interpreter for ours.
    Must run before torch/transformers are imported."""
    import os

    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        sys.modules["fla"] = None


def load_model_config(path: Path, **overrides):
    """A ModelConfig from a configs/model/*.yaml file, with dataclass field overrides."""
    import yaml

    from hybridlm.config import ModelConfig

    values = yaml.safe_load(Path(path).read_text())
    return dataclasses.replace(ModelConfig(**values), **overrides)


def tiny_config(**overrides):
    """A qwen3_next-exportable model small enough for the CPU smoke mode."""
    return load_model_config(REPO / "configs" / "model" / "qwen3_next_tiny.yaml", num_layers=4, vocab_size=512,
                             **overrides)


def match_parameters(base, layer_pattern: str):
    """`base` with another layer pattern and the FFN width changed so the total parameter count stays as close as
    possible (attention and GDN layers differ in size)."""
    target = base.parameter_counts()["total"]
    moe = "moe" in base.mlp_types

    def with_width(width: int):
        if moe:
            return dataclasses.replace(base, layer_pattern=layer_pattern,
                                       moe=dataclasses.replace(base.moe, intermediate_size=width))
        return dataclasses.replace(base, layer_pattern=layer_pattern, intermediate_size=width)

    start = base.moe.intermediate_size if moe else base.intermediate_size
    widths = range(max(8, start // 4), start * 4 + 1, 8)
    return min((with_width(w) for w in widths), key=lambda cfg: abs(cfg.parameter_counts()["total"] - target))


def build_hybridlm(cfg, device, dtype, seed: int = 0):
    import torch

    from hybridlm.model import HybridLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = HybridLM(cfg)
    return model.to(dtype)


def check_exportable(cfg) -> None:
    """Exit before any work when the transformers twin cannot express `cfg` (the qwen3_next format)."""
    from hybridlm.checkpoint.formats import FORMATS, ExportError

    try:
        FORMATS["qwen3_next"].check_fits(cfg)
    except ExportError as error:
        sys.exit(f"the transformers comparison needs a qwen3_next-exportable model: {error}")


def build_transformers_twin(model, device, dtype, experts_implementation: str = "grouped_mm"):
    """transformers' Qwen3NextForCausalLM with `model`'s weights, through our qwen3_next export and
    `from_pretrained` (the path users take). transformers picks its Gated DeltaNet and short-convolution kernels
    when its modeling module is imported (fla / causal-conv1d when importable, else its PyTorch code): see
    `transformers_kernels`. `experts_implementation` picks its MoE path (`set_experts_implementation` changes it)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from hybridlm.checkpoint.reader import Checkpoint
    from hybridlm.export.writer import write_model_dir

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="hybridlm-twin-") as directory:
        write_model_dir(Checkpoint(model.config, state, Path(directory), "hybridlm"), Path(directory), "qwen3_next",
                        dtype, 1 << 40)
        twin = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa",
                                                    experts_implementation=experts_implementation)
    return twin.to(device)


# The functions transformers' Qwen3-Next modeling resolves at import to an installed package or its PyTorch code.
TRANSFORMERS_KERNEL_FUNCTIONS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                                 "causal_conv1d_fn", "causal_conv1d_update")


def _fallback_wrapper_cells(obj, depth: int = 4) -> dict | None:
    """The closure variables of transformers' `use_kernel_func_from_hub_with_fallback` wrapper behind `obj`: searched
    through closures, `__wrapped__` and, for the nn.Module wrappers transformers 5.25 builds around kernel functions
    (`use_kernelized_func`'s `Func`), the class's `forward`. None when no such wrapper is found."""
    seen, frontier = set(), [obj]
    for _ in range(depth):
        found = []
        for candidate in frontier:
            if id(candidate) in seen:
                continue
            seen.add(id(candidate))
            code, closure = getattr(candidate, "__code__", None), getattr(candidate, "__closure__", None)
            if code is not None:
                cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in closure or ())))
                if "implementation" in cells and "is_new_implementation" in cells:
                    return cells
                found.extend(value for value in cells.values() if callable(value))
            found.extend(getattr(candidate, attribute) for attribute in ("__wrapped__", "forward")
                         if callable(getattr(candidate, attribute, None)))
            forward = getattr(type(candidate), "forward", None)
            if callable(forward):
                found.append(forward)
        frontier = found
    return None


def transformers_kernels() -> dict:
    """{function: "module.qualname" of what transformers' Qwen3-Next calls on a GPU, "torch fallback", or "unknown:
    <why>"} plus the experts implementations it registers. transformers has no public API for this: it is read from
    the closure of its `use_kernel_func_from_hub_with_fallback` wrapper, and recorded as unknown (never a crash) when
    a release changes that structure."""
    import transformers
    import transformers.models.qwen3_next.modeling_qwen3_next as qwen3_next
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    resolved = {}
    for name in TRANSFORMERS_KERNEL_FUNCTIONS:
        function = getattr(qwen3_next, name, None)
        cells = None if function is None else _fallback_wrapper_cells(function)
        if function is None:
            resolved[name] = f"unknown: transformers {transformers.__version__} has no qwen3_next.{name}"
        elif cells is None:
            resolved[name] = (f"unknown: transformers {transformers.__version__}'s wrapper of {name} has no "
                              "'implementation' / 'is_new_implementation' closure to read")
        elif cells["is_new_implementation"]:
            implementation = cells["implementation"]
            resolved[name] = f"{implementation.__module__}.{implementation.__qualname__}"
        else:
            resolved[name] = "torch fallback"
    return {"functions": resolved, "experts_implementations": ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]}


def require_fla(kernels: dict) -> None:
    """On a GPU the baseline is transformers + fla: refuse to report numbers for its PyTorch fallback."""
    chunk = kernels["functions"]["torch_chunk_gated_delta_rule"]
    if chunk.startswith("unknown"):
        print(f"WARNING: cannot tell which chunk_gated_delta_rule transformers calls ({chunk}); the baseline may be "
              "its PyTorch code", file=sys.stderr)
        return
    if not chunk.startswith("fla."):
        sys.exit(f"transformers' Qwen3-Next resolved chunk_gated_delta_rule to {chunk!r}, not fla's kernel: the "
                 "baseline would be its slow PyTorch code. Install flash-linear-attention (pip install "
                 "flash-linear-attention) and check that `import fla.ops.gated_delta_rule` works on this GPU")


def hybridlm_kernels(cfg, device) -> dict:
    """The backends our model resolves on `device` (auto: Triton / FlexAttention on CUDA, PyTorch on CPU)."""
    import torch

    from hybridlm import ops

    device = torch.device(device)
    return {"gdn": ops.GATED_DELTA.resolve(cfg.gdn.backend, device), "moe": ops.MOE.resolve(cfg.moe.backend, device),
            "attention": ops.ATTENTION.resolve(cfg.attention.backend, device)}


def release_memory(device) -> None:
    """Return cached blocks after a run (or an out-of-memory error) so the next one starts from a clean pool."""
    import torch

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def synchronize(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak_memory(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if str(device).startswith("cuda") else None


def time_steps(step, device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `step()` over `iters` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_tflops(device, override: float = 0.0) -> float | None:
    import torch

    if override:
        return override
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def device_tag(device) -> str:
    """Short name for result files: cpu, h100, a100, ..."""
    import re

    import torch

    if not str(device).startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    known = next((key for key in PEAK_BF16_TFLOPS if key in name), None)
    return (known or re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")).lower()


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
