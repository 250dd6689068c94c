"""What sparsify works on: the dense model, its prunable layers, the candidates, the data, the latencies.

:class:`SparsifyProblem` is the context every allocation, schedule and run of
the pruning engine reads; :func:`build_problem` makes one from the user's model,
example inputs and target (checking them).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from torch import nn

from ..errors import DataError, InvalidArgumentError, InvalidSparsityError, UnknownLayerError
from .data import Batches, check_batch, layer_rows
from .masks import prunable_layers
from .patterns import UNSTRUCTURED, Pattern, as_matrix, parse_pattern
from .scores import ImportanceScore
from .select import Option
from .sensitivity import option_key
from ..formats import Candidate, candidates, no_larger_than_dense
from ..tune.cost_model import cost_model_for

__all__ = ["SparsifyProblem", "build_problem", "candidate_patterns", "latency_fn"]


@dataclass
class SparsifyProblem:
    """The dense model and everything sparsify knows about its prunable layers.

    Attributes
    ----------
    base : nn.Module
        A dense copy of the user's model in eval mode; never pruned (every run prunes a copy).
    layers : dict name -> nn.Module
        The prunable layers of ``base`` sparsify may prune.
    infos : dict name -> (kind, (C_out, K), M)
        ``"linear"`` or ``"conv"``, the weight matrix shape and the GEMM rows at the example input.
    latency : callable (name, Pattern or None, density) -> float
        Predicted ms of a layer (see :func:`latency_fn`).
    patterns : list of Pattern
        Candidate patterns; the first is the one uniform and global allocation use.
    densities : tuple of float
        Candidate densities of patterns of free density.
    sparsity : float in [0, 1), or None
        Overall sparsity; None: search under an accuracy budget.
    importance : type
        :class:`~sparsecc.sparsify.scores.ImportanceScore` subclass (a fresh one per run).
    example_inputs : Tensor, tuple or dict
    data : iterable of (inputs, target), optional
    loss_fn : callable (output, target) -> scalar Tensor, optional
    eval_fn : callable (model) -> float, optional
        Metric, higher is better.
    batches : Batches, optional
        One endless iterator over ``data`` shared by every step that reads batches.
    calib_batches : int
        Batches that seed gradient scores, or calibrate layer-wise pruning.
    progress : bool
    target_name : str
    metric_dense : float or None
        ``eval_fn(base)``, set by the driver before anything is pruned.
    """

    base: nn.Module
    layers: dict
    infos: dict
    latency: Callable
    patterns: list
    densities: tuple
    sparsity: Optional[float]
    importance: type
    example_inputs: Any
    data: Optional[Iterable] = None
    loss_fn: Optional[Callable] = None
    eval_fn: Optional[Callable] = None
    batches: Optional[Batches] = None
    calib_batches: int = 4
    progress: bool = True
    target_name: str = ""
    metric_dense: Optional[float] = None

    @property
    def names(self) -> list:
        return list(self.layers)

    def new_score(self) -> ImportanceScore:
        """A fresh importance score of the problem's kind."""
        return self.importance()

    def measure(self, model: nn.Module) -> Optional[float]:
        """``eval_fn(model)`` as a float, or None without ``eval_fn``.

        Raises
        ------
        InvalidArgumentError
            ``eval_fn`` returned something that is not a finite number (NaN, inf, a string, ...).
        """
        if self.eval_fn is None:
            return None
        value = self.eval_fn(model)
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"eval_fn must return a number, got {type(value).__name__}") from None
        if not math.isfinite(v):
            raise InvalidArgumentError(f"eval_fn returned {v} (it must return a finite metric; a NaN or an "
                                       "infinite metric cannot be compared against the budget)")
        return v

    def fits(self, name: str, pattern: Pattern) -> bool:
        """Whether layer ``name``'s weight matrix can carry ``pattern``."""
        return pattern.fits(self.infos[name][1])

    def candidates(self, name: str) -> list:
        """The (pattern, density) candidates of layer ``name``: fitting patterns at their densities."""
        out = []
        for p in self.patterns:
            if not self.fits(name, p):
                continue
            out += [(p, p.fixed_density)] if p.fixed_density is not None else [(p, d) for d in self.densities]
        return out

    def options(self, table: dict) -> dict:
        """Per layer, the knapsack options of :mod:`~sparsecc.sparsify.select`: dense, then every candidate.

        Parameters
        ----------
        table : dict name -> {candidate key: drop}
            A candidate's cost (metric drop or output error); missing entries cost 0.

        Returns
        -------
        dict name -> list of Option
        """
        out = {}
        for name in self.layers:
            n_el = math.prod(self.infos[name][1])
            opts = [Option("dense", self.latency(name, None, 1.0), 0.0, n_el)]
            for p, d in self.candidates(name):
                k = option_key(p, d)
                opts.append(Option(k, self.latency(name, p, d), table.get(name, {}).get(k, 0.0), int(round(d * n_el))))
            out[name] = opts
        return out


def pattern_candidates(pattern: Pattern, shape: tuple, density: float) -> list:
    """The sparse formats a weight (C_out, K) pruned to ``pattern`` can compile to (from the format registry):
    BSR of its block, N:M of its (n, m), else every unstructured format (CSR, xcsr)."""
    if pattern.kind == "block" and tuple(pattern.block) != (1, 1):
        return [Candidate("bsr", tuple(pattern.block))]
    if pattern.kind == "n:m":
        return [Candidate("nm", (pattern.n, pattern.m))]
    return [c for c in candidates(shape, "unstructured", density) if not c.is_dense]


