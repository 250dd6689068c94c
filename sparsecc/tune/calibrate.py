"""Calibrate the cost model by measuring every candidate kernel on the host.

A short run (a few seconds, cached on disk per CPU, thread count and library
versions) measures each kernel the target builds for linears (every calibration
candidate of every registered format) on a BERT-sized 768x768 weight at density
0.2 for M ∈ {1, 4, 128} plus a tiny call for the fixed overhead, and fits the
constants of :class:`~sparsecc.tune.cost_model.KernelCalibration`. A fit the
timings cannot come from (:func:`implausible`: on a busy machine every parallel
call waits for a scheduler time slice) is re-measured; one still implausible
is used for the process, with a :class:`~sparsecc.errors.CalibrationWarning`,
and never cached.
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
from sparsecc.errors import CalibrationWarning
from sparsecc.fileio import CacheWarning, verified, write_verified
from sparsecc.formats import all_formats
from sparsecc.runtime.modules import make_linear
from sparsecc.runtime.timing import measure_ms
from sparsecc.tune.cost_model import CostModel, KernelCalibration, M

CALIBRATION_VERSION = 3  # 2: minimum of the repeats, not the median; 3: remote dense = packed GEMM
CAL_N = CAL_K = 768
CAL_DENSITY = 0.2
#: Measurements of one candidate before an implausible fit is kept (and the model not cached).
MEASURE_TRIES = 3


def _fit(t_tiny: float, t1: float, t4: float, t128: float, fl: Callable, by: Callable) -> KernelCalibration:
    oh = max(t_tiny, 1e-4)
    eps = 1e-5
    gbps = by(1) / (max(t1 - oh, eps) * 1e6)
    gflops_gemv = fl(4) / (max(t4 - oh, eps) * 1e6)
    gflops_gemm = fl(128) / (max(t128 - oh, eps) * 1e6)
    return KernelCalibration(gflops_gemv=gflops_gemv, gflops_gemm=gflops_gemm, gbps=gbps, overhead_ms=oh)


def _fit_candidate(cand, times, n: int, k: int, stored: int) -> KernelCalibration:
    """:func:`_fit` of ``(tiny, M=1, M=4, M=128)`` times (ms) with the format's FLOPs and bytes at ``W: (n, k)``."""
    fl = cand.entry.flops(cand.params, n, k, stored)
    by = cand.entry.bytes(cand.params, n, k, stored)
    return _fit(*times, lambda m: float(fl.subs(M, m)), lambda m: float(by.subs(M, m)))


def _measure_candidate(make: Callable[[int, int], Callable], n: int, k: int) -> tuple:
    fn_tiny = make(16, 16)
    fn = make(n, k)
    xs = {m: torch.randn(m, k) for m in (1, 4, 128)}
    t_tiny = measure_ms(fn_tiny, torch.randn(1, 16), repeat=30, statistic="min")
    return (t_tiny,) + tuple(measure_ms(fn, xs[m], repeat=15, statistic="min") for m in (1, 4, 128))


#: Bounds of a plausible fit: a 16x16 call above this many ms, or a throughput above these, means the
#: timings were not the kernel's (a busy machine: a parallel call waits a scheduler time slice, ~4-8 ms).
MAX_OVERHEAD_MS = 1.0
MAX_GFLOPS = MAX_GBPS = 1e4


def implausible(cal: KernelCalibration, times: tuple) -> str | None:
    """Why a fit from ``times`` ``(tiny, M=1, M=4, M=128)`` (ms) cannot be the kernel's, or None."""
    t_tiny, t1, t4, t128 = times
    if t_tiny > MAX_OVERHEAD_MS:
        return f"a 16x16 call took {t_tiny:.2f} ms"
    if t_tiny >= min(t1, t4, t128):
        return f"a 16x16 call took as long as a {CAL_N}x{CAL_K} one ({t_tiny:.3f} vs {min(t1, t4, t128):.3f} ms)"
    if max(cal.gflops_gemv, cal.gflops_gemm) > MAX_GFLOPS or cal.gbps > MAX_GBPS:
        return f"the fit gives {max(cal.gflops_gemv, cal.gflops_gemm):.0f} GFLOP/s and {cal.gbps:.0f} GB/s"
    return None


