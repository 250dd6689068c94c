"""Target cost model: symbolic FLOPs and bytes in M, calibrated per kernel.

For a linear ``Y = X · Wᵀ + b`` with X: (M, K), W: (N, K), each candidate
format gets sympy expressions in the batch/token dim ``M``:

* FLOPs: dense ``2·M·N·K``; sparse ``2·M·nnzb·br·bc`` (fill-in zeros count,
  the kernel multiplies them too); N:M ``2·M·S`` with ``S = N·ceil(K/m)·n``
  stored slots (passed as ``nnzb``, the block argument is ``(n, m)``).
* bytes: weights (values + indices + indptr) + X + Y, fp32.

Latency (ms) is a roofline with calibrated constants per kernel and regime:
``t(M) = overhead + max(FLOPs / P, bytes / BW)``, where ``P`` (GFLOP/s) and
``BW`` (GB/s) are fitted from a short measurement of that very kernel on the
host (:mod:`sparsecc.tune.calibrate`). Roofline: Williams et al., "Roofline: an
insightful visual performance model for multicore architectures" (CACM 2009).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import sympy

#: Batch/token dim of the linear's input (rows of X).
M = sympy.Symbol("M", positive=True, integer=True)

#: M at and above which kernels use the register-tiled "gemm" schedule.
GEMM_MIN_M = 8


def candidate_key(fmt: str, block: Optional[tuple] = None) -> str:
    """``"dense"``, ``"csr_1x1"``, ``"bsr_8x1"`` or ``"nm_2:4"`` (``block = (n, m)`` for N:M)."""
    if fmt == "dense":
        return "dense"
    if fmt == "nm":
        return "nm_%d:%d" % (block[0], block[1])
    return "%s_%dx%d" % (fmt, block[0], block[1])


def flops_expr(fmt: str, n: int, k: int, nnzb: int = 0, block: tuple = (1, 1)) -> sympy.Expr:
    """Floating-point operations of one call, as an expression in :data:`M`."""
    if fmt == "dense":
        return 2 * M * n * k
    if fmt == "nm":  # nnzb = stored slots N·ceil(K/m)·n
        return 2 * M * nnzb
    return 2 * M * nnzb * block[0] * block[1]


def bytes_expr(fmt: str, n: int, k: int, nnzb: int = 0, block: tuple = (1, 1)) -> sympy.Expr:
    """Bytes moved by one call (weights once, X and Y once), as an expression in :data:`M`."""
    act = 4 * M * k + 4 * M * n
    if fmt == "dense":
        return 4 * n * k + act
    if fmt == "nm":  # fp32 value + int16 column per slot; X^T tiles written and read once more
        return 6 * nnzb + act + 8 * M * k
    br, bc = block
    return 4 * nnzb * br * bc + 4 * nnzb + 4 * (n // br + 1) + act


@dataclass
class KernelCalibration:
    """Fitted constants of one kernel.

    Attributes
    ----------
    gflops_gemv, gflops_gemm : float
        Compute throughput in GFLOP/s for M < 8 and M ≥ 8.
    gbps : float
        Effective memory bandwidth in GB/s.
    overhead_ms : float
        Fixed cost of one call in ms.
    """

    gflops_gemv: float
    gflops_gemm: float
    gbps: float
    overhead_ms: float


@dataclass
class CostModel:
    """Latency model of every candidate kernel of one target.

    Attributes
    ----------
    kernels : dict candidate key -> KernelCalibration
    source : str
        Where the constants came from (``"measured <date> on <cpu>"``).
    """

    kernels: dict = field(default_factory=dict)
    source: str = ""

    def has(self, fmt: str, block: Optional[tuple] = None) -> bool:
        return candidate_key(fmt, block) in self.kernels

    def latency_expr(self, fmt: str, n: int, k: int, nnzb: int = 0, block: tuple = (1, 1)) -> sympy.Expr:
        """Latency in ms as a sympy expression in :data:`M`.

        Raises
        ------
        KeyError
            The candidate has no calibration.
        """
        c = self.kernels[candidate_key(fmt, block)]
        fl = flops_expr(fmt, n, k, nnzb, block)
        by = bytes_expr(fmt, n, k, nnzb, block)
        mem = by / (c.gbps * 1e6)
        gemv = c.overhead_ms + sympy.Max(fl / (c.gflops_gemv * 1e6), mem)
        gemm = c.overhead_ms + sympy.Max(fl / (c.gflops_gemm * 1e6), mem)
        return sympy.Piecewise((gemv, M < GEMM_MIN_M), (gemm, True))

    def estimate_ms(self, fmt: str, n: int, k: int, m: int, nnzb: int = 0, block: tuple = (1, 1)) -> float:
        """Estimated latency in ms at ``M = m``."""
        return float(self.latency_expr(fmt, n, k, nnzb, block).subs(M, m))

    def to_json(self) -> str:
        return json.dumps({"source": self.source,
                           "kernels": {k: asdict(v) for k, v in self.kernels.items()}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        d = json.loads(text)
        return cls({k: KernelCalibration(**v) for k, v in d["kernels"].items()}, d.get("source", ""))
