"""Calibrate the cost model by measuring every candidate kernel on the host.

A short run (a few seconds, cached on disk per CPU, thread count and library
versions) measures each kernel on a BERT-sized 768x768 weight at density 0.2
for M ∈ {1, 4, 128} plus a tiny call for the fixed overhead, and fits the
constants of :class:`~sparsecc.tune.cost_model.KernelCalibration`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..fileio import atomic_path
from ..formats import BLOCK_SHAPES, NM_PATTERNS, BlockSparseMatrix, NMSparseMatrix
from ..runtime.kernels import cache_root
from ..runtime.timing import measure_ms
from .cost_model import CostModel, KernelCalibration, M, bytes_expr, candidate_key, flops_expr

CALIBRATION_VERSION = 2  # 2: minimum of the repeats, not the median
CAL_N = CAL_K = 768
CAL_DENSITY = 0.2


def random_block_weight(n: int, k: int, block: tuple, density: float, seed: int = 0) -> torch.Tensor:
    """Random W: (N, K) whose nonzeros fill a random ``density`` fraction of (br, bc) blocks."""
    g = torch.Generator().manual_seed(seed)
    br, bc = block
    keep = torch.rand(n // br, k // bc, generator=g) < density
    mask = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return torch.randn(n, k, generator=g) * mask


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


def random_nm_weight(n: int, k: int, nm: tuple, seed: int = 0) -> torch.Tensor:
    """Random W: (N, K) with exactly ``nm[0]`` nonzeros in every group of ``nm[1]`` columns (K % m == 0)."""
    from ..sparsify.patterns import nm_keep

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return w * nm_keep(w.abs(), nm[0], nm[1])


def calibrate(target, blocks=BLOCK_SHAPES, use_cache: bool = True, verbose: bool = False,
              nm_patterns=NM_PATTERNS) -> CostModel:
    """Measure dense torch and every sparse kernel of ``target``; return the fitted cost model.

    Parameters
    ----------
    target : sparsecc.targets.CompileTarget
        Target whose kernels are measured (must be runnable on this host).
    blocks : sequence of (rows, cols)
        Block shapes to calibrate; (1, 1) is CSR.
    nm_patterns : sequence of (n, m)
        N:M patterns to calibrate (key ``"nm_2:4"``), at their fixed density n/m.
    use_cache : bool
        Reuse (and write) ``<cache_dir>/calibration/<key>.json``.
    """
    kernel_src = hashlib.sha256(b"".join(
        (Path(__file__).parents[1] / f).read_bytes()
        for f in ("codegen/linear.py", "targets/x86.py", "codegen/nm.py", "targets/x86_nm.py"))).hexdigest()
    key_src = json.dumps([CALIBRATION_VERSION, kernel_src, target.cache_key(), torch.get_num_threads(),
                          torch.__version__, platform.machine(), sorted(map(list, blocks)),
                          sorted(map(list, nm_patterns))])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_root() / "calibration" / f"{key}.json"
    if use_cache and path.exists():
        try:
            return CostModel.from_json(path.read_text())
        except (ValueError, KeyError, TypeError):
            pass  # corrupt cache: recalibrate and overwrite
    t0 = time.perf_counter()
    model = CostModel(source=f"measured {time.strftime('%Y-%m-%d')} on {target.describe()}, "
                             f"{torch.get_num_threads()} threads")
    n, k = CAL_N, CAL_K

    def dense_maker(nn_, kk):
        w = torch.randn(nn_, kk)
        b = torch.randn(nn_)
        return lambda x: F.linear(x, w, b)

    cand = [("dense", None)] + [("csr" if b == (1, 1) else "bsr", b) for b in blocks]
    cand += [("nm", tuple(p)) for p in nm_patterns]
    for fmt, block in cand:
        if fmt == "dense":
            make = dense_maker
        elif fmt == "nm":
            def make(nn_, kk, block=block):
                w = random_nm_weight(nn_, kk, block)
                return target.make_linear(NMSparseMatrix.from_dense(w, *block), torch.randn(nn_))
        else:
            def make(nn_, kk, block=block):
                w = random_block_weight(nn_, kk, block, CAL_DENSITY if nn_ > 16 else 0.5)
                return target.make_linear(BlockSparseMatrix.from_dense(w, block), torch.randn(nn_))
        times = _measure_candidate(make, n, k)
        nnzb = 0
        if fmt == "nm":
            nnzb = n * (k // block[1]) * block[0]
        elif fmt != "dense":
            nnzb = BlockSparseMatrix.from_dense(random_block_weight(n, k, block, CAL_DENSITY), block).nnzb
        fl = flops_expr(fmt, n, k, nnzb, block or (1, 1))
        by = bytes_expr(fmt, n, k, nnzb, block or (1, 1))
        cal = _fit(*times, lambda m: float(fl.subs(M, m)), lambda m: float(by.subs(M, m)))
        model.kernels[candidate_key(fmt, block)] = cal
        if verbose:
            print(f"calibrated {candidate_key(fmt, block)}: {cal}")
    model.source += f" in {time.perf_counter() - t0:.1f} s"
    if use_cache:
        with atomic_path(path) as tmp:
            tmp.write_text(model.to_json())
    return model
