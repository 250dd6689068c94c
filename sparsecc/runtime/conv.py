"""Torch-facing sparse convolution: :class:`SparseConv2d` and its kernel cache.

Layout handling lives here, so the compiled graph stays NCHW as torch sees it:

* ``layout="nhwc"`` (every kernel size): the module reads its input as NHWC.
  A ``channels_last`` NCHW tensor *is* NHWC in memory, so between consecutive
  sparse convs (and torch's elementwise ops, pooling and dense convs, which keep
  ``channels_last``) nothing is transposed. The output is returned as an NCHW
  tensor with ``channels_last`` strides (a view of the kernel's NHWC output).
  The only copy is into a zero-bordered, 64-byte aligned buffer when the conv
  pads (or when the input is not channels_last/aligned). Offsets and pixel
  bases (see :mod:`sparsecc.codegen.conv`) are computed once per input shape.
* ``layout="nchw"`` (1x1, stride 1, no padding): the sparse-times-dense NCHW
  kernel; contiguous NCHW in, contiguous NCHW out.
* ``layout="direct"`` (any kernel size, stride and padding, CSR): the direct
  NCHW kernel vectorized along the output pixels. The input is copied into a
  zero-bordered ``(C_in, H_p, W_p)`` buffer (from any strides, so a
  ``channels_last`` input costs nothing more), for stride ``s`` split into its
  ``s_h · s_w`` phase images ``X[:, a::s_h, b::s_w]``: a stride-``s`` conv is a
  stride-1 conv over them (tap ``(dh, dw)`` reads phase ``(dh % s_h, dw % s_w)``
  at ``(dh // s_h, dw // s_w)``), so the same kernel runs it. The output,
  computed on the phase width, is returned as a strided NCHW view without its
  extra columns. Offsets are computed once per input shape.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsecc.cache import KERNELS
from sparsecc.errors import InputDtypeError, InputShapeError, UnsupportedOpError
from sparsecc.formats import BSR, CSR, XCSR, BlockSparseMatrix, as_matrix
from sparsecc.runtime.ieee import all_finite, torch_conv2d
from sparsecc.runtime.kernels import ALIGN, aligned, aligned_empty, load_or_build, target_key
from sparsecc.targets import x86, x86_conv

__all__ = ["SparseConv2d", "conv_matrix", "cpu_conv", "cpu_direct_conv", "export_conv", "get_conv_kernel"]


def get_conv_kernel(kind: str, block: tuple[int, int], bias: bool, activation=None, residual: bool = False,
                    target=None, params=None):
    """Compiled conv kernel (``kind`` "nhwc" or "nchw1x1"), built once per process and machine.

    Raises
    ------
    KernelBuildError
        Unknown kind or a failed TVM build.
    UnsupportedOpError
        Unknown activation.
    """
    target = target or x86.host_target()
    block = (int(block[0]), int(block[1]))
    key = ("conv", kind, block, bool(bias), activation, bool(residual), target_key(target), params)

    def make():
        sch = x86_conv.schedule_conv(kind, block, bias=bool(bias), activation=activation,
                                     residual=bool(residual), target=target, params=params)
        return load_or_build(sch, x86_conv.conv_kernel_name(kind, block, bias, activation, residual), target)

    return KERNELS.get(key, make)


def conv_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a matrix: ``weight (C_out, C_in, kh, kw)`` -> ``(C_out, kh·kw·C_in)`` (``as_matrix``)."""
    return as_matrix(weight)


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


