"""The compiled module users call like their model."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..errors import InputShapeError, InvalidArgumentError, NotPicklableError, RoutingError, TrainModeWarning
from ..ir.annotations import ROUTING_META_KEY, LayerAnnotation, get_annotation
from ..ir.graph import SparseGraph, as_call, iter_tensor_leaves


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


class CompiledModule(torch.nn.Module):
    """A model compiled by sparsecc: call it with torch tensors like the model.

    It is a ``torch.nn.Module`` for inference: it nests inside a bigger model, ``state_dict()`` holds the sparse
    formats' arrays (values, indices, row pointers) and the dense rest, and ``load_state_dict`` of a module
    compiled the same way restores them (kernels read the buffers in place; nothing is rebuilt). Calls run
    under ``torch.no_grad``; ``train()`` keeps the inference semantics (with a warning). It cannot move to
    another device or dtype (compile for that target instead), and it cannot be pickled or deep-copied: TVM
    kernels are not picklable (:class:`NotPicklableError`).

    Attributes
    ----------
    graph : SparseGraph
        The rewritten graph (``print(cm.graph)`` shows it as a table).
    target : sparsecc.targets.Target
    compile_seconds : float
        Wall time of :func:`sparsecc.compile`.
    original_weight_bytes : int
        Parameter and buffer bytes of the user's model.
    prune_block : (rows, cols) or None
        Block shape the model was pruned with (None when ``sparsity=None``).
    """

    def __init__(self, graph: SparseGraph, target, compile_seconds: float, original_weight_bytes: int,
                 history: Optional[list] = None, prune_block: Optional[tuple] = None):
        super().__init__()
        self.graph = graph
        #: the rewritten graph module, a submodule (its buffers are the state_dict's)
        self.graph_module = graph.gm
        #: the example inputs of the compile (export uses them for its static shapes)
        self.example_inputs = None
        self.target = target
        self.compile_seconds = compile_seconds
        self.original_weight_bytes = original_weight_bytes
        self.history = history or []
        self.prune_block = prune_block
        #: the calibration calls of activation routing (``levels()`` measures on them)
        self.calibration: list = []
        #: what structured pruning removed before compiling (``compile(channel_sparsity=...)``), or None
        self.channels = None
        self._levels = None
        self._gated = None  # the routed layers, found once (the graph does not change after compile)

    def forward(self, *args, level: Optional[int] = None, **kwargs):
        """Run the compiled model under ``torch.no_grad``; ``level``: the routing level of this call only.

        Raises
        ------
        InputShapeError, InputDtypeError
            An input differs from the compiled input spec (the message names the expected shape).
        InvalidArgumentError
            ``level`` is not a level of the compiled module.
        """
        if level is not None:
            before = self.level
            self.set_level(level)
            try:
                return self(*args, **kwargs)
            finally:
                self.set_level(before)
        args, kwargs = self.graph.bind(args, kwargs)
        self.graph.check_inputs(args, kwargs)
        with torch.no_grad():
            try:
                return self.graph.gm(*args, **kwargs)
            except AssertionError as e:  # a guard of torch.export's graph that check_inputs did not foresee
                if "Guard failed" not in str(e):
                    raise
                raise InputShapeError(f"the inputs break a shape guard of the compiled graph ({e}); expected "
                                      + "; ".join(f"{s.path}: {s.describe()}" for s in self.graph.input_specs)) from e

    # -------------------------------------------------------------------------------- routing levels
    def gated_layers(self) -> list:
        """``(layer name, GatedLinear)`` of every activation-routed layer, in graph order."""
        if self._gated is None:
            self._gated = [(m.name, m) for m in (self.graph.gm.get_submodule(n.target) for n in self.graph.graph.nodes
                                                   if n.op == "call_module")
                           if getattr(m, "format", None) == "gated"]
        return list(self._gated)

    @contextlib.contextmanager
    def ungated(self):
        """Within the block, every routed layer runs its plain dense product (the reference of :meth:`levels`)."""
        gated = self.gated_layers()
        for _, mod in gated:
            mod.bypass = True
        try:
            yield
        finally:
            for _, mod in gated:
                mod.bypass = False

    @property
    def num_levels(self) -> int:
        """Run-time levels of the routed layers (1 when nothing is routed)."""
        gated = self.gated_layers()
        return gated[0][1].num_levels if gated else 1

    @property
    def level(self) -> int:
        gated = self.gated_layers()
        return gated[0][1].level if gated else 0

    def set_level(self, level: int) -> None:
        """Switch every routed layer to the gate thresholds of ``level`` (0: the densest); nothing is rebuilt.

        Raises
        ------
        InvalidArgumentError
            ``level`` is not an int in ``[0, num_levels)``.
        """
        n = self.num_levels
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < n:
            raise InvalidArgumentError(f"level must be an int in [0, {n}) (the module has {n} routing level"
                                       f"{'s' if n != 1 else ''}), got {level!r}")
        for _, mod in self._gated:
            mod.level = level  # validated above for all: the layers share the level count

    def levels(self, runs: int = 10, refresh: bool = False) -> list:
        """Every routing level's activation densities, latency and fidelity on the calibration data.

        Latency: median ms of the compiled module on the first calibration call, the levels and the ungated
        module timed in interleaved rounds. Fidelity: mean cosine similarity (per sample, over the first tensor
        output) and max abs difference to the ungated module's output, over every calibration call.

        Returns
        -------
        list of dict
            ``level``, ``density`` (target, mean over layers), ``realized_density`` (measured per token),
            ``ms``, ``ungated_ms``, ``cosine``, ``max_abs_diff``.

        Raises
        ------
        RoutingError
            Nothing is routed, or no calibration data.
        """
        import torch.nn.functional as F

        from .timing import interleaved_ms

        gated = self.gated_layers()
        if not gated:
            raise RoutingError("the compiled module has no activation-routed layer (compile with "
                               "activation_density=...)")
        if not self.calibration:
            raise RoutingError("levels() needs the calibration data the module was compiled with")
        if self._levels is not None and not refresh:
            return self._levels
        calls = [as_call(c) for c in self.calibration]
        before = self.level

        def first_out(out):
            return next(t for _, t in iter_tensor_leaves(out)).float()

        acts: dict = {}

        def recorder(name):
            def hook(mod, inp):
                acts.setdefault(name, []).append(inp[0].detach())
            return hook

        try:
            hooks = [mod.register_forward_pre_hook(recorder(name)) for name, mod in gated]
            try:
                with self.ungated():
                    refs = [first_out(self(*a, **k)) for a, k in calls]
            finally:
                for h in hooks:
                    h.remove()
            rows = []
            a0, k0 = calls[0]
            for lv in range(self.num_levels):
                self.set_level(lv)
                cos, diff = [], 0.0
                for (a, k), ref in zip(calls, refs):
                    out = first_out(self(*a, **k))
                    cos.append(F.cosine_similarity(out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1),
                                                   dim=-1))
                    diff = max(diff, float((out - ref).abs().max()))
                dens = [mod.densities[lv] for _, mod in gated if mod.densities[lv] is not None]
                real = [mod.realized_density(torch.cat([x.reshape(-1, mod.shape[1]) for x in acts[name]]), lv)
                        for name, mod in gated]
                rows.append({"level": lv, "density": sum(dens) / len(dens) if dens else None,
                             "realized_density": sum(real) / len(real), "cosine": float(torch.cat(cos).mean()),
                             "max_abs_diff": diff})

            def at(lv):
                return lambda: self(*a0, level=lv, **k0)

            def ungated():
                with self.ungated():
                    return self(*a0, **k0)

            t = interleaved_ms({"ungated": ungated} | {lv: at(lv) for lv in range(self.num_levels)}, runs=runs)
            for r in rows:
                r["ms"], r["ungated_ms"] = t[r["level"]], t["ungated"]
        finally:
            self.set_level(before)
        self._levels = rows
        return rows

    @property
    def layers(self) -> list[LayerAnnotation]:
        """Annotations of every prunable layer, in graph order."""
        return [a for a in (get_annotation(n) for n in self.graph.graph.nodes) if a is not None]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights the compiled module holds (sparse values, indices and dense rest)."""
        return module_bytes(self.graph.gm)

    def report(self, html=None, **html_options) -> str:
        """Per-layer table: name, weight shape, pattern, block, density, format, kernel, est./measured ms.

        ``html=path`` also writes the self-contained HTML page of :func:`sparsecc.report.html_report` (the
        table, time per layer dense against sparse, a density map of each weight, the rewritten graph, the
        accuracy/latency curve of ``sparsify_result=`` or of the routing levels); ``html_options`` go to it.
        """
        if html is not None:
            from ..report import html_report

            html_report(self, html, **html_options)
        head = ("layer", "weight (N, K)", "pattern", "block", "density", "format", "kernel",
                "est ms", "meas ms", "dense ms")
        rows = [head]
        for a in self.layers:
            cand = a.candidate
            est = a.est_ms.get(cand.key) if cand is not None else None
            rows.append((
                a.name, "x".join(map(str, a.weight_shape)), a.pattern or "",
                "x".join(map(str, a.block_shape)) if a.block_shape else "",
                "" if a.density is None else f"{a.density:.3f}",
                cand.label if cand is not None else "",
                (a.kernel or "") + (f"+{a.epilogue}" if a.epilogue and a.epilogue not in (a.kernel or "") else ""),
                "" if est is None else f"{est:.3f}",
                "" if a.measured_ms is None else f"{a.measured_ms:.3f}",
                "" if a.dense_ms is None else f"{a.dense_ms:.3f}",
            ))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        n_sparse = sum(1 for a in self.layers if a.format not in (None, "dense"))
        gated = self.gated_layers()
        if gated:
            lines += ["", f"activation routing: {len(gated)} linear{'s' if len(gated) != 1 else ''} read gated "
                      f"activations, level {self.level} of "
                      f"{self.num_levels} (densities per level: "
                      + ", ".join("/".join("?" if d is None else f"{d:.2f}" for d in mod.densities)
                                  for _, mod in gated[:1]) + ")"]
            metas = {n.meta[ROUTING_META_KEY]["name"]: n.meta[ROUTING_META_KEY] for n in self.graph.graph.nodes
                     if ROUTING_META_KEY in n.meta and n.op == "call_module"}
            for name, mod in gated:
                meta = metas.get(name, {})
                line = (f"  {name}: {mod.shape[1]} neurons, thresholds "
                        + ", ".join("dense" if i in mod.dense_levels else f"{float(t):.4g}"
                                    for i, t in enumerate(mod.thresholds.reshape(-1))))
                if meta.get("calibrated_density"):
                    line += "; calibration density " + "/".join(f"{d:.2f}" for d in meta["calibrated_density"])
                if meta.get("gated_ms"):
                    line += (f"; ms gated {'/'.join(f'{t:.3f}' for t in meta['gated_ms'])} against dense "
                             f"{meta['dense_ms']:.3f}")
                lines.append(line)
        lines.append("")
        if self.channels is not None:
            lines.append(f"structured pruning first: {self.channels.summary()}")
        lines.append(
            f"{n_sparse}/{len(self.layers)} linears on sparse kernels; weights "
            f"{self.original_weight_bytes / 2**20:.1f} MiB -> {self.weight_bytes / 2**20:.1f} MiB; "
            f"target {self.target.describe()}; compiled in {self.compile_seconds:.1f} s")
        return "\n".join(lines)

    def to_mlir(self, example_inputs=None, *, lower: bool = True, nm: str = "csr", pruned_dense: bool = True):
        """The rewritten graph as MLIR (linalg on tensors, ``#sparse_tensor.encoding`` on the sparse weights),
        with torch-mlir; see :func:`sparsecc.runtime.mlir.to_mlir`.

        Returns
        -------
        MlirModule
            ``.text``, ``.verify()``, ``.run(*inputs)`` (sparsifier passes and MLIR's ExecutionEngine).
        """
        from .mlir import to_mlir

        return to_mlir(self, example_inputs, lower=lower, nm=nm, pruned_dense=pruned_dense)

    def export(self, path, *, overwrite: bool = False, example_inputs=None):
        """Write a deployment folder: Relax VM ``model.so`` for the target, ``params.bin``, ``manifest.json``.

        For ``"x86"`` the artifact runs on this host (``sparsecc.load(path)`` returns a callable); for ARM it
        is cross-compiled for aarch64 (copy it to the board with the aarch64 TVM runtime, or run it with
        :func:`sparsecc.runtime.export.run_artifact_under_qemu`). Shapes are fixed to the example inputs.
        See :mod:`sparsecc.runtime.export`.

        Raises
        ------
        ArtifactError
            ``path`` is a non-empty folder and ``overwrite`` is False, or a file.
        UnsupportedOpError, ToolchainError
        """
        from .export import export_compiled

        return export_compiled(self, path, overwrite=overwrite, example_inputs=example_inputs)

    # -------------------------------------------------------------------------------- nn.Module behaviour
    def train(self, mode: bool = True):
        """Compiled modules run inference only; ``train(True)`` warns and keeps it (returns self)."""
        if mode:
            import warnings

            warnings.warn("a CompiledModule runs the inference (eval) semantics of its model; train() changes "
                          "nothing (fine-tune the torch model, then compile it again)", TrainModeWarning,
                          stacklevel=2)
        return self

    def _apply(self, fn, recurse=True):
        raise InvalidArgumentError(
            "a CompiledModule is bound to its target's device and float32 kernels; it cannot be moved or cast "
            "(.to/.cuda/.half/...): compile the model for that target instead (sparsecc.compile(..., target=...))")

    def to(self, *args, **kwargs):
        """No-op for the module's own device and float32; otherwise :class:`InvalidArgumentError`."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        own = torch.device(self.target.torch_device)
        if (device is None or torch.device(device).type == own.type) and dtype in (None, torch.float32):
            return self
        return self._apply(None)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy a ``state_dict`` of a module compiled the same way into this one's buffers.

        Raises
        ------
        InvalidArgumentError
            A key is missing or unexpected (``strict``), or an array's shape differs: the state is from a model
            compiled with other sparsity, pattern or layer shapes (the message names the first keys).
        """
        if assign:
            raise InvalidArgumentError("load_state_dict(assign=True) would replace the aligned buffers the "
                                       "kernels read; use assign=False")
        own = self.state_dict()
        bad = [f"{k}: {tuple(v.shape)} here, {tuple(state_dict[k].shape)} given" for k, v in own.items()
               if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)]
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if bad or (strict and (missing or unexpected)):
            parts = ([f"shape mismatch ({'; '.join(bad[:3])})"] if bad else []) + (
                [f"missing keys {missing[:3]}"] if strict and missing else []) + (
                [f"unexpected keys {unexpected[:3]}"] if strict and unexpected else [])
            raise InvalidArgumentError("state_dict does not fit this compiled module: " + ", ".join(parts)
                                       + " (compile the same model with the same sparsity and pattern first)")
        with torch.no_grad():
            for k, v in own.items():
                if k in state_dict:
                    v.copy_(state_dict[k])
        self._levels = None
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def __reduce_ex__(self, protocol):
        raise NotPicklableError("a CompiledModule holds TVM kernels and cannot be pickled or deep-copied: save "
                                "cm.state_dict() and load it into a module compiled the same way, or write a "
                                "deployment folder with cm.export(path)")

    def __deepcopy__(self, memo):
        return self.__reduce_ex__(2)

    def __repr__(self) -> str:
        return f"CompiledModule(target={self.target.name!r}, layers={len(self.layers)})"
