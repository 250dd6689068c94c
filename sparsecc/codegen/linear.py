"""TensorIR templates for ``Y = act(X @ W.T + b)`` with a block-sparse ``W``.

One template per format: :func:`bsr_linear` is parametrized by a static block
shape ``(br, bc)``; :func:`csr_linear` is the ``(1, 1)`` case.  Everything that
varies between layers (``M``, ``K``, ``N``, ``nnzb``) is symbolic, so a single
build serves every layer and density of a given block shape.

Loop structure (unscheduled)::

    for io in range(NB):                       # block "row"  (spatial io)
        C = alloc (M, br)                            # accumulator of one block row
        for m, ii, k in grid(M, br, indptr[io+1] - indptr[io]), j in range(bc):
            block "compute": C[m, ii] += X[m, indices[p] * bc + j] * data[p, ii, j]
                             (p = indptr[io] + k; data[p, j, ii] with layout "cr")
        for m, ii in grid(M, br):
            block "epilogue": Y[m, io * br + ii] = act(C[m, ii] + b[io * br + ii])

The data-dependent reduction extent ``indptr[io+1] - indptr[io]`` refers to the
block variable of the enclosing "row" block (TensorIR's well-formedness check
refuses a loop variable there), which is why the template is two-level.
Schedules (``sparsecc.targets``) work inside the "row" block and parallelize
its outer loop.

Arguments of the built function, in order: ``X (M, K)``, ``data``, ``indices
(nnzb,) int32``, ``indptr (NB + 1,) int32``, ``bias (N,)`` (only when
``bias=True``), ``Y (M, N)``.  ``data`` is ``(nnzb, br, bc)`` for layout "rc"
(the :class:`~sparsecc.formats.BlockSparseMatrix` layout) and ``(nnzb, bc, br)``
for layout "cr" (each block transposed so that a column of the block is
contiguous, used for blocks with ``br > 1`` and ``bc > 1``).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from sparsecc.errors import UnsupportedOpError

__all__ = [
    "ACTIVATIONS",
    "BLOCK_NAMES",
    "bsr_linear",
    "csr_linear",
    "data_layout_for",
    "linear_template",
]

ACTIVATIONS = (None, "relu", "gelu")
#: Names of the TensorIR blocks of every template (schedules look them up).
BLOCK_NAMES = {"row": "row", "compute": "compute", "epilogue": "epilogue"}

_INV_SQRT2 = 0.7071067811865476


def data_layout_for(block: tuple[int, int]) -> str:
    """Layout of ``data`` the kernels of ``block`` expect: "rc" or "cr".

    The two only differ in memory when ``br > 1 and bc > 1`` (e.g. 4x4): there
    the kernel wants each block transposed so it can vectorize along ``br``.
    """
    br, bc = block
    return "cr" if (br > 1 and bc > 1) else "rc"


# Rational approximation of erf on [-4, 4] (odd numerator / even denominator, max
# error ~1e-7 in float32), from Eigen's ``generic_fast_erf_float`` (also TVM topi's
# ``fast_erf``). Only mul/add/div/min/max, so it vectorizes; ``T.erf`` lowers to a
# scalar libm call per element (the fused FFN-up kernel of MiniLM ran 6x slower with it).
_ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def fast_erf(v):
    """erf(v) for a float32 TIR expression, as a vectorizable rational polynomial."""
    x = T.max(T.min(v, T.float32(4.0)), T.float32(-4.0))
    x2 = x * x
    p = T.float32(_ERF_NUM[0])
    for c in _ERF_NUM[1:]:
        p = p * x2 + T.float32(c)
    q = T.float32(_ERF_DEN[0])
    for c in _ERF_DEN[1:]:
        q = q * x2 + T.float32(c)
    return x * p / q


def stack_floats(n: int):
    """A handle to ``n`` float32 of stack memory, for ``T.decl_buffer(..., data=stack_floats(n))`` accumulators.

    TVM lowers every ``alloc_buffer`` of a CPU kernel to a ``TVMBackendAllocWorkspace`` call, a pointer LLVM
    cannot prove unaliased with the kernel's arguments, so a register tile there is stored back (and the
    loop bounds reloaded) after every FMA: measured 4 vector stores per nonzero in the unstructured kernel.
    A stack array is an LLVM ``alloca``, which LLVM promotes to registers when its accesses are at constant
    offsets. Only for small tiles: the memory is on the calling thread's stack.
    """
    return T.reinterpret("handle", T.tvm_stack_alloca("shape", (int(n) + 1) // 2))  # 8-byte slots


def ieee_relu(v):
    """``torch.relu`` with its IEEE semantics: NaN stays NaN, -0.0 stays -0.0 (a select, not ``max``, whose
    LLVM lowering returns the other operand for a NaN)."""
    return T.Select(v < T.float32(0), T.float32(0), v)


def ieee_hardtanh(v, lo: float, hi: float):
    """``F.hardtanh(v, lo, hi)`` with torch's semantics: NaN stays NaN, ±inf clamp to the bounds."""
    return T.Select(v < T.float32(lo), T.float32(lo), T.Select(v > T.float32(hi), T.float32(hi), v))


