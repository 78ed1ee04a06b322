"""Fidelity and timing helpers shared by the CLI, the benchmarks and the tests."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over all elements."""
    ref, out = ref.double(), out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def psnr(out: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, data_range] (inf when identical)."""
    mse = float(((out.double() - ref.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall time of fn() over `repeats` runs after `warmup` runs, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
