"""Choosing what to prune, how much per layer, and recovering accuracy (issue #3).

>>> sp = sparsecc.sparsify(model, x, sparsity=0.8, method="impact", schedule="gradual",
...                        data=loader, loss_fn=loss, eval_fn=metric, finetune_steps=500)
>>> cm = sparsecc.compile(sp.model, x, target="x86")
"""

from .api import CANDIDATE_DENSITIES, LayerChoice, SparsifyResult, sparsify
from .patterns import Pattern, mask_from_scores, parse_pattern
from .rigl import erk_densities, rigl_update
from .schedule import cubic_sparsity, regularization_penalty, rigl_drop_fraction
from .scores import ImpactScore, MagnitudeScore, MovementScore
from .select import select_for_sparsity, select_under_budget
from .sensitivity import sensitivity_analysis

__all__ = ["sparsify", "SparsifyResult", "LayerChoice", "CANDIDATE_DENSITIES", "Pattern", "parse_pattern",
           "mask_from_scores", "erk_densities", "rigl_update", "cubic_sparsity", "rigl_drop_fraction",
           "regularization_penalty", "MagnitudeScore", "ImpactScore", "MovementScore", "select_for_sparsity",
           "select_under_budget", "sensitivity_analysis"]
