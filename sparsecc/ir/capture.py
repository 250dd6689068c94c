"""Capture a PyTorch model into a :class:`SparseGraph`.

``torch.export`` first (dynamic dims through ``dynamic_shapes``), then
``torch.fx.symbolic_trace`` when export fails. The model is deep-copied first:
sparsecc prunes and rewrites its own copy, never the user's module.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import CaptureError
from .graph import InputSpec, SparseGraph, iter_tensor_leaves


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Split ``example_inputs`` into ``(args, kwargs)``.

    A tensor is one positional input, a tuple/list are positional inputs, a dict
    holds keyword inputs (e.g. a Hugging Face tokenizer's output).
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}")


def capture(model: torch.nn.Module, example_inputs: Any,
            dynamic_shapes: Optional[Any] = None) -> SparseGraph:
    """Capture ``model`` into a graph that sparsecc owns.

    Parameters
    ----------
    model : torch.nn.Module
        The user's model; it is deep-copied and never modified.
    example_inputs : Tensor, tuple or dict
        Inputs the model is called with (see :func:`normalize_inputs`).
    dynamic_shapes : optional
        ``torch.export`` dynamic-shape spec (``{"x": {0: Dim("batch")}}``);
        dims named there are dynamic at run time, all others are fixed.

    Returns
    -------
    SparseGraph

    Raises
    ------
    CaptureError
        Neither ``torch.export`` nor ``torch.fx.symbolic_trace`` could capture the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    owned = copy.deepcopy(model).eval()
    for p in owned.parameters():
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(owned, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        gm = ep.module()
        specs = _specs_from_placeholders(gm, args, kwargs)
        return SparseGraph(gm, "export", specs)
    except Exception as export_err:  # noqa: BLE001 - any export failure falls back to fx
        if dynamic_shapes is not None and _is_user_error(export_err):
            raise CaptureError(f"torch.export rejected dynamic_shapes: {export_err}") from export_err
        try:
            gm = fx.symbolic_trace(owned)
            if args and not kwargs:
                ShapeProp(gm).propagate(*args)
        except Exception as fx_err:  # noqa: BLE001
            raise CaptureError(
                f"could not capture {type(model).__name__}: torch.export failed with "
                f"{type(export_err).__name__}: {str(export_err).splitlines()[0] if str(export_err) else ''}; "
                f"torch.fx.symbolic_trace failed with {type(fx_err).__name__}: {fx_err}") from fx_err
        # fx graphs are shape-agnostic: leading dims dynamic, feature (last) dim fixed
        specs = [InputSpec(p, (None,) * (t.dim() - 1) + tuple(t.shape[-1:]), t.dtype)
                 for p, t in iter_tensor_leaves((args, kwargs))]
        return SparseGraph(gm, "fx", specs)


def _is_user_error(err: Exception) -> bool:
    return type(err).__name__ in ("UserError", "ConstraintViolationError")


def _specs_from_placeholders(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[InputSpec]:
    leaves = list(iter_tensor_leaves((args, kwargs)))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = []
    vals = [n.meta.get("val") for n in placeholders]
    tensor_vals = [v for v in vals if isinstance(v, torch.Tensor)]
    for i, (path, t) in enumerate(leaves):
        val = tensor_vals[i] if i < len(tensor_vals) else None
        if val is None:
            shape = tuple(t.shape)
        else:
            shape = tuple(None if isinstance(d, torch.SymInt) else int(d) for d in val.shape)
        specs.append(InputSpec(path, shape, t.dtype))
    return specs