def host_gelu_at_inf() -> tuple:
    """``(F.gelu(+inf), F.gelu(-inf))`` of torch's vectorized CPU kernel on this host.

    torch itself differs across CPUs: its AVX-512 kernel gives NaN at both infinities, its AVX2 kernel the
    formula's ``+inf`` and ``NaN`` (and a lone element, the scalar path, NaN at both). The fused epilogues follow
    the vectorized kernel of the host, so a compiled layer gives what ``F.gelu`` gives on the same tensor.
    """
    global _GELU_AT_INF
    if _GELU_AT_INF is None:
        import torch

        x = torch.zeros(64)
        x[0], x[1] = float("inf"), float("-inf")
        y = torch.nn.functional.gelu(x)
        _GELU_AT_INF = (float(y[0]), float(y[1]))
    return _GELU_AT_INF


_GELU_AT_INF = None
#: torch's CUDA kernel (and its AVX-512 CPU kernel): NaN at both infinities
GELU_NAN_AT_INF = (float("nan"), float("nan"))


def ieee_gelu(v, at_inf=None):
    """torch's exact (erf) ``F.gelu``: ``v · Φ(v)`` with erf by :func:`fast_erf`, NaN for NaN, and at ``±inf``
    the values ``at_inf`` (default: those of torch's CPU kernel on this host, :func:`host_gelu_at_inf`)."""
    pos, neg = at_inf if at_inf is not None else host_gelu_at_inf()
    g = v * T.float32(0.5) * (T.float32(1) + fast_erf(v * T.float32(_INV_SQRT2)))
    return T.Select(v == T.float32(float("inf")), T.float32(pos),
                    T.Select(v == T.float32(float("-inf")), T.float32(neg), g))


def _activation(activation, gelu_at_inf=None):
    """The TIR epilogue of ``activation``, with torch's IEEE semantics for NaN, ±inf and -0.0 (``gelu_at_inf``:
    see :func:`ieee_gelu`)."""
    if activation is None:
        return lambda v: v
    if activation == "relu":
        return ieee_relu
    if activation == "gelu":
        return lambda v: ieee_gelu(v, gelu_at_inf)
    raise UnsupportedOpError(f"activation {activation!r} is not supported; expected one of {ACTIVATIONS}")


def _hsum(C, mi, ii, bc):
    """C[mi, ii, 0] + ... + C[mi, ii, bc - 1] (the lanes of a split reduction)."""
    acc = C[mi, ii, 0]
    for j in range(1, bc):
        acc = acc + C[mi, ii, j]
    return acc


