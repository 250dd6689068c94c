"""TensorIR templates of ``Y = act(X @ W.T + b)`` (BSR / CSR ``W``) shaped for GPUs.

The CPU templates of :mod:`sparsecc.codegen.linear` put one block row of ``W``
and an M tile in a "row" block whose outer loops are parallelized. A GPU kernel
needs one more level: a *thread block* ("tile") that owns an M tile of ``X``
staged in shared memory and ``rows`` block rows of ``W``, one per thread group
(``threadIdx.y``). So the GPU template is three-level::

    for mo, ig in grid(ceil(M / mt), ceil(NB / rows)):      # -> blockIdx.y, blockIdx.x
        block "tile":
            XS = alloc (mt, K + pad)                        # -> shared memory
            for mi, kk in grid(mt, K):
                block "load_x": XS[mi, kk] = X[mo * mt + mi, kk]        (rows < M only)
            for r in range(rows):                            # -> threadIdx.y
                block "row":   io = ig * rows + r            (io < NB only)
                    C = alloc (mt, br)                      # -> registers ("local")
                    for mi, ii, k, j in grid(mt, br, indptr[io+1] - indptr[io], bc):
                        block "compute" (reduction over k, j):
                            C[mi, ii] += XS[mi, indices[p] * bc + j] * data[p, ii, j]
                    for mi, ii in grid(mt, br):
                        block "epilogue": Y[mo * mt + mi, io, ii] = act(C[mi, ii] + b[io, ii])

The data-dependent reduction extent refers to block variables of "tile" and
"row" (TensorIR refuses loop variables there), as in the CPU template. Left
unscheduled (every buffer in global memory, all loops serial) the template is
an ordinary CPU function: the tests build it for LLVM and compare it with torch,
which checks the index arithmetic the GPU schedules of
:mod:`sparsecc.targets.cuda` inherit (a schedule only binds, splits and
re-scopes; TVM checks that those keep the semantics).

``K`` is static (one build per distinct K): the shared tile's size must be known
at compile time. ``pad`` adds one float to each shared row so that lanes
reading the same column of different rows hit different banks (row stride
``K + 1`` words; Volkov & Demmel 2008 / the CUDA C programming guide, "shared
memory bank conflicts").

Arguments of the built function, in order (same as the CPU kernels): ``X (M,
K)``, ``data (nnzb, br, bc)`` (layout "rc", as
:class:`~sparsecc.formats.BlockSparseMatrix` stores it), ``indices (nnzb,)
int32``, ``indptr (NB + 1,) int32``, ``bias (NB, br)`` (only when
``bias=True``), ``Y (M, NB, br)``.
"""

from __future__ import annotations

from tvm.script import tirx as T

from sparsecc.codegen.linear import GELU_NAN_AT_INF, _activation
from sparsecc.errors import UnsupportedOpError

__all__ = ["BLOCK_NAMES", "bsr_linear_gpu"]

#: Names of the TensorIR blocks of the GPU template (the CUDA schedules look them up).
BLOCK_NAMES = ("tile", "load_x", "row", "compute", "epilogue")


