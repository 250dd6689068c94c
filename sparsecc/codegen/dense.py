"""TensorIR templates of an export's dense rest: ``Y = act(X @ W.T + b)`` on a packed weight (linears), the same
GEMM in NCHW for convs (:func:`dense_conv1x1`, on im2col columns from :func:`im2col_nchw` unless pointwise), a
depthwise conv (:func:`dense_depthwise_conv`) and the zero pad in front of it (:func:`zero_pad_nchw`).

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

A dense 1x1 convolution in NCHW (:func:`dense_conv1x1`) is the same GEMM with the operands' roles swapped: per
image ``Y (C_out, HW) = W (C_out, C_in) @ X (C_in, HW)``; a row of ``X`` is already ``HW`` contiguous floats, so
the activation is the panel operand as it comes (no packing, no layout change) and the weight is broadcast.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te

from sparsecc.codegen.conv import conv_activation
from sparsecc.codegen.linear import _activation
from sparsecc.errors import UnsupportedOpError

__all__ = ["DENSE_BLOCKS", "dense_conv1x1", "dense_depthwise_conv", "dense_linear", "im2col_nchw", "pack_weight",
           "padded_n", "zero_pad_nchw"]

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
    return _prim_func([x, w, *_epilogue(c, act, npad if bias else None, 1)], "dense_linear", nb)


def _epilogue(c, act, bias_len, bias_axis: int) -> list:
    """``[b, Y]`` (or ``[Y]`` when ``bias_len`` is None) with ``Y = act(C + b)``, ``b`` indexed by ``C``'s axis
    ``bias_axis``: the arguments that follow the inputs of a template."""
    if bias_len is None:
        return [te.compute(c.shape, lambda *i: act(c(*i)), name=DENSE_BLOCKS["epilogue"])]
    b = te.placeholder((bias_len,), "float32", name="b")
    return [b, te.compute(c.shape, lambda *i: act(c(*i) + b[i[bias_axis]]), name=DENSE_BLOCKS["epilogue"])]


def _prim_func(args, kind: str, nb: int) -> tvm.tirx.PrimFunc:
    func = te.create_prim_func(args)
    # op_pattern 8 (kOpaque): Relax's FuseOps would otherwise fuse the scheduled kernel with the layout glue
    for key, value in (("tir.noalias", True), ("sparsecc.kind", kind), ("sparsecc.nb", nb), ("op_pattern", 8)):
        func = func.with_attr(key, value)
    return func


def dense_conv1x1(batch: int, c_out: int, c_in: int, hw: int, nb: int, *, bias: bool = False,
                  activation: str | None = None) -> tvm.tirx.PrimFunc:
    """Unscheduled dense 1x1 convolution (stride 1, no padding) in NCHW, for static shapes.

    ``Y[b, i, j] = act(sum_r W[i, r] * X[b, r, j] + bias[i])`` with the image's pixels flattened (``j``).

    Parameters
    ----------
    batch, c_out, c_in, hw : int
        ``X: (batch, C_in, HW)``, ``W: (C_out, C_in)``, ``Y: (batch, C_out, HW)``; ``HW`` a multiple of ``nb``
        (callers pad the pixels).
    nb : int
        Pixels per panel (the vector width of the schedule's tile).
    bias : bool
        A bias per output channel.
    activation : None, "relu" or "relu6"
        Fused epilogue with torch's IEEE semantics (:func:`sparsecc.codegen.conv.conv_activation`).

    Raises
    ------
    UnsupportedOpError
        A non-positive shape, ``HW`` not a multiple of ``nb``, or an unknown activation.
    """
    batch, c_out, c_in, hw, nb = int(batch), int(c_out), int(c_in), int(hw), int(nb)
    if min(batch, c_out, c_in, hw, nb) < 1 or hw % nb:
        raise UnsupportedOpError(f"dense 1x1 conv needs positive shapes and HW a multiple of the panel width, "
                                 f"got batch, C_out, C_in, HW, nb = {(batch, c_out, c_in, hw, nb)}")
    act = conv_activation(activation)
    x = te.placeholder((batch, c_in, hw), "float32", name="X")
    w = te.placeholder((c_out, c_in), "float32", name="W")
    r = te.reduce_axis((0, c_in), name="r")
    c = te.compute((batch, c_out, hw), lambda n, i, j: te.sum(w[i, r] * x[n, r, j], axis=r),
                   name=DENSE_BLOCKS["compute"])
    return _prim_func([x, w, *_epilogue(c, act, c_out if bias else None, 1)], "dense_conv1x1", nb)


def dense_depthwise_conv(batch: int, channels: int, hp: int, wp: int, kernel: tuple[int, int], stride: int,
                         out_hw: tuple[int, int], *, bias: bool = False,
                         activation: str | None = None) -> tvm.tirx.PrimFunc:
    """Unscheduled depthwise convolution (one filter per channel) in NCHW on a zero-padded input.

    ``Y[b, c, i, j] = act(sum_{r, s} W[c, r, s] * Xp[b, c, i * stride + r, j * stride + s] + bias[c])``.

    Parameters
    ----------
    batch, channels, hp, wp : int
        ``Xp: (batch, C, Hp, Wp)``, the input with its zero border (callers pad), wide enough for every output
        column: ``Wp >= (OW - 1) * stride + kw``.
    kernel : (kh, kw)
        ``W: (C, kh, kw)``.
    stride : int
    out_hw : (OH, OW)
        ``Y: (batch, C, OH, OW)``; ``OW`` may be padded past the image's (the extra columns are discarded).
    bias, activation
        As for :func:`dense_conv1x1`.

    Raises
    ------
    UnsupportedOpError
        A non-positive shape, an input too small for the output, or an unknown activation.
    """
    batch, channels, hp, wp, stride = int(batch), int(channels), int(hp), int(wp), int(stride)
    (kh, kw), (oh, ow) = (int(v) for v in kernel), (int(v) for v in out_hw)
    if (min(batch, channels, hp, wp, kh, kw, stride, oh, ow) < 1 or (oh - 1) * stride + kh > hp
            or (ow - 1) * stride + kw > wp):
        raise UnsupportedOpError(f"depthwise conv: input (B, C, Hp, Wp) = {(batch, channels, hp, wp)} cannot give "
                                 f"output {(oh, ow)} with kernel {(kh, kw)} and stride {stride}")
    act = conv_activation(activation)
    x = te.placeholder((batch, channels, hp, wp), "float32", name="X")
    w = te.placeholder((channels, kh, kw), "float32", name="W")
    r = te.reduce_axis((0, kh), name="r")
    q = te.reduce_axis((0, kw), name="q")
    c = te.compute((batch, channels, oh, ow),
                   lambda n, ch, i, j: te.sum(w[ch, r, q] * x[n, ch, i * stride + r, j * stride + q], axis=[r, q]),
                   name=DENSE_BLOCKS["compute"])
    return _prim_func([x, w, *_epilogue(c, act, channels if bias else None, 1)], "dense_depthwise_conv", 0)


def zero_pad_nchw(batch: int, channels: int, h: int, w: int, pads: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """``Y (batch, C, top + H + bottom, left + W + right)``: ``X (batch, C, H, W)`` inside a zero border, scheduled
    (one (image, channel) plane per task): TVM's legalized ``pad`` under the export's rules ran as one serial loop.

    Parameters
    ----------
    pads : (top, bottom, left, right), each >= 0

    Raises
    ------
    UnsupportedOpError
        A non-positive shape or a negative pad.
    """
    top, bottom, left, right = (int(v) for v in pads)
    if min(batch, channels, h, w) < 1 or min(top, bottom, left, right) < 0:
        raise UnsupportedOpError(f"zero pad: shape {(batch, channels, h, w)} and pads {pads} must be positive / >= 0")
    x = te.placeholder((batch, channels, h, w), "float32", name="X")
    y = te.compute((batch, channels, top + h + bottom, left + w + right),
                   lambda n, c, i, j: te.if_then_else(
                       tvm.tirx.all(i >= top, i < top + h, j >= left, j < left + w),
                       x[n, c, i - top, j - left], tvm.tirx.const(0.0, "float32")), name="pad")
    return _parallel_copy(x, y)


def im2col_nchw(batch: int, channels: int, h: int, w: int, kernel, stride, padding, cols: int) -> tvm.tirx.PrimFunc:
    """The im2col columns of an NCHW convolution, in the layout of :func:`dense_conv1x1`'s ``X``, scheduled.

    ``Y[b, (c * kh + r) * kw + q, i * OW + j] = X[b, c, i * sh + r - ph, j * sw + q - pw]`` (0 outside the image
    and for the padded columns ``>= OH * OW``), so that a convolution is ``W (C_out, C_in * kh * kw) @ Y[b]``
    with ``W`` the weight reshaped as it is stored. One (image, row) per task.

    Parameters
    ----------
    batch, channels, h, w : int
        ``X: (batch, C, H, W)``.
    kernel, stride, padding : (int, int)
    cols : int
        Columns of ``Y``: ``OH * OW`` or more (padded to the GEMM's panel width).

    Raises
    ------
    UnsupportedOpError
        A non-positive shape, an empty output, or fewer columns than ``OH * OW``.
    """
    (kh, kw), (sh, sw), (ph, pw) = ((int(a), int(b)) for a, b in (kernel, stride, padding))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if min(batch, channels, h, w, kh, kw, sh, sw, oh, ow) < 1 or min(ph, pw) < 0 or cols < oh * ow:
        raise UnsupportedOpError(f"im2col: input {(batch, channels, h, w)}, kernel {(kh, kw)}, stride {(sh, sw)}, "
                                 f"padding {(ph, pw)} and {cols} columns give no valid output")
    x = te.placeholder((batch, channels, h, w), "float32", name="X")

    def col(n, k, j):
        c, r, q = k // (kh * kw), (k // kw) % kh, k % kw
        ih, iw = (j // ow) * sh + r - ph, (j % ow) * sw + q - pw
        inside = tvm.tirx.all(j < oh * ow, ih >= 0, ih < h, iw >= 0, iw < w)
        return te.if_then_else(inside, x[n, c, ih, iw], tvm.tirx.const(0.0, "float32"))

    return _parallel_copy(x, te.compute((batch, channels * kh * kw, cols), col, name="im2col"))


def _parallel_copy(x, y) -> tvm.tirx.PrimFunc:
    """``y``'s compute (a gather from ``x``) with its two outer loops fused and parallel; marked scheduled and
    opaque, so that the export's rules and FuseOps leave it as it is."""
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    outer = sch.get_loops(sch.get_sblock(y.op.name))[:2]
    sch.parallel(sch.fuse(*outer))
    func = sch.mod["main"]
    for key, value in (("tir.noalias", True), ("op_pattern", 8), ("tirx.is_scheduled", True)):
        func = func.with_attr(key, value)
    return func
