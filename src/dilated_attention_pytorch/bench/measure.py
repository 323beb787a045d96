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


def measure(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int, *, min_warmup_s: float = 0.05,
            min_time_s: float = 0.1) -> tuple[float, float]:
    """-> (median milliseconds, peak bytes allocated during one call; 0 on CPU).

    Warms up for at least ``warmup`` calls and ``min_warmup_s`` seconds (clocks ramp up, kernels load),
    then times at least ``repeats`` calls and ``min_time_s`` seconds: short calls get many repeats, so
    that their medians are as steady as those of long ones.
    """
    t0 = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - t0 < min_warmup_s:
        fn()
        _sync(device)
        done += 1
    peak = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        peak = float(torch.cuda.max_memory_allocated(device))
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time_s * 1e3:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t1) * 1e3)
    return statistics.median(times), peak
