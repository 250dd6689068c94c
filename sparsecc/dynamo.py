"""``torch.compile(model, backend="sparsecc", options={...})``: sparsecc as a TorchDynamo backend.

The backend is registered through the ``torch_dynamo_backends`` entry point of the package, so no import is
needed. Dynamo hands it each captured FX graph (graph breaks give several; the code between them stays eager)
with the model's weights as graph inputs. The backend

1. freezes the weights (as Inductor's ``freezing`` does: compiled inference reads the values they have at
   compile time; retrain, then ``torch._dynamo.reset()`` and compile again),
2. puts them back into modules named as in the user's model (``encoder.layer.0.attention.self.query``), with
   every ``linear`` / ``conv2d`` call of a module's weight turned back into an ``nn.Linear`` / ``nn.Conv2d``,
   so pruning, reports and tuning see the same layers as :func:`sparsecc.compile` does on the model itself,
3. compiles that module with :func:`sparsecc.compile` and the ``options`` (batch dims dynamic by default),
4. returns a callable taking dynamo's arguments.

A graph sparsecc cannot capture or lower (:class:`~sparsecc.errors.SparseccError`), or one without a weight to
prune, runs in eager torch with a :class:`~sparsecc.errors.FallbackWarning`. When dynamo recompiles a graph
with dynamic sizes (a call at a new batch size), the module compiled for the first shape already takes any
batch, so it is reused; when the first graph had its sizes baked in (dynamo specializes the first call), the
dynamic graph is compiled once more, keeping the per-layer formats chosen the first time (no kernel is timed or
built again).
"""

from __future__ import annotations

import re
import threading
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from .errors import FallbackWarning, InputShapeError, InvalidArgumentError, SparseccError
from .ir.modules import linear_and_conv_modules, module_at

__all__ = ["sparsecc_backend", "BACKEND_OPTIONS", "STATS", "reset"]

#: options of ``torch.compile(..., backend="sparsecc", options=...)``: keyword arguments of sparsecc.compile
BACKEND_OPTIONS = ("target", "sparsity", "pattern", "block_shape", "measure", "tuning_db", "dynamic_shapes",
                   "channel_sparsity")

_LOCK = threading.Lock()
#: compiled graphs, by (weights' identities, tensor ops, options): dynamo's dynamic recompile of a graph reuses
#: the batch-dynamic module compiled for its first shape
_CACHE: dict = {}
#: graphs given to the backend, compiled by sparsecc, served by a module compiled before, run eagerly
STATS = {"graphs": 0, "compiled": 0, "reused": 0, "eager": 0}


def reset() -> None:
    """Forget the compiled graphs (``torch._dynamo.reset()`` calls this)."""
    with _LOCK:
        _CACHE.clear()
        STATS.update(graphs=0, compiled=0, reused=0, eager=0)


def _fqn(source) -> str | None:
    """``encoder.layer.0.weight`` from a dynamo source naming a module's parameter or buffer, else None."""
    name = getattr(source, "name", None)
    name = name() if callable(name) else name if isinstance(name, str) else str(source)
    if "_parameters" not in name and "_buffers" not in name:
        return None
    parts = [a or b for a, b in re.findall(r"\['([^']*)'\]|\.(\w+)", name)][1:]  # [0]: the local (fn / self)
    parts = [p for p in parts if p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts) if parts else None


def _is_weight(node: fx.Node, value) -> str | None:
    grapharg = node.meta.get("grapharg")
    fqn = _fqn(grapharg.source) if grapharg is not None else None
    if fqn is None and isinstance(value, torch.nn.Parameter):
        fqn = f"_frozen.{node.name}"
    return fqn


def _split(fqn: str) -> tuple[str, str]:
    path, _, attr = fqn.rpartition(".")
    return path, attr


