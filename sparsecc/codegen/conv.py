"""TensorIR templates for sparse 2-d convolutions (``groups=1``) with a block-sparse weight.

Two templates:

* :func:`bsr_conv_nhwc` -- any kernel size, stride and padding, activations in
  NHWC, by **implicit im2col through offsets**. The weight is the matrix
  ``W: (C_out, kh·kw·C_in)`` of :func:`sparsecc.sparsify.patterns.as_matrix`
  (column ``k = (dh·kw + dw)·C_in + ci``), stored as BSR with blocks
  ``(br, bc)``. Instead of a column index, every stored block keeps the
  *offset* of its first column in the zero-padded NHWC input relative to the
  receptive field's corner, ``off = (dh·W_p + dw)·C_in + ci``; every output
  pixel ``m = (n, oh, ow)`` has a base ``pb[m] = ((n·H_p + oh·s)·W_p + ow·s)·C_in``.
  The reduction is then ``Y[m, co] = Σ_p X[pb[m] + off[p] + j] · data[p, co, j]``,
  the BSR linear kernel of :mod:`sparsecc.codegen.linear` with one more add in
  the address. No im2col matrix is materialised; 1x1, 3x3, 7x7, stride 1 and
  2, padding and batch all go through the same build (offsets and bases are
  data). Blocks with ``bc > 1`` need ``C_in % bc == 0`` (the block's columns
  are then consecutive channels of one pixel).
* :func:`bsr_conv1x1_nchw` -- 1x1 stride-1 convolution in NCHW: ``Y[n] = W · X[n]``
  with ``X[n]: (C_in, HW)``, a sparse-times-dense product vectorized along
  the pixels (``HW`` padded to the vector tile by the caller).
* :func:`csr_conv_direct_nchw` -- any kernel size and padding, stride 1 (a
  strided conv is a stride-1 conv over the phase images of its input, see
  :mod:`sparsecc.runtime.conv`), an unstructured (CSR) weight, NCHW, **vectorized along the output pixels** (the
  direct sparse convolution of Park et al., "Faster CNNs with Direct Sparse
  Convolutions and Guided Pruning", ICLR 2017, and the pixel-vector
  organisation of XNNPACK's sparse 1x1 conv, extended to KxK). The input is
  zero-padded to ``(C_in, H_p, W_p)`` and flattened; output pixels are
  counted on the padded width, ``q = oh·W_p + ow`` (``ow < W_p``; the
  ``W_p - W_out`` extra columns of each row are computed and dropped), so for
  stride 1 the input of output pixel ``q`` under nonzero ``(ci, dh, dw)`` is
  ``X[off + q]`` with ``off = (ci·H_p + dh)·W_p + dw``: every nonzero is one
  scalar broadcast against ``hw_tile`` consecutive floats, contiguous vector
  loads and FMAs, no gather and no im2col. The scalar NHWC CSR kernel
  (``bsr_conv_nhwc`` with block (1, 1)) has neither vector axis.

Why implicit im2col and not explicit im2col + the linear kernel, nor a direct
loop nest: measured on the 2-core Zen 4 VM (AVX-512, 16x1 blocks, density 0.2,
batch 1, the ResNet-18-like layers; 1 thread, this process's CPU time because
other jobs held the cores, medians of 15 interleaved runs; ``python
benchmarks/conv.py --threads 1 --clock cpu --im2col-study``), time relative to
torch ``F.conv2d`` dense (fused bias + ReLU in both sparse variants):

    layer (C_out x C_in x k, stride, input)   implicit (this)   explicit im2col + BSR linear
    64x3x7   s2 224 (stem)                     0.46              2.86
    64x64x3  s1 56                             0.37              2.04
    128x64x3 s2 56                             0.48              1.22
    128x128x3 s1 28                            0.41              1.31
    256x128x3 s2 28                            0.46              0.77
    256x256x3 s1 14                            0.38              0.73
    512x256x3 s2 14                            0.37              0.41
    512x512x3 s1 7                             0.30              0.40

The explicit variant spends its extra time writing and re-reading the
``(HW, kh·kw·C_in)`` matrix (9x or 49x the activation, worst at high
resolution); the implicit one reads the padded activation in place. A direct
scheme (loops over ``dh, dw`` outside the nonzeros) needs one row pointer per
``(dh, dw)`` and so kh·kw times the row-pointer traffic for the same work; the
offset trick gives the same addressing with one pointer array (not built, so
not measured).

Loop structure (unscheduled; identical to the linear template so the x86 rules
of :mod:`sparsecc.targets.x86` apply)::

    for mo, io in grid(M_p // mt, NB):                      # block "row"
        C = alloc (mt, br, bc|1)
        for k in range(indptr[io+1] - indptr[io]), j, mi, ii in grid(bc, mt, br):
            block "compute": C[mi, ii, j] += X[pb[mo·mt+mi] + off[p] + j] · data[p, ii, j]
        for mi, ii in grid(mt, br):
            block "epilogue": Y[mo·mt+mi, io, ii] = act(sum_j C[mi, ii, j] + b[io, ii] (+ R[...]))

Arguments of the built :func:`bsr_conv_nhwc`, in order: ``X (XN,)`` (the
padded NHWC input, flat), ``pb (M_p,) int32``, ``data (nnzb, br, bc)``, ``off
(nnzb,) int32``, ``indptr (NB + 1,) int32``, ``bias (NB, br)`` (only with
``bias=True``), ``R (M_p, NB, br)`` (only with ``residual=True``), ``Y (M_p, NB, br)``.
"""

