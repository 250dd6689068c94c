"""Latency measurement shared by kernels, passes and benchmarks (pure torch/time, no TVM)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

__all__ = ["interleaved_ms", "measure_ms"]


def measure_ms(fn: Callable[..., Any], *args: Any, repeat: int = 30, warmup: int = 3,
               min_time_ms: float = 0.0, statistic: str = "median") -> float:
    """Wall-clock latency of ``fn(*args)`` in milliseconds: the median (or minimum) of ``repeat`` calls.

    ``warmup`` calls are discarded; then ``fn`` is timed ``repeat`` times (more
    while the total stays under ``min_time_ms``). The median is robust to the noise
    of a shared machine; ``statistic="min"`` estimates what the machine can do when
    the noise is other jobs (used by the cost-model calibration, whose candidates
    are measured one after another and must not inherit the load of the moment).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got {statistic!r}")
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
    return min(times) if statistic == "min" else statistics.median(times)


def interleaved_ms(fns: dict, *args: Any, runs: int = 30, warmup: int = 1,
                   clock: Callable[[], float] = time.perf_counter, pause_s: float = 0.0, **kwargs: Any) -> dict:
    """Median ms of each ``fn(*args, **kwargs)``, calls interleaved so all see the same machine noise.

    The way to compare latencies on a shared machine: one run of every function per round,
    ``runs`` rounds, medians; ratios of the results are taken within the same run. Calls run
    under ``torch.no_grad``. ``clock=time.process_time`` measures this process's CPU time.

    ``pause_s``: seconds slept before each timed call, for functions that run on different thread pools.
    torch's OpenMP workers spin-wait after each call, and a function on TVM's own pool (an exported artifact)
    timed right after a torch one shares the cores with them: an exported MiniLM took 32.6 ms alone, about
    63 ms right after a torch matmul, 35 ms after a 10 ms pause (2-core VM).

    Returns
    -------
    dict name -> median latency in ms
    """
    import torch

    with torch.no_grad():
        for _ in range(max(0, warmup)):
            for fn in fns.values():
                fn(*args, **kwargs)
        times: dict = {k: [] for k in fns}
        for _ in range(runs):
            for k, fn in fns.items():
                if pause_s > 0:
                    time.sleep(pause_s)
                t0 = clock()
                fn(*args, **kwargs)
                times[k].append((clock() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}
