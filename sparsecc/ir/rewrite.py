"""Helpers every FX rewrite shares: fresh attribute names, dropping unused attributes, example rows, the
activation a conv epilogue can fuse."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx as fx

__all__ = ["conv_activation_of", "delete_unused_attrs", "example_rows", "fresh_attr", "val_shape"]

_RELU = (torch.ops.aten.relu.default, torch.relu, torch.nn.functional.relu)
_RELU6 = (torch.ops.aten.relu6.default,)
_HARDTANH = (torch.ops.aten.hardtanh.default,)


def conv_activation_of(node: fx.Node) -> Optional[str]:
    """"relu" / "relu6" (``relu6`` or ``hardtanh(0, 6)``) when ``node`` applies one of them to its first
    argument, else None: the activations a conv epilogue fuses (:data:`sparsecc.codegen.conv.CONV_ACTIVATIONS`)."""
    if node.target in _RELU and len(node.args) == 1 and not node.kwargs.get("inplace"):
        return "relu"
    if node.target in _RELU6 and len(node.args) == 1:
        return "relu6"
    if node.target in _HARDTANH:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        if float(lo) == 0.0 and float(hi) == 6.0:
            return "relu6"
    return None


def fresh_attr(gm: torch.nn.Module, base: str) -> str:
    """``base`` (dots replaced by ``_``), or ``base_1``, ``base_2``, ... : a name ``gm`` has no attribute of."""
    base = base.replace(".", "_")
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def delete_unused_attrs(gm: fx.GraphModule, targets: Optional[Iterable[str]] = None) -> None:
    """Delete parameters and buffers no ``get_attr`` reads any more.

    ``targets``: the attribute paths to consider (None: every parameter and buffer of ``gm``).
    Kernel modules called by the graph own their buffers and are never touched.
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    if targets is None:
        targets = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    for t in targets:
        owner, _, attr = t.rpartition(".")
        if t in used or any(owner == c or owner.startswith(c + ".") for c in called):
            continue
        try:
            mod = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            continue
        if attr in getattr(mod, "_parameters", {}) or attr in getattr(mod, "_buffers", {}) or hasattr(mod, attr):
            delattr(mod, attr)


def val_shape(node) -> Optional[tuple]:
    """Static shape of ``node``'s example value (symbolic dims at their hint, else 1), None when unknown."""
    val = node.meta.get("val", node.meta.get("tensor_meta")) if isinstance(node, fx.Node) else None
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, torch.SymInt):
            hint = getattr(d.node, "hint", None)
            d = hint if hint is not None else 1
        out.append(int(d))
    return tuple(out)


def example_rows(node: fx.Node) -> int:
    """Rows M of X = prod of all but the last dim of ``node``'s example value (1 if unknown)."""
    shape = val_shape(node)
    m = 1
    for d in (shape or ())[:-1]:
        m *= d
    return m