def latency_fn(tgt, infos: dict) -> Callable[[str, Optional[Pattern], float], float]:
    """ms of a layer at (pattern, density) from the target's cost model (the faster of sparse and dense).

    Parameters
    ----------
    tgt : sparsecc.targets.Target
        Its cost model (:func:`sparsecc.tune.cost_model.cost_model_for`) prices the candidates.
    infos : dict name -> (kind, (C_out, K), M)

    Returns
    -------
    callable (name, pattern or None, density) -> float ms
        Dense for None, density 1 and convolutions (this allocation prices a pruned conv dense: its
        GEMM rows are output pixels, which ``infos`` does not carry).
    """
    cost = cost_model_for(tgt)
    dense_c = Candidate("dense")

    def lat(name: str, pattern: Optional[Pattern], density: float) -> float:
        kind, (n, k), m = infos[name]
        dense = cost.estimate_ms(dense_c, n, k, m)
        if pattern is None or density >= 1.0 or kind != "linear":
            return dense
        nnz = max(0, int(round(density * n * k)))
        cands = no_larger_than_dense(pattern_candidates(pattern, (n, k), density), (n, k), nnz, {})
        return min([dense] + [cost.estimate_weight_ms(c, (n, k), m, nnz) for c in cands if cost.has(c)])

    return lat


def candidate_patterns(tgt, pattern, block_shape: Optional[tuple], sparsity: Optional[float], infos: dict) -> list:
    """The candidate patterns of a ``pattern=`` argument.

    ``"auto"``: unstructured, the target's block shape for the linears (its
    ``best_block``; none if that is 1x1) and 2:4 where the target has N:M kernels; ``"block"`` without ``block_shape``: the
    target's block shape; anything else: :func:`~sparsecc.sparsify.patterns.parse_pattern`.

    Raises
    ------
    InvalidSparsityError
        An unknown pattern.
    """
    lin_shapes = [infos[n][1] for n in infos if infos[n][0] == "linear"]
    lin_rows = max([infos[n][2] for n in infos if infos[n][0] == "linear"], default=1)
    if pattern == "auto":
        blk = cost_model_for(tgt).best_block(lin_shapes, 1.0 - (sparsity or 0.8), lin_rows) if lin_shapes else (4, 1)
        nm = parse_pattern("2:4")
        return ([UNSTRUCTURED] + ([Pattern("block", block=tuple(blk))] if tuple(blk) != (1, 1) else [])
                + ([nm] if lin_shapes and getattr(tgt, "supports", lambda *a: False)("linear", "nm") else []))
    if pattern == "block" and block_shape is None:
        return [parse_pattern("block", cost_model_for(tgt).best_block(lin_shapes, 1.0 - (sparsity or 0.8), lin_rows)
                              if lin_shapes else (4, 1))]
    return [parse_pattern(pattern, block_shape)]


def build_problem(model: nn.Module, example_inputs, *, target, sparsity: Optional[float], pattern="auto",
                  block_shape: Optional[tuple] = None, densities: tuple, importance: type,
                  layers: Optional[list] = None, data: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
                  eval_fn: Optional[Callable] = None, calib_batches: int = 4, progress: bool = True) -> SparsifyProblem:
    """Copy ``model``, find its prunable layers and their GEMM rows, check the data; see :class:`SparsifyProblem`.

    Raises
    ------
    UnknownLayerError
        A name in ``layers`` that is not a prunable layer.
    InvalidSparsityError
        No prunable layer, or an unknown pattern.
    DataError
        The model fails on ``example_inputs``, or the first batch of ``data`` is malformed.
    """
    from ..targets import resolve_target

    tgt = resolve_target(target) if isinstance(target, str) else target
    base = copy.deepcopy(model)
    base.eval()
    all_layers = prunable_layers(base)
    if layers is not None:
        unknown = [n for n in layers if n not in all_layers]
        if unknown:
            raise UnknownLayerError(f"no prunable layer named {unknown[0]!r}; prunable layers are: "
                                    f"{', '.join(all_layers) or 'none'}")
        all_layers = {n: all_layers[n] for n in layers}
    if not all_layers:
        raise InvalidSparsityError("the model has no prunable layer (Linear or Conv2d with float weights)")
    rows = layer_rows(base, all_layers, example_inputs)
    infos = {n: ("conv" if isinstance(mod, nn.Conv2d) else "linear", tuple(as_matrix(mod.weight).shape),
                 rows.get(n, 1)) for n, mod in all_layers.items()}
    latency = latency_fn(tgt, infos)
    if data is not None:
        it = iter(data)
        try:
            first = next(it)
        except StopIteration:
            raise DataError("data is empty: it yielded no batch (sparsify needs at least one "
                            "(inputs, target) batch)") from None
        check_batch(first, example_inputs, 0)
        if it is data:  # a one-shot iterator (a generator): keep the batch just read
            data = itertools.chain([first], it)
    return SparsifyProblem(
        base=base, layers=all_layers, infos=infos, latency=latency,
        patterns=candidate_patterns(tgt, pattern, block_shape, sparsity, infos), densities=tuple(densities),
        sparsity=sparsity, importance=importance, example_inputs=example_inputs, data=data, loss_fn=loss_fn,
        eval_fn=eval_fn, batches=Batches(data, example_inputs) if data is not None else None,
        calib_batches=calib_batches, progress=progress, target_name=getattr(tgt, "name", str(tgt)))
