"""Dynamic sparse training: RigL prune-and-regrow at constant density, ERK layer densities."""

from __future__ import annotations

import math

import torch

from ..errors import InvalidSparsityError
from .patterns import Pattern, as_matrix, expand_groups, from_matrix, group_scores


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


def rigl_update(weight: torch.Tensor, mask: torch.Tensor, dense_grad: torch.Tensor, fraction: float,
                pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """One RigL connectivity update of a layer, at constant density.

    Drops the ``k = ⌊fraction · active⌋`` active groups of lowest magnitude and
    grows the ``k`` groups (among those not active after the drop) of highest
    gradient magnitude; grown weights start at zero.

    Parameters
    ----------
    weight : Tensor, the layer weight's shape (C_out, ...)
    mask : Tensor, same shape, 1 kept / 0 pruned
    dense_grad : Tensor, same shape
        ``∂L/∂w`` of the masked weight, *before* masking (pruned weights get one too).
    fraction : float in [0, 1]
    pattern : Pattern
        Unstructured, block or channel (groups are updated as units).

    Returns
    -------
    (new mask, grown): both the weight's shape; ``grown`` is 1 where a weight was regrown.

    Source: Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020), algorithm 1.
    """
    if pattern.kind == "n:m":
        raise InvalidSparsityError("RigL keeps N:M groups fixed; use pattern 'unstructured', 'block' or 'channel'")
    shape = weight.shape
    m = as_matrix(mask.to(torch.float32))
    mag = group_scores(as_matrix(weight.detach().abs()), pattern)
    grad = group_scores(as_matrix(dense_grad.detach().abs()), pattern)
    active = group_scores(m, pattern) > 0.5
    flat_active = active.flatten()
    n_active = int(flat_active.sum())
    k = int(math.floor(fraction * n_active))
    k = min(k, flat_active.numel() - n_active + k)  # cannot grow more than there is room for
    if k <= 0:
        return mask.clone(), torch.zeros_like(mask)
    mag_f = mag.flatten().clone()
    mag_f[~flat_active] = float("inf")
    drop = torch.topk(mag_f, k, largest=False).indices
    after = flat_active.clone()
    after[drop] = False
    grad_f = grad.flatten().clone()
    grad_f[after] = -float("inf")
    grow = torch.topk(grad_f, k).indices
    new = after.clone()
    new[grow] = True
    grown = torch.zeros_like(new)
    grown[grow] = True
    to_full = lambda g: from_matrix(expand_groups(g.reshape(active.shape), pattern, tuple(m.shape)).to(mask.dtype), shape)
    return to_full(new), to_full(grown)
