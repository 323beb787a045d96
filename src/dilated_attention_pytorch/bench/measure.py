"""Timing (device events, median of repeats) and peak memory."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["measure"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """-> (median milliseconds, peak bytes allocated during one call; 0 on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    peak = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        peak = float(torch.cuda.max_memory_allocated(device))
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak
