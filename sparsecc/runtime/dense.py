"""Dense linears of an export: the ``aten.linear`` calls a compiled graph leaves to torch, as packed GEMMs.

In ``cm(x)`` a layer kept dense runs torch's own GEMM. An exported artifact has no torch: without this
module TVM legalizes ``aten.linear`` into a ``matmul`` reading ``W.T``, which, with the weights as parameters of
``main``, is transposed on every call (on MiniLM, 17 of the 85 ms of an unpruned forward went to those
transposes). Here each such call becomes one :func:`sparsecc.codegen.dense.dense_linear` kernel on a weight packed
once at export time, with a following ReLU or GELU fused into its epilogue.

:func:`dense_linears_for_export` finds the calls and swaps them for :class:`DenseLinear` modules (the export
turns those into custom-op calls, as it does the sparse kernel modules); :func:`export_dense_linear` is the
converter of the "dense" format.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from sparsecc.formats import DENSE
from sparsecc.runtime.ieee import torch_linear
from sparsecc.targets import x86

__all__ = ["DenseLinear", "dense_linears_for_export", "export_dense_linear"]

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
