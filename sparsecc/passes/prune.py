"""Magnitude pruning (rewrite pass: it zeroes weights of sparsecc's own copy).

Source: magnitude pruning as in Han et al., "Learning both Weights and
Connections for Efficient Neural Networks" (NeurIPS 2015); block scores as the
mean absolute value of a block, as in Narang et al., "Block-Sparse Recurrent
Neural Networks" (2017). Other importance scores are in :mod:`sparsecc.sparsify.scores`.
"""

from __future__ import annotations

from typing import Union

import torch

from ..errors import InvalidSparsityError, UnknownLayerError
from ..ir.graph import LinearSite, SparseGraph
from ..sparsify.patterns import (Pattern, as_matrix, check_sparsity_value, expand_groups, from_matrix,
                                 global_keep, group_scores, topk_keep)
from .base import Pass, PassContext, PassResult


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
    return group_scores(weight.abs(), Pattern("block", block=tuple(block)))


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
    pats, scores = {}, {}
    for name, w in weights.items():
        p = Pattern("block", block=tuple(block))
        pats[name] = p if p.fits(tuple(w.shape)) else Pattern("block", block=(1, 1))
        scores[name] = group_scores(w.abs(), pats[name])
    if isinstance(sparsity, dict) or scope == "layer":
        keep = {n: topk_keep(sc, 1.0 - (sparsity[n] if isinstance(sparsity, dict) else sparsity))
                for n, sc in scores.items()}
    else:
        keep = global_keep(scores, {n: p.block[0] * p.block[1] for n, p in pats.items()}, 1.0 - sparsity)
    return {n: expand_groups(keep[n], pats[n], tuple(weights[n].shape)) for n in weights}


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
        from .conv import prunable_conv_sites  # convs are pruned as their (C_out, kh·kw·C_in) matrix

        convs = {s.name: s for s in prunable_conv_sites(graph) if s.name not in sites}
        sites.update(convs)
        if isinstance(self.sparsity, dict):
            unknown = [k for k in self.sparsity if k not in sites]
            if unknown:
                raise UnknownLayerError(
                    f"no prunable linear or conv layer named {unknown[0]!r}; prunable layers are: "
                    f"{', '.join(sorted(sites)) or 'none'}")
            names = list(self.sparsity)
        else:
            names = list(sites)
        weights = {n: graph.tensor(sites[n].weight).detach() for n in names}
        weights = {n: as_matrix(w) if n in convs else w for n, w in weights.items()}
        if not weights:
            return PassResult(graph, False)
        masks = magnitude_masks(weights, self.sparsity, self.block, self.scope)
        changed = False
        for n, mask in masks.items():
            w = weights[n]
            if not bool(mask.all()):
                pruned = w * mask
                if n in convs:
                    pruned = from_matrix(pruned, graph.tensor(sites[n].weight).shape)
                graph.set_tensor(sites[n].weight, pruned)
                changed = True
        return PassResult(graph, changed, {"pruned": len(masks)})
