"""Magnitude pruning (rewrite pass: it zeroes weights of sparsecc's own copy).

Source: magnitude pruning as in Han et al., "Learning both Weights and
Connections for Efficient Neural Networks" (NeurIPS 2015); block scores as the
mean absolute value of a block, as in Narang et al., "Block-Sparse Recurrent
Neural Networks" (2017). Issue #3 brings importance scores beyond magnitude.
"""

from __future__ import annotations

from typing import Union

import torch

from ..errors import InvalidSparsityError, UnknownLayerError
from ..ir.graph import LinearSite, SparseGraph
from .base import Pass, PassContext, PassResult


def check_sparsity_value(value, where: str) -> float:
    """Validate a sparsity in [0, 1); raise :class:`InvalidSparsityError` naming ``where``."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise InvalidSparsityError(f"sparsity for {where} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= s < 1.0):
        raise InvalidSparsityError(f"sparsity for {where} must be in [0, 1), got {s}")
    return s


def prunable_sites(graph: SparseGraph) -> list[LinearSite]:
    """Linears the sparse path can run: 2-d float32 weights."""
    out = []
    for s in graph.linear_sites():
        w = graph.tensor(s.weight)
        if w.dim() == 2 and w.dtype == torch.float32 and w.numel() > 0:
            out.append(s)
    return out


def block_scores(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Mean |w| of every block.

    Parameters
    ----------
    weight : Tensor (N, K)
    block : (br, bc), dividing (N, K)

    Returns
    -------
    Tensor (N // br, K // bc)
    """
    n, k = weight.shape
    br, bc = block
    return weight.abs().reshape(n // br, br, k // bc, bc).mean(dim=(1, 3))


def _expand(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    br, bc = block
    return mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)


def magnitude_masks(weights: dict, sparsity: Union[float, dict], block: tuple[int, int],
                    scope: str = "layer") -> dict:
    """Keep-masks that prune ``weights`` by magnitude.

    Parameters
    ----------
    weights : dict name -> Tensor (N, K)
    sparsity : float or dict name -> float
        A float prunes all weights together to that overall sparsity
        (``scope="global"``: one threshold over all scores) or each weight to it
        (``scope="layer"``); a dict prunes each named weight to its own sparsity.
    block : (br, bc)
        Block shape pruned as a unit; (1, 1) is unstructured. A weight whose
        shape the block does not divide is pruned unstructured.

    Returns
    -------
    dict name -> bool Tensor (N, K), True where the weight is kept.
    """
    scores, blocks = {}, {}
    for name, w in weights.items():
        b = block if (w.shape[0] % block[0] == 0 and w.shape[1] % block[1] == 0) else (1, 1)
        blocks[name] = b
        scores[name] = block_scores(w, b)
    masks = {}
    if isinstance(sparsity, dict) or scope == "layer":
        for name, sc in scores.items():
            s = sparsity[name] if isinstance(sparsity, dict) else sparsity
            masks[name] = _expand(_topk_mask(sc.flatten(), s).reshape(sc.shape), blocks[name])
        return masks
    # global: rank every block of every layer by score; weight each block by its area
    flat = torch.cat([sc.flatten() for sc in scores.values()])
    areas = torch.cat([torch.full((sc.numel(),), blocks[n][0] * blocks[n][1], dtype=torch.float64)
                       for n, sc in scores.items()])
    order = torch.argsort(flat, descending=True, stable=True)
    kept_elems = torch.cumsum(areas[order], 0)
    total = float(areas.sum())
    n_keep = int(torch.searchsorted(kept_elems, total * (1.0 - sparsity), right=True))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:n_keep]] = True
    off = 0
    for name, sc in scores.items():
        masks[name] = _expand(keep[off: off + sc.numel()].reshape(sc.shape), blocks[name])
        off += sc.numel()
    return masks


def _topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_keep = int(round(scores.numel() * (1.0 - sparsity)))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if n_keep > 0:
        keep[torch.topk(scores, n_keep, sorted=False).indices] = True
    return keep


class MagnitudePrune(Pass):
    """Prune linear weights by magnitude, unstructured or in blocks.

    Parameters
    ----------
    sparsity : float or dict
        Global sparsity in [0, 1), or ``{layer name: sparsity}``.
    block : (br, bc)
        Block shape; ``(1, 1)`` prunes unstructured.
    scope : {"global", "layer"}
        For a float sparsity: one threshold over all layers, or each layer pruned to it.

    Raises
    ------
    InvalidSparsityError
        A sparsity outside [0, 1) (the message names the layer).
    UnknownLayerError
        A layer name that is not a prunable linear of the model.
    """

    name = "magnitude_prune"
    requires = ()

    def __init__(self, sparsity: Union[float, dict], block: tuple = (1, 1), scope: str = "layer"):
        if isinstance(sparsity, dict):
            self.sparsity = {k: check_sparsity_value(v, f"layer {k!r}") for k, v in sparsity.items()}
        else:
            self.sparsity = check_sparsity_value(sparsity, "the model")
        if scope not in ("global", "layer"):
            raise InvalidSparsityError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.block = tuple(block)
        self.scope = scope

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        sites = {s.name: s for s in prunable_sites(graph)}
        if isinstance(self.sparsity, dict):
            unknown = [k for k in self.sparsity if k not in sites]
            if unknown:
                raise UnknownLayerError(
                    f"no prunable linear layer named {unknown[0]!r}; prunable layers are: "
                    f"{', '.join(sorted(sites)) or 'none'}")
            names = list(self.sparsity)
        else:
            names = list(sites)
        weights = {n: graph.tensor(sites[n].weight).detach() for n in names}
        if not weights:
            return PassResult(graph, False)
        masks = magnitude_masks(weights, self.sparsity, self.block, self.scope)
        changed = False
        for n, mask in masks.items():
            w = weights[n]
            if not bool(mask.all()):
                graph.set_tensor(sites[n].weight, w * mask)
                changed = True
        return PassResult(graph, changed, {"pruned": len(masks)})
