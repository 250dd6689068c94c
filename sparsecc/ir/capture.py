"""Capture a PyTorch model into a :class:`SparseGraph`.

``torch.export`` first, then ``torch.fx.symbolic_trace`` when export fails. The model is deep-copied first:
sparsecc prunes and rewrites its own copy, never the user's module.

Shapes follow ``torch.compile``'s defaults: with ``dynamic_shapes="auto"`` (what :func:`sparsecc.compile` passes
unless told otherwise) the leading (batch) dim of every tensor input, and the second (sequence) dim of integer
inputs of two or more dims (token ids and masks of Hugging Face models), are marked ``torch.export.Dim.AUTO``:
dynamic where the model allows it, fixed where it does not. Size-1 examples are traced size-obliviously
(``backed_size_oblivious``), so a batch-1 example still compiles a batch-dynamic graph.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import CaptureError, InvalidArgumentError, TrainModeWarning
from .graph import InputSpec, SparseGraph, iter_tensor_leaves


def check_model(model: Any, caller: str) -> None:
    """Raise :class:`InvalidArgumentError` unless ``model`` is a ``torch.nn.Module`` (the message names the call)."""
    if not isinstance(model, torch.nn.Module):
        hint = " (wrap a function in a torch.nn.Module whose forward calls it)" if callable(model) else ""
        raise InvalidArgumentError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}{hint}")


def warn_if_training(model: torch.nn.Module, caller: str) -> None:
    """Warn (:class:`TrainModeWarning`) when ``model`` or a submodule is in training mode.

    sparsecc compiles inference: dropout off, batch norm on its running statistics, as after
    ``model.eval()``. A warning, not an error: that is what a deployment build wants, and the user's model is
    left as it is (sparsecc works on its own copy in eval mode); but the compiled module then differs from
    ``model(x)`` in training mode, which the user should hear about.
    """
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if training:
        warnings.warn(f"{caller}: the model is in training mode ({len(training)} modules, e.g. {training[0]!r}); "
                      "sparsecc compiles its inference semantics, as model.eval() gives (dropout off, batch norm "
                      "on running statistics). Call model.eval() first to silence this.", TrainModeWarning,
                      stacklevel=3)


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
        if isinstance(dynamic_shapes, str):
            if dynamic_shapes != "auto":
                raise InvalidArgumentError(f"dynamic_shapes must be 'auto', None or a torch.export spec, got "
                                           f"{dynamic_shapes!r}")
            ep = _export_auto(owned, args, kwargs)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(owned, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        gm = ep.module()
        specs = _specs_from_placeholders(gm, args, kwargs, ep.range_constraints)
        return SparseGraph(gm, "export", specs, arg_names=_positional_names(model, len(args)),
                           kwarg_names=tuple(kwargs))
    except InvalidArgumentError:
        raise
    except Exception as export_err:  # noqa: BLE001 - any export failure falls back to fx
        if dynamic_shapes is not None and not isinstance(dynamic_shapes, str) and _is_user_error(export_err):
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
        return SparseGraph(gm, "fx", specs, arg_names=_positional_names(model, len(args)),
                           kwarg_names=tuple(kwargs))


def auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict):
    """The ``torch.export`` spec of ``dynamic_shapes="auto"``: ``Dim.AUTO`` on dim 0 of every tensor input and on
    dim 1 of integer inputs with ≥ 2 dims (token ids, attention masks); None when the inputs cannot be named
    (positional inputs of a forward without named parameters, mixed with keyword inputs)."""
    auto = torch.export.Dim.AUTO

    def leaf(v):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        dims = {0: auto}
        if v.dim() >= 2 and not (v.dtype.is_floating_point or v.dtype.is_complex) and v.dtype != torch.bool:
            dims[1] = auto
        return dims

    spec_args = tuple(torch.utils._pytree.tree_map(leaf, a) for a in args)
    if not kwargs:
        return spec_args
    names = _positional_names(model, len(args))
    if len(names) != len(args):
        return None
    spec = dict(zip(names, spec_args))
    spec.update({k: torch.utils._pytree.tree_map(leaf, v) for k, v in kwargs.items()})
    return spec


def _export_auto(model: torch.nn.Module, args: tuple, kwargs: dict):
    """``torch.export`` with :func:`auto_dynamic_shapes`, size-oblivious for size-1 examples; static when the
    model does not export with dynamic dims."""
    import torch.fx.experimental._config as fx_config

    spec = auto_dynamic_shapes(model, args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec is not None:
            for oblivious in (True, False):
                try:
                    with fx_config.patch(backed_size_oblivious=oblivious):
                        return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)
                except Exception:  # noqa: BLE001 - try the next, stricter capture
                    continue
        return torch.export.export(model, args, kwargs, strict=False)


def _positional_names(model: torch.nn.Module, n: int) -> tuple:
    """Names of the first ``n`` parameters of ``model.forward`` (for keyword calls of a module captured with
    positional inputs); () when the signature does not name them."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(named[:n]) if len(named) >= n else ()


def _is_user_error(err: Exception) -> bool:
    return type(err).__name__ in ("UserError", "ConstraintViolationError")


def _dim_range(d, range_constraints: dict):
    """``(min, max)`` of a symbolic size from ``torch.export``'s range constraints (max None: unbounded)."""
    import sympy
    from torch.utils._sympy.numbers import int_oo

    vr = range_constraints.get(d.node.expr) if hasattr(d, "node") else None
    if vr is None:
        return None
    def finite(v):
        try:
            return None if v in (sympy.oo, -sympy.oo, int_oo, -int_oo) or not v.is_finite else int(v)
        except (TypeError, ValueError, AttributeError):  # sympy infinities of other kinds
            return None

    lo = finite(vr.lower)
    return (0 if lo is None else lo, finite(vr.upper))


def _specs_from_placeholders(gm: fx.GraphModule, args: tuple, kwargs: dict,
                             range_constraints: Optional[dict] = None) -> list[InputSpec]:
    leaves = list(iter_tensor_leaves((args, kwargs)))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = []
    vals = [n.meta.get("val") for n in placeholders]
    tensor_vals = [v for v in vals if isinstance(v, torch.Tensor)]
    for i, (path, t) in enumerate(leaves):
        val = tensor_vals[i] if i < len(tensor_vals) else None
        ranges: tuple = ()
        if val is None:
            shape = tuple(t.shape)
        else:
            shape = tuple(None if isinstance(d, torch.SymInt) else int(d) for d in val.shape)
            ranges = tuple(_dim_range(d, range_constraints or {}) if isinstance(d, torch.SymInt) else None
                           for d in val.shape)
        specs.append(InputSpec(path, shape, t.dtype, ranges))
    return specs
