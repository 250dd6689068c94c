"""TensorIR template for a dense ``Y = act(X @ W.T + b)`` with a packed weight (the dense linears of an export).

torch runs a dense linear with MKL's GEMM; TVM 0.27's wheel has no BLAS to hand one to, and its legalized
``matmul`` reads ``W.T``, which an export with the weights as parameters transposes on every call. This
template takes the weight packed once at export time into column panels of ``nb`` outputs,
``Wp[jo, k, ji] = W[jo * nb + ji, k]`` (:func:`pack_weight`), so that one ``k`` step of a panel is ``nb``
contiguous floats: the layout of the packed B operand of the GotoBLAS/BLIS micro-kernel
(Goto & van de Geijn, "Anatomy of high-performance matrix multiplication", ACM TOMS 34(3), 2008; Van Zee &
van de Geijn, "BLIS", ACM TOMS 41(3), 2015). The schedule (:func:`sparsecc.targets.x86.schedule_dense`) keeps
an ``mr x nb`` tile of ``Y`` in registers over all of ``K``.

Unscheduled loop structure (static shapes: an export knows them)::

    for i, j, k in grid(M, Np, K):
        block "matmul": C[i, j] += X[i, k] * Wp[j // nb, k, j % nb]
    for i, j in grid(M, Np):
        block "epilogue": Y[i, j] = act(C[i, j] + b[j])

Arguments of the built function, in order: ``X (M, K)``, ``Wp (Np / nb, K, nb)``, ``b (Np,)`` (only when
``bias=True``), ``Y (M, Np)``; ``Np`` is ``N`` rounded up to ``nb`` (the padded outputs are zero weights).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te

from sparsecc.codegen.linear import _activation
from sparsecc.errors import UnsupportedOpError

__all__ = ["DENSE_BLOCKS", "dense_linear", "pack_weight", "padded_n"]

#: Names of the TensorIR blocks of :func:`dense_linear` (the schedule looks them up).
DENSE_BLOCKS = {"compute": "matmul", "epilogue": "epilogue"}


def padded_n(n: int, nb: int) -> int:
    """``N`` rounded up to a whole number of ``nb``-wide panels."""
    return -(-int(n) // int(nb)) * int(nb)


def pack_weight(weight: np.ndarray, nb: int) -> np.ndarray:
    """The packed weight of :func:`dense_linear`.

    Parameters
    ----------
    weight : np.ndarray, (N, K) float32
    nb : int
        Panel width (outputs per panel).

    Returns
    -------
    np.ndarray, (Np / nb, K, nb) float32
        ``Wp[jo, k, ji] = weight[jo * nb + ji, k]``, zero for ``jo * nb + ji >= N``.
    """
    n, k = weight.shape
    npad = padded_n(n, nb)
    w = np.zeros((npad, k), np.float32)
    w[:n] = weight
    return np.ascontiguousarray(w.reshape(npad // nb, nb, k).transpose(0, 2, 1))


def dense_linear(m: int, n: int, k: int, nb: int, *, bias: bool = False, activation: str | None = None,
                 gelu_at_inf=None) -> tvm.tirx.PrimFunc:
    """Unscheduled dense linear on a packed weight, for static shapes.

    Parameters
    ----------
    m, n, k : int
        ``X: (M, K)``, ``W: (N, K)``.
    nb : int
        Panel width of the packed weight (:func:`pack_weight`); ``N`` is padded up to it.
    bias : bool
    activation : None, "relu" or "gelu"
        Fused epilogue, with torch's IEEE semantics (:mod:`sparsecc.codegen.linear`).
    gelu_at_inf : tuple, optional
        ``F.gelu(±inf)`` to reproduce (default: torch's CPU kernel on this host).

    Raises
    ------
    UnsupportedOpError
        A non-positive shape or panel width, or an unknown activation.
    """
    m, n, k, nb = int(m), int(n), int(k), int(nb)
    if min(m, n, k, nb) < 1:
        raise UnsupportedOpError(f"dense linear needs positive M, N, K and panel width, got {(m, n, k, nb)}")
    act = _activation(activation, gelu_at_inf)
    npad = padded_n(n, nb)
    x = te.placeholder((m, k), "float32", name="X")
    w = te.placeholder((npad // nb, k, nb), "float32", name="Wp")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, npad), lambda i, j: te.sum(x[i, r] * w[j // nb, r, j % nb], axis=r),
                   name=DENSE_BLOCKS["compute"])
    if bias:
        b = te.placeholder((npad,), "float32", name="b")
        y = te.compute((m, npad), lambda i, j: act(c[i, j] + b[j]), name=DENSE_BLOCKS["epilogue"])
        args = [x, w, b, y]
    else:
        y = te.compute((m, npad), lambda i, j: act(c[i, j]), name=DENSE_BLOCKS["epilogue"])
        args = [x, w, y]
    func = te.create_prim_func(args)
    # op_pattern 8 (kOpaque): Relax's FuseOps would otherwise fuse the scheduled kernel with the layout glue
    for key, value in (("tir.noalias", True), ("sparsecc.kind", "dense_linear"), ("sparsecc.nb", nb),
                       ("op_pattern", 8)):
        func = func.with_attr(key, value)
    return func
