"""Throughput, data-wait and memory figures over a logging window (rank-local)."""

from __future__ import annotations

import math
import time

import psutil
import torch


class WindowMeter:
    """Accumulates step losses and timings between two `flush()` calls."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_s = 0.0
        self.steps = 0
        self.samples = 0
        self.losses: list[float] = []

    def add(self, samples: int, data_s: float, loss: float) -> None:
        self.steps += 1
        self.samples += samples
        self.data_s += data_s
        if math.isfinite(loss):
            self.losses.append(loss)

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "loss": sum(self.losses) / len(self.losses) if self.losses else float("nan"),
            "samples_per_s": self.samples / elapsed,
            "data_wait_frac": self.data_s / elapsed,
            **memory_mb(),
        }
        self.reset()
        return out


def memory_mb() -> dict[str, float]:
    """Process RSS, and the CUDA allocator's peak when on GPU (MiB)."""
    out = {"mem_rss_mb": psutil.Process().memory_info().rss / 2**20}
    if torch.cuda.is_available():
        out["mem_cuda_max_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
