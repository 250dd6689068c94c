"""Convolution passes: fold BatchNorm, detect and choose formats of conv weights, lower to sparse kernels.

Conv weights are seen as matrices ``(C_out, kh·kw·C_in)``
(:func:`sparsecc.sparsify.patterns.as_matrix`), the layout pruning, the
format conversion and the kernels share. Only ``aten.conv2d`` with constant
weights, ``groups == 1`` and ``dilation == 1`` goes on the sparse path;
depthwise and grouped convs stay in torch.

Pipeline position (see :func:`sparsecc.passes.default_pipeline`): conv weights
are pruned by ``magnitude_prune`` on the *unfolded* weights (so
``sparsecc.prune`` gives the same masks on the user's model), then
``fold_batchnorm`` scales them (zeros stay zeros, block structure is kept
because BN scales whole output channels), then the detect / choose / lower
passes below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..formats import BLOCK_SHAPES, as_matrix, candidates, no_larger_than_dense
from ..ir.annotations import annotate, get_annotation
from ..ir.graph import SparseGraph
from ..ir.rewrite import conv_activation_of, delete_unused_attrs, fresh_attr, val_shape
from ..runtime.modules import make_conv
from ..runtime.timing import interleaved_ms
from .base import Pass, PassContext, PassResult
from .choose_format import check_pattern, choose
from .detect import detect_block_shape

__all__ = ["ChooseConvFormat", "ConvSite", "DetectConvSparsity", "FoldBatchNorm", "LowerSparseConvs",
           "conv_candidates", "conv_matrix_shapes", "conv_sites", "prunable_conv_sites"]

CONV_TARGETS = (torch.ops.aten.conv2d.default,)
BN_TARGETS = (torch.ops.aten.batch_norm.default,)


def _pair(v, default):
    if v is None:
        return default
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return v * 2 if len(v) == 1 else v


@dataclass
class ConvSite:
    """One ``aten.conv2d(x, W, b, stride, padding, dilation, groups)`` with constant weights.

    Attributes
    ----------
    node : torch.fx.Node
    name : str
        Layer name in the user's model (``layer1.0.conv1``).
    weight, bias : str, str or None
        Attribute paths of ``W (C_out, C_in, kh, kw)`` and ``b (C_out,)``.
    input : torch.fx.Node
        Node producing ``x (N, C_in, H, W)``.
    stride, padding, dilation : (int, int)
    groups : int
    """

    node: fx.Node
    name: str
    weight: str
    bias: Optional[str]
    input: fx.Node
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


def _as_conv(node: fx.Node) -> Optional[ConvSite]:
    if node.op != "call_function" or node.target not in CONV_TARGETS:
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    w, b = a.get("weight"), a.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    pad = a.get("padding", 0)
    if isinstance(pad, str):  # "same" / "valid": leave to torch
        return None
    name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
    return ConvSite(node, name, w.target, b.target if b is not None else None, a["input"],
                    _pair(a.get("stride"), (1, 1)), _pair(pad, (0, 0)), _pair(a.get("dilation"), (1, 1)),
                    int(a.get("groups", 1) or 1))


def conv_sites(graph: SparseGraph) -> list[ConvSite]:
    """Every ``aten.conv2d`` whose weight (and bias) are constants of the graph module."""
    return [s for s in (_as_conv(n) for n in graph.graph.nodes) if s is not None]


def prunable_conv_sites(graph: SparseGraph) -> list[ConvSite]:
    """Convs the sparse path can run: float32 4-d weights, ``groups == 1``, ``dilation == 1``."""
    out = []
    for s in conv_sites(graph):
        w = graph.tensor(s.weight)
        if w.dim() == 4 and w.dtype == torch.float32 and w.numel() > 0 and s.groups == 1 and s.dilation == (1, 1):
            out.append(s)
    return out


def conv_matrix_shapes(graph: SparseGraph) -> list:
    """``(C_out, kh·kw·C_in)`` of every prunable conv (the shapes block pruning must tile)."""
    out = []
    for s in prunable_conv_sites(graph):
        c_out, c_in, kh, kw = graph.tensor(s.weight).shape
        out.append((int(c_out), int(c_in * kh * kw)))
    return out


class FoldBatchNorm(Pass):
    """Fold eval-mode ``aten.batch_norm`` into the conv before it (rewrite).

    ``torch.export`` of a model in eval mode emits ``aten.batch_norm.default(x,
    γ, β, μ, σ², training=False, momentum, ε, cudnn)`` after the conv. With
    ``s = γ / sqrt(σ² + ε)`` the pair becomes one conv with ``W' = W · s`` (per
    output channel) and ``b' = (b - μ) · s + β`` (Ioffe & Szegedy 2015, eq. of
    the inference transform). A BN is folded only when its input is a conv
    with constant weights used by nothing else and its statistics are
    constants; otherwise it stays in torch.
    """

    name = "fold_batchnorm"
    requires = ()

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        gm = graph.gm
        folded = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in BN_TARGETS:
                continue
            args = list(node.args) + [None] * (9 - len(node.args))
            x, gamma, beta, mean, var, training, _momentum, eps = args[:8]
            if training or not isinstance(x, fx.Node):
                continue
            site = _as_conv(x)
            if site is None or len(x.users) != 1:
                continue
            consts = [gamma, beta, mean, var]
            if not all(c is None or (isinstance(c, fx.Node) and c.op == "get_attr") for c in consts[:2]):
                continue
            if not all(isinstance(c, fx.Node) and c.op == "get_attr" for c in consts[2:]):
                continue
            wnode = x.args[1]
            if len(wnode.users) != 1:
                continue
            w = graph.tensor(site.weight).detach()
            c_out = w.shape[0]
            g = graph.tensor(gamma.target).detach() if gamma is not None else torch.ones(c_out)
            bt = graph.tensor(beta.target).detach() if beta is not None else torch.zeros(c_out)
            mu = graph.tensor(mean.target).detach()
            sig2 = graph.tensor(var.target).detach()
            eps = 1e-5 if eps is None else float(eps)
            scale = (g.double() / torch.sqrt(sig2.double() + eps))
            b0 = graph.tensor(site.bias).detach().double() if site.bias else torch.zeros(c_out, dtype=torch.float64)
            new_w = (w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype)
            new_b = ((b0 - mu.double()) * scale + bt.double()).to(w.dtype)
            graph.set_tensor(site.weight, new_w)
            if site.bias and len(x.args[2].users) == 1:
                graph.set_tensor(site.bias, new_b)
            else:
                attr = fresh_attr(gm, site.name + "_folded_bias")
                gm.register_buffer(attr, new_b)
                with gm.graph.inserting_before(x):
                    bnode = gm.graph.get_attr(attr)
                new_args = list(x.args) + [None] * (3 - len(x.args))
                new_args[2] = bnode
                x.args = tuple(new_args)
            node.replace_all_uses_with(x)
            x.meta["sparsecc.folded_bn"] = node.name
            gm.graph.erase_node(node)
            folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            delete_unused_attrs(gm)
        return PassResult(graph, folded > 0, {"folded": folded})


def conv_candidates(pattern: str, weight_shape: tuple, density: float, allowed=None) -> list:
    """Candidates for a conv weight ``(C_out, C_in, kh, kw)``: those of its matrix ``(C_out, kh·kw·C_in)``
    whose blocks, when ``bc > 1``, divide ``C_in`` (the kernel reads a block's columns as consecutive channels).
    N:M has no conv kernel."""
    c_out, c_in, kh, kw = weight_shape
    out = candidates((c_out, c_in * kh * kw), pattern, density, column_group=c_in, allowed=allowed)
    return [c for c in out if c.format != "nm"]


class DetectConvSparsity(Pass):
    """Annotate every prunable conv: density, nnz, pattern and block shape of its ``as_matrix`` weight."""

    name = "detect_conv_sparsity"
    requires = ()

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        for site in prunable_conv_sites(graph):
            w = graph.tensor(site.weight).detach()
            mat = as_matrix(w)
            nnz = int(torch.count_nonzero(mat))
            c_in = w.shape[1]
            shapes = [b for b in BLOCK_SHAPES if b[1] == 1 or c_in % b[1] == 0]
            block, fill = detect_block_shape(mat, shapes)
            pattern = "dense" if nnz == mat.numel() else "block" if block != (1, 1) else "unstructured"
            annotate(site.node, site.name, kind="conv2d", weight_shape=tuple(w.shape), nnz=nnz,
                     density=nnz / mat.numel(), fill_ratio=fill, block_shape=block, pattern=pattern)
        return PassResult(graph, False)


def conv_gemm_dims(site: ConvSite, w_shape: tuple) -> tuple:
    """``(M, N, K)`` of the conv as a GEMM: output pixels x C_out x (kh·kw·C_in), from the example shapes."""
    c_out, c_in, kh, kw = w_shape
    out_shape = val_shape(site.node)
    m = 1
    if out_shape is not None and len(out_shape) == 4:
        m = out_shape[0] * out_shape[2] * out_shape[3]
    return m, c_out, c_in * kh * kw


class ChooseConvFormat(Pass):
    """Pick dense or a sparse format per conv: cost-model estimate, then a measurement against ``F.conv2d``.

    Estimates treat the conv as its GEMM ``(M = output pixels, N = C_out, K =
    kh·kw·C_in)`` with the target's cost model (the linear kernels' calibration). With
    ``measure=True`` the best sparse candidate is built and timed against torch
    ``F.conv2d`` on an input of the example shape, and the faster one wins.

    Parameters
    ----------
    pattern : {"auto", "unstructured", "block", "dense"}
    measure : bool
    repeat : int
        Timed calls per measurement (median).
    """

    name = "choose_conv_format"
    requires = ("detect_conv_sparsity",)

    def __init__(self, pattern: str = "auto", measure: bool = True, repeat: int = 10):
        self.pattern = check_pattern(pattern)
        self.measure = measure
        self.repeat = repeat

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        sites = [s for s in prunable_conv_sites(graph) if get_annotation(s.node) is not None]
        allowed = ctx.target.layer_formats.get("conv2d", frozenset())
        cost = ctx.cost_model if sites and allowed else None
        for site in sites:
            ann = get_annotation(site.node)
            if not allowed:
                annotate(site.node, site.name, format="dense", format_params=None, kernel="torch.conv2d",
                         reason=f"target {ctx.target.name!r} has no conv kernels")
                continue
            w = graph.tensor(site.weight).detach()
            m, n, k = conv_gemm_dims(site, tuple(w.shape))
            cands = no_larger_than_dense(conv_candidates(self.pattern, tuple(w.shape), ann.density, allowed), (n, k),
                                         ann.nnz, ann.fill_ratio)
            taps = w.shape[2] * w.shape[3] / (site.stride[0] * site.stride[1])  # K·M per input element
            est = cost.estimates(cands, (n, k), m, ann.nnz, ann.fill_ratio, taps=taps)
            x_shape = val_shape(site.input)
            measure = None
            if self.measure and x_shape is not None:
                def measure(cand, site=site, w=w, x_shape=x_shape):
                    return self._measure(graph, site, w, cand, x_shape, ctx)
            cand, measured, dense_ms, reason = choose(est, f"M={m} pixels", ann.density, self.pattern, measure)
            annotate(site.node, site.name, est_ms=est, format=cand.format, format_params=cand.params or None,
                     measured_ms=measured, dense_ms=dense_ms, reason=reason,
                     **({"kernel": "torch.conv2d"} if cand.is_dense else {}))
        return PassResult(graph, False)

    def _measure(self, graph, site, w, cand, x_shape, ctx):
        bias = graph.tensor(site.bias).detach() if site.bias else None
        mod = make_conv(ctx.target, cand, w, bias, stride=site.stride, padding=site.padding, name=site.name)
        x = torch.randn(x_shape)
        xcl = x.contiguous(memory_format=torch.channels_last)
        def dense():
            return torch.nn.functional.conv2d(x, w, bias, site.stride, site.padding)

        t = interleaved_ms({"sparse": lambda: mod(xcl), "dense": dense}, runs=self.repeat, warmup=3)
        return t["sparse"], t["dense"]


_ADD = (torch.ops.aten.add.Tensor,)


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if user.op == "call_function" else None


def fusable_epilogue(node: fx.Node, out_shape: Optional[tuple]):
    """What can be fused after a conv: ``(fused nodes in order, activation, residual node)``.

    Patterns: ``act(conv)``; ``act(conv + r)`` / ``act(r + conv)`` (ResNet's
    residual join) with ``r`` of the conv's output shape; ``conv + r``.
    Returns ``([], None, None)`` when nothing that follows can be fused.
    """
    user = _single_user(node)
    if user is None:
        return [], None, None
    act = conv_activation_of(user) if user.args and user.args[0] is node else None
    if act is not None:
        return [user], act, None
    if user.target in _ADD and len(user.args) == 2 and user.kwargs.get("alpha", 1) == 1:
        a, b = user.args
        other = b if a is node else a if b is node else None
        if isinstance(other, fx.Node) and other is not node and out_shape is not None \
                and val_shape(other) == out_shape:
            nxt = _single_user(user)
            act2 = conv_activation_of(nxt) if nxt is not None and nxt.args and nxt.args[0] is user else None
            if act2 is not None:
                return [user, nxt], act2, other
            return [user], None, other
    return [], None, None


class LowerSparseConvs(Pass):
    """Replace sparse-annotated convs by :class:`~sparsecc.runtime.conv.SparseConv2d` modules (rewrite).

    Fuses a following ReLU / ReLU6 (``hardtanh(0, 6)``) and a residual add
    (``relu(conv(x) + r)``) into the kernel epilogue, and deletes the dense
    weights. Activations between sparse convs stay NHWC (``channels_last``
    tensors), so no layout conversion is inserted.

    Parameters
    ----------
    fuse_epilogue : bool
        Fuse activations; ``fuse_residual`` also fuses residual adds.
    """

    name = "lower_sparse_convs"
    requires = ("choose_conv_format",)

    def __init__(self, fuse_epilogue: bool = True, fuse_residual: bool = True):
        self.fuse_epilogue = fuse_epilogue
        self.fuse_residual = fuse_residual

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        gm = graph.gm
        removed, changed = [], False
        for site in prunable_conv_sites(graph):
            ann = get_annotation(site.node)
            if ann is None or ann.format in (None, "dense"):
                continue
            w = graph.tensor(site.weight).detach()
            bias = graph.tensor(site.bias).detach() if site.bias else None
            chain, act, res = (fusable_epilogue(site.node, val_shape(site.node)) if self.fuse_epilogue
                               else ([], None, None))
            if res is not None and not self.fuse_residual:
                chain, act, res = [], None, None
            mod = make_conv(ctx.target, ann.candidate, w, bias, stride=site.stride, padding=site.padding,
                            activation=act, residual=res is not None, name=site.name)
            sub = fresh_attr(gm, "sparsecc_" + site.name)
            gm.add_submodule(sub, mod)
            end = chain[-1] if chain else site.node
            args = (site.node.args[0],) if res is None else (site.node.args[0], res)
            with gm.graph.inserting_after(end):
                new = gm.graph.call_module(sub, args)
            new.meta.update({k: v for k, v in end.meta.items() if k != "sparsecc"})
            new.meta["sparsecc"] = ann
            site.node.meta.pop("sparsecc", None)
            end.replace_all_uses_with(new)
            for n in reversed(chain):  # the fused nodes, last first
                gm.graph.erase_node(n)
            gm.graph.erase_node(site.node)
            epi = "+".join(([("residual")] if res is not None else []) + ([act] if act else [])) or None
            annotate(new, site.name, kernel=mod.kernel_name, epilogue=epi)
            removed += [t for t in (site.weight, site.bias) if t]
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            delete_unused_attrs(gm, removed)
        return PassResult(graph, changed)

