"""Choosing what to prune, how much per layer, and recovering accuracy.

>>> sp = sparsecc.sparsify(model, x, sparsity=0.8, method="impact", schedule="gradual",
...                        data=loader, loss_fn=loss, eval_fn=metric, finetune_steps=500)
>>> cm = sparsecc.compile(sp.model, x, target="x86")

:func:`sparsify` is a keyword layer over an engine of small objects:
importance scores (:mod:`.scores`), schedules (:mod:`.schedules`), allocations
(:mod:`.allocation`) and layer-wise pruning (:mod:`.layerwise`), composed by
:func:`~.engine.run_sparsify` on a :class:`~.problem.SparsifyProblem`.
"""

from .allocation import ALLOCATIONS, Allocation, Error, Global, Sensitivity, Uniform, erk_densities
from .api import CANDIDATE_DENSITIES, LayerChoice, SparsifyResult, sparsify
from .engine import PruningEngine, Training, run_plan, run_sparsify
from .layerwise import LayerwisePruning
from .patterns import Pattern, mask_from_scores, parse_pattern
from .problem import SparsifyProblem, build_problem
from .regularizers import regularization_penalty
from .schedules import SCHEDULES, Gradual, OneShot, RigL, Schedule, cubic_sparsity, rigl_drop_fraction, rigl_update
from .scores import SCORES, ImpactScore, ImportanceScore, MagnitudeScore, MovementScore
from .select import select_for_sparsity, select_under_budget
from .sensitivity import sensitivity_analysis

__all__ = ["sparsify", "SparsifyResult", "LayerChoice", "CANDIDATE_DENSITIES", "Pattern", "parse_pattern",
           "mask_from_scores", "erk_densities", "rigl_update", "cubic_sparsity", "rigl_drop_fraction",
           "regularization_penalty", "MagnitudeScore", "ImpactScore", "MovementScore", "select_for_sparsity",
           "select_under_budget", "sensitivity_analysis",
           # the engine
           "ImportanceScore", "SCORES", "Schedule", "OneShot", "Gradual", "RigL", "SCHEDULES", "Allocation",
           "Uniform", "Global", "Sensitivity", "Error", "ALLOCATIONS", "LayerwisePruning", "PruningEngine",
           "Training", "SparsifyProblem", "build_problem", "run_plan", "run_sparsify"]
