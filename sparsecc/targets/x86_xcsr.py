"""x86 (and ARM NEON) schedule rule of the unstructured template :mod:`sparsecc.codegen.xcsr`.

The template is written with the vector axis innermost (``mt`` rows of X), so the rule only
vectorizes it and the bias-and-activation block (LLVM splits an ``mt``-wide vector into ``mt / lanes``
registers: 4 zmm for mt = 64),
unrolls the epilogue's transpose into Y and parallelizes the (panel, row group) tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm.s_tir

from sparsecc.codegen.xcsr import xcsr_linear
from sparsecc.targets.base import apply_rules

__all__ = ["XCSR_RULES", "XCSRParams", "column_block", "default_xcsr_params", "host_xcsr_params", "rule_xcsr", "schedule_xcsr", "xcsr_kernel_name"]


@dataclass(frozen=True)
class XCSRParams:
    """Tiles of the unstructured kernel.

    Attributes
    ----------
    m_tile : int
        Rows of X per panel (the vector axis); 1 for M < 8 (a scalar gather over X's row).
    row_group : int
        Rows of W per tile (consecutive columns of Y written together).
    """

    m_tile: int = 64
    row_group: int = 128
    #: columns per column block (0: one block); a block of the X panel (k_block x m_tile floats, 32 KiB for
    #: 128 x 64) stays in L1 while the rows of a group use it
    k_block: int = 128
    #: independent accumulator sets per row (consecutive nonzeros alternate between them): with one set,
    #: each of its mt / lanes vectors takes one FMA per nonzero, so the FMA latency bounds the loop
    chains: int = 1


def column_block(m_tile: int, l1d_bytes: int, l2_bytes: int | None = None) -> int:
    """Columns per column block for an X panel of ``m_tile`` rows.

    With an L2 of less than 1 MiB per core (or ``l2_bytes`` None): the largest multiple of 32 whose block of the
    panel (``k_block x m_tile`` float32) fills at most three quarters of an ``l1d_bytes`` L1 data cache,
    between 32 and 128 (the rest of L1 holds the row's values, indices and accumulators). With 1 MiB or more:
    a 48 KiB block of the panel (192 columns of 64 rows), at least the L1 size above: each (row, block) pair
    costs a reload and store of the row's accumulators and a mispredicted loop exit, so fewer, longer
    blocks pay once an L2 this large serves the part of the block that does not stay in L1.

    Measured with ``m_tile`` 64 on the six BERT/MiniLM shapes, M = 128 and 1024, 2 threads, interleaved with
    torch dense: on Zen 3 (32 KiB L1, 512 KiB L2, AVX2) 96 columns (24 KiB) ran 0.81-1.08 of dense at density
    0.5 against 0.78-1.29 for 128 (32 KiB, the whole L1) and 0.84-1.29 for 64, and was the fastest or within
    noise of it at 34 of the 36 points; on Zen 4 (32 KiB L1, 1 MiB L2, AVX-512) the geometric mean over
    densities 0.5 and 0.3 was 0.66 of dense for 96 columns, 0.62 for 128, 0.58 for 160 and 192, and over 0.5,
    0.3 and 0.1: 0.45 for 160, 0.42 for 192, 0.44 for 256, 0.47 for 384 (at density 0.1 192-384 were within
    noise; at 0.5, 256 and 384 were slower: 0.72-1.09). On Zen 5 (48 KiB L1, 1 MiB L2) 128 columns were
    faster than 64; wider blocks were not measured there.
    """
    per_column = 4 * max(1, int(m_tile))
    fit = max(32, min(128, (3 * int(l1d_bytes) // 4) // per_column // 32 * 32))
    if l2_bytes is not None and int(l2_bytes) >= 1024 * 1024:
        return max(fit, min(384, max(32, 48 * 1024 // per_column // 32 * 32)))
    return fit


def default_xcsr_params(regime: str, l1d_bytes: int | None = None, l2_bytes: int | None = None) -> XCSRParams:
    """Tiles of the unstructured kernel; ``k_block`` from :func:`column_block` for an ``l1d_bytes`` L1 data
    cache and an ``l2_bytes`` L2 (``l1d_bytes`` None: 128 columns, the Zen 5 choice).

    Measured on the 2-core Zen 5 host, 2 threads, interleaved with torch dense (M = 128 and 1024, the six
    BERT/MiniLM shapes): ``m_tile`` 64 (4 vectors of AVX-512) was fastest at densities 0.1–0.5 (16: 1.5–1.9x
    slower, 32: 1.1–1.4x slower, 128: within 10%, slower on most shapes); ``row_group`` 16 (see the template);
    ``k_block`` 128 (against one block: 0.87 -> 0.74 of dense at 384x384, M = 128, density 0.5; 1.03 -> 0.72 at
    M = 1024; 64 was within noise of 128); ``row_group`` 32 (against 16: 0.75 -> 0.57 at 3072x768, M = 128,
    density 0.5, 0.42 -> 0.28 at 768x3072 density 0.1, 3-10% elsewhere; 64 rows and 256-column blocks were
    within noise of it; all from one interleaved run); then 128 rows per tile (the accumulators of a tile,
    128 x 64 floats, stay in L2 while each 128-column block of the X panel is read once from L1 for all of them:
    against 32, 0.57 -> 0.38 at 768x3072, M = 128, density 0.3, 0.28 -> 0.17 at density 0.1, 0.24 -> 0.15 at
    3072x768, 2-10% elsewhere; 384 rows were no better). A layer whose N is not a multiple takes the largest
    power of two that divides N (:class:`~sparsecc.runtime.xcsr.XCSRLinear`). These tiles were chosen while
    the accumulators were stored back to memory after every nonzero; with them in registers the kernel ran
    1.3-2x faster (``benchmarks/results/kernels_unstructured.md``). Searched again with them in registers, on
    the six shapes at M = 128 and 1024, densities 0.5/0.3/0.1: two accumulator ``chains`` were within noise of
    one except at 3072x768 and 768x3072, M = 128 (0.58 -> 0.41-0.45 of dense); ``m_tile`` 128 with 64-column
    blocks and 64-row groups measured 0.38-0.45 of dense against 0.47-0.60 for these tiles at density 0.5
    kernel alone, but end to end on MiniLM (50% unstructured, seq 128, kernels in one interleaved run) it was
    slower: batch 1 1.56x against 1.66x, batch 8 1.67x against 1.89x of torch dense, with two chains 1.59x and
    1.75x. The kernel's loads are the limit: every nonzero is an index load and ``mt / lanes`` vector loads
    whose address depends on it; hand-written C of the same loop runs 3.3-3.6 cycles per nonzero (4 FMAs of
    AVX-512) in L1, and 2.3 cycles with the same addresses as immediates (code specialised to the pattern).
    On Zen 3 (AVX2, 8 vectors per nonzero) the same C loop takes 2.1-2.5 ns per nonzero with the X block in L1,
    2.1-2.3 ns with computed addresses and a constant weight, against 1.3 ns for 8 FMAs on registers: the
    256-bit loads, not the FMAs or the index arithmetic, bound it at about 55-60% of the FMA peak."""
    k_block = 128 if l1d_bytes is None else column_block(64, l1d_bytes, l2_bytes)  # one storage layout for both regimes
    if regime == "gemv":  # 32 rows per tile: 12 tiles for 2 threads at N = 384 (128 rows: 3; 17.2 -> 13.2 us
        # at 384x384, density 0.3, kernel call alone; 3072x768 within noise)
        return XCSRParams(m_tile=1, row_group=32, k_block=k_block)
    return XCSRParams(m_tile=64, row_group=128, k_block=k_block)


def host_xcsr_params(regime: str) -> XCSRParams:
    """:func:`default_xcsr_params` for this host's L1 data and L2 cache sizes."""
    from sparsecc.targets.x86 import host_l1d_bytes, host_l2_bytes

    return default_xcsr_params(regime, l1d_bytes=host_l1d_bytes(), l2_bytes=host_l2_bytes())


def rule_xcsr(func, target=None, params: XCSRParams = XCSRParams()):
    """Vectorize along the X panel, parallelize the tiles; None for other templates."""
    if str(func.attrs.get("sparsecc.kind", "")) != "xcsr":
        return None
    sch = tvm.s_tir.Schedule(func, enable_check=False)
    mt = int(func.attrs["sparsecc.m_tile"])
    if mt > 1:
        loops = sch.get_loops(sch.get_sblock("compute"))
        sch.vectorize(loops[-1])
        sch.unroll(loops[-2])  # the accumulator sets
        sch.vectorize(sch.get_loops(sch.get_sblock("tail"))[-1])
        sch.vectorize(sch.get_loops(sch.get_sblock("init"))[-1])
        for name in ("acc_load", "acc_store", "act"):
            sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
    else:  # the gather kernel: its u partial sums unrolled
        sch.unroll(sch.get_loops(sch.get_sblock("compute"))[-1])
    e_outer, e_inner = sch.get_loops(sch.get_sblock("epilogue"))[-2:]
    if int(func.attrs.get("sparsecc.panels_out", 0)) and mt > 1:
        sch.vectorize(e_inner)  # panels out: contiguous along the panel
    else:
        sch.unroll(e_inner)  # the transpose into Y: rg consecutive floats of one row of Y
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("row"))))  # parallel last (see tvm notes)
    return sch


