"""Target cost model: symbolic FLOPs and bytes in M from the format registry, calibrated per kernel.

For a linear ``Y = X · Wᵀ + b`` with X: (M, K), W: (N, K), every candidate
format states its FLOPs and bytes of one call as sympy expressions in the
batch/token dim ``M`` (:meth:`sparsecc.formats.base.Format.flops` /
:meth:`~sparsecc.formats.base.Format.bytes`): dense ``2·M·N·K``; BSR
``2·M·nnzb·br·bc`` (fill-in zeros count: the kernel multiplies them too);
N:M ``2·M·S`` with ``S = N·ceil(K/m)·n`` stored slots.

Latency (ms) is a roofline with calibrated constants per kernel and regime:
``t(M) = overhead + max(FLOPs / P, bytes / BW)``, where ``P`` (GFLOP/s) and
``BW`` (GB/s) are fitted from a short measurement of that very kernel on the
host (:mod:`sparsecc.tune.calibrate`), or taken from a target's static roofline
(:meth:`sparsecc.targets.base.Target.roofline`). Roofline: Williams et al.,
"Roofline: an insightful visual performance model for multicore architectures"
(CACM 2009).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import sympy

from sparsecc.formats import BSR, Candidate, M

__all__ = ["GEMM_MIN_M", "M", "CostModel", "KernelCalibration", "cost_model_for"]

#: M at and above which kernels use the register-tiled "gemm" schedule.
GEMM_MIN_M = 8


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
        Keyed by :attr:`Candidate.key` (the JSON form of the model).
    source : str
        Where the constants came from (``"measured <date> on <cpu>"``).
    """

    kernels: dict = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_roofline(cls, constants: dict, source: str) -> "CostModel":
        """From ``{Candidate: (GFLOP/s gemv, GFLOP/s gemm, GB/s, overhead ms)}`` (a target's static roofline)."""
        return cls({c.key: KernelCalibration(*v) for c, v in constants.items()}, source)

    def has(self, cand: Candidate) -> bool:
        return cand.key in self.kernels

    def latency_expr(self, cand: Candidate, n: int, k: int, stored: int = 0, taps: int | None = None) -> sympy.Expr:
        """Latency in ms of a call on W: (N, K) holding ``stored`` units, as a sympy expression in :data:`M`.

        ``taps``: the weight is a conv's ``(C_out, kh·kw·C_in)`` with ``kh·kw = taps`` and :data:`M` its output
        pixels (bytes from :meth:`~sparsecc.formats.base.Format.conv_bytes`).

        Raises
        ------
        KeyError
            The candidate has no calibration.
        """
        c = self.kernels[cand.key]
        fmt = cand.entry
        fl = fmt.flops(cand.params, n, k, stored)
        by = fmt.bytes(cand.params, n, k, stored) if taps is None else fmt.conv_bytes(cand.params, n, k, stored, taps)
        mem = by / (c.gbps * 1e6)
        gemv = c.overhead_ms + sympy.Max(fl / (c.gflops_gemv * 1e6), mem)
        gemm = c.overhead_ms + sympy.Max(fl / (c.gflops_gemm * 1e6), mem)
        return sympy.Piecewise((gemv, M < GEMM_MIN_M), (gemm, True))

    def estimate_ms(self, cand: Candidate, n: int, k: int, m: int, stored: int = 0, taps: int | None = None) -> float:
        """Estimated latency in ms at ``M = m`` (``taps``: see :meth:`latency_expr`)."""
        return float(self.latency_expr(cand, n, k, stored, taps).subs(M, m))

    def estimate_weight_ms(self, cand: Candidate, shape: tuple, m: int, nnz: int, fill_ratio=None,
                           taps: int | None = None) -> float:
        """Estimated latency in ms at ``M = m`` of a weight (N, K) with ``nnz`` nonzeros stored as ``cand``."""
        n, k = shape
        stored = cand.entry.stored(cand.params, (n, k), nnz, fill_ratio or {})
        return self.estimate_ms(cand, n, k, m, stored, taps)

    def estimates(self, cands, shape: tuple, m: int, nnz: int, fill_ratio=None, taps: int | None = None) -> dict:
        """``{candidate key: ms}`` at ``M = m`` for every calibrated candidate in ``cands`` (``taps``: convs)."""
        return {c.key: self.estimate_weight_ms(c, shape, m, nnz, fill_ratio, taps) for c in cands if self.has(c)}

    def best_block(self, shapes, density: float, m: int, max_area: int = 16) -> tuple:
        """Block shape to prune to for ``pattern="block"``: the one with least estimated total latency.

        Parameters
        ----------
        shapes : list of (N, K)
            Weight shapes of the layers to prune.
        density : float
            Density they will be pruned to.
        m : int
            Example rows of X.
        max_area : int
            Largest block area considered (larger blocks cost more accuracy).
        """
        dense, csr = Candidate("dense"), Candidate("csr", (1, 1))
        best, best_t = (1, 1), float("inf")
        for b in BSR.blocks:
            cand = Candidate("bsr", b)
            if b[0] * b[1] > max_area or not self.has(cand):
                continue
            fits = [(n, k) for n, k in shapes if n % b[0] == 0 and k % b[1] == 0]
            if not fits:
                continue
            # a layer the block does not divide stays unstructured (CSR) or dense, whichever is faster
            t = sum(self.estimate_ms(cand, n, k, m, int(density * n * k / (b[0] * b[1]))) for n, k in fits)
            t += sum(min(self.estimate_ms(dense, n, k, m), self.estimate_ms(csr, n, k, m, int(density * n * k)))
                     for n, k in shapes if (n, k) not in fits)
            if t < best_t:
                best, best_t = b, t
        return best

    def to_json(self) -> str:
        return json.dumps({"source": self.source,
                           "kernels": {k: asdict(v) for k, v in self.kernels.items()}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        d = json.loads(text)
        return cls({k: KernelCalibration(**v) for k, v in d["kernels"].items()}, d.get("source", ""))


_MODELS: dict = {}


def cost_model_for(target) -> CostModel:
    """The cost model of ``target``: its static roofline, or a calibration measured on this host (cached).

    Raises
    ------
    TargetError
        A target that neither has a roofline nor can time kernels here.
    """
    rpc = getattr(target, "rpc", None)
    if rpc is not None:
        return _remote_model(target, rpc)
    constants = target.roofline()
    if constants is not None:
        return CostModel.from_roofline(constants, f"static roofline of {target.describe()}, not measured")
    if not target.can_time_kernels:
        from sparsecc.errors import TargetError

        raise TargetError(f"target {target.name!r} has no roofline and cannot time kernels on this host")
    import torch

    key = (target.cache_key(), torch.get_num_threads())
    model = _MODELS.get(key)
    if model is None:
        from sparsecc.tune.calibrate import calibrate

        model = _MODELS[key] = calibrate(target)
    return model


def _remote_model(target, rpc) -> CostModel:
    """Calibrated on the remote device (cached per process and on disk); the static roofline if it fails."""
    key = ("rpc", target.cache_key(), rpc.tracker, rpc.key)
    model = _MODELS.get(key)
    if model is None:
        import warnings

        from sparsecc.errors import RemoteFallbackWarning, RPCError
        from sparsecc.tune.calibrate import calibrate_remote

        try:
            model = _MODELS[key] = calibrate_remote(target, rpc)
        except RPCError as e:
            warnings.warn(f"{e}; formats are chosen with the static roofline of {target.name}",
                          RemoteFallbackWarning, stacklevel=3)
            return CostModel.from_roofline(target.roofline(), f"static roofline of {target.describe()}, not "
                                           f"measured ({rpc.describe()} could not be used)")
    return model
