"""Per-layer choice of (pattern, density) from sensitivities and predicted latency.

Both problems are a multiple-choice knapsack (one option per layer) solved by
dynamic programming over a discretized resource (Sinha & Zoltners, "The
multiple-choice knapsack problem", Operations Research 1979):

* under an accuracy budget: minimize Σ predicted latency subject to
  Σ sensitivity drop ≤ budget (drops of single layers add up, a first-order
  approximation checked afterwards by measuring the pruned model);
* at a global sparsity: minimize Σ drop (ties: latency) subject to
  Σ kept weights ≤ (1 - sparsity) · Σ weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidSparsityError
from .patterns import parse_pattern


@dataclass(frozen=True)
class Option:
    """One choice for one layer: the candidate key, its cost terms."""

    key: str
    latency_ms: float
    drop: float
    kept: int


def _knapsack(options: dict, weight_of, cost_of, capacity: float, bins: int, round_up: bool = True) -> dict:
    """min Σ cost subject to Σ weight ≤ capacity, one option per layer; weights in units of capacity/bins
    (rounded up when ``round_up``, else to nearest)."""
    names = list(options)
    unit = capacity / bins if capacity > 0 else 1.0
    inf = math.inf
    best = [0.0] + [inf] * bins  # best[c] = least cost using exactly ≤ c units so far
    choice = []
    for name in names:
        new = [inf] * (bins + 1)
        arg = [None] * (bins + 1)
        for c in range(bins + 1):
            if best[c] == inf:
                continue
            for i, o in enumerate(options[name]):
                w = weight_of(o)
                if w <= 0:
                    u = 0
                elif capacity <= 0:
                    continue
                else:
                    u = math.ceil(w / unit - 1e-9) if round_up else int(round(w / unit))
                if c + u > bins:
                    continue
                v = best[c] + cost_of(o)
                if v < new[c + u]:
                    new[c + u], arg[c + u] = v, (c, i)
        choice.append(arg)
        best = new
    end = min(range(bins + 1), key=lambda c: best[c])
    if best[end] == inf:
        return {}
    out = {}
    c = end
    for name, arg in zip(reversed(names), reversed(choice)):
        prev, i = arg[c]
        out[name] = options[name][i]
        c = prev
    return out


def select_under_budget(options: dict, budget: float, bins: int = 400) -> dict:
    """Per layer, the option minimizing total latency with Σ drop ≤ ``budget``.

    Parameters
    ----------
    options : dict name -> list of Option
        Each list must hold the layer's dense option (drop 0).
    budget : float
        Allowed metric drop, in the metric's units.

    Returns
    -------
    dict name -> Option
    """
    if budget < 0:
        raise InvalidSparsityError(f"accuracy budget must be ≥ 0, got {budget}")
    # ties in latency (e.g. a sparse kernel no faster than dense) go to the option keeping fewer weights
    total_ms = sum(max(o.latency_ms for o in opts) for opts in options.values())
    total_kept = sum(max(o.kept for o in opts) for opts in options.values())
    eps = 1e-6 * total_ms / max(1, total_kept)
    return _knapsack(options, lambda o: max(o.drop, 0.0), lambda o: o.latency_ms + eps * o.kept, budget, bins)


def select_for_sparsity(options: dict, sparsity: float, bins: int = 1000) -> dict:
    """Per layer, the option minimizing Σ drop (then latency) with Σ kept ≤ (1 - sparsity) · Σ weights.

    Raises
    ------
    InvalidSparsityError
        No combination of the options reaches the sparsity.
    """
    total = sum(max(o.kept for o in opts) for opts in options.values())
    capacity = (1.0 - sparsity) * total
    lat_scale = 1e-6 / max(1e-9, sum(max(o.latency_ms for o in opts) for opts in options.values()))
    out = _knapsack(options, lambda o: o.kept, lambda o: max(o.drop, 0.0) + lat_scale * o.latency_ms,
                    capacity, bins, round_up=False)
    if not out:
        least = sum(min(o.kept for o in opts) for opts in options.values())
        raise InvalidSparsityError(
            f"sparsity {sparsity:.3f} cannot be reached with the candidate densities: the sparsest "
            f"choice keeps {least} of {total} weights (sparsity {1 - least / total:.3f})")
    return out


def plan_from_keys(keys: dict) -> dict:
    """The pruning plan ``{name: (Pattern, density)}`` of candidate keys ``{name: "<pattern>@<density>"}``
    (see :func:`~sparsecc.sparsify.sensitivity.option_key`); ``"dense"`` layers left out."""
    plan = {}
    for n, k in keys.items():
        if k == "dense":
            continue
        ptxt, dtxt = k.split("@")
        plan[n] = (parse_pattern(ptxt.replace("block ", "")), float(dtxt))
    return plan


def plan_from_choice(choice: dict) -> dict:
    """The pruning plan of a per-layer choice: ``{name: (Pattern, density)}``, dense layers left out.

    Parameters
    ----------
    choice : dict name -> Option
        Keys ``"dense"`` or a candidate key ``"<pattern>@<density>"`` (see
        :func:`~sparsecc.sparsify.sensitivity.option_key`).
    """
    return plan_from_keys({n: o.key for n, o in choice.items()})
