"""Calibrate the cost model by measuring every candidate kernel on the host.

A short run (a few seconds, cached on disk per CPU, thread count and library
versions) measures each kernel the target builds for linears (every calibration
candidate of every registered format) on a BERT-sized 768x768 weight at density
0.2 for M ∈ {1, 4, 128} plus a tiny call for the fixed overhead, and fits the
constants of :class:`~sparsecc.tune.cost_model.KernelCalibration`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sparsecc.cache import cache_root
from sparsecc.fileio import CacheWarning, verified, write_verified
from sparsecc.formats import all_formats
from sparsecc.runtime.modules import make_linear
from sparsecc.runtime.timing import measure_ms
from sparsecc.tune.cost_model import CostModel, KernelCalibration, M

CALIBRATION_VERSION = 2  # 2: minimum of the repeats, not the median
CAL_N = CAL_K = 768
CAL_DENSITY = 0.2


def _fit(t_tiny: float, t1: float, t4: float, t128: float, fl: Callable, by: Callable) -> KernelCalibration:
    oh = max(t_tiny, 1e-4)
    eps = 1e-5
    gbps = by(1) / (max(t1 - oh, eps) * 1e6)
    gflops_gemv = fl(4) / (max(t4 - oh, eps) * 1e6)
    gflops_gemm = fl(128) / (max(t128 - oh, eps) * 1e6)
    return KernelCalibration(gflops_gemv=gflops_gemv, gflops_gemm=gflops_gemm, gbps=gbps, overhead_ms=oh)


def _measure_candidate(make: Callable[[int, int], Callable], n: int, k: int) -> tuple:
    fn_tiny = make(16, 16)
    fn = make(n, k)
    xs = {m: torch.randn(m, k) for m in (1, 4, 128)}
    t_tiny = measure_ms(fn_tiny, torch.randn(1, 16), repeat=30, statistic="min")
    return (t_tiny,) + tuple(measure_ms(fn, xs[m], repeat=15, statistic="min") for m in (1, 4, 128))


def calibration_candidates(target) -> list:
    """Every candidate the registry offers for linears that ``target`` builds (dense first)."""
    return [c for fmt in all_formats() if target.supports("linear", fmt.name) for c in fmt.calibration_candidates()]


def _kernel_sources_digest() -> str:
    """SHA-256 of the kernel templates, the target rules and the runtime modules (a change recalibrates)."""
    root = Path(__file__).parents[1]
    files = sorted([*(root / "codegen").glob("*.py"), *(root / "targets").glob("x86*.py"),
                    *(root / "runtime").glob("*.py"), *(root / "formats").glob("*.py")])
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def calibrate(target, use_cache: bool = True, verbose: bool = False, candidates=None) -> CostModel:
    """Measure dense torch and every sparse kernel of ``target``; return the fitted cost model.

    Parameters
    ----------
    target : sparsecc.targets.Target
        Target whose kernels are measured (must run on this host: ``can_time_kernels``).
    use_cache : bool
        Reuse (and write) ``<cache_root>/calibration/<key>.json``.
    candidates : list of Candidate, optional
        What to calibrate (default: :func:`calibration_candidates`).
    """
    cands = list(candidates) if candidates is not None else calibration_candidates(target)
    key_src = json.dumps([CALIBRATION_VERSION, _kernel_sources_digest(), target.cache_key(), torch.get_num_threads(),
                          torch.__version__, platform.machine(), sorted(c.key for c in cands)])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_root() / "calibration" / f"{key}.json"
    if use_cache and path.exists():
        ok, why = verified(path)
        if ok:
            try:
                return CostModel.from_json(path.read_text())
            except (ValueError, KeyError, TypeError) as e:
                why = f"it does not parse ({e})"
        warnings.warn(f"calibration {path}: {why}; measuring again", CacheWarning, stacklevel=2)
    t0 = time.perf_counter()
    model = CostModel(source=f"measured {time.strftime('%Y-%m-%d')} on {target.describe()}, "
                             f"{torch.get_num_threads()} threads")
    n, k = CAL_N, CAL_K
    for cand in cands:
        fmt = cand.entry

        def make(nn_, kk, cand=cand, fmt=fmt):
            w = fmt.calibration_weight(cand.params, nn_, kk, CAL_DENSITY if nn_ > 16 else 0.5)
            b = torch.randn(nn_)
            if cand.is_dense:
                return lambda x: F.linear(x, w, b)
            return make_linear(target, cand.to_storage(w), b)

        times = _measure_candidate(make, n, k)
        w = fmt.calibration_weight(cand.params, n, k, CAL_DENSITY)
        stored = fmt.units_of(cand.to_storage(w))
        fl = fmt.flops(cand.params, n, k, stored)
        by = fmt.bytes(cand.params, n, k, stored)
        cal = _fit(*times, lambda m: float(fl.subs(M, m)), lambda m: float(by.subs(M, m)))
        model.kernels[cand.key] = cal
        if verbose:
            print(f"calibrated {cand.key}: {cal}")
    model.source += f" in {time.perf_counter() - t0:.1f} s"
    if use_cache:
        text = model.to_json()
        try:
            write_verified(path, lambda tmp: tmp.write_text(text))
        except OSError as e:  # a read-only cache: the measured model is used, just not kept
            warnings.warn(f"calibration {path} not written ({e}); it is used for this process only", CacheWarning,
                          stacklevel=2)
    return model
