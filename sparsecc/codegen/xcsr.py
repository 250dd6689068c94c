"""TensorIR template for ``Y = act(X · Wᵀ + b)`` with an unstructured W, vectorized along the token dim M.

Storage: :class:`sparsecc.formats.xcsr.RowSparseMatrix` (CSR rows, 16- or 32-bit column indices).
X is packed transposed in panels of ``mt`` rows, ``XT (MT, K, mt)`` with ``MT = ceil(M / mt)`` (the
runtime module packs it once per call), so the ``mt`` values of one column of X are contiguous.

Loop structure (unscheduled)::

    for mo, ig in grid(MT, N / rg):            # block "row": one panel of X x a group of rg rows of W
        C = alloc (rg, mt)                     # accumulators
        for kb, r in grid(KB, rg):             # block "wrow": column block kb of row n = ig·rg + r
            for p in range(ptr[n, kb], ptr[n, kb + 1]):
                for mi in range(mt):           # block "compute": the vector axis
                    C[r, mi] += data[p] * XT[mo, indices[p], mi]
        for r, mi in grid(rg, mt):             # block "act" (vectorized along mi)
            C[r, mi] = act(C[r, mi] + b[n])
        for mi, r in grid(mt, rg):             # block "epilogue"
            Y[mo·mt + mi, ig·rg + r] = C[r, mi]

Every nonzero is one scalar broadcast against ``mt / lanes`` vector loads of the X panel and as
many FMAs; no gather, no store: the row's accumulators live in registers (a stack array, see
:func:`sparsecc.codegen.linear.stack_floats`) and go back to C once per column block. The panel (K x mt floats) is read by every row group, so it stays in L1/L2.
A group of ``rg`` rows writes ``rg`` consecutive floats of each of the ``mt`` rows of Y it touches
(one cache line per row for rg = 16, instead of one line and one TLB entry per element when a
single row of W writes a column of Y: measured 2.5x slower at N = 3072, density 0.1).
XNNPACK's sparse 1x1 convolution (NCHW: vectorized along pixels, one output channel at a time) and
Sputnik's row-wise SpMM (Gale et al., SC 2020) are organised the same way.

Arguments of the built function: ``XT (MT, K, mt)``, ``data (nnz,)``, ``indices (nnz,)``, ``PTR
(N, KB + 1) int32`` (row pointers per column block), ``bias (N,)`` (zeros for layers without one), ``Y (M, N)``; ``rg`` must divide N
(the runtime module picks the largest power of two up to its tile height that does).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from sparsecc.codegen.linear import _activation, stack_floats
from sparsecc.errors import UnsupportedOpError

__all__ = ["xcsr_linear"]


def xcsr_linear(*, activation: str | None = None, m_tile: int = 64, row_group: int = 128, index_dtype: str = "int16",
                panels_out: bool = False, chains: int = 1):
    """Unscheduled template (a ``tvm.tirx.PrimFunc``) for ``m_tile`` rows of X and ``row_group`` rows of W per tile.

    ``panels_out``: Y is written as the X^T panels of the next layer, ``Y (MT, N, mt)`` (the accumulator
    layout, no transpose), for a following xcsr layer that reads this one's output only; its padded rows
    hold ``act(b)`` (the next layer's padded rows are not stored).

    ``chains``: accumulator sets per row; consecutive nonzeros of a row alternate between them and they are
    summed once per column block (independent FMA chains, ``chains · mt / lanes`` vector registers).

    ``PTR`` is ``(NR, KB + 1)``: ``PTR[n, j]`` is the first nonzero of row ``n`` in column block ``j``
    (``KB`` blocks of columns; KB = 1 is plain CSR). The column blocks are walked outermost inside a
    tile, so the part of the X panel they read stays in L1 while every row of the group uses it.

    Raises
    ------
    UnsupportedOpError
        Non-positive tile sizes, an index dtype other than int16/int32, or an unknown activation.
    """
    mt, rg = int(m_tile), int(row_group)
    if mt < 1 or rg < 1:
        raise UnsupportedOpError(f"m_tile and row_group must be positive, got {mt} and {rg}")
    if index_dtype not in ("int16", "int32"):
        raise UnsupportedOpError(f"index dtype must be int16 or int32, got {index_dtype!r}")
    act = _activation(activation)
    KDIM = tvm.tirx.Var("K", "int32")  # noqa: N806
    u = 4  # M = 1: partial sums per row (FMA latency 4 cycles: one chain ran 2.4 cycles per nonzero)
    chains = max(1, int(chains))
    ca = mt if mt > 1 else u  # accumulator columns per row (in C)
    ra = mt * chains if mt > 1 else u  # register accumulators per row (A)
    passes = 1 if mt > 1 else 0  # 1: one pass per column block; 0: one pass over the whole row (M = 1)

    def y_region(Y, vmo, vig):
        if panels_out:
            return Y[vmo, vig * rg:vig * rg + rg, 0:mt]
        return Y[vmo * mt:vmo * mt + mt, vig * rg:vig * rg + rg]

    def row_reads(XT, D, IND, PTR, B, vmo, vig, NNZ, KB):
        return [XT[vmo, 0:KDIM, 0:mt], D[0:NNZ], IND[0:NNZ], PTR[vig * rg:vig * rg + rg, 0:KB + 1],
                B[vig * rg:vig * rg + rg]]

    @T.macro
    def vector_row(XT, D, IND, PTR, C, A, vmo, n, vkb, vr, KB):
        # one nonzero: a broadcast against the mt contiguous values of its column in the panel, into the
        # register accumulators A (C is in memory: written back once per row and column block, not per nonzero);
        # consecutive nonzeros go to `chains` sets of accumulators (independent FMA chains), the last
        # (length % chains) of the block, counted from its end, to the first set
        for k in T.serial((PTR[n, vkb + 1] - PTR[n, vkb]) // chains):
            for h, mi in T.grid(chains, mt):
                with T.sblock("compute"):
                    vk, vh, vmi = T.axis.remap("RSS", [k, h, mi])
                    A[vh * mt + vmi] = A[vh * mt + vmi] + D[PTR[n, vkb] + vk * chains + vh] * XT[
                        vmo, T.Cast("int32", IND[PTR[n, vkb] + vk * chains + vh]), vmi]
        for t in T.serial((PTR[n, vkb + 1] - PTR[n, vkb]) % chains):
            for mi in T.serial(mt):
                with T.sblock("tail"):
                    vt, vmi = T.axis.remap("RS", [t, mi])
                    A[vmi] = A[vmi] + D[PTR[n, vkb + 1] - vt - 1] * XT[
                        vmo, T.Cast("int32", IND[PTR[n, vkb + 1] - vt - 1]), vmi]

    @T.macro
    def gather_row(XT, D, IND, PTR, C, A, vmo, n, vkb, vr, KB):
        # M = 1: a gather along X's row (in L1 whatever K), so the column blocks are not needed: the row's
        # nonzeros, contiguous from PTR[n, 0] to PTR[n, KB], in one pass (per block: 1.8-2x slower at 3072x768,
        # density 0.3). Nonzeros in groups of u into u partial sums (independent FMA chains); the last
        # (length % u), counted from the row's end, go to the first sum
        for k in T.serial((PTR[n, KB] - PTR[n, 0]) // u):
            for h in T.serial(u):
                with T.sblock("compute"):
                    vk, vh = T.axis.remap("RS", [k, h])
                    A[vh] = A[vh] + D[PTR[n, 0] + vk * u + vh] * XT[
                        vmo, T.Cast("int32", IND[PTR[n, 0] + vk * u + vh]), 0]
        for t in T.serial((PTR[n, KB] - PTR[n, 0]) % u):
            with T.sblock("tail"):
                vt = T.axis.remap("R", [t])
                A[0] = A[0] + D[PTR[n, KB] - vt - 1] * XT[
                    vmo, T.Cast("int32", IND[PTR[n, KB] - vt - 1]), 0]

    row_body = vector_row if mt > 1 else gather_row

    def acc_sum(A, vmi):
        if mt == 1:
            return A[vmi]
        acc = A[vmi]
        for h in range(1, chains):
            acc = acc + A[h * mt + vmi]
        return acc

    def acc_val(C, vr, vmi):
        if mt > 1:
            return C[vr, vmi]
        acc = C[vr, 0]
        for h in range(1, u):
            acc = acc + C[vr, h]
        return acc

    @T.macro
    def rows_epilogue(Y, C, M, vmo, vig):
        for mi, r in T.grid(mt, rg):
            with T.sblock("epilogue"):
                vmi, vr = T.axis.remap("SS", [mi, r])
                T.where(vmo * mt + mi < M)
                Y[vmo * mt + vmi, vig * rg + vr] = C[vr, vmi]

    @T.macro
    def panels_epilogue(Y, C, M, vmo, vig):
        for r, mi in T.grid(rg, mt):
            with T.sblock("epilogue"):
                vr, vmi = T.axis.remap("SS", [r, mi])
                Y[vmo, vig * rg + vr, vmi] = C[vr, vmi]

    epilogue = panels_epilogue if panels_out else rows_epilogue

    @T.macro
    def body(XT, D, IND, PTR, B, Y, M, MT, NG, NNZ, KB):
        for mo, ig in T.grid(MT, NG):
            with T.sblock("row"):
                vmo, vig = T.axis.remap("SS", [mo, ig])
                T.reads(row_reads(XT, D, IND, PTR, B, vmo, vig, NNZ, KB))
                T.writes(y_region(Y, vmo, vig))
                C = T.alloc_buffer((rg, ca), "float32")
                for r, mi in T.grid(rg, ca):
                    with T.sblock("init"):
                        vr, vmi = T.axis.remap("SS", [r, mi])
                        C[vr, vmi] = T.float32(0)
                for kb, r in T.grid(KB * passes + (1 - passes), rg):  # M = 1: one pass over the row
                    with T.sblock("wrow"):  # the row's extent must name block variables (well-formedness)
                        vkb, vr = T.axis.remap("RS", [kb, r])
                        T.reads(XT[vmo, 0:KDIM, 0:mt], D[0:NNZ], IND[0:NNZ], PTR[vig * rg + vr, 0:KB + 1],
                                C[vr, 0:ca])
                        T.writes(C[vr, 0:ca])
                        A = T.decl_buffer((ra,), "float32", data=stack_floats(ra), scope="local")  # registers
                        for mi in T.serial(ra):
                            with T.sblock("acc_load"):
                                vmi = T.axis.remap("S", [mi])
                                A[vmi] = T.if_then_else(vmi < ca, C[vr, T.min(vmi, ca - 1)], T.float32(0))
                        row_body(XT, D, IND, PTR, C, A, vmo, vig * rg + vr, vkb, vr, KB)
                        for mi in T.serial(ca):
                            with T.sblock("acc_store"):
                                vmi = T.axis.remap("S", [mi])
                                C[vr, vmi] = acc_sum(A, vmi)
                for r, mi in T.grid(rg, mt):  # bias and activation in C, vectorized along its rows
                    with T.sblock("act"):
                        vr, vmi = T.axis.remap("SS", [r, mi])
                        C[vr, vmi] = act(acc_val(C, vr, vmi) + B[vig * rg + vr])
                epilogue(Y, C, M, vmo, vig)

    attrs = {"global_symbol": "main", "tir.noalias": True, "sparsecc.kind": "xcsr", "sparsecc.m_tile": mt,
             "sparsecc.chains": chains if mt > 1 else 1,
             "sparsecc.row_group": rg, "sparsecc.panels_out": int(bool(panels_out))}
    y_shape = (lambda M, MT, NR: (MT, NR, mt)) if panels_out else (lambda M, MT, NR: (M, NR))
    # one signature with a bias (zeros for layers without one): N adds per row of X, against nnz / N FMAs
    @T.prim_func(s_tir=True)
    def func(xt_h: T.handle, d_h: T.handle, ind_h: T.handle, ptr_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr(attrs)
        M = T.int32()
        MT = T.int32()
        NR = T.int32()
        KB1 = T.int32()
        NNZ = T.int32()
        XT = T.match_buffer(xt_h, (MT, KDIM, mt), "float32")
        D = T.match_buffer(d_h, (NNZ,), "float32")
        IND = T.match_buffer(ind_h, (NNZ,), index_dtype)
        PTR = T.match_buffer(ptr_h, (NR, KB1), "int32")
        B = T.match_buffer(b_h, (NR,), "float32")
        Y = T.match_buffer(y_h, y_shape(M, MT, NR), "float32")
        body(XT, D, IND, PTR, B, Y, M, MT, NR // rg, NNZ, KB1 - 1)

    return func
