"""Latency measurement shared by kernels, passes and benchmarks (pure torch/time, no TVM)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

__all__ = ["measure_ms"]


def measure_ms(fn: Callable[..., Any], *args: Any, repeat: int = 30, warmup: int = 3,
               min_time_ms: float = 0.0) -> float:
    """Median wall-clock latency of ``fn(*args)`` in milliseconds.

    ``warmup`` calls are discarded; then ``fn`` is timed ``repeat`` times (more
    while the total stays under ``min_time_ms``) and the median is returned, which
    is robust to the noise of a shared machine.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(max(0, warmup)):
        fn(*args)
    times: list[float] = []
    total = 0.0
    while len(times) < repeat or total < min_time_ms:
        t0 = time.perf_counter()
        fn(*args)
        dt = (time.perf_counter() - t0) * 1e3
        times.append(dt)
        total += dt
        if len(times) >= 100 * repeat:
            break
    return statistics.median(times)
