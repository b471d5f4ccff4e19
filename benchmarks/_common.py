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


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start
