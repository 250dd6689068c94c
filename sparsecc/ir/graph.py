"""Graph IR: a captured ``torch.fx.GraphModule`` plus sparsecc's view of it.

The IR *is* the FX graph (so every torch op keeps running in torch); sparsecc
adds namespaced per-node annotations (:mod:`sparsecc.ir.annotations`), a list
of prunable layer sites, input specs for runtime checks, a readable table and
a networkx view for graph analyses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import InputDtypeError, InputShapeError
from .annotations import get_annotation

LINEAR_TARGETS = (torch.ops.aten.linear.default,)


@dataclass
class LinearSite:
    """One ``Y = X · Wᵀ + b`` in the graph.

    Attributes
    ----------
    node : torch.fx.Node
        The ``aten.linear`` call (export capture) or ``nn.Linear`` call_module (fx capture).
    name : str
        Fully qualified layer name in the user's model.
    weight : str
        Attribute path of the weight ``(N, K)`` in the graph module.
    bias : str or None
        Attribute path of the bias ``(N,)``.
    input : torch.fx.Node
        Node producing X ``(..., K)``.
    """

    node: fx.Node
    name: str
    weight: str
    bias: Optional[str]
    input: fx.Node


@dataclass(frozen=True)
class InputSpec:
    """Expected shape and dtype of one flattened input; ``None`` dims are dynamic, within ``ranges``."""

    path: str
    shape: tuple
    dtype: torch.dtype
    #: per dim, ``(min, max)`` sizes allowed for a dynamic dim (max None: unbounded); None for a fixed dim
    ranges: tuple = ()

    def describe(self) -> str:
        dims = []
        for i, d in enumerate(self.shape):
            r = self.ranges[i] if i < len(self.ranges) else None
            if d is not None:
                dims.append(str(d))
            elif r is None:
                dims.append("*")
            else:
                dims.append(f"{r[0]}..{'' if r[1] is None else r[1]}")
        return f"({', '.join(dims)}) {str(self.dtype).replace('torch.', '')}"

    def range_of(self, dim: int):
        """``(min, max)`` of dynamic dim ``dim`` (max None: unbounded), or None."""
        return self.ranges[dim] if dim < len(self.ranges) else None


def _resolve(root: torch.nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class SparseGraph:
    """A captured model: FX graph module, layer sites and input specs.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The captured graph module; owned by sparsecc (never the user's module).
    method : str
        ``"export"`` or ``"fx"``: how it was captured.
    input_specs : list of InputSpec
        One per flattened example input leaf that is a tensor.
    """

    def __init__(self, gm: fx.GraphModule, method: str, input_specs: list[InputSpec], arg_names: tuple = (),
                 kwarg_names: tuple = ()):
        self.gm = gm
        self.method = method
        self.input_specs = input_specs
        #: names of the positional inputs the model was captured with (its forward's parameters)
        self.arg_names = tuple(arg_names)
        #: the keyword inputs of the example, in its order (the order the input specs are in)
        self.kwarg_names = tuple(kwarg_names)
        #: parameter names of the weights that may be pruned (``passes.prune.prunable_weights`` of the user's
        #: model, set by capture); None: every site
        self.prunable: Optional[frozenset] = None

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        """``(args, kwargs)`` as the captured graph takes them: keyword inputs of a graph captured with
        positional ones are put in place by the names of the model's ``forward``.

        Raises
        ------
        InputShapeError
            A keyword the model was not compiled with, or an input given twice.
        """
        if kwargs and self.kwarg_names and set(kwargs) == set(self.kwarg_names):  # another order: the example's
            return args, {k: kwargs[k] for k in self.kwarg_names}
        if not kwargs or not self.arg_names:
            return args, kwargs
        given = list(args)
        for name in self.arg_names[len(args):]:
            if name not in kwargs:
                break
            given.append(kwargs[name])
        extra = [k for k in kwargs if k not in self.arg_names[len(args):len(given)]]
        if extra:
            dup = [k for k in extra if k in self.arg_names[:len(args)]]
            raise InputShapeError(
                f"input {(dup or extra)[0]!r} " + ("given both by position and by keyword" if dup else
                f"is not an input of the compiled model (its inputs: {', '.join(self.arg_names)})"))
        return tuple(given), {}

    # ------------------------------------------------------------------ sites
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def linear_sites(self) -> list[LinearSite]:
        """Every linear whose weight (and bias) are constants of the graph module."""
        sites = []
        for node in self.graph.nodes:
            site = self._as_linear(node)
            if site is not None:
                sites.append(site)
        return sites

    def _as_linear(self, node: fx.Node) -> Optional[LinearSite]:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            args = list(node.args) + [None] * (3 - len(node.args))
            x, w, b = args[:3]
            b = node.kwargs.get("bias", b)
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                return None
            if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
                return None
            name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
            return LinearSite(node, name, w.target, b.target if b is not None else None, x)
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if type(mod) is torch.nn.Linear:
                bias = f"{node.target}.bias" if mod.bias is not None else None
                return LinearSite(node, node.target, f"{node.target}.weight", bias, node.args[0])
        return None

    def tensor(self, target: str) -> torch.Tensor:
        """The parameter or buffer at attribute path ``target``."""
        return _resolve(self.gm, target)

    def set_tensor(self, target: str, value: torch.Tensor) -> None:
        """Replace the values of the parameter or buffer at ``target`` in place (same shape)."""
        with torch.no_grad():
            self.tensor(target).copy_(value)

    def site(self, name: str) -> LinearSite:
        for s in self.linear_sites():
            if s.name == name:
                return s
        raise KeyError(name)

    # ------------------------------------------------------------- inspection
    def to_networkx(self) -> nx.DiGraph:
        """Dataflow view: one vertex per FX node (attrs ``op``, ``target``, ``ann``), edges producer → user."""
        g = nx.DiGraph()
        for node in self.graph.nodes:
            g.add_node(node.name, op=node.op, target=str(node.target), ann=get_annotation(node))
            for inp in node.all_input_nodes:
                g.add_edge(inp.name, node.name)
        return g

    def table(self, only_layers: bool = False) -> str:
        """Readable table: node, op, shape, layer, pattern, density, format, kernel, time (ms)."""
        rows = [("node", "op", "shape", "layer", "pattern", "density", "format", "kernel", "ms")]
        for node in self.graph.nodes:
            ann = get_annotation(node)
            if only_layers and ann is None:
                continue
            shape = node_shape(node)
            op = node.op if node.op in ("placeholder", "output", "get_attr") else _short_target(node)
            if ann is None:
                rows.append((node.name, op, shape, "", "", "", "", "", ""))
                continue
            cand = ann.candidate
            fmt = cand.label if cand is not None else ""
            ms = ann.measured_ms if ann.measured_ms is not None else (
                ann.est_ms.get(cand.key) if ann.est_ms and cand is not None else None)
            rows.append((
                node.name, op, shape, ann.name, ann.pattern or "",
                "" if ann.density is None else f"{ann.density:.3f}",
                fmt, ann.kernel or "", "" if ms is None else f"{ms:.3f}",
            ))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def __str__(self) -> str:
        return f"SparseGraph(captured by {self.method}, {len(self.graph.nodes)} nodes)\n" + self.table()

    __repr__ = __str__

    # --------------------------------------------------------- input checking
    def check_inputs(self, args: tuple, kwargs: dict) -> None:
        """Raise :class:`InputShapeError` / :class:`InputDtypeError` if inputs differ from the specs."""
        # tree_leaves, not tree_flatten_with_path: paths cost ~100 µs per call and the specs name the inputs
        tensors = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        if len(tensors) != len(self.input_specs):
            raise InputShapeError(
                f"expected {len(self.input_specs)} tensor inputs "
                f"({', '.join(s.path for s in self.input_specs)}), got {len(tensors)}")
        for t, spec in zip(tensors, self.input_specs):
            if t.dtype != spec.dtype:
                raise InputDtypeError(
                    f"input {spec.path}: expected dtype {spec.dtype}, got {t.dtype} "
                    f"(expected {spec.describe()})")
            ok = t.dim() == len(spec.shape) and all(
                e is None or e == g for e, g in zip(spec.shape, t.shape))
            if not ok:
                raise InputShapeError(
                    f"input {spec.path}: expected shape {spec.describe()} ('*' = dynamic), "
                    f"got {tuple(t.shape)}")
            for i, e in enumerate(spec.shape):
                r = spec.range_of(i) if e is None else None
                if r is not None and not (r[0] <= t.shape[i] and (r[1] is None or t.shape[i] <= r[1])):
                    raise InputShapeError(
                        f"input {spec.path}: dim {i} is {t.shape[i]}, outside the range the model was compiled "
                        f"for ({r[0]} to {'any size' if r[1] is None else r[1]}; dynamic_shapes of compile); "
                        f"expected shape {spec.describe()}")


def node_shape(node: fx.Node) -> str:
    """Shape of a node's value as text (symbolic dims by name), '' when unknown."""
    val = node.meta.get("val", None)
    if val is None and "tensor_meta" in node.meta:
        val = node.meta["tensor_meta"]
    shape = getattr(val, "shape", None)
    if shape is None:
        return ""
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _short_target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", str(t))
    if isinstance(t, torch._ops.OpOverload):
        name = f"{t._schema.name.split('::')[-1]}"
    return name


def iter_tensor_leaves(obj) -> Iterator[tuple[str, torch.Tensor]]:
    """Flattened ``(path, tensor)`` leaves of a pytree of inputs."""
    for path, v in pytree.tree_flatten_with_path(obj)[0]:
        if isinstance(v, torch.Tensor):
            yield pytree.keystr(path), v


def as_call(call) -> tuple:
    """``(args, kwargs)`` of one example call given as a tensor, a tuple / list of positional inputs or a dict of
    keyword inputs.

    Raises
    ------
    DataError
        Anything else.
    """
    from ..errors import DataError

    if isinstance(call, dict):
        return (), dict(call)
    if isinstance(call, torch.Tensor):
        return (call,), {}
    if isinstance(call, (tuple, list)):
        return tuple(call), {}
    raise DataError(f"an example call must be a tensor, a tuple or a dict, got {type(call).__name__}")