class SparseConv2d(torch.nn.Module):
    """``act(conv2d(x, W, b, stride, padding) [+ residual])`` with a block-sparse ``W``, run by a TVM kernel.

    Parameters
    ----------
    weight : Tensor (C_out, C_in, kh, kw)
        Dense float32 weight holding the zeros (already pruned).
    bias : Tensor (C_out,), optional
    stride, padding : int or (int, int)
    activation : {None, "relu", "relu6"}
        Fused epilogue.
    block : (br, bc)
        BSR block of the matrix ``(C_out, kh·kw·C_in)``; (1, 1) = CSR.
        ``bc > 1`` needs ``C_in % bc == 0``.
    layout : {"nhwc", "nchw", "direct"}
        Kernel family (see the module docstring); "nchw" only for 1x1 stride 1 unpadded convs, "direct"
        only for CSR (block (1, 1)).
    residual : bool
        ``forward(x, r)`` adds ``r`` (the conv's output shape) before the activation.
    target : tvm.target.Target, optional
        Default: the host.

    Raises
    ------
    UnsupportedOpError
        A layout, block or activation the kernels do not support (the message says which).
    InputShapeError
        Weight, bias or block of the wrong shape.
    """

    layer_kind = "conv2d"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                 activation: str | None = None, block=(16, 1), layout: str = "nhwc", residual: bool = False,
                 target=None, name: str = "conv"):
        super().__init__()
        if weight.dim() != 4:
            raise InputShapeError(f"{name}: conv weight must be (C_out, C_in, kh, kw), got {tuple(weight.shape)}")
        if activation not in (None, "relu", "relu6"):
            raise UnsupportedOpError(f"{name}: activation {activation!r} is not supported; "
                                     "expected None, 'relu' or 'relu6'")
        c_out, c_in, kh, kw = (int(v) for v in weight.shape)
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(int(p) for p in padding)
        self.kernel_size = (kh, kw)
        self.c_in, self.c_out = c_in, c_out
        self.layout = layout
        self.activation = activation
        self.residual = bool(residual)
        self.target = target
        self.layer = name
        br, bc = int(block[0]), int(block[1])
        if layout == "nchw":
            if (kh, kw) != (1, 1) or self.stride != (1, 1) or self.padding != (0, 0):
                raise UnsupportedOpError(f"{name}: the NCHW kernel runs 1x1 stride-1 unpadded convs only, "
                                         f"got kernel {(kh, kw)}, stride {self.stride}, padding {self.padding}")
            if bc != 1:
                raise UnsupportedOpError(f"{name}: the NCHW kernel takes blocks (br, 1), got {(br, bc)}")
            if residual:
                raise UnsupportedOpError(f"{name}: the NCHW kernel has no residual epilogue")
        elif layout == "direct":
            if (br, bc) != (1, 1):
                raise UnsupportedOpError(f"{name}: the direct kernel stores CSR (block (1, 1)), got {(br, bc)}")
        elif layout != "nhwc":
            raise UnsupportedOpError(f"{name}: layout must be 'nhwc', 'nchw' or 'direct', got {layout!r}")
        if bc > 1 and c_in % bc:
            raise UnsupportedOpError(f"{name}: block {(br, bc)} needs C_in % {bc} == 0 (C_in = {c_in})")
        mat = conv_matrix(weight.detach().to(torch.float32))
        m = BlockSparseMatrix.from_dense(mat, (br, bc))  # raises InvalidSparsityError if the block does not tile
        self.block = (br, bc)
        self.density = m.density
        self.format = "xcsr" if layout == "direct" else m.format
        data, indices = m.data.detach().to(torch.float32), m.indices.to(torch.int64)
        if layout == "direct" and data.shape[0]:
            # within each row, nonzeros in (ci, dh, dw) order: at stride 1 the order of their input offsets
            rows = torch.repeat_interleave(torch.arange(c_out), (m.indptr[1:] - m.indptr[:-1]).to(torch.int64))
            dh, dw, ci = indices // (kw * c_in), indices % (kw * c_in) // c_in, indices % c_in
            order = torch.argsort(rows * (c_in * kh * kw) + (ci * kh + dh) * kw + dw, stable=True)
            data, indices = data[order], indices[order]
        if data.shape[0] == 0:  # nnzb == 0: indptr keeps the single dummy block unread
            data, indices = torch.zeros(1, br, bc), torch.zeros(1, dtype=torch.int64)
        self.register_buffer("data", aligned(data.contiguous()))
        # torch's conv does not multiply its implicit zero padding: a NaN or inf weight gives NaN at the border
        # only where the window covers real input, while the kernel's padded copy gives 0 · NaN there too
        self.finite_weight = all_finite(data)
        self._col = indices * bc  # first column k of every stored block (decoded into offsets per shape)
        self.register_buffer("indptr", aligned(m.indptr.to(torch.int32).contiguous()))
        if layout == "nchw":
            self.register_buffer("indices", aligned(self._col.to(torch.int32).contiguous()))
        if bias is not None:
            if tuple(bias.shape) != (c_out,):
                raise InputShapeError(f"{name}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
            self.register_buffer("bias", aligned(bias.detach().to(torch.float32).reshape(c_out // br, br)))
        else:
            self.bias = None
        self._params = x86_conv.default_conv_params(self.block, self.kind)
        self._geom: dict[tuple, tuple] = {}  # (N, H, W) -> (off, pb, M, OH, OW)
        self._fn = None

    def dense_weight(self) -> torch.Tensor:
        """W: (C_out, C_in, kh, kw) dense, with its zeros, from the stored blocks."""
        kh, kw = self.kernel_size
        br, bc = self.block
        nnzb = int(self.indptr[-1])
        mat = BlockSparseMatrix((self.c_out, kh * kw * self.c_in), self.block, self.data[:nnzb],
                                (self._col[:nnzb] // bc).to(torch.int32), self.indptr).to_dense()
        return mat.view(self.c_out, kh, kw, self.c_in).permute(0, 3, 1, 2).contiguous()  # inverse of as_matrix

    def out_shape(self, x_shape) -> tuple:
        """(N, C_out, H_out, W_out) of an input of shape (N, C_in, H, W)."""
        n, _, h, w = x_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (n, self.c_out, _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw))

    # ------------------------------------------------------------------ kernels
    @property
    def kind(self) -> str:
        """The kernel family of :mod:`sparsecc.targets.x86_conv` (``"nhwc"``, ``"nchw1x1"`` or ``"direct"``)."""
        return {"nhwc": "nhwc", "nchw": "nchw1x1", "direct": "direct"}[self.layout]

    def _kernel(self):
        if self._fn is None:
            self._fn = get_conv_kernel(self.kind, self.block, self.bias is not None, self.activation, self.residual,
                                       self.target, self._params)
        return self._fn

    @property
    def kernel_name(self) -> str:
        return x86_conv.conv_kernel_name(self.kind, self.block, self.bias is not None, self.activation, self.residual)

    def _geometry(self, n: int, h: int, w: int):
        key = (n, h, w)
        g = self._geom.get(key)
        if g is not None:
            return g
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        hp, wp = h + 2 * ph, w + 2 * pw
        oh, ow = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
        c = self.c_in
        if n * hp * wp * c >= 2 ** 31:
            raise InputShapeError(f"{self.layer}: input {(n, c, h, w)} is too large for 32-bit offsets")
        col = self._col
        dh, rest = col // (kw * c), col % (kw * c)
        dw, ci = rest // c, rest % c
        off = aligned(((dh * wp + dw) * c + ci).to(torch.int32))
        mt = self._params.m_tile
        m = n * oh * ow
        mp = -(-max(m, 1) // mt) * mt
        nn_, ohh, oww = torch.meshgrid(torch.arange(n), torch.arange(oh), torch.arange(ow), indexing="ij")
        base = ((nn_ * hp + ohh * sh) * wp + oww * sw) * c
        pb = torch.zeros(mp, dtype=torch.int32)
        pb[:m] = base.reshape(-1).to(torch.int32)
        g = (off, aligned(pb), m, mp, oh, ow, hp, wp)
        self._geom[key] = g
        return g

    # ------------------------------------------------------------------ forward
    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputDtypeError(f"{self.layer}: expected a float32 tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise InputDtypeError(f"{self.layer}: expected input dtype torch.float32, got {x.dtype}")
        if x.device.type != "cpu":
            raise InputDtypeError(f"{self.layer}: expected a CPU tensor, got device {x.device}")
        if x.dim() != 4 or x.shape[1] != self.c_in:
            raise InputShapeError(f"{self.layer}: expected input (N, {self.c_in}, H, W), got {tuple(x.shape)}")
        kh, kw = self.kernel_size
        if x.shape[2] + 2 * self.padding[0] < kh or x.shape[3] + 2 * self.padding[1] < kw:
            raise InputShapeError(f"{self.layer}: input {tuple(x.shape)} is smaller than the kernel {(kh, kw)}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        if self.residual and residual is None:
            raise InputShapeError(f"{self.layer}: this conv fuses a residual add; call it as conv(x, residual)")
        if not (self.finite_weight and all_finite(x)):  # runtime.ieee: torch's answer for NaN and inf
            return torch_conv2d(x, self.dense_weight(), self.bias.reshape(-1) if self.bias is not None else None,
                                self.stride, self.padding, self.activation, residual if self.residual else None)
        if self.layout == "nchw":
            return self._forward_nchw(x)
        if self.layout == "direct":
            return self._forward_direct(x, residual)
        n, c, h, w = (int(v) for v in x.shape)
        off, pb, m, mp, oh, ow, hp, wp = self._geometry(n, h, w)
        if m == 0:
            return x.new_empty((n, self.c_out, oh, ow))
        xh = x.permute(0, 2, 3, 1)  # NHWC view (contiguous when x is channels_last)
        ph, pw = self.padding
        if ph == 0 and pw == 0 and xh.is_contiguous() and xh.data_ptr() % ALIGN == 0:
            xp = xh
        else:
            xp = aligned_empty((n, hp, wp, c))
            if ph or pw:  # zero only the border
                xp[:, :ph].zero_()
                xp[:, hp - ph:].zero_()
                xp[:, ph:hp - ph, :pw].zero_()
                xp[:, ph:hp - ph, wp - pw:].zero_()
            xp[:, ph:ph + h, pw:pw + w].copy_(xh)
        y = aligned_empty((mp, self.c_out))
        br = self.block[0]
        args = [xp.reshape(-1), pb, self.data, off, self.indptr]
        if self.bias is not None:
            args.append(self.bias)
        if self.residual:
            if tuple(residual.shape) != (n, self.c_out, oh, ow):
                raise InputShapeError(f"{self.layer}: residual must have shape {(n, self.c_out, oh, ow)}, "
                                      f"got {tuple(residual.shape)}")
            rh = residual.permute(0, 2, 3, 1)
            if mp == m and rh.is_contiguous() and rh.data_ptr() % ALIGN == 0:
                r = rh.reshape(mp, self.c_out)
            else:
                r = aligned_empty((mp, self.c_out))
                r[:m].view(n, oh, ow, self.c_out).copy_(rh)
                r[m:].zero_()
            args.append(r.view(mp, self.c_out // br, br))
        args.append(y.view(mp, self.c_out // br, br))
        with torch.no_grad():
            self._kernel()(*args)
        return y[:m].view(n, oh, ow, self.c_out).permute(0, 3, 1, 2)

    def _forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = (int(v) for v in x.shape)
        hw = h * w
        if n * hw == 0:
            return x.new_empty((n, self.c_out, h, w))
        ht = self._params.hw_tile
        hwp = -(-hw // ht) * ht
        x3 = x.reshape(n, c, hw)
        if hwp != hw:
            xp = aligned_empty((n, c, hwp))
            xp[..., :hw].copy_(x3)
            xp[..., hw:].zero_()
        else:
            xp = aligned(x3.contiguous())
        br = self.block[0]
        y = aligned_empty((n, self.c_out, hwp))
        args = [xp, self.data, self.indices, self.indptr]
        if self.bias is not None:
            args.append(self.bias)
        args.append(y.view(n, self.c_out // br, br, hwp))
        with torch.no_grad():
            self._kernel()(*args)
        if hwp != hw:
            y = y[..., :hw]
        return y.reshape(n, self.c_out, h, w)

    def direct_bias(self) -> torch.Tensor:
        """``(C_out,)``: the bias, or zeros (the direct kernel always takes one; made once)."""
        if self.bias is not None:
            return self.bias.view(-1)
        if getattr(self, "_zero_bias", None) is None:
            self._zero_bias = aligned(torch.zeros(self.c_out))
        return self._zero_bias

    def direct_phases(self) -> tuple:
        """``(rows, cols)`` of phase images a strided conv reads: phase ``(a, b)`` for ``a < min(s_h, k_h)``,
        ``b < min(s_w, k_w)`` (a 1x1 stride-2 conv reads one of four)."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return min(sh, kh), min(sw, kw)

    def direct_geometry(self, n: int, h: int, w: int):
        """Offsets and sizes of the direct kernel for input ``(n, C_in, h, w)``: ``(off (nnz,) int32, H_q, W_q,
        H_out, W_out, QP, L)``, the input being the phase images ``(C_in, H_q, W_q)`` of the zero-padded input
        that the taps read (:meth:`direct_phases`; see :func:`~sparsecc.codegen.conv.csr_conv_direct_nchw`)."""
        key = ("direct", n, h, w)
        g = self._geom.get(key)
        if g is not None:
            return g
        kh, kw = self.kernel_size
        (ph, pw), (sh, sw) = self.padding, self.stride
        hq, wq = -(-(h + 2 * ph) // sh), -(-(w + 2 * pw) // sw)
        oh, ow = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
        ht = self._params.hw_tile
        qp = -(-max(oh * wq, 1) // ht) * ht
        c = self.c_in
        fh, fw = self.direct_phases()
        length = fh * fw * c * hq * wq + qp + wq  # room for the last offset's reads past the image
        if length >= 2 ** 31:
            raise InputShapeError(f"{self.layer}: input {(n, c, h, w)} is too large for 32-bit offsets")
        col = self._col
        dh, dw, ci = col // (kw * c), col % (kw * c) // c, col % c
        phase = (dh % sh) * fw + dw % sw
        off = aligned((((phase * c + ci) * hq + dh // sh) * wq + dw // sw).to(torch.int32))
        g = (off, hq, wq, oh, ow, qp, length)
        self._geom[key] = g
        return g

    def _forward_direct(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        n, c, h, w = (int(v) for v in x.shape)
        off, hq, wq, oh, ow, qp, length = self.direct_geometry(n, h, w)
        if n * oh * ow == 0:
            return x.new_empty((n, self.c_out, oh, ow))
        (ph, pw), (sh, sw) = self.padding, self.stride
        fh, fw = self.direct_phases()
        xp = aligned_empty((n, length))
        img = xp[:, :fh * fw * c * hq * wq].view(n, fh, fw, c, hq, wq)
        xp[:, fh * fw * c * hq * wq:].zero_()  # the tail the last pixel tile reads past the images
        for a in range(fh):  # padded row h + ph is row (h + ph) // sh of phase (h + ph) % sh
            h0 = (a - ph) % sh
            r0, nr = (h0 + ph) // sh, len(range(h0, h, sh))
            for b in range(fw):
                w0 = (b - pw) % sw
                c0, nc = (w0 + pw) // sw, len(range(w0, w, sw))
                phase = img[:, a, b]
                if not (nr and nc):
                    phase.zero_()
                    continue
                # zero only what the copy leaves: the padding rows and columns around the phase's pixels
                phase[..., :r0, :].zero_()
                phase[..., r0 + nr:, :].zero_()
                phase[..., r0:r0 + nr, :c0].zero_()
                phase[..., r0:r0 + nr, c0 + nc:].zero_()
                phase[..., r0:r0 + nr, c0:c0 + nc].copy_(x[:, :, h0::sh, w0::sw])
        args = [xp, self.data.view(-1), off, self.indptr, self.direct_bias()]
        if self.residual:
            if tuple(residual.shape) != (n, self.c_out, oh, ow):
                raise InputShapeError(f"{self.layer}: residual must have shape {(n, self.c_out, oh, ow)}, "
                                      f"got {tuple(residual.shape)}")
            r = aligned_empty((n, self.c_out, qp))
            r[:, :, oh * wq:].zero_()
            rg = r[:, :, :oh * wq].view(n, self.c_out, oh, wq)
            rg[..., ow:].zero_()
            rg[..., :ow].copy_(residual)
            args.append(r)
        y = aligned_empty((n, self.c_out, qp))
        args.append(y)
        with torch.no_grad():
            self._kernel()(*args)
        return y[:, :, :oh * wq].view(n, self.c_out, oh, wq)[..., :ow]

    def extra_repr(self) -> str:
        return (f"{self.c_in}, {self.c_out}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, block={self.block}, layout={self.layout}, density={self.density:.3f}, "
                f"bias={self.bias is not None}, activation={self.activation}, residual={self.residual}")


@CSR.register_module("x86", "conv2d")
@BSR.register_module("x86", "conv2d")
@CSR.register_module("arm", "conv2d")
@BSR.register_module("arm", "conv2d")
def cpu_conv(weight: torch.Tensor, bias=None, activation=None, target=None, *, block=(16, 1), stride=1, padding=0,
             residual: bool = False, layout: str = "nhwc", name: str = "conv") -> SparseConv2d:
    """:class:`SparseConv2d` for a CPU target: ``weight`` (C_out, C_in, kh, kw) holding the zeros, ``block`` of
    its ``(C_out, kh·kw·C_in)`` matrix (host kernels; ARM export cross-builds the same rules)."""
    return SparseConv2d(weight, bias, stride, padding, activation, block, layout=layout, residual=residual,
                        target=target.tvm_target(), name=name)


@XCSR.register_module("x86", "conv2d")
@XCSR.register_module("arm", "conv2d")
def cpu_direct_conv(weight: torch.Tensor, bias=None, activation=None, target=None, *, block=None, stride=1,
                    padding=0, residual: bool = False, name: str = "conv") -> SparseConv2d:
    """The direct NCHW :class:`SparseConv2d` (``layout="direct"``) of an unstructured ``weight`` (C_out, C_in, kh,
    kw) holding the zeros (any stride: strided convs run on the phase images of their input)."""
    return SparseConv2d(weight, bias, stride, padding, activation, (1, 1), layout="direct", residual=residual,
                        target=target.tvm_target(), name=name)


def _export_direct(ctx, bb, gv, x, res, mod: SparseConv2d):
    from tvm import relax

    n, c, h, w = (int(v) for v in x.ty.shape.values)
    c_out = mod.c_out
    off, hq, wq, oh, ow, qp, length = mod.direct_geometry(n, h, w)
    (ph, pw), (sh, sw) = mod.padding, mod.stride
    eh, ew = hq * sh - h - 2 * ph, wq * sw - w - 2 * pw  # zero rows/columns completing the last phase row
    xp = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, ph, ph + eh, pw, pw + ew])) if ph or pw or eh or ew else x
    fh, fw = mod.direct_phases()
    if (sh, sw) != (1, 1):  # (n, C, H_q·s_h, W_q·s_w) -> the phase images it reads (n, fh, fw, C, H_q, W_q)
        xp = bb.emit(relax.op.reshape(xp, (n, c, hq, sh, wq, sw)))
        xp = bb.emit(relax.op.permute_dims(xp, [0, 3, 5, 1, 2, 4]))
        if (fh, fw) != (sh, sw):
            xp = bb.emit(relax.op.strided_slice(xp, axes=[1, 2], begin=[0, 0], end=[fh, fw]))
    xf = bb.emit(relax.op.reshape(xp, (n, fh * fw * c * hq * wq)))
    xf = bb.emit(relax.op.nn.pad(xf, [0, 0, 0, length - fh * fw * c * hq * wq]))
    args = [xf, ctx.const(mod.data.view(-1)), ctx.const(off), ctx.const(mod.indptr), ctx.const(mod.direct_bias())]
    if mod.residual:  # (n, C_out, H_out, W_out) -> the output's layout on the phase width
        r = bb.emit(relax.op.nn.pad(res, [0, 0, 0, 0, 0, 0, 0, wq - ow])) if wq != ow else res
        r = bb.emit(relax.op.reshape(r, (n, c_out, oh * wq)))
        args.append(bb.emit(relax.op.nn.pad(r, [0, 0, 0, 0, 0, qp - oh * wq])) if qp != oh * wq else r)
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((n, c_out, qp), "float32")))
    if qp != oh * wq:
        y = bb.emit(relax.op.strided_slice(y, axes=[2], begin=[0], end=[oh * wq]))
    y = bb.emit(relax.op.reshape(y, (n, c_out, oh, wq)))
    if wq != ow:
        y = bb.emit(relax.op.strided_slice(y, axes=[3], begin=[0], end=[ow]))
    return y


@CSR.register_exporter("conv2d")
@BSR.register_exporter("conv2d")
@XCSR.register_exporter("conv2d")
def export_conv(ctx, bb, x, res, mod: SparseConv2d):
    """Relax for one :class:`SparseConv2d` (NCHW in and out; NHWC and the zero border inside)."""
    from tvm import relax

    n, c, h, w = (int(v) for v in x.ty.shape.values)
    _, c_out, oh, ow = mod.out_shape((n, c, h, w))
    br = mod.block[0]
    kind = mod.kind
    params = mod._params
    sch = x86_conv.schedule_conv(kind, mod.block, bias=mod.bias is not None, activation=mod.activation,
                                 residual=mod.residual, target=ctx.tvm_target, params=params)
    name = "sparsecc_" + x86_conv.conv_kernel_name(kind, mod.block, mod.bias is not None, mod.activation,
                                                    mod.residual) + f"_{abs(hash(str(params))) % 10**8}"
    gv = ctx.gvar(bb, name, sch)
    if kind == "direct":
        return _export_direct(ctx, bb, gv, x, res, mod)
    if kind == "nchw1x1":
        hw = h * w
        ht = params.hw_tile
        hwp = -(-hw // ht) * ht
        x3 = bb.emit(relax.op.reshape(x, (n, c, hw)))
        if hwp != hw:
            x3 = bb.emit(relax.op.nn.pad(x3, [0, 0, 0, 0, 0, hwp - hw]))
        args = [x3, ctx.const(mod.data), ctx.const(mod.indices), ctx.const(mod.indptr)]
        if mod.bias is not None:
            args.append(ctx.const(mod.bias))
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType((n, c_out // br, br, hwp), "float32")))
        y = bb.emit(relax.op.reshape(y, (n, c_out, hwp)))
        if hwp != hw:
            y = bb.emit(relax.op.strided_slice(y, axes=[2], begin=[0], end=[hw]))
        return bb.emit(relax.op.reshape(y, (n, c_out, h, w)))
    off, pb, m, mp, _, _, hp, wp = mod._geometry(n, h, w)
    ph, pw = mod.padding
    xh = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
    if ph or pw:
        xh = bb.emit(relax.op.nn.pad(xh, [0, 0, ph, ph, pw, pw, 0, 0]))
    xf = bb.emit(relax.op.reshape(xh, (n * hp * wp * c,)))
    args = [xf, ctx.const(pb), ctx.const(mod.data), ctx.const(off), ctx.const(mod.indptr)]
    if mod.bias is not None:
        args.append(ctx.const(mod.bias))
    if mod.residual:
        r = bb.emit(relax.op.reshape(relax.op.permute_dims(res, [0, 2, 3, 1]), (m, c_out)))
        if mp != m:
            r = bb.emit(relax.op.concat([r, relax.const(np.zeros((mp - m, c_out), np.float32))], axis=0))
        args.append(bb.emit(relax.op.reshape(r, (mp, c_out // br, br))))
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((mp, c_out // br, br), "float32")))
    y = bb.emit(relax.op.reshape(y, (mp, c_out)))
    if mp != m:
        y = bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[m]))
    y = bb.emit(relax.op.reshape(y, (n, oh, ow, c_out)))
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))

