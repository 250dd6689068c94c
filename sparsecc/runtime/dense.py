"""Dense linears and convs of an export: the ``aten.linear`` and ``aten.conv2d`` calls a compiled graph leaves to
torch, as register-tiled GEMMs (and a depthwise kernel).

In ``cm(x)`` a layer kept dense runs torch's own GEMM. An exported artifact has no torch: without this
module TVM legalizes ``aten.linear`` into a ``matmul`` reading ``W.T``, which, with the weights as parameters of
``main``, is transposed on every call (on MiniLM, 17 of the 85 ms of an unpruned forward went to those
transposes). Here each such call becomes one :func:`sparsecc.codegen.dense.dense_linear` kernel on a weight packed
once at export time, with a following ReLU or GELU fused into its epilogue.

:func:`dense_linears_for_export` finds the calls and swaps them for :class:`DenseLinear` modules (the export
turns those into custom-op calls, as it does the sparse kernel modules); :func:`export_dense_linear` is the
converter of the "dense" format. Likewise a dense convolution with one group becomes :class:`DenseConv2d`
(:func:`dense_convs_for_export`) and one :func:`sparsecc.codegen.dense.dense_conv1x1` GEMM kernel in NCHW
(:func:`export_dense_conv`), on X itself for a 1x1 kernel with stride 1 and no padding (the expansion and
projection layers of MobileNet-style blocks), else on its im2col columns; and a depthwise convolution :class:`DenseDepthwiseConv2d` and one
:func:`sparsecc.codegen.dense.dense_depthwise_conv` kernel behind a scheduled zero pad: TVM's legalized
``conv2d`` and ``pad`` under dlight's default rules made most of an exported MobileNetV2's time
(``benchmarks/structured.py`` times the artifacts).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from sparsecc.errors import UnsupportedOpError
from sparsecc.formats import DENSE
from sparsecc.ir.rewrite import conv_activation_of
from sparsecc.runtime.ieee import torch_activation, torch_conv2d, torch_linear
from sparsecc.targets import x86

__all__ = ["DenseConv2d", "DenseDepthwiseConv2d", "DenseLinear", "dense_convs_for_export", "dense_linears_for_export", "export_dense_conv",
           "export_dense_linear"]

_ACTIVATIONS = {torch.ops.aten.relu.default: "relu", torch.ops.aten.gelu.default: "gelu"}


class DenseLinear(torch.nn.Module):
    """A dense ``act(x @ weight.T + bias)`` of a compiled graph, standing for its ``aten.linear`` call in an export.

    Parameters
    ----------
    weight : torch.Tensor, (N, K) float32
    bias : torch.Tensor, (N,) float32, or None
    activation : None, "relu" or "gelu"
    """

    format = "dense"
    layer_kind = "linear"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None):
        super().__init__()
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.activation = activation
        self.shape = tuple(weight.shape)

    def forward(self, x):
        return torch_linear(x, self.weight, self.bias, self.activation)


class DenseConv2d(torch.nn.Module):
    """A dense ``act(conv2d(x, weight, bias, stride, padding))`` with one group, standing for its ``aten.conv2d``
    call in an export.

    Parameters
    ----------
    weight : torch.Tensor, (C_out, C_in, kh, kw) float32
    bias : torch.Tensor, (C_out,) float32, or None
    stride, padding : (int, int)
    activation : None, "relu" or "relu6"
    """

    format = "dense"
    layer_kind = "conv2d"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1), padding=(0, 0),
                 activation: str | None = None):
        super().__init__()
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.activation = activation
        self.c_out = int(weight.shape[0])
        self.shape = (self.c_out, int(np.prod(weight.shape[1:])))  # the GEMM's (C_out, C_in * kh * kw)
        self.kernel_size = tuple(int(v) for v in weight.shape[2:])
        self.stride, self.padding = tuple(int(v) for v in stride), tuple(int(v) for v in padding)

    @property
    def pointwise(self) -> bool:
        """A 1x1 kernel, stride 1, no padding: X is the GEMM's operand as it is (no im2col)."""
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x):
        return torch_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.activation)


