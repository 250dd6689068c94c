"""Dense linears and 1x1 convs of an export: the ``aten.linear`` and pointwise ``aten.conv2d`` calls a compiled
graph leaves to torch, as register-tiled GEMMs.

In ``cm(x)`` a layer kept dense runs torch's own GEMM. An exported artifact has no torch: without this
module TVM legalizes ``aten.linear`` into a ``matmul`` reading ``W.T``, which, with the weights as parameters of
``main``, is transposed on every call (on MiniLM, 17 of the 85 ms of an unpruned forward went to those
transposes). Here each such call becomes one :func:`sparsecc.codegen.dense.dense_linear` kernel on a weight packed
once at export time, with a following ReLU or GELU fused into its epilogue.

:func:`dense_linears_for_export` finds the calls and swaps them for :class:`DenseLinear` modules (the export
turns those into custom-op calls, as it does the sparse kernel modules); :func:`export_dense_linear` is the
converter of the "dense" format. Likewise a dense 1x1 convolution (stride 1, no padding, no groups: the
expansion and projection layers of MobileNet-style blocks) becomes :class:`DenseConv1x1`
(:func:`dense_convs_for_export`) and one :func:`sparsecc.codegen.dense.dense_conv1x1` kernel in NCHW
(:func:`export_dense_conv`): TVM's legalized ``conv2d`` with the default schedules ran MobileNetV2's at a few
GFLOP/s.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from sparsecc.errors import UnsupportedOpError
from sparsecc.formats import DENSE
from sparsecc.runtime.ieee import torch_conv2d, torch_linear
from sparsecc.targets import x86

__all__ = ["DenseConv1x1", "DenseLinear", "dense_convs_for_export", "dense_linears_for_export", "export_dense_conv",
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


class DenseConv1x1(torch.nn.Module):
    """A dense ``act(conv2d(x, weight, bias))`` with a 1x1 kernel, stride 1 and no padding, standing for its
    ``aten.conv2d`` call in an export.

    Parameters
    ----------
    weight : torch.Tensor, (C_out, C_in, 1, 1) float32
    bias : torch.Tensor, (C_out,) float32, or None
    activation : None, "relu" or "gelu"
    """

    format = "dense"
    layer_kind = "conv2d"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None):
        super().__init__()
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.activation = activation
        self.shape = tuple(weight.shape[:2])
        self.c_out = self.shape[0]
        self.kernel_size, self.stride, self.padding = (1, 1), (1, 1), (0, 0)

    def forward(self, x):
        return torch_conv2d(x, self.weight, self.bias, 1, 0, self.activation)


def _tensor_attr(gm, node):
    """The float32 tensor a ``get_attr`` node reads, or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    try:
        t = functools.reduce(getattr, node.target.split("."), gm)
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else None


def _fused_activation(node):
    """``(activation, node whose result the fused call replaces)`` for a linear node: its only user when that is
    a ReLU or an exact GELU, else ``(None, node)``."""
    users = list(node.users)
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
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        weight = _tensor_attr(gm, node.args[1])
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = _tensor_attr(gm, bias_node) if bias_node is not None else None
        if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
            continue
        activation, last = _fused_activation(node)
        found.append((node, DenseLinear(weight, bias, activation), last))
    return found


def _is_pointwise(node) -> bool:
    """An ``aten.conv2d`` call with stride 1, no padding, dilation 1 and one group (the kernel checked apart)."""
    args = list(node.args) + [None] * (7 - len(node.args))
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    val = {n: node.kwargs.get(n, a) for n, a in zip(names, args)}
    flat = {n: (val[n] if val[n] is not None else defaults[n]) for n in defaults}
    as_pair = {n: (tuple(v) if isinstance(v, (list, tuple)) else (v, v)) for n, v in flat.items() if n != "groups"}
    return (as_pair["stride"] == (1, 1) and as_pair["padding"] == (0, 0) and as_pair["dilation"] == (1, 1)
            and flat["groups"] == 1)


def dense_convs_for_export(gm: torch.fx.GraphModule) -> list:
    """The pointwise ``aten.conv2d`` calls of ``gm``'s graph on graph-held float32 weights ``(C_out, C_in, 1, 1)``
    (stride 1, no padding, dilation 1, one group), each with its fused activation.

    Returns
    -------
    list of (node, DenseConv1x1, replaced node)
        As :func:`dense_linears_for_export`.
    """
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.conv2d.default or not _is_pointwise(node):
            continue
        weight = _tensor_attr(gm, node.args[1])
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = _tensor_attr(gm, bias_node) if bias_node is not None else None
        if weight is None or weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or (
                bias_node is not None and bias is None):
            continue
        activation, last = _fused_activation(node)
        found.append((node, DenseConv1x1(weight, bias, activation), last))
    return found


@DENSE.register_exporter("conv2d")
def export_dense_conv(ctx, bb, x, res, mod: DenseConv1x1):
    """Relax for one :class:`DenseConv1x1`: X (B, C_in, H, W) -> (B, C_in, HW) with the pixels padded to the
    panel width, the 1x1 conv kernel on a weight whose rows are padded to the row tile, (B, C_out, H, W).

    Tiles: the deploy target's ``kernel_params("dense", ...)`` with ``C_out`` as the rows.
    """
    from tvm import relax

    from sparsecc.codegen.dense import padded_n

    if res is not None:
        raise UnsupportedOpError("a dense 1x1 conv of an export takes no residual")
    c_out, c_in = mod.shape
    n, c, h, w = (int(v) for v in x.ty.shape.values)
    hw = h * w
    p = ctx.target.kernel_params("dense", x86.regime_for(c_out), m=c_out, k=c_in)
    cop = -(-c_out // p.mr) * p.mr
    hwp = padded_n(hw, p.nb)
    has_bias = mod.bias is not None
    name = (f"sparsecc_dense_conv1x1_b{n}_co{cop}_ci{c_in}_hw{hwp}{'_bias' if has_bias else ''}"
            f"_{mod.activation or 'none'}_mr{p.mr}_nb{p.nb}")
    sch = x86.schedule_dense_conv1x1(n, cop, c_in, hwp, bias=has_bias, activation=mod.activation, params=p)
    x3 = bb.emit(relax.op.reshape(x, (n, c, hw)))
    if hwp != hw:
        x3 = bb.emit(relax.op.nn.pad(x3, [0, 0, 0, 0, 0, hwp - hw]))
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
    return bb.emit(relax.op.reshape(y, (n, c_out, h, w)))


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
