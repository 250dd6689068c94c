"""Sparsity schedules and sparsity-inducing regularizers."""

from __future__ import annotations

import math

import torch

from ..errors import InvalidSparsityError
from .patterns import Pattern, as_matrix


def cubic_sparsity(step: int, final: float, *, initial: float = 0.0, start: int = 0,
                   n_steps: int = 10, frequency: int = 1) -> float:
    """Sparsity of the gradual pruning schedule at training step ``step``.

    ``s_t = s_f + (s_i - s_f) · (1 - (t - t0) / (n·Δt))³`` for
    ``t ∈ {t0, t0 + Δt, ..., t0 + n·Δt}``, held constant between pruning
    steps: fast pruning while many redundant weights remain, slowing down near
    the final sparsity.

    Parameters
    ----------
    step : int
        Training step t.
    final, initial : float
        s_f and s_i, sparsities in [0, 1).
    start : int
        t0, the step of the first pruning.
    n_steps : int
        n, the number of pruning steps after t0.
    frequency : int
        Δt, training steps between pruning steps.

    Returns
    -------
    float: the sparsity in force at ``step`` (``initial`` before t0, ``final`` after t0 + n·Δt).

    Source: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
    pruning for model compression" (ICLR workshop 2018, arXiv 2017), eq. (1).
    """
    if n_steps < 1 or frequency < 1:
        raise InvalidSparsityError(f"cubic schedule needs n_steps ≥ 1 and frequency ≥ 1, got {n_steps}, {frequency}")
    if step < start:
        return initial
    k = min((step - start) // frequency, n_steps)
    return final + (initial - final) * (1.0 - k / n_steps) ** 3


def pruning_steps(start: int, n_steps: int, frequency: int) -> list[int]:
    """Training steps at which the cubic schedule prunes: t0, t0 + Δt, ..., t0 + n·Δt."""
    return [start + i * frequency for i in range(n_steps + 1)]


def rigl_drop_fraction(step: int, alpha: float, end: int) -> float:
    """RigL's cosine-decayed update fraction ``α/2 · (1 + cos(π t / T_end))`` (0 after T_end).

    Source: Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020), eq. (1).
    """
    if step >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end))


REGULARIZERS = ("none", "l1", "group_lasso")


def regularization_penalty(kind: str, weights: dict, pattern: Pattern) -> torch.Tensor:
    """Sparsity-inducing penalty summed over layers (multiply by a strength and add to the loss).

    Parameters
    ----------
    kind : {"none", "l1", "group_lasso"}
        ``l1``: ``Σ |w|`` (Tibshirani 1996). ``group_lasso``: ``Σ_g ‖w_g‖₂``
        over the pattern's groups (blocks, channels; N:M groups of M), which
        drives whole groups to zero (Yuan & Lin 2006; Wen et al., "Learning
        Structured Sparsity in Deep Neural Networks", NeurIPS 2016). For the
        unstructured pattern every weight is its own group, i.e. L1.
    weights : dict name -> Tensor
        Effective (masked) weights, each (C_out, ...).
    pattern : Pattern
    """
    if kind not in REGULARIZERS:
        raise InvalidSparsityError(f"regularization must be one of {REGULARIZERS}, got {kind!r}")
    total = torch.zeros(())
    if kind == "none":
        return total
    for w in weights.values():
        if kind == "l1" or pattern.kind == "unstructured":
            total = total + w.abs().sum()
            continue
        mat = as_matrix(w)
        rows, k = mat.shape
        if pattern.kind == "channel":
            groups = mat
        elif pattern.kind == "block" and pattern.fits((rows, k)):
            br, bc = pattern.block
            groups = mat.reshape(rows // br, br, k // bc, bc).permute(0, 2, 1, 3).reshape(-1, br * bc)
        elif pattern.kind == "n:m" and pattern.fits((rows, k)):
            groups = mat.reshape(-1, pattern.m)
        else:
            groups = mat.reshape(-1, 1)
        total = total + groups.norm(dim=1).sum()
    return total