class DenseDepthwiseConv2d(torch.nn.Module):
    """A dense depthwise ``act(conv2d(x, weight, bias, stride, padding, groups=C))`` (one filter per channel),
    standing for its ``aten.conv2d`` call in an export.

    Parameters
    ----------
    weight : torch.Tensor, (C, 1, kh, kw) float32
    bias : torch.Tensor, (C,) float32, or None
    stride : int
        The same along both axes.
    padding : (ph, pw)
    activation : None, "relu" or "relu6"
    """

    format = "dense"
    layer_kind = "conv2d"

    def __init__(self, weight, bias, stride: int, padding, activation: str | None = None):
        super().__init__()
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.activation = activation
        self.c_out = int(weight.shape[0])
        self.shape = (self.c_out, 1)
        self.kernel_size = tuple(int(v) for v in weight.shape[2:])
        self.stride, self.padding = (int(stride), int(stride)), tuple(int(v) for v in padding)

    def forward(self, x):
        with torch.no_grad():
            y = torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, groups=self.c_out)
        return torch_activation(y, self.activation)


def _tensor_attr(gm, node):
    """The float32 tensor a ``get_attr`` node reads, or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    try:
        t = functools.reduce(getattr, node.target.split("."), gm)
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else None


def _fused_activation(node, conv: bool = False):
    """``(activation, node whose result the fused call replaces)`` for a linear node: its only user when that is
    a ReLU or an exact GELU, else ``(None, node)``; for a conv node (``conv=True``) a ReLU or a ReLU6
    (``hardtanh(0, 6)``)."""
    users = list(node.users)
    if conv:
        act = users[0] if len(users) == 1 and users[0].op == "call_function" else None
        name = conv_activation_of(act) if act is not None and act.args and act.args[0] is node else None
        return (name, act) if name else (None, node)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _ACTIVATIONS:
        act = users[0]
        approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
        if len(act.args) >= 1 and act.args[0] is node and approximate == "none":
            return _ACTIVATIONS[act.target], act
    return None, node


def dense_linears_for_export(gm: torch.fx.GraphModule) -> list:
    """The ``aten.linear`` calls of ``gm``'s graph on graph-held float32 weights, each with its fused activation.

    Returns
    -------
    list of (node, DenseLinear, replaced node)
        ``replaced node``: the linear node, or the activation after it that the module also computes.
    """
    found = []
    for node, weight, bias in _weighted_calls(gm, torch.ops.aten.linear.default, 2):
        activation, last = _fused_activation(node)
        found.append((node, DenseLinear(weight, bias, activation), last))
    return found


def _weighted_calls(gm, target, weight_dims: int):
    """``(node, weight, bias or None)`` for each call of ``target`` whose weight (``weight_dims`` dims) and bias
    (when given) are graph-held float32 tensors."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not target:
            continue
        weight = _tensor_attr(gm, node.args[1])
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = _tensor_attr(gm, bias_node) if bias_node is not None else None
        if weight is not None and weight.dim() == weight_dims and (bias_node is None or bias is not None):
            yield node, weight, bias


def _conv_geometry(node) -> dict:
    """``stride``, ``padding``, ``dilation`` (pairs) and ``groups`` of an ``aten.conv2d`` call."""
    args = list(node.args) + [None] * (7 - len(node.args))
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    val = {n: node.kwargs.get(n, a) for n, a in zip(names, args)}
    flat = {n: (val[n] if val[n] is not None else defaults[n]) for n in defaults}
    geo = {n: (tuple(v) if isinstance(v, (list, tuple)) else (v, v)) for n, v in flat.items() if n != "groups"}
    geo["groups"] = flat["groups"]
    return geo


