"""Training metrics: losses averaged over a logging window, throughput, MFU and MoE expert load."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Dense bf16 tensor-core peak per GPU (no sparsity), matched against torch.cuda.get_device_name() in this order.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def peak_flops_per_device(device: torch.device) -> float | None:
    """bf16 dense peak of this device, or None when unknown (CPU, unlisted GPU): MFU is then reported as n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def expert_load_ratio(counts: torch.Tensor) -> float:
    """max / mean tokens per expert: 1.0 is a perfectly even load, num_experts means one expert takes everything."""
    counts = counts.double()
    mean = counts.mean()
    return float(counts.max() / mean) if mean > 0 else float("nan")


class MetricsWindow:
    """Sums over the micro-batches since the last log, kept on device: only logging, validation and checkpoint
    steps read the clock (a CUDA synchronise) or the sums."""

    LOSSES = ("loss", "ce_loss", "aux_loss", "z_loss")

    def __init__(self, device: torch.device, moe_layer_ids: list[int]):
        self.device = device
        self.moe_layer_ids = moe_layer_ids  # block index of each MoE layer, in forward order
        self.reset()

    def reset(self, now: float | None = None) -> None:
        """Start a new window; its clock runs from `now` (a clock reading just taken) or from a new reading."""
        self.loss_sums = torch.zeros(len(self.LOSSES), dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        self.tokens = 0  # input tokens over all ranks
        self.expert_counts: list[torch.Tensor] | None = None
        self.grad_norms: list[torch.Tensor] = []
        self.seconds = 0.0
        self._started = self._clock() if now is None else now

    def _clock(self) -> float:
        # CUDA work is queued asynchronously: wait for it, or the window would end before its steps have run.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def pause(self) -> float:
        """Stop the clock (validation, checkpoints) so tokens/s measures training only; returns the reading."""
        now = self._clock()
        self.seconds += now - self._started
        return now

    def resume(self) -> None:
        self._started = self._clock()

    def add_micro_batch(self, out, tokens: int) -> None:
        self.loss_sums += torch.stack([getattr(out, name).detach().double() for name in self.LOSSES])
        self.micro_batches += 1
        self.tokens += tokens
        if out.expert_counts:
            counts = [c.detach().to(torch.int64) for c in out.expert_counts]
            self.expert_counts = counts if self.expert_counts is None else [
                a + b for a, b in zip(self.expert_counts, counts)
            ]

    def add_grad_norm(self, norm) -> None:
        if norm is not None:
            self.grad_norms.append(torch.as_tensor(norm, dtype=torch.float64, device=self.device))

    def summarize(self, flops_per_token: float, peak_flops: float | None, world_size: int) -> dict[str, float]:
        """Average over the window and over ranks (collective: every rank calls it)."""
        now = self.pause()
        sums = self.loss_sums.clone()
        if world_size > 1:
            dist.all_reduce(sums)
        means = (sums / (self.micro_batches * world_size)).tolist()
        metrics = dict(zip(self.LOSSES, means))
        if self.grad_norms:
            metrics["grad_norm"] = float(torch.stack(self.grad_norms).mean())
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        metrics["tokens_per_s"] = tokens_per_s
        if peak_flops is not None:
            metrics["mfu"] = flops_per_token * tokens_per_s / (peak_flops * world_size)
        if self.expert_counts is not None:
            counts = torch.stack(self.expert_counts)
            # The model sums counts over ranks only when training needs it; max/mean is scale-free, so summing
            # already-global counts again gives the same ratio.
            if world_size > 1:
                dist.all_reduce(counts)
            ratios = [expert_load_ratio(layer_counts) for layer_counts in counts]
            for layer, ratio in zip(self.moe_layer_ids, ratios):
                metrics[f"moe_load_max_over_mean/layer{layer}"] = ratio
            metrics["moe_load_max_over_mean/worst"] = max(ratios)
        self.reset(now)
        return metrics


TAIL_CHUNK = 1 << 16


def append_line(path: Path, line: str) -> None:
    """Append `line` as one write(2) of the whole line on an O_APPEND file, so a crash leaves every earlier line
    whole; only a full disk can cut the last one short (drop_torn_last_line removes it on the next start)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def drop_torn_last_line(path: Path) -> int:
    """Truncate a last line without its newline (a write cut short, e.g. by a full disk); returns the bytes
    dropped. Keeps metrics.jsonl one JSON object per line for every reader after a resume."""
    if not path.is_file():
        return 0
    with path.open("rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        keep = 0
        while end > 0:  # backwards, a chunk at a time, to the last newline
            start = max(0, end - TAIL_CHUNK)
            f.seek(start)
            chunk = f.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return 0
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        f.truncate(keep)
        return size - keep
