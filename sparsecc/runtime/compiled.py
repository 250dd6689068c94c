"""The compiled module users call like their model."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputShapeError
from ..ir.annotations import LayerAnnotation, get_annotation
from ..ir.graph import SparseGraph


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


class CompiledModule:
    """A model compiled by sparsecc: call it with torch tensors like the model.

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
        self.graph = graph
        self.target = target
        self.compile_seconds = compile_seconds
        self.original_weight_bytes = original_weight_bytes
        self.history = history or []
        self.prune_block = prune_block

    def __call__(self, *args, **kwargs):
        """Run the compiled model under ``torch.no_grad``.

        Raises
        ------
        InputShapeError, InputDtypeError
            An input differs from the compiled input spec (the message names the expected shape).
        """
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

    @property
    def layers(self) -> list[LayerAnnotation]:
        """Annotations of every prunable layer, in graph order."""
        return [a for a in (get_annotation(n) for n in self.graph.graph.nodes) if a is not None]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights the compiled module holds (sparse values, indices and dense rest)."""
        return module_bytes(self.graph.gm)

    def report(self) -> str:
        """Per-layer table: name, weight shape, pattern, block, density, format, kernel, est./measured ms."""
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
        lines.append("")
        lines.append(
            f"{n_sparse}/{len(self.layers)} linears on sparse kernels; weights "
            f"{self.original_weight_bytes / 2**20:.1f} MiB -> {self.weight_bytes / 2**20:.1f} MiB; "
            f"target {self.target.describe()}; compiled in {self.compile_seconds:.1f} s")
        return "\n".join(lines)

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

    def __repr__(self) -> str:
        return f"CompiledModule(target={self.target.name!r}, layers={len(self.layers)})"