def dense_convs_for_export(gm: torch.fx.GraphModule) -> list:
    """The dense ``aten.conv2d`` calls of ``gm``'s graph on graph-held float32 weights that have a kernel here,
    each with its fused activation (ReLU, ReLU6):

    * one group: :class:`DenseConv2d` (the GEMM on X itself when pointwise, else on its im2col columns);
    * depthwise: weight ``(C, 1, kh, kw)`` with ``groups = C``, one stride for both axes ->
      :class:`DenseDepthwiseConv2d`.

    Dilated convs and other grouped ones keep TVM's legalized conv.

    Returns
    -------
    list of (node, module, replaced node)
        As :func:`dense_linears_for_export`.
    """
    found = []
    for node, weight, bias in _weighted_calls(gm, torch.ops.aten.conv2d.default, 4):
        geo = _conv_geometry(node)
        if geo["dilation"] != (1, 1):
            continue
        if geo["groups"] == 1:
            activation, last = _fused_activation(node, conv=True)
            found.append((node, DenseConv2d(weight, bias, geo["stride"], geo["padding"], activation), last))
        elif (geo["groups"] == weight.shape[0] > 1 and weight.shape[1] == 1
              and geo["stride"][0] == geo["stride"][1]):
            activation, last = _fused_activation(node, conv=True)
            found.append((node, DenseDepthwiseConv2d(weight, bias, geo["stride"][0], geo["padding"], activation),
                          last))
    return found


