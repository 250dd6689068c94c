"""Search under an accuracy budget: select, prune, fine-tune, measure; scale the predicted budget.

The sensitivity drops are measured one-shot, one layer at a time and without
fine-tuning, so their sum overstates (or, with interactions, understates) the
drop left after fine-tuning. The search therefore chooses per-layer options
under a *scaled* predicted budget (:func:`~sparsecc.sparsify.select.select_under_budget`),
runs the plan and measures its real drop, doubling or halving the scale (then
bisecting geometrically between the largest scale known to pass and the
smallest known to fail) for up to ``search_rounds`` measured rounds. It returns
the passing plan of least predicted latency (ties: fewer kept weights).

Source: the choice is the multiple-choice knapsack of Sinha & Zoltners
(Operations Research 1979); the geometric search on the scale of the predicted
budget is this package's own.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

from ..errors import AccuracyBudgetError
from .patterns import UNSTRUCTURED
from .select import Option, plan_from_choice, select_under_budget
from .sensitivity import option_key

__all__ = ["SEARCH_SPARSITIES", "penalized_options", "plan_sparsity", "search_budget", "search_mixed_budget",
           "search_uniform_budget"]

#: Overall sparsities :func:`search_uniform_budget` bisects for a pattern of free density.
SEARCH_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def penalized_options(options: dict, lam: float) -> dict:
    """Options whose drop is ``max(drop, 0) + lam · (fraction of the layer's weights pruned)``.

    Charging every option for its sparsity makes the knapsack prefer fewer, less
    aggressive layers when one-shot drops of 0 or below let it take them all.
    """
    if lam == 0:
        return options
    return {n: [Option(o.key, o.latency_ms, max(o.drop, 0.0) + lam * (1 - o.kept / max(1, os_[0].kept)),
                       o.kept) for o in os_] for n, os_ in options.items()}


def search_budget(options: dict, budget: float, metric_dense: float, run: Callable, search_rounds: int = 3) -> tuple:
    """The fastest plan whose measured metric drop is within ``budget``.

    Parameters
    ----------
    options : dict name -> list of Option
        Per layer its dense option first, then its candidates with their sensitivity drops.
    budget : float, ≥ 0
        Largest allowed drop of the metric, in its units.
    metric_dense : float
        The metric of the dense model.
    run : callable plan -> outcome
        Prunes (and fine-tunes) a copy of the model by ``plan`` ``{name: (Pattern, density)}``;
        the outcome has ``.metric``.
    search_rounds : int
        Measured rounds (at least one); at most 30 choices are tried in all.

    Returns
    -------
    (plan, outcome, rounds)
        ``rounds``: one dict per measured round with its ``scale``, ``plan`` (candidate keys),
        measured ``drop`` and predicted ms ``pred_ms``.

    Raises
    ------
    AccuracyBudgetError
        Not even the least sensitive candidate fits the budget, or no measured round met it.
    """
    names = list(options)
    rounds: list = []
    lo = hi = None  # largest scale known to pass, smallest known to fail
    scale, best, tries, lam = 1.0, None, 0, 0.0
    while len(rounds) < max(1, search_rounds) and tries < 30:
        tries += 1
        choice = select_under_budget(penalized_options(options, lam), budget * scale)
        plan = plan_from_choice(choice)
        pred = sum(o.latency_ms for o in choice.values())
        cost = (round(pred, 9), sum(o.kept for o in choice.values()))  # latency, then fewer weights
        key = {n: option_key(*v) for n, v in plan.items()}
        seen = next((r_ for r_ in rounds if r_["plan"] == key), None)
        if not plan:
            if lo is None:
                least = min(((o.drop, n) for n in names for o in options[n] if o.key != "dense"),
                            default=(float("nan"), None))
                tried = "; ".join(f"{len(r_['plan'])} layers pruned: drop {r_['drop']:.4f}" for r_ in rounds)
                raise AccuracyBudgetError(
                    f"accuracy_budget={budget} cannot be met: "
                    + (f"measured after fine-tuning: {tried}" if rounds else
                       f"the least sensitive candidate ({least[1]}) drops the metric by {least[0]:.4f}"))
            passed = True
        elif seen is not None:  # same choice as an earlier round: its outcome is known
            passed = seen["drop"] <= budget + 1e-12
            if not passed and scale < 1.0:
                # shrinking the budget keeps choosing layers whose one-shot drop was ≤ 0: charge every
                # option for its sparsity so that fewer, less aggressive layers fit
                lam = budget / len(names) if lam == 0 else 2 * lam
                lo, hi, scale = None, None, 1.0
                continue
        else:
            res = run(plan)
            drop = metric_dense - res.metric
            passed = drop <= budget + 1e-12
            rounds.append({"round": len(rounds), "scale": scale, "plan": key, "drop": drop, "pred_ms": pred})
            if passed and (best is None or cost < best[0]):
                best = (cost, plan, res)
        if passed:
            lo = scale if lo is None else max(lo, scale)
            scale = scale * 2.0 if hi is None else math.sqrt(lo * hi)
        else:
            hi = scale if hi is None else min(hi, scale)
            scale = scale / 2.0 if lo is None else math.sqrt(lo * hi)
        if hi is not None and lo is not None and hi / lo < 1.05:
            break
    if best is None:
        raise AccuracyBudgetError(
            f"accuracy_budget={budget} was not met in {len(rounds)} rounds; measured drops: "
            + ", ".join(f"{r_['drop']:.4f}" for r_ in rounds))
    _, plan, outcome = best
    return plan, outcome, rounds


def uniform_plan(problem, pattern, sparsity: float) -> dict:
    """``{layer: (pattern, density)}``: every layer at ``sparsity`` (an N:M pattern at its own density); a
    block that does not tile a layer prunes it as single weights, an N:M pattern that does not fit leaves it
    dense."""
    density = pattern.fixed_density if pattern.fixed_density is not None else 1.0 - sparsity
    plan = {}
    for n in problem.layers:
        p = pattern if problem.fits(n, pattern) else (UNSTRUCTURED if pattern.kind != "n:m" else None)
        if p is not None and density < 1.0:
            plan[n] = (p, density)
    return plan


def predicted_ms(problem, plan: dict) -> float:
    """Predicted latency of all prunable layers under ``plan`` (dense where it has no entry)."""
    return sum(problem.latency(n, *plan[n]) if n in plan else problem.latency(n, None, 1.0) for n in problem.layers)


def search_uniform_budget(problem, budget: float, metric_dense: float, run: Callable,
                          sparsities: tuple = SEARCH_SPARSITIES) -> tuple:
    """The plan of least predicted latency, among uniform plans of each candidate pattern, whose measured metric
    drop is within ``budget``: the budget search of layer-wise pruning (SparseGPT, Wanda, reconstruction).

    Layer-wise pruning measures no per-layer sensitivity (each layer is pruned on the inputs the earlier
    pruned layers give it), so the search is over whole-model operating points: patterns of fixed density
    (N:M) are run once; for a pattern of free density the overall sparsity is bisected over ``sparsities``
    (the drop grows with sparsity), probing only sparsities predicted faster than the best plan found so
    far. Patterns of fixed density go first, so that they bound the probes of the others.

    Parameters
    ----------
    problem : SparsifyProblem
        ``patterns`` are the candidates; ``latency`` predicts each plan.
    budget : float, ≥ 0
        Largest allowed drop of the metric.
    metric_dense : float
    run : callable plan -> outcome (with ``.metric``)
    sparsities : tuple of float
        Grid of overall sparsities for patterns of free density.

    Returns
    -------
    (plan, outcome, rounds)
        ``rounds``: one dict per measured run: ``pattern``, ``sparsity``, ``drop``, ``pred_ms``, ``passed``.

    Raises
    ------
    AccuracyBudgetError
        No probed plan met the budget (the message lists the measured drops).
    """
    rounds: list = []
    best = None  # (pred_ms, plan, outcome)

    def probe(pattern, sparsity: float):
        nonlocal best
        plan = uniform_plan(problem, pattern, sparsity)
        pred = predicted_ms(problem, plan)
        if not plan or (best is not None and pred >= best[0]):
            return None  # nothing to prune, or cannot beat the best plan found
        outcome = run(plan)
        drop = metric_dense - outcome.metric
        passed = drop <= budget + 1e-12
        rounds.append({"round": len(rounds), "pattern": str(pattern), "sparsity": round(sparsity, 6),
                       "drop": drop, "pred_ms": pred, "passed": passed,
                       "plan": {n: option_key(*v) for n, v in plan.items()}})
        if passed and (best is None or pred < best[0]):
            best = (pred, plan, outcome)
        return passed

    for pattern in sorted(problem.patterns, key=lambda p: p.fixed_density is None):
        if pattern.fixed_density is not None:
            probe(pattern, 1.0 - pattern.fixed_density)
            continue
        grid = sorted(sparsities)
        lo, hi = -1, len(grid)  # highest index known to pass, lowest known to fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            passed = probe(pattern, grid[mid])
            if passed is False:
                hi = mid
            else:  # passed, or not run (predicted no faster than the best): only sparser plans can win
                lo = mid
    if best is None:
        raise AccuracyBudgetError(
            f"accuracy_budget={budget} was not met by any uniform plan; measured drops: "
            + ", ".join(f"{r_['pattern']} at sparsity {r_['sparsity']}: {r_['drop']:.4f}" for r_ in rounds))
    return best[1], best[2], rounds


def plan_sparsity(problem, plan: dict) -> float:
    """Fraction of all prunable weights that ``plan`` removes."""
    sizes = {n: math.prod(problem.infos[n][1]) for n in problem.layers}
    return 1.0 - sum(sizes[n] * (plan[n][1] if n in plan else 1.0) for n in sizes) / max(1, sum(sizes.values()))


def search_mixed_budget(problem, errors: dict, start: tuple, budget: float, metric_dense: float, run: Callable,
                        search_rounds: int = 3) -> tuple:
    """Per-layer patterns and densities under the budget, from each layer's output error, started at a
    uniform plan known to pass: the per-layer stage of layer-wise pruning's budget search.

    Each layer's candidate ``(pattern, density)`` costs its relative output error pruned alone in the
    dense model (``errors``, from :meth:`LayerwisePruning.error_table
    <sparsecc.sparsify.layerwise.LayerwisePruning.error_table>`). The errors are rescaled so that the
    error sum of the starting plan equals ``budget``; :func:`search_budget` then minimizes the predicted
    latency under that error sum, measures the plan it picks, and doubles, halves or bisects the scale
    for up to ``search_rounds`` measured rounds. At scale 1 the starting plan itself is feasible, so the
    first plan is predicted at least as fast. The starting plan is kept unless a measured mixed plan
    passes and is predicted faster.

    Parameters
    ----------
    problem : SparsifyProblem
        ``latency`` predicts each option, ``infos`` gives the weight sizes.
    errors : dict name -> {candidate key: error}
        Every candidate of every layer of ``problem``; the keys of ``start``'s plan among them.
    start : (plan, outcome)
        The passing uniform plan of :func:`search_uniform_budget` and its outcome.
    budget, metric_dense, run, search_rounds
        As in :func:`search_budget`.

    Returns
    -------
    (plan, outcome, rounds)
        ``rounds``: one dict per measured mixed plan, with ``pattern`` ``"per layer"``, its overall
        ``sparsity``, ``drop``, ``pred_ms``, ``passed``, ``plan`` and ``patterns`` (layers per pattern).

    Source: the error objective of OBC's non-uniform compression (Frantar & Alistarh, "Optimal Brain
    Compression", NeurIPS 2022) solved as a multiple-choice knapsack (Sinha & Zoltners 1979) on the
    predicted latency; the anchoring at a measured uniform plan is this package's own.
    """
    plan0, outcome0 = start
    pred0 = predicted_ms(problem, plan0)
    keys0 = {n: option_key(*v) for n, v in plan0.items()}
    e0 = sum(errors[n][k] for n, k in keys0.items())
    if not plan0 or e0 <= 0 or search_rounds < 1:
        return plan0, outcome0, []
    options = problem.options({n: {k: e * budget / e0 for k, e in row.items()} for n, row in errors.items()})
    measured: list = []

    def run_mixed(plan: dict):
        if {n: option_key(*v) for n, v in plan.items()} == keys0:
            outcome = outcome0  # the starting plan: already measured
        else:
            outcome = run(plan)
            measured.append((plan, outcome))
        return outcome

    try:
        plan, outcome, _ = search_budget(options, budget, metric_dense, run_mixed, search_rounds)
    except AccuracyBudgetError:  # no mixed plan passed: the measured ones are still reported
        plan, outcome = plan0, outcome0
    rounds = []
    for i, (p, res) in enumerate(measured):
        drop = metric_dense - res.metric
        rounds.append({"round": i, "pattern": "per layer", "sparsity": round(plan_sparsity(problem, p), 6),
                       "drop": drop, "pred_ms": predicted_ms(problem, p), "passed": drop <= budget + 1e-12,
                       "plan": {n: option_key(*v) for n, v in p.items()},
                       "patterns": dict(Counter(str(pattern) for pattern, _ in p.values()))})
    if predicted_ms(problem, plan) >= pred0:
        return plan0, outcome0, rounds
    return plan, outcome, rounds
