"""Helpers shared by the benchmarks: hardware description and timing."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def best_of(fn: Callable[[], float], repeats: int) -> float:
    """Best (highest) rate of `repeats` runs of fn, which returns a rate; best-of filters noise."""
    return max(fn() for _ in range(repeats))


def training_rate(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor], tokens: int, steps: int) -> float:
    """Best of three runs of `steps` AdamW steps (after one warm-up step) of `loss_of()`'s backward, as tokens per
    second, `tokens` per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss_of().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = max(best, steps * tokens / (time.perf_counter() - t0))
    return best


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start
