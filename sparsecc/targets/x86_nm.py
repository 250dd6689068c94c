"""x86 schedule rules for the N:M template (:mod:`sparsecc.codegen.nm`).

Same conventions as :mod:`sparsecc.targets.x86`: a rule takes the unscheduled
template (built with the rule's tiles, see :func:`nm_template_for`) and returns
a ``tvm.s_tir.Schedule`` or ``None``; tile sizes are plain parameters
(:class:`NMScheduleParams`) that a tuner can turn into knobs.

Two templates:

* ``index="permute"`` (default where the CPU has AVX2 or AVX-512):
  :func:`~sparsecc.codegen.nm.nm_linear_permute`, vectorized along N, X
  values picked by ``vpermps``. ``"gemm"`` (M ≥ 8): 8 rows of X per tile,
  K in blocks of 8 vectors run over all M tiles before the next block
  (``k_block``); ``"gemv"`` (M < 8): 1 row per tile, row tiles of W outside M
  tiles (``rows_outer``), so a tile's values stay in cache while every M tile
  uses them.
* ``index="column" | "packed" | "offset"``: :func:`~sparsecc.codegen.nm.nm_linear`
  over X^T tiles, vectorized along M (any LLVM target; the fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm.s_tir

from sparsecc.codegen.nm import PERMUTE_INTRINSICS, nm_linear, nm_linear_permute
from sparsecc.errors import KernelBuildError
from sparsecc.targets.base import apply_rules
from sparsecc.targets.x86 import REGIMES, target_vector_bits

__all__ = ["NM_RULES", "NMScheduleParams", "default_nm_params", "nm_template_for", "schedule_nm"]


@dataclass(frozen=True)
class NMScheduleParams:
    """Tile sizes of the N:M rules."""

    m_tile: int = 16
    r_tile: int = 8
    #: "permute" (vpermps template, r_tile = vector lanes) or an index mode of the X^T template:
    #: "column" (int16 column per slot), "offset" (column * m_tile), "packed" (the format's bits)
    index: str = "column"
    rows_outer: bool = True  # parallel loop order: W row tiles outside M tiles (permute template)
    k_block: int = 0  # permute template: vector chunks of K per pass over all M tiles (0: no K blocking)


def default_nm_params(regime: str, m: int | None = None, target=None) -> NMScheduleParams:
    """Hand-picked tiles (measured with ``benchmarks/kernel_speed.py --section nm``).

    ``m``: rows of X of the call, when known; in the gemm regime an M at or
    below one vector keeps ``m_tile`` at one vector of floats (16 with AVX-512).
    """
    lanes = max(4, target_vector_bits(target) // 32)
    if lanes in PERMUTE_INTRINSICS:
        if regime == "gemv":
            return NMScheduleParams(m_tile=1, r_tile=lanes, index="permute")
        # 8 rows of X per tile and K blocks of 8 vectors. One thread, CPU time, interleaved medians, M=16,
        # ratio to torch dense: 768x3072 0.56 (4 rows: 0.66, 2 rows: 0.63, 4 rows unblocked: 0.64),
        # 384x1536 0.64 (4 rows: 0.76); the run-to-run noise on this shared machine is about +-0.05.
        return NMScheduleParams(m_tile=8, r_tile=lanes, index="permute", k_block=8)
    if regime == "gemv":
        return NMScheduleParams(m_tile=1, r_tile=8)
    return NMScheduleParams(m_tile=lanes, r_tile=8)


def nm_template_for(n: int, m: int, groups: int, regime: str, *, bias: bool, activation,
                    params: NMScheduleParams | None = None):
    params = params or default_nm_params(regime)
    if params.index == "permute":
        chunks = -(-groups * m // params.r_tile)
        return nm_linear_permute(n, m, chunks, lanes=params.r_tile, bias=bias, activation=activation,
                                 m_tile=params.m_tile, k_block=effective_k_block(chunks, params.k_block))
    return nm_linear(n, m, groups, bias=bias, activation=activation, m_tile=params.m_tile, r_tile=params.r_tile,
                     index=params.index)


def effective_k_block(chunks: int, k_block: int) -> int:
    """The largest divisor of ``chunks`` not above ``k_block`` (0 when blocking would leave one block)."""
    if k_block <= 0 or k_block >= chunks:
        return 0
    return max(d for d in range(1, k_block + 1) if chunks % d == 0)


def _finish(sch: tvm.s_tir.Schedule) -> tvm.s_tir.Schedule:
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("row"))))  # parallel last (see tvm notes)
    return sch


def _index(func) -> str:
    """The template's index mode, "" for templates that are not N:M."""
    return str(func.attrs.get("sparsecc.index", "")) if func.attrs.get("sparsecc.nm") is not None else ""


def rule_nm_permute(func, target=None, params: NMScheduleParams = NMScheduleParams()):
    """Permute template: the compute is written in vectors; vectorize the epilogue along N, parallel tiles."""
    if _index(func) != "permute":
        return None
    sch = tvm.s_tir.Schedule(func, enable_check=False)
    emi, er = sch.get_loops(sch.get_sblock("epilogue"))[-2:]
    sch.vectorize(er)
    sch.unroll(emi)
    loops = sch.get_loops(sch.get_sblock("row"))
    if params.rows_outer and len(loops) == 2:
        sch.reorder(loops[1], loops[0])
    return _finish(sch)


def rule_nm_gemm(func, target=None, params: NMScheduleParams = NMScheduleParams()):
    """Vectorize along the M tile, unroll slots and the rows of the W tile."""
    if _index(func) in ("", "permute") or int(func.attrs["sparsecc.m_tile"]) == 1:
        return None
    sch = tvm.s_tir.Schedule(func, enable_check=False)
    g, s, r, mi = sch.get_loops(sch.get_sblock("compute"))
    sch.vectorize(mi)
    sch.unroll(r)
    sch.unroll(s)
    r0, mi0 = sch.get_loops(sch.get_sblock("init"))[-2:]
    sch.vectorize(mi0)
    sch.unroll(r0)
    emi, er = sch.get_loops(sch.get_sblock("epilogue"))[-2:]
    sch.vectorize(er)
    sch.unroll(emi)
    return _finish(sch)


def rule_nm_gemv(func, target=None, params: NMScheduleParams = NMScheduleParams()):
    """M tile of 1: vectorize along the rows of the W tile (X gathered by position)."""
    if _index(func) in ("", "permute") or int(func.attrs["sparsecc.m_tile"]) != 1:
        return None
    sch = tvm.s_tir.Schedule(func, enable_check=False)
    g, s, r, mi = sch.get_loops(sch.get_sblock("compute"))
    sch.vectorize(r)
    sch.unroll(s)
    r0, mi0 = sch.get_loops(sch.get_sblock("init"))[-2:]
    sch.vectorize(r0)
    emi, er = sch.get_loops(sch.get_sblock("epilogue"))[-2:]
    sch.vectorize(er)
    return _finish(sch)


NM_RULES = (rule_nm_permute, rule_nm_gemm, rule_nm_gemv)


def schedule_nm(n: int, m: int, groups: int, regime: str, *, bias: bool, activation=None, target=None,
                params: NMScheduleParams | None = None) -> tvm.s_tir.Schedule:
    """Template + the first applicable N:M rule for ``regime``.

    Raises
    ------
    KernelBuildError
        Unknown regime or no rule applies.
    """
    if regime not in REGIMES:
        raise KernelBuildError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    params = params or default_nm_params(regime, target=target)
    func = nm_template_for(n, m, groups, regime, bias=bias, activation=activation, params=params)
    return apply_rules(NM_RULES, func, target, params)