def bsr_linear_gpu(block: tuple[int, int], *, k: int, bias: bool = False, activation: str | None = None,
                   m_tile: int = 1, rows: int = 4, pad: int = 0, x_scope: str = "global",
                   acc_scope: str = "global"):
    """Unscheduled GPU-shaped BSR template (a ``tvm.tirx.PrimFunc``); ``block == (1, 1)`` is CSR.

    Parameters
    ----------
    block : (br, bc)
        Block shape of ``W``: (N, K) (static).
    k : int
        K, the reduction size (static: it sizes the shared-memory X tile).
    bias : bool
        Add ``bias: (N,)`` (passed as ``(NB, br)``).
    activation : {None, "relu", "gelu"}
        Fused epilogue (gelu: exact, erf by a rational approximation, max error ~1e-7).
    m_tile : int
        Rows of ``X`` one thread block stages in shared memory (``mt``). Any M
        works: rows past M are neither loaded nor stored.
    rows : int
        Block rows of ``W`` one thread block computes (one per ``threadIdx.y``).
    pad : int
        Extra floats per staged row of ``X`` (1 avoids bank conflicts when lanes
        read different rows at the same column).

    Raises
    ------
    UnsupportedOpError
        A non-positive size or an unknown activation.
    """
    br, bc = int(block[0]), int(block[1])
    mt, rb, kdim, kp = int(m_tile), int(rows), int(k), int(k) + int(pad)
    if min(br, bc, mt, rb, kdim) < 1 or pad < 0:
        raise UnsupportedOpError(
            f"block, m_tile, rows and k must be positive and pad >= 0, got block={(br, bc)}, m_tile={mt}, "
            f"rows={rb}, k={kdim}, pad={pad}")
    if kdim % bc:
        raise UnsupportedOpError(f"K={kdim} is not a multiple of the block width {bc}")
    act = _activation(activation, GELU_NAN_AT_INF)  # torch's CUDA gelu: NaN at ±inf

    def bias_val(B, vio, vii):
        return T.float32(0) if B is None else B[vio, vii]

    def tile_reads(X, D, IND, PTR, B, vmo, vig, NNZB):
        regions = [X[vmo * mt:vmo * mt + mt, 0:kdim], D[0:NNZB, 0:br, 0:bc], IND[0:NNZB],
                   PTR[vig * rb:vig * rb + rb + 1]]
        return regions if B is None else regions + [B[vig * rb:vig * rb + rb, 0:br]]

    def row_reads(XS, D, IND, PTR, B, vio, NNZB):
        regions = [XS[0:mt, 0:kp], D[0:NNZB, 0:br, 0:bc], IND[0:NNZB], PTR[vio:vio + 2]]
        return regions if B is None else regions + [B[vio, 0:br]]

    @T.macro
    def body(X, D, IND, PTR, B, Y, M, NB, NNZB):
        for mo, ig in T.grid((M + mt - 1) // mt, (NB + rb - 1) // rb):
            with T.sblock("tile"):
                vmo, vig = T.axis.remap("SS", [mo, ig])
                T.reads(tile_reads(X, D, IND, PTR, B, vmo, vig, NNZB))
                T.writes(Y[vmo * mt:vmo * mt + mt, vig * rb:vig * rb + rb, 0:br])
                XS = T.alloc_buffer((mt, kp), "float32", scope=x_scope)
                for mi, kk in T.grid(mt, kdim):
                    with T.sblock("load_x"):
                        vmi, vkk = T.axis.remap("SS", [mi, kk])
                        T.where(vmo * mt + mi < M)
                        XS[vmi, vkk] = X[vmo * mt + vmi, vkk]
                for r in range(rb):
                    with T.sblock("row"):
                        vr = T.axis.spatial(rb, r)
                        T.where(vig * rb + r < NB)
                        T.reads(row_reads(XS, D, IND, PTR, B, vig * rb + vr, NNZB))
                        T.writes(Y[vmo * mt:vmo * mt + mt, vig * rb + vr, 0:br])
                        C = T.alloc_buffer((mt, br), "float32", scope=acc_scope)
                        for mi, ii, kb, j in T.grid(mt, br, PTR[vig * rb + vr + 1] - PTR[vig * rb + vr], bc):
                            with T.sblock("compute"):
                                vmi, vii, vk, vj = T.axis.remap("SSRR", [mi, ii, kb, j])
                                with T.init():
                                    C[vmi, vii] = T.float32(0)
                                C[vmi, vii] = C[vmi, vii] + XS[
                                    vmi, IND[PTR[vig * rb + vr] + vk] * bc + vj] * D[PTR[vig * rb + vr] + vk, vii, vj]
                        for mi, ii in T.grid(mt, br):
                            with T.sblock("epilogue"):
                                vmi, vii = T.axis.remap("SS", [mi, ii])
                                T.where(vmo * mt + mi < M)
                                Y[vmo * mt + vmi, vig * rb + vr, vii] = act(
                                    C[vmi, vii] + bias_val(B, vig * rb + vr, vii))

    attrs = {"global_symbol": "main", "tir.noalias": True, "sparsecc.block": [br, bc], "sparsecc.m_tile": mt,
             "sparsecc.rows": rb, "sparsecc.kind": "linear_gpu"}
    if bias:

        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, d_h: T.handle, ind_h: T.handle, ptr_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            M = T.int32()
            NB = T.int32()
            NP = T.int32()
            NNZB = T.int32()
            X = T.match_buffer(x_h, (M, kdim), "float32")
            D = T.match_buffer(d_h, (NNZB, br, bc), "float32")
            IND = T.match_buffer(ind_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            B = T.match_buffer(b_h, (NB, br), "float32")
            Y = T.match_buffer(y_h, (M, NB, br), "float32")
            body(X, D, IND, PTR, B, Y, M, NB, NNZB)

    else:

        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, d_h: T.handle, ind_h: T.handle, ptr_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            M = T.int32()
            NB = T.int32()
            NP = T.int32()
            NNZB = T.int32()
            X = T.match_buffer(x_h, (M, kdim), "float32")
            D = T.match_buffer(d_h, (NNZB, br, bc), "float32")
            IND = T.match_buffer(ind_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            Y = T.match_buffer(y_h, (M, NB, br), "float32")
            body(X, D, IND, PTR, None, Y, M, NB, NNZB)

    return func
