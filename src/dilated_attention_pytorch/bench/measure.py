"""Timing (device events, median and quartiles of repeats) and peak memory."""

from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple

import torch

__all__ = ["Timing", "measure", "time_calls"]


class Timing(NamedTuple):
    ms: float  # median of the timed calls
    p25: float  # first quartile
    p75: float  # third quartile
    calls: int  # timed calls
    peak: float  # peak bytes allocated during one call (0 on CPU)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int, *,
               min_warmup_s: float = 0.05, min_time_s: float = 0.1) -> Timing:
    """Warms up for at least ``warmup`` calls and ``min_warmup_s`` seconds (clocks ramp up, kernels load,
    allocator caches fill), then times at least ``repeats`` calls and ``min_time_s`` seconds: short calls
    get many repeats, so that their medians are as steady as those of long ones."""
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
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times), q1, q3, len(times), peak)


def measure(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int, *, min_warmup_s: float = 0.05,
            min_time_s: float = 0.1) -> tuple[float, float]:
    """-> (median milliseconds, peak bytes allocated during one call; 0 on CPU); see :func:`time_calls`."""
    t = time_calls(fn, device, warmup, repeats, min_warmup_s=min_warmup_s, min_time_s=min_time_s)
    return t.ms, t.peak