def calibration_candidates(target) -> list:
    """Every candidate the registry offers for linears that ``target`` builds (dense first)."""
    return [c for fmt in all_formats() if target.supports("linear", fmt.name) for c in fmt.calibration_candidates()]


def _kernel_sources_digest() -> str:
    """SHA-256 of the kernel templates, the target rules and the runtime modules (a change recalibrates)."""
    root = Path(__file__).parents[1]
    files = sorted([*(root / "codegen").glob("*.py"), *(root / "targets").glob("x86*.py"),
                    *(root / "runtime").glob("*.py"), *(root / "formats").glob("*.py")])
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _cached(path: Path):
    """The cost model stored at ``path``, or None (missing; damaged: warned and measured again)."""
    if not path.exists():
        return None
    ok, why = verified(path)
    if ok:
        try:
            return CostModel.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as e:
            why = f"it does not parse ({e})"
    warnings.warn(f"calibration {path}: {why}; measuring again", CacheWarning, stacklevel=3)
    return None


def _store(path: Path, model: CostModel) -> None:
    text = model.to_json()
    try:
        write_verified(path, lambda tmp: tmp.write_text(text))
    except OSError as e:  # a read-only cache: the measured model is used, just not kept
        warnings.warn(f"calibration {path} not written ({e}); it is used for this process only", CacheWarning,
                      stacklevel=3)


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
    cached = _cached(path) if use_cache else None
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    bad: list = []
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

        w = fmt.calibration_weight(cand.params, n, k, CAL_DENSITY)
        stored = fmt.units_of(cand.to_storage(w))
        for _ in range(MEASURE_TRIES):  # re-measured while the timings are implausible
            times = _measure_candidate(make, n, k)
            cal = _fit_candidate(cand, times, n, k, stored)
            why = implausible(cal, times)
            if why is None:
                break
        model.kernels[cand.key] = cal
        if why is not None:
            bad.append(f"{cand.key} ({why})")
        if verbose:
            print(f"calibrated {cand.key}: {cal}")
    model.source += f" in {time.perf_counter() - t0:.1f} s"
    if bad:
        model.source += ", implausible: " + ", ".join(bad)
        warnings.warn(f"calibration on {target.describe()}: implausible timings after {MEASURE_TRIES} tries for "
                      f"{'; '.join(bad)}; the machine looks busy. The model is used for this process only and not "
                      f"cached (formats it picks may be slow; sparse layers are still timed against dense)",
                      CalibrationWarning, stacklevel=2)
    elif use_cache:
        _store(path, model)
    return model


#: Linear formats a remote device times: dense (TVM's dense matmul, scheduled as an export schedules it) and
#: the BSR family (CSR = 1x1 blocks). N:M and xcsr kernels pack their weights in host modules and are not
#: offered when the cost model comes from a remote device.
REMOTE_FORMATS = ("dense", "csr", "bsr")


def remote_candidates(target) -> list:
    """The calibration candidates of ``target`` a remote device times (:data:`REMOTE_FORMATS`)."""
    return [c for c in calibration_candidates(target) if c.entry.name in REMOTE_FORMATS]


