"""Sparsity-inducing regularizers added to the loss during fine-tuning."""

from __future__ import annotations

import torch

from ..errors import InvalidSparsityError
from .patterns import Pattern, as_matrix

#: Regularizer names accepted by :func:`sparsecc.sparsify`.
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

    Returns
    -------
    Tensor, a scalar (0 for ``"none"``).

    Raises
    ------
    InvalidSparsityError
        An unknown ``kind``.
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
