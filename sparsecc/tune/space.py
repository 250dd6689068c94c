"""Search space of the sparse linear kernels: workloads, knobs, MetaSchedule design spaces.

A *workload* is what one tuning run optimizes: the kernel template of
:mod:`sparsecc.codegen.linear` for a format (CSR or BSR block), a weight
``W: (N, K)``, a bucket of the number of stored blocks ``nnzb``, a bucket of
the rows ``M`` of ``X`` (which also fixes the regime, ``"gemv"`` or
``"gemm"``), bias and fused activation. Tuning specializes the template to
those static sizes (MetaSchedule's runner needs concrete argument shapes); the
schedule it finds is a *trace* of the x86 schedule rules
(:mod:`sparsecc.targets.x86`) whose knobs are ``sample_categorical``
decisions, so it replays onto the symbolic template and the tuned kernel
serves every ``M`` and ``nnzb`` at run time.

Knobs (:class:`~sparsecc.targets.x86.ScheduleParams`):

* ``m_tile``: rows of ``X`` per register tile. It changes the template itself
  (TensorIR cannot move a loop across the "row" block boundary), so each value
  is a separate MetaSchedule task of the same workload;
* ``m_outer``: loop order of the parallel loops (M tiles outside or inside
  block rows), only in the "gemm" regime (at ``M = 1`` both orders are equal);
* ``row_group``: block rows per parallel task, run serially innermost;
* ``k_unroll``: unroll factor of the loop over the nonzero blocks of a row;
* ``parallel``: run the row loop on TVM's thread pool or serially (waking the
  pool costs more than a small kernel: one token through a 384x384 layer at
  90% sparsity ran 0.07x of the parallel time serially, on a loaded 2-core VM).

The hand schedule (:func:`~sparsecc.targets.x86.default_params`) is always the
first point of the grid, so tuning measures it.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tvm

from sparsecc.errors import KernelBuildError
from sparsecc.formats import block_candidate
from sparsecc.targets import x86

__all__ = [
    "KNOBS",
    "Workload",
    "apply_params",
    "density_bucket",
    "generic_template",
    "grid",
    "m_bucket",
    "m_tile_choices",
    "make_args",
    "params_from_trace",
    "schedule_from_trace",
    "space_fn",
    "specialized_func",
    "workload_func",
]

#: Candidate values of the knobs inside one MetaSchedule task (m_tile is per task).
KNOBS = {
    "m_outer": (1, 0),
    "row_group": (1, 2, 4, 8),
    "k_unroll": (1, 4),
    "parallel": (1, 0),
}
#: Candidate register tiles (rows of X) of the "gemm" regime.
M_TILES = (4, 8, 16)
#: Bytes an accumulator may take and still live on the stack (TVM's kMaxStackAlloca = 1024; at
#: 1024 itself 16x1 with 16 rows ran 4x slower, see ``x86.default_params``).
_STACK_BYTES = 1024
#: Density buckets: nnzb is rounded to a multiple of this fraction of all blocks.
DENSITY_STEP = 0.05


def m_bucket(m: int) -> int:
    """Rows of X a workload is tuned at: 1 below :data:`~sparsecc.targets.x86.GEMM_MIN_M`, else
    the nearest power of two (8, 16, 32, ...)."""
    m = int(m)
    if m < x86.GEMM_MIN_M:
        return 1
    return max(x86.GEMM_MIN_M, 2 ** int(round(math.log2(m))))


def density_bucket(nnzb: int, total_blocks: int) -> float:
    """Block density rounded to the nearest multiple of :data:`DENSITY_STEP` (at least one step).

    Nearest, not up: pruning to 90% leaves a block density a hair above 0.1 (0.1003 on MiniLM),
    which must fall in the same bucket as exactly 0.1.
    """
    if total_blocks <= 0:
        return DENSITY_STEP
    d = nnzb / total_blocks
    return round(min(1.0, max(DENSITY_STEP, math.floor(d / DENSITY_STEP + 0.5) * DENSITY_STEP)), 4)


@dataclass(frozen=True)
class Workload:
    """One distinct sparse linear kernel to tune.

    Attributes
    ----------
    block : (br, bc)
        Block shape; ``(1, 1)`` is CSR.
    n, k : int
        Weight shape ``W: (N, K)``.
    density : float
        Block density bucket (stored blocks / all blocks), see :func:`density_bucket`.
    m : int
        Rows of X tuned at (a bucket, see :func:`m_bucket`).
    bias : bool
    activation : None, "relu" or "gelu"
    """

    block: tuple
    n: int
    k: int
    density: float
    m: int
    bias: bool
    activation: Optional[str]

    @classmethod
    def for_layer(cls, block, n: int, k: int, nnzb: int, m: int, bias: bool, activation=None) -> "Workload":
        """The workload a layer with ``nnzb`` stored blocks falls in at ``M = m``."""
        br, bc = int(block[0]), int(block[1])
        total = (int(n) // br) * (int(k) // bc)
        return cls((br, bc), int(n), int(k), density_bucket(int(nnzb), total), m_bucket(m), bool(bias),
                   activation)

    @property
    def fmt(self) -> str:
        return block_candidate(self.block).format

    @property
    def regime(self) -> str:
        return x86.regime_for(self.m)

    @property
    def nb(self) -> int:
        """Block rows ``N // br``."""
        return self.n // self.block[0]

    @property
    def nnzb(self) -> int:
        """Stored blocks of the tuned instance (the density bucket of all ``N·K / (br·bc)`` blocks)."""
        total = self.nb * (self.k // self.block[1])
        return max(1, int(round(self.density * total)))

    def key(self) -> str:
        """Target-independent key, e.g. ``bsr_16x1|N1536|K384|d0.10|M128|bias|gelu``."""
        br, bc = self.block
        return "|".join([f"{self.fmt}_{br}x{bc}", f"N{self.n}", f"K{self.k}", f"d{self.density:.2f}",
                         f"M{self.m}", "bias" if self.bias else "nobias", self.activation or "none"])

    def as_dict(self) -> dict:
        return {"block": list(self.block), "n": self.n, "k": self.k, "density": self.density, "m": self.m,
                "bias": self.bias, "activation": self.activation}

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        return cls(tuple(d["block"]), int(d["n"]), int(d["k"]), float(d["density"]), int(d["m"]),
                   bool(d["bias"]), d.get("activation"))


def _acc_bytes(block, m_tile: int) -> int:
    br, bc = block
    return int(m_tile) * br * (bc if bc > 1 else 1) * 4


def hand_params(wl: Workload, target=None) -> x86.ScheduleParams:
    """The runtime's hand schedule of ``wl`` on ``target`` (a ``tvm.target.Target``): NEON tiles
    (:func:`sparsecc.targets.arm.arm_params`) for an aarch64 target, the x86 ones otherwise."""
    if target is not None and "aarch64" in str(target):
        from sparsecc.targets.arm import arm_params

        return arm_params(tuple(wl.block), wl.regime)
    return x86.default_params(tuple(wl.block), wl.regime)


def m_tile_choices(wl: Workload, hand: x86.ScheduleParams | None = None) -> list:
    """Register tiles to try for ``wl``: the hand one first (``hand``, default the x86 one), then the others
    that divide ``M`` and keep the accumulator on the stack."""
    hand = (hand or x86.default_params(tuple(wl.block), wl.regime)).m_tile
    if wl.regime == "gemv":
        return [hand]
    out = [hand]
    for t in M_TILES:
        if t != hand and wl.m % t == 0 and _acc_bytes(wl.block, t) < _STACK_BYTES:
            out.append(t)
    return out


def grid(wl: Workload, m_tile: int, seed: int = 0, hand: x86.ScheduleParams | None = None) -> list:
    """Knob points of one task, as :class:`ScheduleParams`: the hand schedule (``hand``, default the x86
    one) first when ``m_tile`` is its tile, then the rest in a seeded random order."""
    hand = hand or x86.default_params(tuple(wl.block), wl.regime)
    m_outer = KNOBS["m_outer"] if wl.regime == "gemm" else (1,)
    points = [x86.ScheduleParams(m_tile=int(m_tile), m_outer=bool(mo), row_group=g, k_unroll=u, parallel=bool(par))
              for mo, g, u, par in itertools.product(m_outer, KNOBS["row_group"], KNOBS["k_unroll"],
                                                     KNOBS["parallel"])]
    first = [p for p in points if p == hand]
    rest = [p for p in points if p not in first]
    random.Random(seed + 7919 * int(m_tile)).shuffle(rest)
    return first + rest


def generic_template(block, *, bias: bool, activation, m_tile: int, k: int):
    """The symbolic-M/N/nnzb template a tuned trace is replayed onto (static K, as the runtime builds)."""
    from sparsecc.codegen.linear import linear_template

    return linear_template(tuple(block), bias=bias, activation=activation, m_tile=int(m_tile), k=int(k))


def workload_func(wl: Workload, m_tile: int):
    """The function tuned for ``wl``: the symbolic-M/N/nnzb template the runtime builds (static K),
    tagged with the workload key (attribute ``sparsecc.workload``, which no pass reads) so that
    each workload is a distinct MetaSchedule workload in the database.

    Candidates are measured as they will run: with ``M``, ``N`` and ``nnzb`` symbolic. A schedule
    measured on the specialized function (:func:`specialized_func`) can be faster there than at run
    time: a row split that divides the static ``N // br`` has no bounds predicate.
    """
    func = generic_template(wl.block, bias=wl.bias, activation=wl.activation, m_tile=m_tile, k=wl.k)
    return func.with_attr("sparsecc.workload", wl.key())


def specialized_func(wl: Workload, m_tile: int):
    """The template of ``wl`` specialized to its static ``M``, ``N // br``, ``nnzb`` (K is static):
    the argument shapes of the measured instance."""
    func = generic_template(wl.block, bias=wl.bias, activation=wl.activation, m_tile=m_tile, k=wl.k)
    br, bc = wl.block
    shapes = [((wl.m, wl.k), "float32"), ((wl.nnzb, br, bc), "float32"), ((wl.nnzb,), "int32"),
              ((wl.nb + 1,), "int32")] + ([((wl.nb, br), "float32")] if wl.bias else []) + [
              ((wl.m, wl.nb, br), "float32")]
    params = list(func.params)
    if len(params) != len(shapes):
        raise KernelBuildError(f"template of {wl.key()} has {len(params)} parameters, expected {len(shapes)}")
    return func.specialize({p: tvm.tirx.decl_buffer(shape, dtype, name=str(p))
                            for p, (shape, dtype) in zip(params, shapes)})


def apply_params(sch, block, regime: str, params) -> None:
    """Apply the x86 rule of ``block`` with ``params`` to the (traced) schedule ``sch`` in place."""
    for rule in x86.RULES:
        if rule(sch, None, params) is not None:
            return
    raise KernelBuildError(f"no x86 schedule rule applies to block {tuple(block)} ({regime})")


def _sample(sch, name: str, values: tuple, value) -> None:
    """Record knob ``name`` = ``value`` as a ``sample_categorical`` decision in ``sch``'s trace."""
    vals = [int(v) for v in values]
    sch.sample_categorical(candidates=vals, probs=[1.0 / len(vals)] * len(vals), decision=vals.index(int(value)))


def schedule_point(sch, wl: Workload, params) -> None:
    """Knob decisions of ``params`` into the trace, then the x86 rule (``sch`` modified in place)."""
    m_outer = KNOBS["m_outer"] if wl.regime == "gemm" else (1,)
    _sample(sch, "m_outer", m_outer, int(params.m_outer))
    _sample(sch, "row_group", KNOBS["row_group"], params.row_group)
    _sample(sch, "k_unroll", KNOBS["k_unroll"], params.k_unroll)
    _sample(sch, "parallel", KNOBS["parallel"], int(params.parallel))
    apply_params(sch, wl.block, wl.regime, params)


def space_fn(wl: Workload, m_tile: int, seed: int = 0, hand: x86.ScheduleParams | None = None):
    """A ``ScheduleFn`` body returning every knob point of one task as a design space."""
    points = grid(wl, m_tile, seed, hand)

    def fn(sch):
        base = tvm.s_tir.Schedule(sch.mod, enable_check=False)  # the rules run unchecked (dynamic loops)
        out = []
        for p in points:
            s = base.copy()
            schedule_point(s, wl, p)
            out.append(s)
        return out

    return fn


def params_from_trace(trace, m_tile: int):
    """The :class:`ScheduleParams` a trace of :func:`schedule_point` encodes."""
    vals = [int(trace.decisions[inst]) for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    if len(vals) != 4:
        raise KernelBuildError(f"not a sparsecc trace: {len(vals)} sample_categorical decisions, expected 4")
    cands = [[int(c) for c in inst.attrs[0]] for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    mo, g, u, par = (c[v] for c, v in zip(cands, vals))
    return x86.ScheduleParams(m_tile=int(m_tile), m_outer=bool(mo), row_group=g, k_unroll=u, parallel=bool(par))


def schedule_from_trace(trace, block, *, bias: bool, activation, m_tile: int, k: int):
    """Replay a tuned ``trace`` onto the symbolic template: a schedule for every M and nnzb."""
    func = generic_template(block, bias=bias, activation=activation, m_tile=m_tile, k=k)
    sch = tvm.s_tir.Schedule(func, enable_check=False)
    try:
        trace.apply_to_schedule(sch, remove_postproc=True)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise KernelBuildError(f"tuned trace does not replay onto the {tuple(block)} template: {e}") from e
    return sch


def make_args(wl: Workload, seed: int = 0) -> list:
    """Arguments of one call of ``wl``'s kernel as numpy arrays, with a valid sparse structure.

    ``nnzb`` distinct blocks are drawn uniformly among all ``(N // br) x (K // bc)``
    positions, so ``indptr`` is non-decreasing and ``indices`` stay in range
    (random integers would make the kernel read out of bounds).
    Order: X (M, K), data (nnzb, br, bc), indices (nnzb,), indptr (N // br + 1,),
    [bias (N // br, br)], Y (M, N // br, br).
    """
    rng = np.random.default_rng(seed)
    br, bc = wl.block
    kb = wl.k // bc
    total = wl.nb * kb
    pos = np.sort(rng.choice(total, size=min(wl.nnzb, total), replace=False))
    rows, cols = pos // kb, pos % kb
    indptr = np.zeros(wl.nb + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=wl.nb), out=indptr[1:])
    args = [rng.standard_normal((wl.m, wl.k), dtype=np.float32),
            rng.standard_normal((len(pos), br, bc), dtype=np.float32),
            cols.astype(np.int32), indptr]
    if wl.bias:
        args.append(rng.standard_normal((wl.nb, br), dtype=np.float32))
    args.append(np.zeros((wl.m, wl.nb, br), dtype=np.float32))
    return args
