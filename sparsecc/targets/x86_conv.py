"""x86 schedule rules for the sparse convolution templates of :mod:`sparsecc.codegen.conv`.

The NHWC implicit-im2col template has the loop structure of the BSR linear
template (blocks "row", "init", "compute", "epilogue", compute loops
``k, j, mi, ii``), so it reuses the linear rules of :mod:`sparsecc.targets.x86`
(vectorize along ``br`` for ``(br, 1)`` blocks, along ``bc`` for row blocks,
scalar FMAs over a pixel tile for CSR). The NCHW 1x1 and the direct NCHW
templates get their own rules: vectorize along the pixel tile (unrolling the
1x1 block's output channels), parallelize the tiles.

Rules return a ``tvm.s_tir.Schedule`` or None when they do not apply (dlight style).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm.s_tir

from sparsecc.codegen.conv import bsr_conv1x1_nchw, bsr_conv_nhwc, csr_conv_direct_nchw
from sparsecc.errors import KernelBuildError
from sparsecc.targets import x86
from sparsecc.targets.base import apply_rules
from sparsecc.formats import block_candidate

__all__ = ["CONV_RULES", "ConvParams", "conv_kernel_name", "default_conv_params", "schedule_conv"]

#: Kernel families: the implicit-im2col NHWC conv, the 1x1 NCHW conv and the direct (stride-1, CSR) NCHW conv.
KINDS = ("nhwc", "nchw1x1", "direct")


@dataclass(frozen=True)
class ConvParams:
    """Tile sizes of the conv rules.

    Attributes
    ----------
    m_tile : int
        Output pixels per register tile (NHWC).
    hw_tile : int
        Pixels per vector tile (NCHW 1x1, direct); the pixel count is padded to it.
    """

    m_tile: int = 8
    hw_tile: int = 16


def default_conv_params(block: tuple[int, int], kind: str) -> ConvParams:
    """Hand-picked tiles (measured with ``benchmarks/conv.py``, see its results).

    NHWC: 8 pixels x one block row (for 16x1: 8 zmm accumulators); the
    accumulator must stay under TVM's 1024-byte stack limit (see
    :func:`sparsecc.targets.x86.default_params`). NCHW: one AVX-512 vector of
    pixels (16 floats) x ``br`` channels.
    """
    br, bc = block
    if kind == "nhwc":
        mt = 8
        while mt > 1 and mt * br * bc * 4 > 1024:
            mt //= 2
        return ConvParams(m_tile=mt)
    if kind == "direct":
        # 64 pixels (8 AVX2 vectors of accumulators): on the stride-1 3x3 ResNet-18 layers at density 0.3,
        # batch 1, 2 threads (Zen 3), 0.44-0.83 of torch dense against 0.54-0.89 with 32 and 0.85-1.23 with 16;
        # 128 was no faster, 96 (not a power of two) 3x slower (benchmarks/tiles.py direct)
        return ConvParams(hw_tile=64)
    return ConvParams(hw_tile=16 if x86.target_vector_bits() >= 512 else 8)


def conv_kernel_name(kind: str, block: tuple[int, int], bias: bool, activation, residual: bool = False) -> str:
    """``conv_<kind>_<format>[_bias][_res][_act]``, e.g. ``conv_nhwc_bsr_16x1_bias_relu``."""
    return block_candidate(block).kernel_name(f"conv_{kind}", "", bias, activation, residual)


def rule_nchw1x1(func, target=None, params=ConvParams()):
    """NCHW 1x1: vectorize the pixel tile, unroll the block rows, parallelize (n, block row, pixel tile)."""
    if str(func.attrs.get("sparsecc.kind", "")) != "conv1x1_nchw":
        return None
    sch = tvm.s_tir.Schedule(func, enable_check=False)
    k, ii, hi = sch.get_loops(sch.get_sblock("compute"))
    sch.unroll(ii)
    sch.vectorize(hi)
    for blk in ("init", "epilogue"):
        ii, hi = sch.get_loops(sch.get_sblock(blk))[-2:]
        sch.unroll(ii)
        sch.vectorize(hi)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("row"))))
    return sch


def rule_direct(func, target=None, params=ConvParams()):
    """Direct NCHW conv: vectorize the pixel tile, parallelize (n, pixel tile, output channel)."""
    if str(func.attrs.get("sparsecc.kind", "")) != "conv_direct_nchw":
        return None
    sch = tvm.s_tir.Schedule(func, enable_check=False)
    for blk in ("init", "compute", "epilogue"):
        sch.vectorize(sch.get_loops(sch.get_sblock(blk))[-1])
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("row"))))
    return sch


def schedule_conv(kind: str, block, *, bias: bool, activation=None, residual: bool = False, target=None,
                  params: ConvParams | None = None) -> tvm.s_tir.Schedule:
    """Template + the first applicable x86 rule for a conv kernel.

    Raises
    ------
    KernelBuildError
        Unknown kind, or no rule applies.
    """
    block = (int(block[0]), int(block[1]))
    params = params or default_conv_params(block, kind)
    if kind == "nhwc":
        func = bsr_conv_nhwc(block, bias=bias, activation=activation, residual=residual, m_tile=params.m_tile)
        # the linear rules schedule the NHWC template (same loop structure)
        return apply_rules(x86.RULES, func, target, x86.ScheduleParams(m_tile=params.m_tile, m_outer=True))
    if kind == "nchw1x1":
        if residual:
            raise KernelBuildError("the NCHW 1x1 conv kernel has no residual epilogue")
        func = bsr_conv1x1_nchw(block, bias=bias, activation=activation, hw_tile=params.hw_tile)
        return apply_rules(CONV_RULES, func, target, params)
    if kind == "direct":
        if block != (1, 1):
            raise KernelBuildError(f"the direct conv kernel stores CSR (block (1, 1)), got {block}")
        # takes a bias always (zeros for convs without one): one build for both
        func = csr_conv_direct_nchw(activation=activation, residual=residual, hw_tile=params.hw_tile)
        return apply_rules(CONV_RULES, func, target, params)
    raise KernelBuildError(f"unknown conv kernel kind {kind!r}; expected one of {KINDS}")


#: The conv-only rules (the NHWC template is scheduled by the linear rules).
CONV_RULES = (rule_nchw1x1, rule_direct)
