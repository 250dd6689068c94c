"""A row softmax in TensorIR with a vectorized exp (the attention softmax of an export's dense rest).

TVM's legalized ``softmax`` computes ``exp`` twice per element with LLVM's ``expf``, which does not vectorize,
and the export's reduction rule tiled it like a matmul: 1.14 ms for MiniLM's (12, 128, 128) scores against
torch's 0.19 ms and this kernel's 0.20 ms (2 threads, ``python benchmarks/dense.py``). This kernel is written scheduled: rows in parallel; per row a vector max, one pass
storing ``exp(x - max)`` and summing it in vector lanes, one pass scaling by ``1 / sum``.

``exp`` is Cephes' ``expf`` (S. L. Moshier, Cephes Math Library; also the algorithm of Eigen's ``pexp`` and of
TVM topi's ``fast_exp``): ``x = n ln 2 + r`` with ``|r| <= ln 2 / 2`` (``ln 2`` split in two constants), a
degree-5 polynomial for ``exp(r)``, ``2^n`` built in the exponent bits; relative error ~1e-7 on the range it
is used on here (``x - max <= 0``). IEEE cases follow torch: ``exp(-inf) = 0`` exactly (masked scores), a NaN
or ``+inf`` in a row makes the row NaN, as in ``torch.softmax``.

Arguments of the built function: ``X (R, L)``, ``Y (R, L)`` float32, ``L`` a multiple of ``lanes``.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from sparsecc.codegen.linear import stack_floats
from sparsecc.errors import UnsupportedOpError

__all__ = ["softmax_rows", "vector_exp"]

_LOG2E = 1.44269504088896341
_C1 = 0.693359375  # ln 2 = _C1 + _C2, _C1 exact in 9 bits
_C2 = -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_LO, _HI = -87.33654, 88.3762626647949  # exp underflows below (normal range) / overflows above


def vector_exp(v):
    """``exp(v)`` of a float32 TIR expression (Cephes ``expf``), vectorizable: 0 below -87.3, NaN stays NaN."""
    x = T.Select(v > T.float32(_HI), T.float32(_HI), v)
    x = T.Select(x < T.float32(_LO), T.float32(_LO), x)
    n = T.floor(x * T.float32(_LOG2E) + T.float32(0.5))
    r = x - n * T.float32(_C1) - n * T.float32(_C2)
    p = T.float32(_P[0])
    for c in _P[1:]:
        p = p * r + T.float32(c)
    e = (p * r * r + r + T.float32(1)) * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return T.Select(v < T.float32(_LO), T.float32(0), T.Select(v > T.float32(_HI), T.float32(float("inf")), e))


def softmax_rows(rows: int, length: int, lanes: int = 8) -> tvm.tirx.PrimFunc:
    """Scheduled softmax over the last axis of ``X: (rows, length)`` (static shapes).

    Parameters
    ----------
    rows, length : int
    lanes : int
        float32 lanes of one vector of the target (8: AVX2, 16: AVX-512, 4: NEON); ``length`` must be a multiple.

    Raises
    ------
    UnsupportedOpError
        ``length`` not a positive multiple of ``lanes``.
    """
    rows, length, lanes = int(rows), int(length), int(lanes)
    if rows < 1 or length < lanes or length % lanes:
        raise UnsupportedOpError(f"softmax rows need a length that is a multiple of {lanes}, got {length}")
    chunks = length // lanes
    neg_inf = float("-inf")

    @T.prim_func(private=True, s_tir=True)
    def func(x_h: T.handle, y_h: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        X = T.match_buffer(x_h, (rows, length), "float32")
        Y = T.match_buffer(y_h, (rows, length), "float32")
        for r in T.parallel(rows):
            with T.sblock("row"):
                v = T.axis.spatial(rows, r)
                T.reads(X[v, 0:length])
                T.writes(Y[v, 0:length])
                acc = T.decl_buffer((lanes,), "float32", data=stack_floats(lanes), scope="local")
                red = T.decl_buffer((2,), "float32", data=stack_floats(2), scope="local")
                for j in T.vectorized(lanes):
                    acc[j] = T.float32(neg_inf)
                for c in range(chunks):
                    for j in T.vectorized(lanes):
                        acc[j] = T.Select(X[v, c * lanes + j] > acc[j], X[v, c * lanes + j], acc[j])
                red[0] = acc[0]
                for j in T.unroll(1, lanes):
                    red[0] = T.Select(acc[j] > red[0], acc[j], red[0])
                for j in T.vectorized(lanes):
                    acc[j] = T.float32(0)
                for c in range(chunks):
                    for j in T.vectorized(lanes):
                        Y[v, c * lanes + j] = vector_exp(X[v, c * lanes + j] - red[0])
                        acc[j] = acc[j] + Y[v, c * lanes + j]
                red[1] = acc[0]
                for j in T.unroll(1, lanes):
                    red[1] = red[1] + acc[j]
                red[1] = T.float32(1) / red[1]
                for c in range(chunks):
                    for j in T.vectorized(lanes):
                        Y[v, c * lanes + j] = Y[v, c * lanes + j] * red[1]

    return func
