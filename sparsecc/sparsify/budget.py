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
from typing import Callable

from ..errors import AccuracyBudgetError
from .select import Option, plan_from_choice, select_under_budget
from .sensitivity import option_key

__all__ = ["penalized_options", "search_budget"]


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
