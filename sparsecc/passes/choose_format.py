"""Choose each linear's storage format with the target's cost model (analysis pass)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import InvalidSparsityError
from ..formats import NM_PATTERN_NAMES, PATTERN_CHOICES, Candidate, candidates, no_larger_than_dense
from ..ir.annotations import annotate, get_annotation
from ..ir.graph import SparseGraph
from ..ir.rewrite import example_rows
from ..runtime.modules import make_linear
from ..runtime.timing import interleaved_ms
from .base import Pass, PassContext, PassResult
from .prune import prunable_sites

__all__ = ["ChooseFormat", "NM_PATTERN_NAMES", "PATTERN_CHOICES", "check_pattern", "choose", "example_rows"]


def check_pattern(pattern: str) -> str:
    """``pattern`` itself if it is one of :data:`PATTERN_CHOICES`.

    Raises
    ------
    InvalidSparsityError
        Unknown pattern.
    """
    if pattern not in PATTERN_CHOICES:
        raise InvalidSparsityError(f"pattern must be one of {PATTERN_CHOICES}, got {pattern!r}")
    return pattern


#: A sparse candidate estimated at most this many times the dense time is still timed against dense, and the
#: runner-up sparse candidate is timed too when its estimate is within this factor of the best one's.
MEASURE_WITHIN = 1.5


def choose(est: dict, where: str, density: float, pattern: str,
           measure: Optional[Callable[[Candidate], tuple]] = None) -> tuple:
    """The format of one layer: lowest estimate, then (``measure``) the best sparse candidates timed against dense.

    The best sparse candidate is timed when it has the lowest estimate, or (dense lowest) when its estimate is
    within :data:`MEASURE_WITHIN` of dense's: a miscalibrated cost model cannot keep a faster layer dense. The
    runner-up sparse candidate is timed as well when its estimate is within :data:`MEASURE_WITHIN` of the
    best one's (a cost model fitted on one CPU ranks close kernels wrongly on another: on a Zen 4 host it put
    the unstructured kernel ahead of the 2:4 one on 2:4 weights, which then measured 0.60-0.84 of dense
    against 0.67-1.30). Each candidate is timed in rounds interleaved with dense, and the candidates are
    compared by their ratio to dense, so drift in the machine between the two measurements cancels.

    Parameters
    ----------
    est : dict candidate key -> ms
    where : str
        The example size for the reason (``"M=128"``, ``"M=3136 pixels"``).
    density : float
    pattern : str
    measure : callable Candidate -> (sparse ms, dense ms), optional
        Times a sparse candidate and torch dense in the same rounds; the fastest wins, so a wrong
        estimate never makes a layer slower than dense.

    Returns
    -------
    (Candidate, measured ms or None, dense ms or None, reason)
    """
    best = min(est, key=est.get) if est else "dense"
    reason = f"lowest estimate at {where}"
    if best == "dense" and len(est) > 1:
        reason = f"sparse estimated slower at {where}"
    elif len(est) <= 1:
        reason = "no zeros" if density >= 1.0 else f"pattern={pattern!r}"
    measured = dense_ms = None
    cand = Candidate.parse(best)
    sparse = {key: ms for key, ms in est.items() if not Candidate.parse(key).is_dense}
    if measure is not None and cand.is_dense and sparse:
        # an estimate close to dense is within the cost model's error: let the measurement decide
        near = min(sparse, key=sparse.get)
        if sparse[near] <= MEASURE_WITHIN * est.get("dense", float("inf")):
            cand = Candidate.parse(near)
    if measure is not None and not cand.is_dense:
        ranked = sorted(sparse, key=sparse.get)
        rivals = [key for key in ranked if key != cand.key and sparse[key] <= MEASURE_WITHIN * sparse[cand.key]][:1]
        timed = [(c, *measure(c)) for c in [cand] + [Candidate.parse(key) for key in rivals]]
        cand, measured, dense_ms = min(timed, key=lambda t: t[1] / t[2])
        others = "".join(f"; {c.label} {d / ms:.2f}x" for c, ms, d in timed if c is not cand)
        if measured >= dense_ms:
            reason = f"measured {cand.label} {measured:.3f} ms ≥ dense {dense_ms:.3f} ms at {where}{others}"
            cand, measured = Candidate("dense"), dense_ms
        else:
            reason = f"measured {dense_ms / measured:.2f}x faster than dense at {where}{others}"
    return cand, measured, dense_ms, reason


class ChooseFormat(Pass):
    """Pick dense, CSR, BSR (with block shape) or N:M per linear by estimated, then measured, latency.

    For each annotated linear, every candidate allowed by ``pattern`` and built by the target
    (:func:`sparsecc.formats.candidates`) gets an estimate from the target's cost model at the
    example M (``est_ms``); candidates whose stored weight would be larger than the dense weight are not
    offered (:func:`sparsecc.formats.no_larger_than_dense`). With ``measure=True`` (and a target that can time kernels here) the
    best sparse candidate is then built and timed against torch dense, and the faster one wins.

    Parameters
    ----------
    pattern : {"auto", "unstructured", "block", "dense", "n:m", "2:4", "1:4"}
        The N:M names allow dense and that N:M format only (for weights that satisfy it).
    measure : bool
        Time the best sparse candidate against torch dense (median of ``repeat`` runs).
    """

    name = "choose_format"
    requires = ("detect_sparsity",)

    def __init__(self, pattern: str = "auto", measure: bool = True, repeat: int = 10):
        self.pattern = check_pattern(pattern)
        self.measure = measure
        self.repeat = repeat

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        cost = ctx.cost_model
        allowed = ctx.target.layer_formats.get("linear", frozenset())
        for site in prunable_sites(graph):
            ann = get_annotation(site.node)
            if ann is None:
                continue
            w = graph.tensor(site.weight).detach()
            n, k = w.shape
            m = example_rows(site.input)
            x_val = site.input.meta.get("val")
            if x_val is not None and getattr(x_val, "dtype", torch.float32) != torch.float32:
                annotate(site.node, site.name, format="dense", format_params=None, kernel="torch.linear",
                         reason=f"input dtype {x_val.dtype} (sparse kernels are float32)")
                continue
            cands = no_larger_than_dense(candidates((n, k), self.pattern, ann.density, nm=ann.nm, allowed=allowed),
                                         (n, k), ann.nnz, ann.fill_ratio)
            est = cost.estimates(cands, (n, k), m, ann.nnz, ann.fill_ratio)
            prior = ctx.options.get("prior_formats", {}).get(site.name)
            if prior is not None and prior.candidate is not None and prior.candidate.key in est \
                    and tuple(prior.weight_shape) == (n, k) and prior.nnz == ann.nnz:
                cand = prior.candidate  # the choice of an earlier compile of the same weights: no timing
                annotate(site.node, site.name, est_ms=est, format=cand.format, format_params=cand.params or None,
                         measured_ms=prior.measured_ms, dense_ms=prior.dense_ms,
                         reason=f"{prior.reason} (kept from the earlier compile)",
                         **({"kernel": "torch.linear"} if cand.is_dense else {}))
                continue
            bias = graph.tensor(site.bias).detach() if site.bias else None

            def measure(cand, w=w, bias=bias, m=m, k=k):
                mod = make_linear(ctx.target, cand.to_storage(w), bias)
                x = torch.randn(max(m, 1), k)
                t = interleaved_ms({"sparse": mod, "dense": lambda t: torch.nn.functional.linear(t, w, bias)}, x,
                                   runs=self.repeat, warmup=3)
                return t["sparse"], t["dense"]

            cand, measured, dense_ms, reason = choose(est, f"M={m}", ann.density, self.pattern,
                                                      measure if self.measure else None)
            annotate(site.node, site.name, est_ms=est, format=cand.format, format_params=cand.params or None,
                     measured_ms=measured, dense_ms=dense_ms, reason=reason,
                     **({"kernel": "torch.linear"} if cand.is_dense else {}))
        return PassResult(graph, False)
