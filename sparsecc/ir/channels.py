"""Channel dependency groups on the captured ATen graph.

Removing output channel ``c`` of a conv also removes input channel ``c`` of every
layer that reads it, entry ``c`` of the batch norm between them, and, through a
residual add, channel ``c`` of every other layer feeding or reading the same sum.
These coupled sets are the *dependency groups* of Torch-Pruning's DepGraph (Fang
et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023). sparsecc finds
them on the graph ``torch.export`` captured, op by op, so it can also prove
where removing channels is exact and refuse where it cannot.

Model. A vertex is one dim of one tensor, ``(node, dim)``. Every op couples
dims of its inputs and outputs:

* *identity*: index ``i`` of one dim is index ``i`` of another (elementwise ops,
  a linear's output features and its weight's rows, a depthwise conv's channels);
* *offset*: index ``i`` of a concatenation's input is index ``i + offset`` of its
  output (cat, split, slice);
* *product*: one dim is the row-major flattening of several (``view`` splitting
  384 features into 12 heads of 32, ``flatten`` of ``(C, H, W)`` into a
  linear). Only the outermost factor may be pruned, in whole blocks of the
  inner ones: removing head ``h`` removes features ``32h .. 32h+31``;
* *fixed*: a dim whose size may not change: the model's inputs and outputs, dims
  a layer norm or softmax normalises over, reduced dims, a head's width (the
  attention's scale reads it), grouped convs (not depthwise).

Identity and offset couplings are kept in a union-find with offsets; the
components are the groups, in the coordinates of their widest member. A group
is prunable when it holds a parameter dim and nothing fixed; products make the
flattened component follow its outer factor's group.

An op the analysis does not know, or a reshape that mixes channels, is *opaque*:
when it touches a prunable group, :func:`channel_groups` refuses the model,
naming the node.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx

from ..errors import UnsupportedOpError
from .graph import SparseGraph

__all__ = ["CHANNELS_META_KEY", "ChannelGroup", "ChannelGroups", "Member", "channel_groups"]

#: node.meta key under which :class:`sparsecc.passes.channels.FindChannelGroups` writes ``{dim: group id}``
CHANNELS_META_KEY = "sparsecc.channels"

aten = torch.ops.aten

Vertex = tuple  # (node name, dim)

#: ops that map every dim of their (first) input to the same dim of their output
_UNARY = {aten.relu.default, aten.relu_.default, aten.gelu.default, aten.hardtanh.default, aten.hardtanh_.default,
          aten.relu6.default, aten.silu.default, aten.silu_.default, aten.sigmoid.default, aten.tanh.default,
          aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
          aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
          aten.neg.default, aten.abs.default, aten.hardswish.default, aten.hardsigmoid.default,
          aten.leaky_relu.default, aten.elu.default, aten.exp.default, aten.sqrt.default, aten.rsqrt.default,
          aten.pow.Tensor_Scalar, aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar,
          aten.type_as.default, aten.erf.default, aten.square.default, aten.mish.default, aten.feature_dropout.default,
          aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
          aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default,
          aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.pad.default, aten.constant_pad_nd.default}
#: pooling/resampling ops: only their batch and channel dims keep their meaning
_SPATIAL = {aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
            aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default,
            aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.pad.default, aten.constant_pad_nd.default}
#: elementwise ops of several tensors (broadcast from the right)
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
                aten.minimum.default, aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
                aten.add_.Tensor, aten.mul_.Tensor, operator.add, operator.mul}
#: ops that do not produce a tensor of the dataflow (checks, sizes)
_IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default}
#: ops that make a tensor from nothing: its sizes are written in the graph, so its dims may not change
_CREATION = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.ones.default, aten.zeros.default,
             aten.full.default, aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
             aten.scalar_tensor.default, aten.empty.memory_format, aten.lift_fresh_copy.default}


@dataclass
class Member:
    """One parameter (or buffer) dim of a group.

    Attributes
    ----------
    target : str
        Attribute path in the model (``layer1.0.conv1.weight``).
    dim : int
        The dim along which the group removes entries.
    unit_of : numpy.ndarray (size,)
        For each index along ``dim``, the group unit (channel, head) that owns it.
    is_parameter : bool
        False for buffers (batch-norm running statistics); they are sliced but not scored.
    """

    target: str
    dim: int
    unit_of: np.ndarray
    is_parameter: bool = True

    @property
    def layer(self) -> str:
        return self.target.rsplit(".", 1)[0] if "." in self.target else self.target


@dataclass
class ChannelGroup:
    """Coupled channels: removing unit ``u`` removes, in every member, the entries whose ``unit_of`` is ``u``.

    Attributes
    ----------
    id : int
    size : int
        Number of units (channels, heads or neurons).
    unit : int
        Entries of the widest member per unit (1 for channels, the head width for heads).
    kind : str
        ``"channels"`` (a conv's output channels), ``"heads"`` (attention heads) or ``"neurons"`` (a linear's
        output features).
    members : list of Member
    """

    id: int
    size: int
    unit: int
    kind: str
    members: list = field(default_factory=list)
    #: (node name, dim) -> unit_of of every tensor dim in the group (for the shape check after removal)
    vertices: dict = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list:
        """Names of the layers with a parameter in the group, in graph order, each once."""
        return list(dict.fromkeys(m.layer for m in self.members if m.is_parameter))

    def describe(self) -> str:
        parts = []
        for m in self.members:
            if m.is_parameter and m.target.endswith(".weight"):
                parts.append(f"{m.layer}[{'out' if m.dim == 0 else 'in'}]")
        others = [m.layer for m in self.members if m.is_parameter and not m.target.endswith(".weight")]
        extra = f" (+{len(set(others))} bias/norm params)" if others else ""
        what = f"{self.size} {self.kind}" + (f" of {self.unit}" if self.unit > 1 else "")
        return f"group {self.id}: {what}: " + ", ".join(dict.fromkeys(parts)) + extra


class ChannelGroups:
    """The dependency groups of one captured model (:func:`channel_groups`).

    Attributes
    ----------
    groups : list of ChannelGroup
        The prunable groups.
    fixed : list of str
        Why the other parameter dims may not shrink, one line each (``"ln.weight[0]: layer_norm"``).
    gm : torch.fx.GraphModule
        The graph they were found on.
    """

    def __init__(self, groups: list, fixed: list, gm: fx.GraphModule):
        self.groups = groups
        self.fixed = fixed
        self.gm = gm

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> ChannelGroup:
        return self.groups[i]

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} dependency groups"]
        lines += ["  " + g.describe() for g in self.groups]
        if self.fixed:
            lines.append(f"{len(self.fixed)} parameter dims kept whole, e.g.: " + "; ".join(self.fixed[:4]))
        return "\n".join(lines)

    __repr__ = __str__


# ---------------------------------------------------------------------------------------------- union-find


class _OffsetUnionFind:
    """Union-find whose edges carry an index offset: index ``i`` of a vertex is index ``i + off`` of its root."""

    def __init__(self):
        self.parent: dict = {}
        self.off: dict = {}
        self.lo: dict = {}
        self.hi: dict = {}
        self.bad: set = set()  # roots with inconsistent offsets (a channel shuffle): never pruned

    def add(self, v, size: int) -> None:
        if v not in self.parent:
            self.parent[v], self.off[v], self.lo[v], self.hi[v] = v, 0, 0, size

    def find(self, v) -> tuple:
        path = []
        while self.parent[v] != v:
            path.append(v)
            v = self.parent[v]
        for x in reversed(path):
            p = self.parent[x]
            if p != v:
                self.off[x] += self.off[p]
                self.parent[x] = v
        return v, (self.off[path[0]] if path else 0)

    def union(self, a, b, delta: int = 0) -> None:
        """Index ``i`` of ``a`` is index ``i + delta`` of ``b``."""
        ra, oa = self.find(a)
        rb, ob = self.find(b)
        d = delta + ob - oa
        if ra == rb:
            if d != 0:
                self.bad.add(ra)
            return
        self.parent[ra], self.off[ra] = rb, d
        self.lo[rb] = min(self.lo[rb], self.lo[ra] + d)
        self.hi[rb] = max(self.hi[rb], self.hi[ra] + d)
        if ra in self.bad:
            self.bad.add(rb)


# ---------------------------------------------------------------------------------------------- the analysis


def _shape(node: Any) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(d) if isinstance(d, int) else None for d in val.shape)
    return None


class _Analysis:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.uf = _OffsetUnionFind()
        self.fixed: dict = {}  # vertex -> reason
        self.products: list = []  # (merged vertex, [factor vertices, outer first], [factor sizes])
        self.opaque: list = []  # (node, reason)
        self.params = {n for n, _ in gm.named_parameters()}

    # -- vertices
    def v(self, node: fx.Node, dim: int) -> Optional[Vertex]:
        shape = _shape(node)
        if shape is None:
            return None
        dim = dim % len(shape) if shape else 0
        if not shape or shape[dim] is None:
            return None
        vert = (node.name, dim)
        self.uf.add(vert, shape[dim])
        return vert

    def same(self, a: fx.Node, da: int, b: fx.Node, db: int, delta: Optional[int] = None) -> None:
        """Index ``i`` of dim ``da`` of ``a`` is index ``i`` (or ``i + delta``: a slice of ``b``) of ``db`` of
        ``b``."""
        va, vb = self.v(a, da), self.v(b, db)
        if va is None or vb is None:
            return
        sa, sb = _shape(a)[va[1]], _shape(b)[vb[1]]
        if delta is None and sa != sb:
            self.fix(a, da, f"{a.name}: size {sa} against {sb} of {b.name}")
            self.fix(b, db, f"{b.name}: size {sb} against {sa} of {a.name}")
            return
        self.uf.union(va, vb, delta or 0)

    def fix(self, node: fx.Node, dim: int, reason: str) -> None:
        vert = self.v(node, dim)
        if vert is not None:
            self.fixed.setdefault(vert, reason)

    def fix_all(self, node: fx.Node, reason: str) -> None:
        shape = _shape(node)
        for d in range(len(shape or ())):
            self.fix(node, d, reason)

    def identity(self, a: fx.Node, b: fx.Node, skip=()) -> None:
        """Dim ``i`` of ``a`` is dim ``i`` of ``b`` (same rank), except the dims in ``skip``."""
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None or len(sa) != len(sb):
            return
        for d in range(len(sa)):
            if d not in skip:
                self.same(a, d, b, d)

    # -- ops
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.fix_all(node, "model input")
            elif node.op == "output":
                for leaf in torch.utils._pytree.tree_leaves(node.args):
                    if isinstance(leaf, fx.Node):
                        self.fix_all(leaf, "model output")
            elif node.op == "get_attr":
                for d in range(len(_shape(node) or ())):
                    self.v(node, d)
            elif node.op == "call_function":
                self.call(node)
            else:
                self.opaque.append((node, f"{node.op} {node.target}"))

    def call(self, n: fx.Node) -> None:
        t = n.target
        args = n.args
        out = _shape(n)
        if t in _IGNORED:
            return
        if t in _CREATION:
            if out is not None:
                self.fix_all(n, f"{n.name}: sizes written in the graph ({_name(t)})")
            return
        if t is operator.getitem:
            return self.getitem(n)
        if out is None:
            # ops returning several tensors are opaque unless getitem resolves them (split)
            if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                     aten.unbind.int):
                return
            self.opaque.append((n, _name(t)))
            return
        x = args[0] if args else None
        if t in _UNARY:
            skip = tuple(range(2, len(out))) if t in _SPATIAL else ()
            self.identity(x, n, skip)
        elif t in _ELEMENTWISE:
            for a in list(args) + list(n.kwargs.values()):
                sa = _shape(a)
                if sa is None:
                    continue
                for k in range(1, len(sa) + 1):
                    if sa[-k] == out[-k] and sa[-k] != 1:
                        self.same(a, len(sa) - k, n, len(out) - k)
        elif t == aten.linear.default:
            self.linear(n)
        elif t in (aten.conv2d.default, aten.conv1d.default, aten.convolution.default):
            self.conv(n)
        elif t == aten.batch_norm.default:
            self.identity(x, n)
            for p in args[1:5]:
                if isinstance(p, fx.Node):
                    self.same(p, 0, n, 1)
        elif t == aten.layer_norm.default:
            k = len(args[1])
            self.identity(x, n, skip=tuple(range(len(out) - k, len(out))))
            for d in range(len(out) - k, len(out)):
                self.fix(x, d, f"{n.name}: layer_norm normalises over it")
                self.fix(n, d, f"{n.name}: layer_norm normalises over it")
            for p in args[2:4]:
                if isinstance(p, fx.Node):
                    self.fix_all(p, f"{n.name}: layer_norm normalises over it")
        elif t in (aten.group_norm.default,):
            self.identity(x, n, skip=(1,))
            self.fix(x, 1, f"{n.name}: group_norm normalises over it")
            self.fix(n, 1, f"{n.name}: group_norm normalises over it")
            for p in args[2:4]:
                if isinstance(p, fx.Node):
                    self.fix_all(p, f"{n.name}: group_norm normalises over it")
        elif t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default):
            d = args[1] % len(out)
            self.identity(x, n, skip=(d,))
            self.fix(x, d, f"{n.name}: softmax normalises over it")
            self.fix(n, d, f"{n.name}: softmax normalises over it")
        elif t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default):
            self.reduce(n)
        elif t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            self.reshape(n, _shape(x), out)
        elif t == aten.flatten.using_ints:
            self.reshape(n, _shape(x), out)
        elif t in (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            self.reshape(n, _shape(x), out)
        elif t in (aten.transpose.int, aten.t.default, aten.permute.default):
            rank = len(out)
            if t == aten.permute.default:
                perm = [d % rank for d in args[1]]
            else:
                a, b = (0, 1) if t == aten.t.default else (args[1] % rank, args[2] % rank)
                perm = list(range(rank))
                perm[a], perm[b] = perm[b], perm[a]
            for d_out, d_in in enumerate(perm):
                self.same(x, d_in, n, d_out)
        elif t == aten.expand.default:
            sx = _shape(x)
            lead = len(out) - len(sx)
            for d in range(len(sx)):
                if sx[d] == out[lead + d] and sx[d] != 1:
                    self.same(x, d, n, lead + d)
                elif out[lead + d] is not None and out[lead + d] != 1:
                    self.fix(n, lead + d, f"{n.name}: expand writes its size")
            for d in range(lead):
                self.fix(n, d, f"{n.name}: expand writes its size")
        elif t == aten.cat.default:
            dim = (args[1] if len(args) > 1 else n.kwargs.get("dim", 0)) % len(out)
            offset = 0
            for a in args[0]:
                sa = _shape(a)
                self.identity(a, n, skip=(dim,))
                self.same(a, dim, n, dim, delta=offset)
                offset += sa[dim]
        elif t == aten.slice.Tensor:
            dim = (args[1] if len(args) > 1 else 0) % len(out)
            start = args[2] if len(args) > 2 else 0
            step = args[4] if len(args) > 4 else 1
            size = _shape(x)[dim]
            start = 0 if start is None else (start + size if start < 0 else min(start, size))
            self.identity(x, n, skip=(dim,))
            if step == 1:
                self.same(n, dim, x, dim, delta=start)
            else:
                self.fix(x, dim, f"{n.name}: strided slice")
                self.fix(n, dim, f"{n.name}: strided slice")
        elif t == aten.select.int:
            dim = args[1] % len(_shape(x))
            self.fix(x, dim, f"{n.name}: selects one index")
            for d_in in range(len(_shape(x))):
                if d_in != dim:
                    self.same(x, d_in, n, d_in if d_in < dim else d_in - 1)
        elif t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            self.matmul(n, args[0], args[1])
        elif t == aten.addmm.default:
            self.matmul(n, args[1], args[2])
            self.same(args[0], -1, n, -1) if _shape(args[0]) and _shape(args[0])[-1] == out[-1] else None
        elif t == aten.scaled_dot_product_attention.default:
            self.attention(n)
        elif t == aten.embedding.default:
            w, idx = args[0], args[1]
            self.same(w, 1, n, -1)
            self.fix(w, 0, f"{n.name}: embedding rows are indexed by the input")
            si = _shape(idx)
            for d in range(len(si or ())):
                self.same(idx, d, n, d)
        else:
            self.opaque.append((n, _name(t)))

    def getitem(self, n: fx.Node) -> None:
        src, i = n.args
        if not isinstance(src, fx.Node):
            return
        t = src.target
        if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            x = src.args[0]
            sx = _shape(x)
            dim = (src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)) % len(sx)
            sizes = [_shape(u)[dim] if _shape(u) else None for u in _split_outputs(src)]
            offset = sum(s for s in sizes[:i] if s is not None) if None not in sizes[:i] else None
            self.identity(x, n, skip=(dim,))
            if offset is None:
                self.fix(x, dim, f"{src.name}: split of unknown sizes")
            else:
                self.same(n, dim, x, dim, delta=offset)
        elif t == aten.unbind.int:
            x = src.args[0]
            dim = (src.args[1] if len(src.args) > 1 else 0) % len(_shape(x))
            self.fix(x, dim, f"{src.name}: unbind")
            for d_in in range(len(_shape(x))):
                if d_in != dim:
                    self.same(x, d_in, n, d_in if d_in < dim else d_in - 1)
        elif _shape(n) is not None:
            self.opaque.append((n, f"getitem of {_name(t)}"))

    def linear(self, n: fx.Node) -> None:
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        out = _shape(n)
        self.same(w, 0, n, -1)
        self.same(w, 1, x, -1)
        if isinstance(b, fx.Node):
            self.same(b, 0, n, -1)
        for d in range(len(out) - 1):
            self.same(x, d, n, d)

    def conv(self, n: fx.Node) -> None:
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else None
        if n.target == aten.convolution.default:
            groups = n.args[8]
            if n.args[6]:
                return self.opaque.append((n, "transposed convolution"))
        else:
            groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
        sx, sw = _shape(x), _shape(w)
        for d in range(2, len(sw)):
            self.fix(w, d, f"{n.name}: kernel taps")
        self.same(x, 0, n, 0)
        self.same(w, 0, n, 1)
        if isinstance(b, fx.Node):
            self.same(b, 0, n, 1)
        if groups == 1:
            self.same(w, 1, x, 1)
        elif groups == sx[1] and sw[1] == 1 and sw[0] == sx[1]:  # depthwise: channel c reads channel c
            self.same(x, 1, n, 1)
        else:
            why = f"{n.name}: grouped convolution ({groups} groups)"
            for node, d in ((x, 1), (n, 1), (w, 0), (w, 1)):
                self.fix(node, d, why)
            if isinstance(b, fx.Node):
                self.fix(b, 0, why)

    def reduce(self, n: fx.Node) -> None:
        x = n.args[0]
        sx, out = _shape(x), _shape(n)
        dims = n.args[1] if len(n.args) > 1 else list(range(len(sx)))
        dims = {d % len(sx) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        keep = len(out) == len(sx)
        j = 0
        for d in range(len(sx)):
            if d in dims:
                self.fix(x, d, f"{n.name}: reduced over")
                j += keep
                continue
            self.same(x, d, n, j)
            j += 1

    def matmul(self, n: fx.Node, a: fx.Node, b: fx.Node) -> None:
        sa, sb, out = _shape(a), _shape(b), _shape(n)
        if len(sa) < 2 or len(sb) < 2:
            return self.opaque.append((n, "matmul of a vector"))
        self.same(a, -2, n, -2)
        self.same(b, -1, n, -1)
        self.same(a, -1, b, -2)  # the reduction: entry k of both, removed together
        for src in (a, b):
            s = _shape(src)
            for k in range(3, len(s) + 1):
                if s[-k] == out[-k] and s[-k] != 1:
                    self.same(src, len(s) - k, n, len(out) - k)

    def attention(self, n: fx.Node) -> None:
        q, k, v = n.args[:3]
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
        out = _shape(n)
        for src in (q, k, v):
            s = _shape(src)
            for kk in range(3, len(s) + 1):
                if s[-kk] == out[-kk] and s[-kk] != 1:
                    self.same(src, len(s) - kk, n, len(out) - kk)
        self.same(q, -2, n, -2)
        self.same(k, -2, v, -2)
        self.same(q, -1, k, -1)
        self.same(v, -1, n, -1)
        if scale is None:
            self.fix(q, -1, f"{n.name}: the attention's scale is 1/sqrt of the head width")
        if isinstance(mask, fx.Node):
            sm = _shape(mask)
            for kk in range(1, len(sm) + 1):
                if sm[-kk] != 1 and sm[-kk] == out[-kk] and kk != 1:
                    self.same(mask, len(sm) - kk, n, len(out) - kk)
            if sm[-1] != 1:
                self.same(mask, -1, k, -2)

    def reshape(self, n: fx.Node, si: tuple, so: tuple) -> None:
        """Match the dims of a reshape in runs of equal products; a run splitting or merging dims is a product."""
        x = n.args[0]
        if si is None or so is None or None in si or None in so:
            return self.opaque.append((n, "reshape with dynamic sizes"))
        ins = [d for d in range(len(si)) if si[d] != 1]
        outs = [d for d in range(len(so)) if so[d] != 1]
        i = j = 0
        while i < len(ins) or j < len(outs):
            if i >= len(ins) or j >= len(outs):
                return self.opaque.append((n, "reshape whose sizes do not match"))
            ri, rj = [ins[i]], [outs[j]]
            pi, pj = si[ins[i]], so[outs[j]]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj and i < len(ins):
                    ri.append(ins[i])
                    pi *= si[ins[i]]
                    i += 1
                elif pj < pi and j < len(outs):
                    rj.append(outs[j])
                    pj *= so[outs[j]]
                    j += 1
                else:
                    return self.opaque.append((n, "reshape whose sizes do not match"))
            if len(ri) == 1 and len(rj) == 1:
                self.same(x, ri[0], n, rj[0])
            elif len(ri) == 1:
                self.product(x, ri[0], [(n, d) for d in rj])
            elif len(rj) == 1:
                self.product(n, rj[0], [(x, d) for d in ri])
            else:
                self.opaque.append((n, f"reshape mixing dims {ri} of {tuple(si)} into {rj} of {tuple(so)}"))

    def product(self, merged: fx.Node, dim: int, factors: list) -> None:
        vm = self.v(merged, dim)
        vf = [self.v(node, d) for node, d in factors]
        if vm is None or None in vf:
            return
        sizes = [_shape(node)[d] for node, d in factors]
        self.products.append((vm, vf, sizes))
        for (node, d) in factors[1:]:
            self.fix(node, d, f"{merged.name}: inner factor of a reshape (only whole outer blocks may go)")


def _name(t) -> str:
    return str(getattr(t, "__name__", t)).replace("aten::", "")


def _split_outputs(src: fx.Node) -> list:
    return sorted((u for u in src.users if u.target is operator.getitem), key=lambda u: u.args[1])


# ---------------------------------------------------------------------------------------------- groups


def channel_groups(graph, unknown: str = "error") -> ChannelGroups:
    """Dependency groups of a captured model.

    Parameters
    ----------
    graph : SparseGraph or torch.fx.GraphModule
        A graph captured by ``torch.export`` (:func:`sparsecc.ir.capture.capture`).
    unknown : {"error", "keep"}
        What to do when an op the analysis does not know (or a reshape that mixes channels) touches channels that
        could otherwise be removed: ``"error"`` raises; ``"keep"`` keeps those channels whole.

    Returns
    -------
    ChannelGroups

    Raises
    ------
    UnsupportedOpError
        With ``unknown="error"``: an opaque op touches a prunable group; the message names the node, the op and
        the layers of the group. Also for a graph not captured by ``torch.export``.
    """
    if isinstance(graph, SparseGraph):
        if graph.method != "export":
            raise UnsupportedOpError("channel groups need a graph captured by torch.export; this model was captured "
                                     "by torch.fx.symbolic_trace (torch.export failed on it)")
        gm = graph.gm
    else:
        gm = graph
    if unknown not in ("error", "keep"):
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(f"unknown must be 'error' or 'keep', got {unknown!r}")
    an = _Analysis(gm)
    an.run()
    return _resolve_groups(an, unknown)


def _resolve_groups(an: _Analysis, unknown: str) -> ChannelGroups:
    uf = an.uf
    nodes = {n.name: n for n in an.gm.graph.nodes}
    members: dict = {}
    for vert in uf.parent:
        r, o = uf.find(vert)
        members.setdefault(r, []).append((vert, o))
    fixed_roots: dict = {}
    for vert, why in an.fixed.items():
        fixed_roots.setdefault(uf.find(vert)[0], why)
    for r in uf.bad:
        fixed_roots.setdefault(r, "channels reordered (inconsistent offsets)")
    # products: the merged component follows the group of its outer factor
    derived: dict = {}  # merged root -> (outer root, outer offset, inner size, merged offset, outer size)
    for vm, vf, sizes in an.products:
        rm, om = uf.find(vm)
        ra, oa = uf.find(vf[0])
        inner = math.prod(sizes[1:])
        entry = (ra, oa, inner, om, sizes[0])
        if rm == ra or derived.get(rm, entry) != entry or rm in {e[0] for e in derived.values()}:
            fixed_roots.setdefault(rm, "flattened twice in different ways")
            fixed_roots.setdefault(ra, "flattened twice in different ways")
            continue
        derived[rm] = entry
    for rm in list(derived):  # chains of products (a flattened dim flattened again): kept whole
        if derived[rm][0] in derived:
            fixed_roots.setdefault(rm, "nested reshapes")
            fixed_roots.setdefault(derived[rm][0], "nested reshapes")
    changed = True
    while changed:  # a fixed merged component fixes its outer factor's group, and back
        changed = False
        for rm, (ra, *_rest) in derived.items():
            for a, b in ((rm, ra), (ra, rm)):
                if a in fixed_roots and b not in fixed_roots:
                    fixed_roots[b] = fixed_roots[a]
                    changed = True

    def has_param(r) -> bool:
        return any(nodes[v[0]].op == "get_attr" and nodes[v[0]].target in an.params for v, _ in members.get(r, ()))

    followers: dict = {}
    for rm, e in derived.items():
        followers.setdefault(e[0], []).append(rm)
    candidates = [r for r in members if r not in derived and r not in fixed_roots
                  and (has_param(r) or any(has_param(f) for f in followers.get(r, ())))]
    # refuse (or keep whole) groups an opaque op touches
    cand = set(candidates)
    for node, why in an.opaque:
        touched = []
        for src in list(node.all_input_nodes) + [node]:
            for d in range(len(_shape(src) or ())):
                vert = (src.name, d)
                if vert in uf.parent:
                    r = uf.find(vert)[0]
                    r = derived[r][0] if r in derived else r
                    if r in cand:
                        touched.append(r)
        for r in touched:
            if unknown == "error":
                layers = list(dict.fromkeys(_layer(nodes[v[0]].target) for v, _ in members[r]
                                            if nodes[v[0]].op == "get_attr"))
                raise UnsupportedOpError(
                    f"channel analysis: node {node.name!r} ({why}) uses channels of layers {layers[:4]}; sparsecc "
                    f"does not know how it uses them, so it cannot remove them safely (unknown='keep' keeps them "
                    f"whole)")
            cand.discard(r)
            fixed_roots[r] = f"{node.name}: {why}"
    groups = []
    for r in candidates:
        if r not in cand:
            continue
        g = _make_group(len(groups), r, members, followers, derived, uf, nodes, an)
        if g is not None and g.size >= 2:
            groups.append(g)
    fixed_params = []
    for r, why in fixed_roots.items():
        for v, _ in members.get(r, ()):
            if nodes[v[0]].op == "get_attr" and nodes[v[0]].target in an.params:
                fixed_params.append(f"{nodes[v[0]].target}[{v[1]}]: {why}")
    groups.sort(key=lambda g: _first_position(g, an.gm))
    for i, g in enumerate(groups):
        g.id = i
    return ChannelGroups(groups, sorted(set(fixed_params)), an.gm)


def _layer(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else target


def _first_position(g: ChannelGroup, gm: fx.GraphModule) -> int:
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    users = [min((order[u.name] for u in n.users), default=order[n.name])
             for n in gm.graph.nodes if n.op == "get_attr" and n.target in {m.target for m in g.members}]
    return min(users, default=0)


def _make_group(gid, r, members, followers, derived, uf, nodes, an) -> Optional[ChannelGroup]:
    lo, hi = uf.lo[r], uf.hi[r]
    size = hi - lo
    vertices: dict = {}
    for v, o in members[r]:
        n = _shape(nodes[v[0]])[v[1]]
        vertices[v] = np.arange(n) + o - lo
    unit = 1
    for rm in followers.get(r, ()):
        _, oa, inner, om, outer = derived[rm]
        unit = max(unit, inner)
        for v, o in members[rm]:
            n = _shape(nodes[v[0]])[v[1]]
            idx = np.arange(n) + o - om  # index in the merged vertex of the product
            if idx.min() < 0 or idx.max() >= outer * inner:
                return None  # the merged component reaches beyond the flattened dim: keep whole
            vertices[v] = idx // inner + oa - lo
    members_out = []
    kinds = set()
    for v, unit_of in vertices.items():
        node = nodes[v[0]]
        for u in node.users:
            if u.target == aten.scaled_dot_product_attention.default:
                kinds.add("heads")
            elif node.op == "get_attr" and v[1] == 0 and u.args[1:2] == (node,):
                if u.target in (aten.conv2d.default, aten.conv1d.default):
                    kinds.add("channels")
                elif u.target == aten.linear.default:
                    kinds.add("neurons")
        if node.op == "get_attr":
            members_out.append(Member(node.target, v[1], unit_of, node.target in an.params))
    kind = "heads" if "heads" in kinds else "channels" if "channels" in kinds else "neurons" if kinds else "channels"
    if not any(m.is_parameter for m in members_out):
        return None
    return ChannelGroup(gid, size, unit, kind, sorted(members_out, key=lambda m: (m.layer, m.target)), vertices)