XCSR_RULES = (rule_xcsr,)


def xcsr_kernel_name(regime: str, activation, index_dtype: str, params: XCSRParams, panels_out: bool = False) -> str:
    """``xcsr_<regime>[_act]_mt<m_tile>_rg<row_group>_<index dtype>[_po]`` (``k_block`` is in the data, not the
    code; ``_po``: output in the next layer's X^T panels)."""
    return (f"xcsr_{regime}" + (f"_{activation}" if activation else "")
            + f"_mt{params.m_tile}_rg{params.row_group}"
            + (f"_c{params.chains}" if params.m_tile > 1 and params.chains > 1 else "")
            + f"_{index_dtype}" + ("_po" if panels_out else ""))


def schedule_xcsr(regime: str, *, activation=None, index_dtype: str = "int16", target=None,
                  params: XCSRParams | None = None, panels_out: bool = False) -> tvm.s_tir.Schedule:
    """Template + the first applicable rule.

    Raises
    ------
    KernelBuildError
        No rule applies.
    """
    params = params or default_xcsr_params(regime)
    func = xcsr_linear(activation=activation, m_tile=params.m_tile, row_group=params.row_group,
                       index_dtype=index_dtype, panels_out=panels_out, chains=params.chains)
    return apply_rules(XCSR_RULES, func, target, params)