def _remote_kernel(cand, target, m: int, n: int, k: int, density: float) -> tuple:
    """``(aarch64 .so, numpy arguments, stored units)`` of one call of ``cand``'s kernel at ``M = m``."""
    import numpy as np

    from sparsecc.codegen.dense import pack_weight, padded_n
    from sparsecc.targets import arm, x86

    fmt = cand.entry
    w = fmt.calibration_weight(cand.params, n, k, density)
    rng = np.random.default_rng(0)
    b = rng.standard_normal(n, dtype=np.float32)
    tvm_target = target.deploy_tvm_target()
    if cand.is_dense:  # the packed GEMM an export runs dense linears on (sparsecc.runtime.dense)
        p = target.kernel_params("dense", x86.regime_for(m), m=m, k=k)
        mp, npad = -(-m // p.mr) * p.mr, padded_n(n, p.nb)
        lib = arm.cross_built(x86.schedule_dense(mp, n, k, bias=True, params=p),
                              f"dense_linear_m{mp}_n{npad}_k{k}_mr{p.mr}_nb{p.nb}", tvm_target)
        x = rng.standard_normal((mp, k), dtype=np.float32)
        bp = np.zeros(npad, np.float32)
        bp[:n] = b
        args = [x, pack_weight(w.numpy(), p.nb), bp, np.zeros((mp, npad), np.float32)]
        return lib, args, fmt.units_of(cand.to_storage(w))
    storage = cand.to_storage(w)
    br, bc = storage.block
    regime = x86.regime_for(m)
    mt = arm.arm_params((br, bc), regime).m_tile
    mp = -(-m // mt) * mt
    lib = arm.build_linear_kernel((br, bc), regime, bias=True, device=target.device, k=k)
    x = rng.standard_normal((mp, k), dtype=np.float32)
    args = [x, storage.data.numpy(), storage.indices.numpy(), storage.indptr.numpy(), b.reshape(n // br, br),
            np.zeros((mp, n // br, br), np.float32)]
    return lib, args, fmt.units_of(storage)


def calibrate_remote(target, device, use_cache: bool = True, verbose: bool = False, candidates=None) -> CostModel:
    """Fit the cost model of ``target`` from kernels timed on a remote device through TVM's RPC tracker.

    The same measurements as :func:`calibrate` (W: (768, 768) at density 0.2 for M ∈ {1, 4, 128}, and a
    16x16 call for the fixed overhead), each kernel cross-built for the device, uploaded and timed with
    ``time_evaluator`` there (the minimum of 5 samples).

    Parameters
    ----------
    target : sparsecc.targets.arm.ArmTarget
        What the kernels are built for (``deploy_tvm_target()``).
    device : sparsecc.tune.remote.RPCDevice
    use_cache : bool
        Reuse (and write) ``<cache_root>/calibration/rpc-<key>.json``, keyed by the kernel sources, the target,
        the tracker and the device key.
    candidates : list of Candidate, optional
        Default: :func:`remote_candidates`.

    Returns
    -------
    CostModel
        Its ``source`` names the device and the tracker.

    Raises
    ------
    RPCError
        The device cannot be reached or a kernel failed on it.
    ToolchainError, KernelBuildError
        A kernel could not be cross-built.
    """
    cands = list(candidates) if candidates is not None else remote_candidates(target)
    key_src = json.dumps([CALIBRATION_VERSION, _kernel_sources_digest(), target.cache_key(), device.tracker,
                          device.key, sorted(c.key for c in cands)])
    path = cache_root() / "calibration" / f"rpc-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.json"
    cached = _cached(path) if use_cache else None
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    model = CostModel(source=f"measured {time.strftime('%Y-%m-%d')} on {device.describe()} over TVM RPC, "
                             f"kernels built for {target.name}")
    n, k = CAL_N, CAL_K
    with device.session() as sess:
        for cand in cands:
            lib, args, _ = _remote_kernel(cand, target, 1, 16, 16, 0.5)
            t_tiny = min(sess.time_ms(lib, args, number=10, repeat=5))
            times, stored = [t_tiny], 0
            for m in (1, 4, 128):
                lib, args, stored = _remote_kernel(cand, target, m, n, k, CAL_DENSITY)
                times.append(min(sess.time_ms(lib, args, number=1, repeat=5)))
            cal = model.kernels[cand.key] = _fit_candidate(cand, times, n, k, stored)
            if verbose:
                print(f"calibrated {cand.key} on {device.describe()}: {cal}")
    model.source += f" in {time.perf_counter() - t0:.1f} s"
    if use_cache:
        _store(path, model)
    return model