from __future__ import annotations

from tvm.script import tirx as T

from sparsecc.codegen.linear import _activation, _hsum, ieee_hardtanh, stack_floats
from sparsecc.errors import UnsupportedOpError

__all__ = ["CONV_ACTIVATIONS", "bsr_conv1x1_nchw", "bsr_conv_nhwc", "conv_activation", "csr_conv_direct_nchw"]

#: Epilogues a conv kernel can fuse (``relu6`` = ``hardtanh(0, 6)``).
CONV_ACTIVATIONS = (None, "relu", "relu6")


def conv_activation(activation):
    """The TIR epilogue function of ``activation`` (one of :data:`CONV_ACTIVATIONS`).

    Raises
    ------
    UnsupportedOpError
        Any other activation.
    """
    if activation in (None, "relu"):
        return _activation(activation)  # the linear templates' epilogues
    if activation == "relu6":
        return lambda v: ieee_hardtanh(v, 0.0, 6.0)
    raise UnsupportedOpError(f"conv activation {activation!r} is not supported; expected one of {CONV_ACTIVATIONS}")


def bsr_conv_nhwc(block: tuple[int, int], *, bias: bool = False, activation: str | None = None,
                  residual: bool = False, m_tile: int = 8):
    """Unscheduled implicit-im2col BSR convolution template (a ``tvm.tirx.PrimFunc``).

    Parameters
    ----------
    block : (br, bc)
        Block of the weight matrix ``(C_out, kh·kw·C_in)``; (1, 1) is CSR.
    bias : bool
        Add ``bias (NB, br)`` (= ``(C_out,)``) in the epilogue.
    activation : {None, "relu", "relu6"}
        Applied after bias (and residual).
    residual : bool
        Add a tensor ``R (M_p, NB, br)`` (same layout as Y) before the activation
        (ResNet's ``relu(conv(x) + identity)``).
    m_tile : int
        Output pixels per register tile; ``M_p`` (rows of ``pb``, Y) must be a
        multiple of it. Padded rows of ``pb`` must point at valid input (0 does).

    Raises
    ------
    UnsupportedOpError
        Non-positive block or tile, or an unknown activation.
    """
    br, bc = int(block[0]), int(block[1])
    mt = int(m_tile)
    if br < 1 or bc < 1 or mt < 1:
        raise UnsupportedOpError(f"block shape and m_tile must be positive, got {(br, bc)} and {mt}")
    act = conv_activation(activation)
    sj = bc > 1
    cj = bc if sj else 1

    def acc_val(C, mi, ii):
        return _hsum(C, mi, ii, bc) if sj else C[mi, ii, 0]

    def epi_val(C, B, R, mi, m, vio, vii):
        v = acc_val(C, mi, vii)
        if B is not None:
            v = v + B[vio, vii]
        if R is not None:
            v = v + R[m, vio, vii]
        return v

    @T.macro
    def body(X, PB, D, OFF, PTR, B, R, Y, XN, MP, NB, NNZB):
        for mo, io in T.grid(MP // mt, NB):
            with T.sblock("row"):
                vmo, vio = T.axis.remap("SS", [mo, io])
                T.reads(X[0:XN], PB[vmo * mt:vmo * mt + mt], D[0:NNZB, 0:br, 0:bc], OFF[0:NNZB],
                        PTR[vio:vio + 2])
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
                                PB[vmo * mt + vmi] + OFF[PTR[vio] + vk] + vj] * D[PTR[vio] + vk, vii, vj]
                for mi, ii in T.grid(mt, br):
                    with T.sblock("epilogue"):
                        vmi, vii = T.axis.remap("SS", [mi, ii])
                        Y[vmo * mt + vmi, vio, vii] = act(epi_val(C, B, R, vmi, vmo * mt + vmi, vio, vii))

    attrs = {"global_symbol": "main", "tir.noalias": True, "sparsecc.block": [br, bc], "sparsecc.m_tile": mt,
             "sparsecc.kind": "conv_nhwc"}
    # One signature per (bias, residual): TVMScript needs the handles spelled out.
    if bias and residual:
        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, pb_h: T.handle, d_h: T.handle, off_h: T.handle, ptr_h: T.handle,
                 b_h: T.handle, r_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            XN, MP, NB, NP, NNZB = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            X = T.match_buffer(x_h, (XN,), "float32")
            PB = T.match_buffer(pb_h, (MP,), "int32")
            D = T.match_buffer(d_h, (NNZB, br, bc), "float32")
            OFF = T.match_buffer(off_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            B = T.match_buffer(b_h, (NB, br), "float32")
            R = T.match_buffer(r_h, (MP, NB, br), "float32")
            Y = T.match_buffer(y_h, (MP, NB, br), "float32")
            body(X, PB, D, OFF, PTR, B, R, Y, XN, MP, NB, NNZB)
    elif bias:
        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, pb_h: T.handle, d_h: T.handle, off_h: T.handle, ptr_h: T.handle,
                 b_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            XN, MP, NB, NP, NNZB = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            X = T.match_buffer(x_h, (XN,), "float32")
            PB = T.match_buffer(pb_h, (MP,), "int32")
            D = T.match_buffer(d_h, (NNZB, br, bc), "float32")
            OFF = T.match_buffer(off_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            B = T.match_buffer(b_h, (NB, br), "float32")
            Y = T.match_buffer(y_h, (MP, NB, br), "float32")
            body(X, PB, D, OFF, PTR, B, None, Y, XN, MP, NB, NNZB)
    elif residual:
        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, pb_h: T.handle, d_h: T.handle, off_h: T.handle, ptr_h: T.handle,
                 r_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            XN, MP, NB, NP, NNZB = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            X = T.match_buffer(x_h, (XN,), "float32")
            PB = T.match_buffer(pb_h, (MP,), "int32")
            D = T.match_buffer(d_h, (NNZB, br, bc), "float32")
            OFF = T.match_buffer(off_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            R = T.match_buffer(r_h, (MP, NB, br), "float32")
            Y = T.match_buffer(y_h, (MP, NB, br), "float32")
            body(X, PB, D, OFF, PTR, None, R, Y, XN, MP, NB, NNZB)
    else:
        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, pb_h: T.handle, d_h: T.handle, off_h: T.handle, ptr_h: T.handle,
                 y_h: T.handle):
            T.func_attr(attrs)
            XN, MP, NB, NP, NNZB = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            X = T.match_buffer(x_h, (XN,), "float32")
            PB = T.match_buffer(pb_h, (MP,), "int32")
            D = T.match_buffer(d_h, (NNZB, br, bc), "float32")
            OFF = T.match_buffer(off_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            Y = T.match_buffer(y_h, (MP, NB, br), "float32")
            body(X, PB, D, OFF, PTR, None, None, Y, XN, MP, NB, NNZB)
    return func


def bsr_conv1x1_nchw(block: tuple[int, int] = (1, 1), *, bias: bool = False, activation: str | None = None,
                     hw_tile: int = 16):
    """Unscheduled 1x1 stride-1 NCHW template: ``Y[n, co, :] = act(Σ W[co, ci] · X[n, ci, :] + b[co])``.

    Block rows of ``br`` output channels (``bc == 1``: one input channel per
    stored block; CSR is (1, 1)). The pixel loop is split into tiles of
    ``hw_tile`` (the vector width); ``HW_p`` must be a multiple of it (the
    caller pads X and Y along the pixels).

    Arguments: ``X (NBATCH, C_in, HW_p)``, ``data (nnzb, br, 1)``, ``indices (nnzb,)
    int32`` (input channel), ``indptr (NB + 1,) int32``, ``bias (NB, br)`` (with
    ``bias=True``), ``Y (NBATCH, NB, br, HW_p)``.

    Raises
    ------
    UnsupportedOpError
        ``bc != 1``, a non-positive tile, or an unknown activation.
    """
    br, bc = int(block[0]), int(block[1])
    ht = int(hw_tile)
    if bc != 1 or br < 1 or ht < 1:
        raise UnsupportedOpError(f"the NCHW 1x1 kernel takes blocks (br, 1) and a positive tile, got {(br, bc)}, {ht}")
    act = conv_activation(activation)

    def nchw_val(C, B, vio, vii, vhi):
        return C[vii, vhi] if B is None else C[vii, vhi] + B[vio, vii]

    @T.macro
    def body(X, D, IND, PTR, B, Y, NBATCH, CIN, HWP, NB, NNZB):
        for n, io, ho in T.grid(NBATCH, NB, HWP // ht):
            with T.sblock("row"):
                vn, vio, vho = T.axis.remap("SSS", [n, io, ho])
                T.reads(X[vn, 0:CIN, vho * ht:vho * ht + ht], D[0:NNZB, 0:br, 0:1], IND[0:NNZB], PTR[vio:vio + 2])
                T.writes(Y[vn, vio, 0:br, vho * ht:vho * ht + ht])
                C = T.decl_buffer((br, ht), "float32", data=stack_floats(br * ht), scope="local")
                for ii, hi in T.grid(br, ht):
                    with T.sblock("init"):
                        vii, vhi = T.axis.remap("SS", [ii, hi])
                        C[vii, vhi] = T.float32(0)
                for k in T.serial(PTR[vio + 1] - PTR[vio]):
                    for ii, hi in T.grid(br, ht):
                        with T.sblock("compute"):
                            vk, vii, vhi = T.axis.remap("RSS", [k, ii, hi])
                            C[vii, vhi] = C[vii, vhi] + D[PTR[vio] + vk, vii, 0] * X[
                                vn, IND[PTR[vio] + vk], vho * ht + vhi]
                for ii, hi in T.grid(br, ht):
                    with T.sblock("epilogue"):
                        vii, vhi = T.axis.remap("SS", [ii, hi])
                        Y[vn, vio, vii, vho * ht + vhi] = act(nchw_val(C, B, vio, vii, vhi))

    attrs = {"global_symbol": "main", "tir.noalias": True, "sparsecc.block": [br, 1], "sparsecc.hw_tile": ht,
             "sparsecc.kind": "conv1x1_nchw"}
    if bias:
        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, d_h: T.handle, ind_h: T.handle, ptr_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            NBATCH, CIN, HWP, NB, NP, NNZB = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            X = T.match_buffer(x_h, (NBATCH, CIN, HWP), "float32")
            D = T.match_buffer(d_h, (NNZB, br, 1), "float32")
            IND = T.match_buffer(ind_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            B = T.match_buffer(b_h, (NB, br), "float32")
            Y = T.match_buffer(y_h, (NBATCH, NB, br, HWP), "float32")
            body(X, D, IND, PTR, B, Y, NBATCH, CIN, HWP, NB, NNZB)
    else:
        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, d_h: T.handle, ind_h: T.handle, ptr_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            NBATCH, CIN, HWP, NB, NP, NNZB = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            X = T.match_buffer(x_h, (NBATCH, CIN, HWP), "float32")
            D = T.match_buffer(d_h, (NNZB, br, 1), "float32")
            IND = T.match_buffer(ind_h, (NNZB,), "int32")
            PTR = T.match_buffer(ptr_h, (NP,), "int32")
            Y = T.match_buffer(y_h, (NBATCH, NB, br, HWP), "float32")
            body(X, D, IND, PTR, None, Y, NBATCH, CIN, HWP, NB, NNZB)
    return func


def csr_conv_direct_nchw(*, activation: str | None = None, residual: bool = False, hw_tile: int = 32):
    """Unscheduled direct sparse convolution template, stride 1, NCHW (see the module docstring).

    Loop structure::

        for n, qo, co in grid(NBATCH, QP // hw_tile, C_out):       # block "row"
            C = alloc (hw_tile,)                                    # accumulators (stack)
            for p in range(indptr[co], indptr[co + 1]):            # block "compute"
                for qi in range(hw_tile):                           # the vector axis
                    C[qi] += data[p] · X[n, off[p] + qo·hw_tile + qi]
            for qi in range(hw_tile):                               # block "epilogue"
                Y[n, co, qo·hw_tile + qi] = act(C[qi] + b[co] (+ R[n, co, qo·hw_tile + qi]))

    The pixel tiles are outside the output channels, so the part of the input one tile reads (``kh``
    rows of every channel) stays in cache while every channel's nonzeros use it.

    Arguments of the built function: ``X (NBATCH, L)`` (the zero-padded input ``(C_in, H_p, W_p)``
    flattened, then zero-extended so that ``off + QP ≤ L`` for every offset), ``data (nnz,)``, ``off
    (nnz,) int32``, ``indptr (C_out + 1,) int32``, ``bias (C_out,)`` (zeros for convs without one), ``R
    (NBATCH, C_out, QP)`` (with ``residual=True``, same layout as Y), ``Y (NBATCH, C_out, QP)`` with
    ``QP`` the output pixels on the padded width, ``H_out · W_p``, rounded up to ``hw_tile``.

    Raises
    ------
    UnsupportedOpError
        A non-positive tile or an unknown activation.
    """
    ht = int(hw_tile)
    if ht < 1:
        raise UnsupportedOpError(f"the direct conv kernel takes a positive pixel tile, got {ht}")
    act = conv_activation(activation)

    def epi_val(C, B, R, vn, vco, q, vqi):
        v = C[vqi] + B[vco]
        return v if R is None else v + R[vn, vco, q]

    @T.macro
    def body(X, D, OFF, PTR, B, R, Y, NBATCH, L, NNZ, CO, QP):
        for n, qo, co in T.grid(NBATCH, QP // ht, CO):
            with T.sblock("row"):
                vn, vqo, vco = T.axis.remap("SSS", [n, qo, co])
                T.reads(X[vn, 0:L], D[0:NNZ], OFF[0:NNZ], PTR[vco:vco + 2])
                T.writes(Y[vn, vco, vqo * ht:vqo * ht + ht])
                C = T.decl_buffer((ht,), "float32", data=stack_floats(ht), scope="local")
                for qi in T.serial(ht):
                    with T.sblock("init"):
                        vqi = T.axis.remap("S", [qi])
                        C[vqi] = T.float32(0)
                for k in T.serial(PTR[vco + 1] - PTR[vco]):
                    for qi in T.serial(ht):
                        with T.sblock("compute"):
                            vk, vqi = T.axis.remap("RS", [k, qi])
                            C[vqi] = C[vqi] + D[PTR[vco] + vk] * X[vn, OFF[PTR[vco] + vk] + vqo * ht + vqi]
                for qi in T.serial(ht):
                    with T.sblock("epilogue"):
                        vqi = T.axis.remap("S", [qi])
                        Y[vn, vco, vqo * ht + vqi] = act(epi_val(C, B, R, vn, vco, vqo * ht + vqi, vqi))

    attrs = {"global_symbol": "main", "tir.noalias": True, "sparsecc.block": [1, 1], "sparsecc.hw_tile": ht,
             "sparsecc.kind": "conv_direct_nchw"}
    if residual:
        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, d_h: T.handle, off_h: T.handle, ptr_h: T.handle, b_h: T.handle, r_h: T.handle,
                 y_h: T.handle):
            T.func_attr(attrs)
            NBATCH, L, NNZ, CO, QP = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            X = T.match_buffer(x_h, (NBATCH, L), "float32")
            D = T.match_buffer(d_h, (NNZ,), "float32")
            OFF = T.match_buffer(off_h, (NNZ,), "int32")
            PTR = T.match_buffer(ptr_h, (CO + 1,), "int32")
            B = T.match_buffer(b_h, (CO,), "float32")
            R = T.match_buffer(r_h, (NBATCH, CO, QP), "float32")
            Y = T.match_buffer(y_h, (NBATCH, CO, QP), "float32")
            body(X, D, OFF, PTR, B, R, Y, NBATCH, L, NNZ, CO, QP)
    else:
        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, d_h: T.handle, off_h: T.handle, ptr_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            NBATCH, L, NNZ, CO, QP = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            X = T.match_buffer(x_h, (NBATCH, L), "float32")
            D = T.match_buffer(d_h, (NNZ,), "float32")
            OFF = T.match_buffer(off_h, (NNZ,), "int32")
            PTR = T.match_buffer(ptr_h, (CO + 1,), "int32")
            B = T.match_buffer(b_h, (CO,), "float32")
            Y = T.match_buffer(y_h, (NBATCH, CO, QP), "float32")
            body(X, D, OFF, PTR, B, None, Y, NBATCH, L, NNZ, CO, QP)
    return func
