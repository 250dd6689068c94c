"""Re-modularization: turn ``linear`` / ``conv2d`` calls on graph-held weights back into ``nn.Linear`` / ``nn.Conv2d``.

sparsecc prunes and rewrites the weights of ``nn.Linear`` and ``nn.Conv2d`` modules. Two kinds of graph hold
their weights otherwise:

* the module of a ``torch.export`` program (``ExportedProgram.module()``, a loaded ``.pt2``): weights are
  ``get_attr`` nodes and layers are ``aten.linear`` / ``aten.conv2d`` calls;
* a graph that dynamo gives a ``torch.compile`` backend: weights are graph inputs (``sparsecc.dynamo``).

:func:`linear_and_conv_modules` rebuilds the modules for both, named after the weight's owner (``encoder.layer.0
.attention.self.query`` for ``encoder.layer.0.attention.self.query.weight``); :func:`modules_from_program` applies
it to a program, so ``compile``/``sparsify``/``prune`` see the layers of a ``.pt2`` file as those of the model it
was exported from.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

__all__ = ["CONV2D_TARGETS", "LINEAR_TARGETS", "linear_and_conv_modules", "module_at", "modules_from_program"]

#: call targets of a linear layer (torch functions in dynamo graphs, the ATen op in exported programs)
LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default}
#: call targets of a 2-D convolution
CONV2D_TARGETS = {torch.conv2d, torch.nn.functional.conv2d, torch.ops.aten.conv2d.default}
_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule of ``root`` at dotted ``path``, made (as empty ``nn.Module`` containers) where missing."""
    mod = root
    for part in path.split(".") if path else ():
        if part not in mod._modules:
            mod.add_module(part, torch.nn.Module())
        mod = mod._modules[part]
    return mod


def _has(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _full_args(node: fx.Node):
    """Positional arguments of a linear/conv call with its keyword arguments folded in, or None for others."""
    args = list(node.args)
    for k, v in node.kwargs.items():
        if k not in _ARG_NAMES:
            return None
        i = _ARG_NAMES.index(k)
        args += [None] * (i + 1 - len(args))
        args[i] = v
    return args


def linear_and_conv_modules(gm: fx.GraphModule, weights: dict, root: torch.nn.Module) -> dict:
    """Add an ``nn.Linear`` / ``nn.Conv2d`` to ``root`` for each ``linear(x, W, b)`` / ``conv2d(x, W, b, ...)`` of
    ``gm`` whose weight (and bias) are graph-held weights of one owner.

    Parameters
    ----------
    gm : torch.fx.GraphModule
    weights : dict
        ``{node: (fully qualified name, tensor)}`` of the nodes that hold weights (inputs or ``get_attr``).
    root : torch.nn.Module
        Where the modules go, at the weight's owner path (kept if a module of that type with the same weight
        tensor is there already).

    Returns
    -------
    dict
        ``{call node: (module path, input node)}``; other calls are left out (a weight named other than
        ``<path>.weight``, a bias of another owner, a non-2-D linear weight, string padding).
    """
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS | CONV2D_TARGETS:
            continue
        args = _full_args(node)
        if args is None or len(args) < 2 or args[1] not in weights:
            continue
        fqn, w = weights[args[1]]
        path, _, attr = fqn.rpartition(".")
        b = args[2] if len(args) > 2 else None
        if not path or attr != "weight" or (b is not None and (b not in weights or weights[b][0] != f"{path}.bias")):
            continue
        bias = weights[b][1] if b is not None else None
        existing = root.get_submodule(path) if _has(root, path) else None
        if existing is not None and getattr(existing, "weight", None) is not w:
            continue  # the path holds another module: leave this call as it is
        if node.target in LINEAR_TARGETS:
            if w.dim() != 2:
                continue
            mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        else:
            if w.dim() != 4:
                continue
            full = args + [None, None, None, 1, 0, 1, 1][len(args):]
            stride, padding, dilation, groups = full[3:7]
            if isinstance(padding, str):
                continue
            mod = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                                  padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
        if existing is None:
            mod.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
            if bias is not None:
                mod.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
            parent, _, leaf = path.rpartition(".")
            module_at(root, parent).add_module(leaf, mod)
        elif not isinstance(existing, type(mod)):
            continue
        out[node] = (path, args[0])
    return out


def modules_from_program(program) -> fx.GraphModule:
    """A copy of an exported program's module whose linear and conv2d layers are ``nn.Linear`` / ``nn.Conv2d``.

    Parameters
    ----------
    program : torch.export.ExportedProgram or torch.fx.GraphModule
        A program (``torch.export.export`` / ``torch.export.load``) or its ``.module()``.

    Returns
    -------
    torch.fx.GraphModule
        Same inputs, outputs and computation; every other weight stays a ``get_attr`` of the same name. The
        program and its weights are not modified (the weights are copied).
    """
    gm = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    named = dict(gm.named_parameters(remove_duplicate=False))
    named.update(dict(gm.named_buffers(remove_duplicate=False)))
    weights = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(named.get(node.target), torch.Tensor):
            weights[node] = (node.target, named[node.target].detach().clone())
    root = torch.nn.Module()
    modules = linear_and_conv_modules(gm, weights, root)
    used = {weights[n][0] for n in weights if any(u not in modules for u in n.users)}
    for fqn, t in ((weights[n][0], weights[n][1]) for n in weights):
        if fqn not in used:
            continue
        path, _, attr = fqn.rpartition(".")
        owner = module_at(root, path)
        if attr in owner._parameters or attr in owner._buffers:
            continue
        if isinstance(named[fqn], torch.nn.Parameter):
            owner.register_parameter(attr, torch.nn.Parameter(t, requires_grad=False))
        else:
            owner.register_buffer(attr, t)
    for node in gm.graph.nodes:  # other submodules the graph calls (e.g. a guard function)
        if node.op == "call_module" and not _has(root, node.target):
            parent, _, leaf = node.target.rpartition(".")
            module_at(root, parent).add_module(leaf, gm.get_submodule(node.target))
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # the program's pytree inputs and outputs
    env: dict = {}
    for node in gm.graph.nodes:
        if node in modules:
            path, x = modules[node]
            new = graph.call_module(path, (env[x],))
        elif node.op == "get_attr" and node in weights and weights[node][0] not in used:
            continue  # read only by the rebuilt modules
        else:
            new = graph.node_copy(node, lambda a: env[a])
        env[node] = new
    out = fx.GraphModule(root, graph)
    out.meta.update(getattr(gm, "meta", {}))
    return out.eval()
