"""Allocations: how an overall sparsity is spread over the layers.

An allocation is a small object with one interface, called by the driver
(:func:`~sparsecc.sparsify.engine.run_sparsify`) in this order:

* :meth:`Allocation.check` ``(problem)``: raise before any work if it cannot serve the problem;
* :meth:`Allocation.measure` ``(problem) -> table``: per layer ``{candidate key: cost}``
  (metric drops, output errors, or nothing), reported as each layer's sensitivity;
* :meth:`Allocation.allocate` ``(problem, table) -> plan``: ``{layer: (Pattern, density)}``,
  layers left dense missing;
* :meth:`Allocation.distribute` ``(engine, densities) -> densities``: at every pruning
  step of the engine, the per-layer densities it actually prunes to.

:class:`Uniform` prunes every layer to the sparsity (ERK densities for RigL on
request), :class:`Global` ranks all layers' weights against one threshold,
:class:`Sensitivity` chooses per layer from measured metric drops and predicted
latency, :class:`Error` from each layer's output error under layer-wise
pruning. :data:`ALLOCATIONS` maps the ``allocation=`` names of
:func:`sparsecc.sparsify` to the classes.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Optional, Union

from ..errors import InvalidSparsityError
from .data import first_batches
from .engine import PruningEngine
from .layerwise import LayerwisePruning
from .masks import strip_masks
from .patterns import UNSTRUCTURED, as_matrix, global_keep, group_scores
from .problem import SparsifyProblem
from .select import plan_from_choice, select_for_sparsity
from .sensitivity import option_key, model_fingerprint, sensitivity_analysis

__all__ = ["ALLOCATIONS", "Allocation", "Error", "Global", "NEEDS_EVAL_FN", "Sensitivity", "Uniform", "erk_densities"]

#: The error message of a sensitivity allocation without ``eval_fn``.
NEEDS_EVAL_FN = ("per-layer choice by sensitivity (pattern='auto' or a budget) needs eval_fn; "
                 "give eval_fn or an explicit pattern")


def erk_densities(shapes: dict, density: float) -> dict:
    """Erdős–Rényi-Kernel layer densities with overall density ``density``.

    ``d_l = ε · Σ dims(W_l) / Π dims(W_l)`` (for a conv (C_out, C_in, kh, kw)
    all four dims, for a linear (C_out, C_in) both), with ε chosen so that
    ``Σ d_l · |W_l| = density · Σ |W_l|``; layers whose density would exceed 1
    are kept dense and ε is solved again over the rest.

    Parameters
    ----------
    shapes : dict name -> tuple
        Weight shapes.
    density : float in (0, 1]

    Returns
    -------
    dict name -> density in (0, 1]

    Raises
    ------
    InvalidSparsityError
        ``density`` outside (0, 1].

    Source: Evci et al., "Rigging the Lottery: Making All Tickets Winners"
    (ICML 2020), section 3, extending Mocanu et al. (Nature Comm. 2018).
    """
    if not (0.0 < density <= 1.0):
        raise InvalidSparsityError(f"ERK density must be in (0, 1], got {density}")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    dense: set = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        rest = [n for n in shapes if n not in dense]
        if not rest:
            return {n: 1.0 for n in shapes}
        eps = budget / sum(raw[n] * numel[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            out = {n: 1.0 for n in dense}
            out.update({n: eps * raw[n] for n in rest})
            return out
        dense.update(over)


class Allocation:
    """How the overall sparsity is spread over layers (see the module docstring for the protocol).

    The base class allocates by the multiple-choice knapsack of
    :func:`~sparsecc.sparsify.select.select_for_sparsity` over the measured table
    and never redistributes.
    """

    name = "allocation"

    def check(self, problem: SparsifyProblem) -> None:
        """Raise :class:`InvalidSparsityError` if this allocation cannot serve ``problem``."""

    def measure(self, problem: SparsifyProblem) -> dict:
        """Per-layer costs of the candidates, ``{layer: {candidate key: cost}}`` (default: none)."""
        return {}

    def allocate(self, problem: SparsifyProblem, table: dict) -> dict:
        """Per layer, the candidate (or dense) minimizing the sum of ``table``'s costs at ``problem.sparsity``.

        Ties go to the lower predicted latency.

        Raises
        ------
        InvalidSparsityError
            The candidates cannot reach the sparsity.
        """
        return plan_from_choice(select_for_sparsity(problem.options(table), problem.sparsity))

    def distribute(self, engine: PruningEngine, densities: dict) -> dict:
        """The per-layer densities the engine prunes to when asked for ``densities`` (default: those)."""
        return densities

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Uniform(Allocation):
    """Every layer at the overall sparsity (N:M layers at N/M), or ERK densities.

    A block pattern that does not divide a layer's weight prunes it as single
    weights; an N:M pattern that does not divide it leaves it dense.

    Parameters
    ----------
    erk : bool
        Erdős–Rényi-Kernel densities (:func:`erk_densities`), as RigL uses.

    Source: the uniform per-layer sparsity of Zhu & Gupta, "To prune, or not to
    prune" (2017); ERK from Evci et al., "Rigging the Lottery" (ICML 2020).
    """

    name = "uniform"

    def __init__(self, erk: bool = False):
        self.erk = erk

    def check(self, problem: SparsifyProblem) -> None:
        self.require_sparsity(problem)
        fixed = problem.patterns[0].fixed_density
        if fixed is not None and abs((1 - fixed) - problem.sparsity) > 1e-9:
            raise InvalidSparsityError(f"pattern {problem.patterns[0]} has sparsity {1 - fixed:.3f}, "
                                       f"not {problem.sparsity}")

    def require_sparsity(self, problem: SparsifyProblem) -> None:
        if problem.sparsity is None:
            raise InvalidSparsityError(f"allocation={self.name!r} needs sparsity=; an accuracy_budget alone is "
                                       "searched with allocation='sensitivity'")

    def allocate(self, problem: SparsifyProblem, table: dict) -> dict:
        """``{layer: (pattern, density)}`` for every layer the pattern (or single weights) fits.

        Raises
        ------
        InvalidSparsityError
            The pattern fits no layer.
        """
        sparsity, first = problem.sparsity, problem.patterns[0]
        fixed = first.fixed_density
        if self.erk:
            dens = erk_densities({n: tuple(mod.weight.shape) for n, mod in problem.layers.items()}, 1.0 - sparsity)
        else:
            dens = {n: fixed if fixed is not None else 1.0 - sparsity for n in problem.layers}
        plan = {}
        for n in problem.layers:
            p = first
            if not problem.fits(n, p):
                p = UNSTRUCTURED if p.kind != "n:m" else None  # a block that does not divide: single weights
            if p is not None and dens[n] < 1.0:
                plan[n] = (p, dens[n])
        if not plan and sparsity > 0:
            raise InvalidSparsityError(f"pattern {first} fits no prunable layer of the model")
        return plan

    def __repr__(self) -> str:
        return f"{type(self).__name__}(erk={self.erk})"


class Global(Uniform):
    """One score threshold over all layers at every pruning step (layer densities follow the scores).

    Plans as :class:`Uniform`; at every pruning step the engine's mean density
    over the pruned layers is kept by the best-scoring groups of all layers
    together (:func:`~sparsecc.sparsify.patterns.global_keep`).

    Source: global magnitude pruning as compared in Blalock et al., "What is the
    State of Neural Network Pruning?" (MLSys 2020).
    """

    name = "global"

    def check(self, problem: SparsifyProblem) -> None:
        self.require_sparsity(problem)
        if problem.patterns[0].kind == "n:m":
            raise InvalidSparsityError("N:M patterns fix every layer's density: use allocation='uniform'")

    def distribute(self, engine: PruningEngine, densities: dict) -> dict:
        total = sum(engine.layers[n].weight.numel() for n in densities)
        overall = sum(d * engine.layers[n].weight.numel() for n, d in densities.items()) / total
        return self.threshold_densities(engine, overall)

    @staticmethod
    def threshold_densities(engine: PruningEngine, density: float) -> dict:
        """Per-layer densities of one score threshold over all the engine's layers, keeping ``density`` of all weights."""
        scores, areas = {}, {}
        for n, mod in engine.layers.items():
            scores[n] = group_scores(as_matrix(engine.masked_scores(n)), engine.plan[n][0])
            areas[n] = mod.weight.numel() // scores[n].numel()
        keep = global_keep(scores, areas, density)
        return {n: float(keep[n].sum()) * areas[n] / engine.layers[n].weight.numel() for n in scores}


