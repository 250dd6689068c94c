"""Prune linear weights to an N:M pattern along the reduction axis (rewrite pass).

Source: N:M structured sparsity (at most N nonzeros in every M consecutive
weights along K) as in Mishra et al., "Accelerating Sparse Deep Neural
Networks" (NVIDIA, 2021): keep the N largest magnitudes of every group. The
keep-mask comes from :func:`sparsecc.sparsify.patterns.nm_keep`, the same
primitive ``sparsecc.sparsify`` uses.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidSparsityError, UnknownLayerError
from ..ir.graph import SparseGraph
from ..formats import nm_keep
from .base import Pass, PassContext, PassResult
from .prune import prunable_sites


def nm_prune_weight(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``weight`` (N, K) with all but the ``n`` largest |w| of every ``m`` consecutive columns zeroed.

    K need not be a multiple of ``m``: the last group is padded with zeros
    (which rank last) for the ranking only.
    """
    rows, k = weight.shape
    kp = -(-k // m) * m
    score = torch.full((rows, kp), -1.0, dtype=torch.float32)
    score[:, :k] = weight.detach().abs().to(torch.float32)
    keep = nm_keep(score, n, m)[:, :k]
    return weight * keep.to(weight.dtype)


class NMPrune(Pass):
    """Prune every prunable linear (or the named ones) to N:M by magnitude.

    Parameters
    ----------
    n, m : int
        The pattern, 0 < n < m.
    layers : sequence of str, optional
        Fully qualified names of the linears to prune; None prunes all.

    Raises
    ------
    InvalidSparsityError
        ``n``/``m`` outside 0 < n < m.
    UnknownLayerError
        A named layer is not a prunable linear.
    """

    name = "nm_prune"
    requires = ()

    def __init__(self, n: int, m: int, layers: Optional[list] = None):
        if not (0 < int(n) < int(m)):
            raise InvalidSparsityError(f"N:M pattern needs 0 < n < m, got {n}:{m}")
        self.n, self.m = int(n), int(m)
        self.layers = list(layers) if layers is not None else None

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        sites = {s.name: s for s in prunable_sites(graph)}
        if graph.prunable is not None:  # the weights sparsecc.prune prunes (passes.prune.prunable_weights)
            sites = {n: s for n, s in sites.items() if s.weight in graph.prunable}
        names = list(sites)
        if self.layers is not None:
            unknown = [k for k in self.layers if k not in sites]
            if unknown:
                raise UnknownLayerError(
                    f"no prunable linear layer named {unknown[0]!r}; prunable layers are: "
                    f"{', '.join(sorted(sites)) or 'none'}")
            names = self.layers
        changed = False
        for name in names:
            w = graph.tensor(sites[name].weight).detach()
            pruned = nm_prune_weight(w, self.n, self.m)
            if not torch.equal(pruned, w):
                graph.set_tensor(sites[name].weight, pruned)
                changed = True
        return PassResult(graph, changed, {"pruned": len(names), "pattern": f"{self.n}:{self.m}"})
