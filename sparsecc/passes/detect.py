"""Detect the sparsity of every linear weight (analysis pass)."""

from __future__ import annotations

import torch

from ..formats import BLOCK_SHAPES, NM_PATTERNS, block_fill_ratio, is_nm_sparse
from ..ir.annotations import annotate
from ..ir.graph import SparseGraph
from .base import Pass, PassContext, PassResult
from .prune import prunable_sites

#: Fill-in (stored / nonzero values) still counted as "no fill-in" when picking the block shape.
FILL_TOLERANCE = 1.02


def detect_block_shape(weight: torch.Tensor, shapes=BLOCK_SHAPES, tol: float = FILL_TOLERANCE):
    """Block shape covering the nonzeros of ``weight`` with least fill-in.

    Parameters
    ----------
    weight : Tensor (N, K)
    shapes : sequence of (rows, cols)
        Candidates; shapes that do not tile (N, K) are skipped.
    tol : float
        Fill ratio at or below which a block shape counts as covering without fill-in.

    Returns
    -------
    block : (rows, cols)
        The largest-area shape whose fill ratio is ≤ ``tol`` ((1, 1) if none).
    fill : dict (rows, cols) -> float
        Fill ratio (stored values / nnz) of every tiling candidate.
    """
    n, k = weight.shape
    fill = {b: block_fill_ratio(weight, b) for b in shapes if n % b[0] == 0 and k % b[1] == 0}
    ok = [b for b, f in fill.items() if f <= tol]
    best = max(ok, key=lambda b: (b[0] * b[1], b[0])) if ok else (1, 1)
    return best, fill


def detect_nm(weight: torch.Tensor, patterns=NM_PATTERNS):
    """The sparsest N:M pattern ``(n, m)`` that ``weight`` (N, K) satisfies along K, or None.

    A dense weight (or one with a group holding more than n nonzeros for every
    candidate) returns None; an all-zero weight satisfies every pattern.
    """
    for n, m in sorted(patterns, key=lambda p: p[0] / p[1]):
        if is_nm_sparse(weight, n, m):
            return (n, m)
    return None


class DetectSparsity(Pass):
    """Annotate every prunable linear with density, nnz, pattern and block shape.

    Writes ``node.meta["sparsecc"]``: ``weight_shape``, ``density``, ``nnz``,
    ``fill_ratio`` per block shape, ``block_shape``, ``nm`` (the sparsest N:M
    pattern the weight satisfies, see :func:`detect_nm`) and ``pattern``
    (``"dense"`` when density is 1, ``"block"`` when a block larger than 1x1
    covers the nonzeros without fill-in, else ``"n:m"`` when an N:M pattern
    holds, else ``"unstructured"``).
    """

    name = "detect_sparsity"
    requires = ()

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        for site in prunable_sites(graph):
            w = graph.tensor(site.weight).detach()
            nnz = int(torch.count_nonzero(w))
            density = nnz / w.numel()
            block, fill = detect_block_shape(w)
            nm = detect_nm(w) if nnz < w.numel() else None
            if nnz == w.numel():
                pattern = "dense"
            elif block != (1, 1):
                pattern = "block"
            elif nm is not None:
                pattern = "n:m"
            else:
                pattern = "unstructured"
            annotate(site.node, site.name, weight_shape=tuple(w.shape), nnz=nnz, density=density,
                     fill_ratio=fill, block_shape=block, pattern=pattern, nm=nm)
        return PassResult(graph, False)