class Sensitivity(Allocation):
    """Per layer from the metric drop of each candidate, that layer alone pruned, and the predicted latency.

    :meth:`measure` runs :func:`~sparsecc.sparsify.sensitivity.sensitivity_analysis`
    (gradient scores seeded first on ``problem.calib_batches`` batches), cached on
    disk; :meth:`allocate` is the knapsack of the base class at the sparsity; an
    accuracy budget alone is searched by :func:`~sparsecc.sparsify.budget.search_budget`.

    Parameters
    ----------
    cache_dir : path, optional
        Where sensitivity tables are cached (default ``$SPARSECC_CACHE_DIR/sensitivity``).

    Source: layer-wise sensitivity scans as in Han et al., "Learning both Weights
    and Connections" (NeurIPS 2015); the choice is a multiple-choice knapsack
    (Sinha & Zoltners 1979).
    """

    name = "sensitivity"

    def __init__(self, cache_dir: Optional[Union[str, Path]] = None):
        self.cache_dir = cache_dir

    def check(self, problem: SparsifyProblem) -> None:
        if problem.eval_fn is None:
            raise InvalidSparsityError(NEEDS_EVAL_FN)

    def measure(self, problem: SparsifyProblem) -> dict:
        """``{layer: {candidate key: metric drop}}``, by :func:`~sparsecc.sparsify.sensitivity.sensitivity_analysis`."""
        names = problem.names
        score = problem.new_score()
        probe = PruningEngine(copy.deepcopy(problem.base), {n: (UNSTRUCTURED, 1.0) for n in names}, score,
                              problem.batches, problem.loss_fn, progress=problem.progress)
        probe.calibrate(problem.calib_batches)
        strip_masks(probe.layers)
        from ..cache import cache_root

        root = Path(self.cache_dir) if self.cache_dir is not None else cache_root() / "sensitivity"
        key = "%s-%s-%s-%s" % (model_fingerprint(probe.layers), score.name, problem.metric_dense,
                               "|".join(option_key(p, d) for n in names for p, d in problem.candidates(n)))
        path = root / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        probe.model.eval()
        table = sensitivity_analysis(probe.layers, {n: problem.candidates(n) for n in names}, score.score,
                                     lambda: problem.measure(probe.model), path, problem.progress)
        return table["drop"]

    def __repr__(self) -> str:
        return f"Sensitivity(cache_dir={self.cache_dir!r})"


