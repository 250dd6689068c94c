"""Magnitude pruning (rewrite pass: it zeroes weights of sparsecc's own copy).

Source: magnitude pruning as in Han et al., "Learning both Weights and
Connections for Efficient Neural Networks" (NeurIPS 2015); block scores as the
mean absolute value of a block, as in Narang et al., "Block-Sparse Recurrent
Neural Networks" (2017). Other importance scores are in :mod:`sparsecc.sparsify.scores`.
"""

from __future__ import annotations

import warnings
from typing import Union

import torch

from ..errors import InvalidSparsityError, PatternWarning, UnknownLayerError
from ..ir.graph import LinearSite, SparseGraph
from ..sparsify.patterns import (Pattern, as_matrix, check_sparsity_value, expand_groups, from_matrix,
                                 global_keep, group_scores, topk_keep)
from .base import Pass, PassContext, PassResult


def layer_name(weight_fqn: str) -> str:
    """The layer name of a weight: its module's name for a module's ``weight`` (``"encoder.fc"``), the
    parameter's own name otherwise (``"attn.in_proj_weight"``), as :meth:`SparseGraph.linear_sites` names sites."""
    return weight_fqn[: -len(".weight")] if weight_fqn.endswith(".weight") else weight_fqn


def prunable_weights(model: torch.nn.Module) -> dict:
    """The weights sparsecc prunes, ``{layer name: (parameter name, kind)}`` with kind "linear" or "conv".

    The one decision shared by :func:`sparsecc.prune` and ``compile(sparsity=...)`` (its
    :class:`MagnitudePrune` prunes a graph site only if its weight is listed here), by what a module computes:

    * ``nn.Linear`` and its subclasses (``out_proj`` of attention included): float32 ``(N, K)`` weights;
    * ``nn.MultiheadAttention``'s fused input projection ``in_proj_weight`` ``(3E, E)`` (or its separate
      ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``), each one linear;
    * ``nn.Conv2d`` and its subclasses (one that pads in its own ``forward`` included) with ``groups == 1``,
      ``dilation == 1``, numeric padding and float32 ``(C_out, C_in, kh, kw)`` weights, pruned as the
      ``(C_out, kh·kw·C_in)`` matrix.
    """
    out: dict = {}

    def add(prefix: str, attr: str, t, kind: str) -> None:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() > 0 and \
                t.dim() == (2 if kind == "linear" else 4):
            fqn = prefix + attr
            out.setdefault(layer_name(fqn), (fqn, kind))

    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, torch.nn.Linear):
            add(pre, "weight", m.weight, "linear")
        elif isinstance(m, torch.nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                add(pre, attr, getattr(m, attr, None), "linear")
        elif isinstance(m, torch.nn.Conv2d) and m.groups == 1 and tuple(m.dilation) == (1, 1) \
                and not isinstance(m.padding, str):
            add(pre, "weight", m.weight, "conv")
    return out


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
    untiled = [n for n, p in pats.items() if p.block != tuple(block)]
    if untiled:
        br, bc = block
        shapes = ", ".join(f"{n} {tuple(weights[n].shape)}" for n in untiled[:4]) + (" ..." if len(untiled) > 4 else "")
        warnings.warn(f"block shape {(br, bc)} tiles {'none' if len(untiled) == len(pats) else 'not all'} of the "
                      f"{len(pats)} layers ({len(untiled)} do not divide by it: {shapes}); those are pruned "
                      "unstructured", PatternWarning, stacklevel=3)
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
        if graph.prunable is not None:  # the weights sparsecc.prune prunes (prunable_weights): one decision
            sites = {n: s for n, s in sites.items() if s.weight in graph.prunable}
            convs = {n: s for n, s in convs.items() if n in sites}
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