class _Frozen:
    """Dynamo's graph with its weights frozen into named modules, and how to call it from dynamo's arguments."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise InvalidArgumentError("dynamo passed a different number of inputs than the graph has")
        weights = {}  # placeholder -> fqn
        for n, v in zip(placeholders, example_inputs):
            if isinstance(v, torch.Tensor):
                fqn = _is_weight(n, v)
                if fqn is not None:
                    weights[n] = (fqn, v)
        root = torch.nn.Module()
        graph = fx.Graph()
        env: dict = {}
        by_source = {n.meta["grapharg"].source: n for n in placeholders if n.meta.get("grapharg") is not None}
        user = [(i, n) for i, (n, v) in enumerate(zip(placeholders, example_inputs))
                if n not in weights and isinstance(v, torch.Tensor)]
        for _, n in user:
            env[n] = graph.placeholder(n.name)
        modules = linear_and_conv_modules(gm, weights, root)
        for n, (fqn, v) in weights.items():
            path, attr = _split(fqn)
            owner = module_at(root, path)
            if attr not in owner._parameters and attr not in owner._buffers:
                t = v.detach()
                if isinstance(v, torch.nn.Parameter):
                    owner.register_parameter(attr, torch.nn.Parameter(t, requires_grad=False))
                else:
                    owner.register_buffer(attr, t)
        for n, v in zip(placeholders, example_inputs):
            if n in weights:
                env[n] = graph.get_attr(weights[n][0])
            elif isinstance(v, torch.SymInt) or isinstance(v, int):
                src = n.meta["grapharg"].source if n.meta.get("grapharg") is not None else None
                base = by_source.get(getattr(src, "base", None))
                idx = getattr(src, "idx", None)
                if base is None or base in weights or idx is None or "SIZE" not in str(getattr(src, "prop", "")):
                    raise InvalidArgumentError(f"graph input {n.name} is a symbolic int that is not a tensor size")
                env[n] = graph.call_function(torch.ops.aten.sym_size.int, (env[base], idx))
            elif n not in env:
                raise InvalidArgumentError(f"graph input {n.name} of type {type(v).__name__} is not supported")
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node in modules:
                path, x = modules[node]
                new = graph.call_module(path, (env[x],))
            else:
                new = graph.node_copy(node, lambda a: env[a])
            # no meta from dynamo: its fake tensors belong to dynamo's shape environment, which a dynamic
            # torch.export of this graph would then add symbols and guards to (breaking the frame's guards)
            new.meta = {}
            env[node] = new
        for name, sub in gm.named_children():  # submodules dynamo's graph calls (rare with inlining)
            if name not in root._modules:
                root.add_module(name, sub)
        self.module = fx.GraphModule(root, graph).eval()
        self.user_positions = [i for i, _ in user]
        self.example_inputs = tuple(example_inputs[i] for i in self.user_positions)
        self.weights = tuple((fqn, id(v)) for fqn, v in weights.values())
        self.n_prunable = len(modules)
        self.ops = tuple(str(n.target) for n in gm.graph.nodes
                         if n.op in ("call_function", "call_method", "call_module")
                         and isinstance(n.meta.get("example_value"), torch.Tensor))

    def call(self, entry, module) -> Callable:
        positions = self.user_positions

        def run(*args):
            return entry(module, tuple(args[i] for i in positions))

        return run


def _check_options(options: dict) -> dict:
    if not isinstance(options, dict):
        raise InvalidArgumentError(f"torch.compile(backend='sparsecc') options must be a dict, got "
                                   f"{type(options).__name__}")
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise InvalidArgumentError(f"unknown sparsecc backend option(s) {', '.join(map(repr, unknown))}; "
                                   f"known: {', '.join(BACKEND_OPTIONS)}")
    return dict(options)


def sparsecc_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None,
                     mode: str | None = None) -> Callable:
    """The TorchDynamo backend ``"sparsecc"``: compile one captured graph with :func:`sparsecc.compile`.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        A graph captured by TorchDynamo; the model's parameters and buffers are among its inputs.
    example_inputs : list
        Dynamo's example arguments of ``gm`` (weights, user tensors, symbolic sizes).
    options : dict, optional
        Keyword arguments of :func:`sparsecc.compile`: ``target``, ``sparsity``, ``pattern``, ``block_shape``,
        ``measure``, ``tuning_db``, ``dynamic_shapes``, ``channel_sparsity``.
    mode : str, optional
        ``torch.compile``'s mode; ignored (sparsecc's own measurement picks each layer's kernel).

    Returns
    -------
    callable
        Takes dynamo's arguments, returns the graph's outputs.

    Raises
    ------
    InvalidArgumentError
        An unknown option.

    Warns
    -----
    FallbackWarning
        The graph runs in eager torch: nothing in it to prune, or sparsecc could not compile it (the warning
        says why).
    """
    from .api import compile as sparsecc_compile

    opts = _check_options(options or {})
    STATS["graphs"] += 1
    try:
        frozen = _Frozen(gm, list(example_inputs))
    except InvalidArgumentError as e:
        STATS["eager"] += 1
        warnings.warn(f"sparsecc backend: this graph runs in eager torch ({e})", FallbackWarning, stacklevel=2)
        return gm.forward
    if frozen.n_prunable == 0:
        STATS["eager"] += 1
        warnings.warn("sparsecc backend: a graph without linear or conv weights runs in eager torch",
                      FallbackWarning, stacklevel=2)
        return gm.forward
    key = (frozen.weights, frozen.ops, repr(sorted(opts.items(), key=lambda kv: kv[0])))
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            # the same weights in another graph (dynamo re-traces a graph with dynamic sizes after a call at a
            # new shape): its modules lend their per-layer formats, so no kernel is timed again
            earlier = next((e for k, e in reversed(_CACHE.items()) if k[0] == key[0] and k[2] == key[2]), None)
            entry = _CACHE[key] = _Entry(opts, earlier.modules[-1] if earlier is not None and earlier.modules
                                         else None)
    try:
        cm = entry.module_for(frozen.module, frozen.example_inputs)
    except SparseccError as e:
        STATS["eager"] += 1
        warnings.warn(f"sparsecc backend: this graph runs in eager torch ({type(e).__name__}: {e})",
                      FallbackWarning, stacklevel=2)
        return gm.forward
    sparsecc_backend.last = cm  # the module of the latest graph, for tests and cm.report()
    return frozen.call(entry, frozen.module)


#: compiled modules kept per graph (one per input shape the graph could not run dynamically)
MAX_MODULES = 8


class _Entry:
    """The compiled modules of one graph: the first takes every shape its dynamic dims allow; a call it cannot
    run compiles one more module (keeping the formats), up to :data:`MAX_MODULES`."""

    def __init__(self, opts: dict, formats_from=None):
        self.opts, self.formats_from, self.modules = opts, formats_from, []

    def module_for(self, module: torch.nn.Module, inputs: tuple):
        """A compiled module whose input specs take ``inputs`` (compiled now if none does)."""
        for cm in self.modules:
            if _fits(cm, inputs):
                STATS["reused"] += 1
                return cm
        return self._compile(module, inputs)

    def _compile(self, module: torch.nn.Module, inputs: tuple):
        from .api import compile as sparsecc_compile

        if len(self.modules) >= MAX_MODULES:
            raise InputShapeError(f"the sparsecc backend compiled this graph for {MAX_MODULES} input shapes "
                                  f"already; got {[tuple(t.shape) for t in inputs]}")
        prior = self.modules[-1] if self.modules else self.formats_from
        inputs = tuple(t.detach().clone() for t in inputs)  # export marks dynamic dims on its examples
        # outside dynamo's tracing context: torch.export would add its shape guards to dynamo's frame
        with torch._guards.tracing(None):
            cm = sparsecc_compile(module, inputs, formats_from=prior, **self.opts)
        self.modules.append(cm)
        STATS["compiled"] += 1
        return cm

    def __call__(self, module: torch.nn.Module, inputs: tuple):
        for cm in self.modules:  # the module checks its input specs (and its graph's guards) itself
            try:
                return cm(*inputs)
            except InputShapeError:
                continue
        return self._compile(module, inputs)(*inputs)


def _fits(cm, inputs: tuple) -> bool:
    try:
        cm.graph.check_inputs(inputs, {})
        return True
    except SparseccError:
        return False


sparsecc_backend.last: Any = None
sparsecc_backend.reset = reset  # torch.compile's wrapper calls the backend's reset() on torch._dynamo.reset()