def bsr_linear(block: tuple[int, int], *, bias: bool = False, activation: str | None = None,
               m_tile: int = 1, split_j: bool | None = None, k: int | None = None):
    """Unscheduled BSR template (a ``tvm.tirx.PrimFunc``) for a static ``block``.

    ``m_tile`` rows of ``X`` are handled by one instance of the "row" block (the
    register tile of the schedules; TensorIR cannot move loops across a block
    boundary, so it is a template parameter). ``M`` must be a multiple of
    ``m_tile`` (callers pad X; :class:`~sparsecc.runtime.kernels.SparseLinear`
    does): reads are not clamped, so that LLVM folds the row offsets of a tile
    into the addressing mode. ``k`` fixes K statically, which turns those
    offsets into immediates (``vfmadd231ps 1536(%r11,%rcx,4){1to16}``); None
    keeps K symbolic.  ``split_j`` keeps one partial sum
    per column of the block (accumulator ``(m_tile, br, bc)``, summed in the
    epilogue) so that the kernel can vectorize along the block's contiguous
    columns; default: when ``bc > 1``.
    """
    br, bc = int(block[0]), int(block[1])
    mt = int(m_tile)
    KDIM = int(k) if k else tvm.tirx.Var("K", "int32")  # noqa: N806 - static K turns X offsets into immediates
    if br < 1 or bc < 1 or mt < 1:
        raise UnsupportedOpError(f"block shape and m_tile must be positive, got {(br, bc)} and {mt}")
    act = _activation(activation)
    has_bias = bool(bias)
    sj = (bc > 1) if split_j is None else bool(split_j)
    cj = bc if sj else 1

    def acc_val(C, mi, ii):
        return _hsum(C, mi, ii, bc) if sj else C[mi, ii, 0]

    def bias_val(B, vio, vii):
        return T.float32(0) if B is None else B[vio, vii]

    def row_reads(X, D, IND, PTR, B, vio, M, NNZB):
        regions = [X[0:M, 0:KDIM], D[0:NNZB, 0:br, 0:bc], IND[0:NNZB], PTR[vio:vio + 2]]
        return regions if B is None else regions + [B[vio, 0:br]]

    @T.macro
    def body(X, D, IND, PTR, B, Y, M, NB, NNZB):
        for mo, io in T.grid((M + mt - 1) // mt, NB):
            with T.sblock("row"):
                vmo, vio = T.axis.remap("SS", [mo, io])
                T.reads(row_reads(X, D, IND, PTR, B, vio, M, NNZB))
                T.writes(Y[vmo * mt:vmo * mt + mt, vio, 0:br])
                C = T.decl_buffer((mt, br, cj), "float32", data=stack_floats(mt * br * cj), scope="local")
                for mi, ii, jj in T.grid(mt, br, cj):
                    with T.sblock("init"):
                        vmi, vii, vjj = T.axis.remap("SSS", [mi, ii, jj])
                        C[vmi, vii, vjj] = T.float32(0)
                for k in T.serial(PTR[vio + 1] - PTR[vio]):
                    for j, mi, ii in T.grid(bc, mt, br):
                        with T.sblock("compute"):
                            vk, vj, vmi, vii = T.axis.remap("RSSS" if sj else "RRSS", [k, j, mi, ii])
                            C[vmi, vii, vj if sj else 0] = C[vmi, vii, vj if sj else 0] + X[
                                vmo * mt + vmi, IND[PTR[vio] + vk] * bc + vj] * D[PTR[vio] + vk, vii, vj]
                for mi, ii in T.grid(mt, br):
                    with T.sblock("epilogue"):
                        vmi, vii = T.axis.remap("SS", [mi, ii])
                        T.where(vmo * mt + mi < M)
                        Y[vmo * mt + vmi, vio, vii] = act(acc_val(C, vmi, vii) + bias_val(B, vio, vii))

    attrs = {"global_symbol": "main", "tir.noalias": True, "sparsecc.block": [br, bc], "sparsecc.m_tile": mt,
             "sparsecc.kind": "linear"}
    if has_bias:

        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, d_h: T.handle, ind_h: T.handle, ptr_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            M = T.int32()
            NB = T.int32()
            NP = T.int32()
            NNZB = T.int32()
            X = T.match_buffer(x_h, (M, KDIM), "float32")
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
            X = T.match_buffer(x_h, (M, KDIM), "float32")
            D = T.match_buffer(d_h, (NNZB, br, bc), "float32")
            IND = T.match_buffer(ind_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            Y = T.match_buffer(y_h, (M, NB, br), "float32")
            body(X, D, IND, PTR, None, Y, M, NB, NNZB)

    return func


def csr_linear(*, bias: bool = False, activation: str | None = None, m_tile: int = 1, k: int | None = None):
    """Unscheduled CSR template: the ``(1, 1)`` BSR template (``data`` is ``(nnz, 1, 1)``).

    The CSR schedules differ from the BSR ones (no block dimension to vectorize
    along), see ``sparsecc.targets.x86``.
    """
    return bsr_linear((1, 1), bias=bias, activation=activation, m_tile=m_tile, k=k)


def linear_template(block: tuple[int, int], *, bias: bool = False, activation: str | None = None,
                    m_tile: int = 1, k: int | None = None):
    """The template for a format given by its block shape ((1, 1) = CSR)."""
    block = (int(block[0]), int(block[1]))
    if block == (1, 1):
        return csr_linear(bias=bias, activation=activation, m_tile=m_tile, k=k)
    return bsr_linear(block, bias=bias, activation=activation, m_tile=m_tile, k=k)
