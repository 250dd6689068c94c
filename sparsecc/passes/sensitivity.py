"""Sensitivity analysis as a graph pass: metric drop per linear layer and candidate (analysis pass).

The graph-level counterpart of :func:`sparsecc.sparsify.sensitivity.sensitivity_analysis`
(which :func:`sparsecc.sparsify` runs on the eager model): every prunable linear
of the captured graph is pruned alone to each candidate (pattern, density), the
user's metric is evaluated on the graph module, and the drops are written to
``node.meta["sparsecc.sensitivity"]`` (candidate key -> drop). Weights are
restored after every measurement.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

from ..ir.graph import SparseGraph
from ..sparsify.patterns import UNSTRUCTURED, Pattern
from ..sparsify.sensitivity import sensitivity_analysis
from .base import Pass, PassContext, PassResult
from .prune import prunable_sites

#: Node-metadata key written by :class:`SensitivityAnalysis`.
SENSITIVITY_KEY = "sparsecc.sensitivity"


class SensitivityAnalysis(Pass):
    """Per linear layer, the metric drop when that layer alone is pruned (magnitude, one-shot).

    Parameters
    ----------
    eval_fn : callable (graph module) -> float
        Metric on a calibration split, higher is better.
    candidates : sequence of (Pattern, density)
        Default: unstructured at densities 0.5, 0.3, 0.2, 0.1, 0.05. Candidates a layer's
        shape cannot carry (a block that does not divide it) are skipped for that layer.
    cache_path : path, optional
        JSON file caching the table (see :func:`sensitivity_analysis`).
    """

    name = "sensitivity_analysis"
    requires = ()

    def __init__(self, eval_fn: Callable, candidates: Optional[Sequence] = None,
                 cache_path: Optional[Path] = None, progress: bool = False):
        self.eval_fn = eval_fn
        self.candidates = list(candidates) if candidates is not None else \
            [(UNSTRUCTURED, d) for d in (0.5, 0.3, 0.2, 0.1, 0.05)]
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.progress = progress

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        sites = prunable_sites(graph)
        layers = {s.name: SimpleNamespace(weight=graph.tensor(s.weight)) for s in sites}
        cands = {s.name: [(p, d) for p, d in self.candidates
                          if isinstance(p, Pattern) and p.fits(tuple(layers[s.name].weight.shape))] for s in sites}
        table = sensitivity_analysis(layers, cands, lambda n, w: w.abs(), lambda: self.eval_fn(graph.gm),
                                     self.cache_path, self.progress)
        for s in sites:
            s.node.meta[SENSITIVITY_KEY] = dict(table["drop"].get(s.name, {}))
        return PassResult(graph, False, {"base": table["base"], "layers": len(sites)})