class Error(Allocation):
    """Per layer from its relative output error at each candidate, pruned alone by layer-wise pruning.

    :meth:`measure` prunes each layer alone in the dense model on the first
    ``problem.calib_batches`` batches (:meth:`LayerwisePruning.error_table
    <sparsecc.sparsify.layerwise.LayerwisePruning.error_table>`); :meth:`allocate`
    picks, among the candidate densities and dense, those minimizing the sum of
    the errors at the overall sparsity.

    Parameters
    ----------
    layerwise : LayerwisePruning
        The masks (and refit) whose errors are measured.

    Source: the layer-wise error objective of OBC's non-uniform compression,
    Frantar & Alistarh, "Optimal Brain Compression" (NeurIPS 2022).
    """

    name = "error"

    def __init__(self, layerwise: LayerwisePruning):
        self.layerwise = layerwise

    def check(self, problem: SparsifyProblem) -> None:
        if problem.sparsity is None:
            raise InvalidSparsityError("allocation='error' needs sparsity=")

    def measure(self, problem: SparsifyProblem) -> dict:
        """``{layer: {candidate key: relative output error}}``."""
        calib = [b[0] for b in first_batches(problem.data, problem.example_inputs, problem.calib_batches)]
        return self.layerwise.error_table(problem.base, problem.layers, problem.candidates, calib,
                                          problem.new_score())

    def __repr__(self) -> str:
        return f"Error({self.layerwise!r})"


#: Allocation names accepted by :func:`sparsecc.sparsify`.
ALLOCATIONS = {"uniform": Uniform, "global": Global, "sensitivity": Sensitivity, "error": Error}
