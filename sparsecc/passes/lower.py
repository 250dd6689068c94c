"""Lower sparse linears to TVM kernels (rewrite pass).

Every linear annotated with a sparse format is replaced by a ``call_module``
of the target's kernel module (weights converted once, here), fusing a single
following ReLU or exact GELU into the kernel epilogue. Dense layers keep their
``aten.linear`` and run in torch. Dense weights that no node uses any more are
deleted from the graph module, so the compiled module does not hold them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import PassError
from ..ir.annotations import annotate, get_annotation
from ..ir.graph import SparseGraph
from ..ir.rewrite import delete_unused_attrs, fresh_attr
from ..runtime.modules import make_linear
from .base import Pass, PassContext, PassResult
from .prune import prunable_sites


def fusable_activation(node: fx.Node):
    """``(user node, "relu" | "gelu")`` if ``node``'s only user is a fusable activation, else ``(None, None)``."""
    if len(node.users) != 1:
        return None, None
    (user,) = node.users
    if user.op != "call_function" or not user.args or user.args[0] is not node:
        return None, None
    if user.target in (torch.ops.aten.relu.default, torch.relu, torch.nn.functional.relu):
        return (user, "relu") if len(user.args) == 1 and not user.kwargs.get("inplace") else (None, None)
    if user.target in (torch.ops.aten.gelu.default, torch.nn.functional.gelu):
        approximate = user.args[1] if len(user.args) > 1 else user.kwargs.get("approximate", "none")
        if approximate == "none":
            return user, "gelu"
    return None, None


class LowerSparseLinears(Pass):
    """Replace sparse-annotated linears by the target's kernel modules (:func:`sparsecc.runtime.make_linear`).

    Ensures: no linear annotated with a sparse format is still a plain ``aten.linear``.

    Parameters
    ----------
    fuse_epilogue : bool
        Fuse a following ReLU / exact GELU into the kernel.
    """

    name = "lower_sparse_linears"
    requires = ("choose_format",)

    def __init__(self, fuse_epilogue: bool = True):
        self.fuse_epilogue = fuse_epilogue

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        gm = graph.gm
        removed_attrs = []
        changed = False
        for site in prunable_sites(graph):
            ann = get_annotation(site.node)
            if ann is None or ann.format in (None, "dense"):
                continue
            w = graph.tensor(site.weight).detach()
            bias = graph.tensor(site.bias).detach() if site.bias else None
            user, act = fusable_activation(site.node) if self.fuse_epilogue else (None, None)
            mod = make_linear(ctx.target, ann.candidate.to_storage(w), bias, act, tuning_db=ctx.tuning_db)
            sub = fresh_attr(gm, "sparsecc_" + site.name)
            gm.add_submodule(sub, mod)
            last = user if user is not None else site.node
            x = site.node.args[0]  # not site.input: an earlier fusion may have replaced it
            with gm.graph.inserting_after(last):
                new = gm.graph.call_module(sub, (x,))
            new.meta.update({k: v for k, v in last.meta.items() if k != "sparsecc"})
            new.meta["sparsecc"] = ann
            site.node.meta.pop("sparsecc", None)
            last.replace_all_uses_with(new)
            if user is not None:
                gm.graph.erase_node(user)
            gm.graph.erase_node(site.node)
            annotate(new, site.name, kernel=mod.kernel_name, epilogue=act)
            removed_attrs += [t for t in (site.weight, site.bias) if t]
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            delete_unused_attrs(gm, removed_attrs)
            if graph.method == "fx":
                gm.delete_all_unused_submodules()
        return PassResult(graph, changed)

    def ensures(self, graph: SparseGraph) -> None:
        """No sparse-annotated node is still a plain linear.

        Raises
        ------
        PassError
            A linear annotated with a sparse format was not lowered.
        """
        for site in prunable_sites(graph):
            ann = get_annotation(site.node)
            if ann is not None and ann.format not in (None, "dense"):
                raise PassError(f"layer {site.name!r} is annotated {ann.candidate.label} but still runs as "
                                f"{site.node.target}")


class ChainSparseLinears(Pass):
    """Let a sparse linear write its output in the layout the next sparse linear reads (rewrite pass).

    For every kernel module whose only reader is another kernel module taking it as its input (the up and
    down projections of a transformer's feed-forward block, with the activation fused into the first),
    asks the first to hand its output over in the second's layout (``chain_to``; the unstructured
    kernels: the X^T panels, so the second skips its transpose of X). Modules without ``chain_to`` are
    left alone. The graph is unchanged; the modules are configured.

    Ensures: every chained pair is a direct producer/consumer edge with no other reader.
    """

    name = "chain_sparse_linears"
    requires = ("lower_sparse_linears",)

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        gm = graph.gm
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_module" or len(node.users) != 1:
                continue
            (user,) = node.users
            if user.op != "call_module" or user.args[:1] != (node,) or len(user.args) != 1 or user.kwargs:
                continue
            first, second = gm.get_submodule(node.target), gm.get_submodule(user.target)
            chain = getattr(first, "chain_to", None)
            if chain is not None and chain(second):
                ann = get_annotation(node)
                if ann is not None:
                    annotate(node, ann.name, kernel=(ann.kernel or "") + "_po")  # the panels-out variant
                changed = True
        return PassResult(graph, changed)