@DENSE.register_exporter("conv2d")
def export_dense_conv(ctx, bb, x, res, mod):
    """Relax for one :class:`DenseConv2d`: X (B, C_in, H, W) -> (B, C_in, HW) when pointwise with whole panels of
    pixels, else its im2col columns (B, C_in * kh * kw, OH * OW padded to the panel width)
    (:func:`sparsecc.codegen.dense.im2col_nchw`); the NCHW GEMM kernel on a weight whose rows are padded to the
    row tile; (B, C_out, OH, OW). Tiles: the deploy target's ``kernel_params("dense", ...)`` with ``C_out`` as
    the rows. Or for one :class:`DenseDepthwiseConv2d` (:func:`_export_depthwise`).
    """
    import tvm
    from tvm import relax

    from sparsecc.codegen.dense import im2col_nchw, padded_n

    if res is not None:
        raise UnsupportedOpError("a dense conv of an export takes no residual")
    if isinstance(mod, DenseDepthwiseConv2d):
        return _export_depthwise(ctx, bb, x, mod)
    c_out, c_in = mod.shape  # c_in: the GEMM's reduction, C_in * kh * kw
    n, c, h, w = (int(v) for v in x.ty.shape.values)
    (kh, kw), (sh, sw), (ph, pw) = mod.kernel_size, mod.stride, mod.padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    hw = oh * ow
    p = ctx.target.kernel_params("dense", x86.regime_for(c_out), m=c_out, k=c_in)
    cop = -(-c_out // p.mr) * p.mr
    hwp = padded_n(hw, p.nb)
    has_bias = mod.bias is not None
    name = (f"sparsecc_dense_conv1x1_b{n}_co{cop}_ci{c_in}_hw{hwp}{'_bias' if has_bias else ''}"
            f"_{mod.activation or 'none'}_mr{p.mr}_nb{p.nb}")
    sch = x86.schedule_dense_conv1x1(n, cop, c_in, hwp, bias=has_bias, activation=mod.activation, params=p)
    if mod.pointwise and hwp == hw:
        x3 = bb.emit(relax.op.reshape(x, (n, c, hw)))
    else:  # im2col also pads a pointwise conv's pixels to the panel width (TVM's own pad runs serially)
        cols = tvm.IRModule({"main": im2col_nchw(n, c, h, w, mod.kernel_size, mod.stride, mod.padding, hwp)})
        gv = ctx.gvar(bb, f"sparsecc_im2col_b{n}_c{c}_{h}x{w}_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}_n{hwp}", cols)
        x3 = bb.emit(relax.call_tir(gv, [x], relax.TensorType((n, c_in, hwp), "float32")))
    wt = np.zeros((cop, c_in), np.float32)
    wt[:c_out] = mod.weight.reshape(c_out, c_in).cpu().numpy()
    args = [x3, relax.const(wt)]
    if has_bias:
        b = np.zeros(cop, np.float32)
        b[:c_out] = mod.bias.cpu().numpy()
        args.append(relax.const(b))
    y = bb.emit(relax.call_tir(ctx.gvar(bb, name, sch), args, relax.TensorType((n, cop, hwp), "float32")))
    if cop != c_out or hwp != hw:
        y = bb.emit(relax.op.strided_slice(y, axes=[1, 2], begin=[0, 0], end=[c_out, hw]))
    return bb.emit(relax.op.reshape(y, (n, c_out, oh, ow)))


def _export_depthwise(ctx, bb, x, mod: DenseDepthwiseConv2d):
    """X (B, C, H, W) zero-padded (the conv's border, plus what whole vectors of output columns read), the
    depthwise kernel, its output sliced to (B, C, OH, OW)."""
    import tvm
    from tvm import relax

    from sparsecc.codegen.dense import zero_pad_nchw
    from sparsecc.targets.x86 import target_vector_bits

    n, c, h, w = (int(v) for v in x.ty.shape.values)
    (kh, kw), s, (ph, pw) = mod.kernel_size, mod.stride[0], mod.padding
    oh, ow = (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1
    lanes = target_vector_bits(ctx.tvm_target) // 32
    owp, _ = x86.depthwise_tile(ow, lanes)
    bottom = max((oh - 1) * s + kh - h - ph, 0)
    right = max((owp - 1) * s + kw - w - pw, 0)
    hp, wp = h + ph + bottom, w + pw + right
    has_bias = mod.bias is not None
    name = (f"sparsecc_depthwise_conv_b{n}_c{c}_{hp}x{wp}_k{kh}x{kw}_s{s}_o{oh}x{owp}{'_bias' if has_bias else ''}"
            f"_{mod.activation or 'none'}")
    sch = x86.schedule_depthwise(n, c, hp, wp, (kh, kw), s, (oh, owp), bias=has_bias, activation=mod.activation,
                                 lanes=lanes)
    if ph or pw or bottom or right:
        pad = tvm.IRModule({"main": zero_pad_nchw(n, c, h, w, (ph, bottom, pw, right))})
        pad_gv = ctx.gvar(bb, f"sparsecc_zero_pad_b{n}_c{c}_{h}x{w}_p{ph}_{bottom}_{pw}_{right}", pad)
        xp = bb.emit(relax.call_tir(pad_gv, [x], relax.TensorType((n, c, hp, wp), "float32")))
    else:
        xp = x
    args = [xp, relax.const(mod.weight.reshape(c, kh, kw).cpu().numpy())]
    if has_bias:
        args.append(relax.const(mod.bias.cpu().numpy()))
    y = bb.emit(relax.call_tir(ctx.gvar(bb, name, sch), args, relax.TensorType((n, c, oh, owp), "float32")))
    if owp != ow:
        y = bb.emit(relax.op.strided_slice(y, axes=[3], begin=[0], end=[ow]))
    return y


@DENSE.register_exporter("linear")
def export_dense_linear(ctx, bb, x, mod: DenseLinear):
    """Relax for one :class:`DenseLinear`: X (..., K) -> (M, K) padded to the row tile, packed GEMM, (..., N).

    Tiles: the deploy target's ``kernel_params("dense", ...)`` (:func:`sparsecc.targets.x86.dense_params`).
    """
    from tvm import relax

    from sparsecc.codegen.dense import pack_weight, padded_n
    from sparsecc.runtime.export import rows_for_export

    n, k = mod.shape
    lead, m = rows_for_export(x)
    p = ctx.target.kernel_params("dense", x86.regime_for(m), m=m, k=k)
    mp = -(-max(m, 1) // p.mr) * p.mr
    npad = padded_n(n, p.nb)
    has_bias = mod.bias is not None
    name = (f"sparsecc_dense_linear_m{mp}_n{npad}_k{k}{'_bias' if has_bias else ''}_{mod.activation or 'none'}"
            f"_mr{p.mr}_nb{p.nb}")
    sch = x86.schedule_dense(mp, n, k, bias=has_bias, activation=mod.activation, params=p)
    x2 = bb.emit(relax.op.reshape(x, (m, k)))
    if mp != m:
        x2 = bb.emit(relax.op.concat([x2, relax.const(np.zeros((mp - m, k), np.float32))], axis=0))
    args = [x2, relax.const(pack_weight(mod.weight.cpu().numpy(), p.nb))]
    if has_bias:
        b = np.zeros(npad, np.float32)
        b[:n] = mod.bias.cpu().numpy()
        args.append(relax.const(b))
    y = bb.emit(relax.call_tir(ctx.gvar(bb, name, sch), args, relax.TensorType((mp, npad), "float32")))
    if mp != m or npad != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
    return bb.emit(relax.op.reshape(y, (*lead, n)))
