"""Layer-wise one-shot pruning: one layer at a time, on calibration inputs, optionally refit.

The driver's reconstruction step. Layers are pruned in the order they run; each
one's keep-mask comes from its inputs in the model being pruned (Wanda's score,
SparseGPT's masks, or a weight-only score) and, with ``refit``, its kept weights
are refit by least squares to the dense model's outputs. The linear algebra is
in :mod:`sparsecc.sparsify.reconstruct`.

Sources: Frantar & Alistarh, "Optimal Brain Compression" (NeurIPS 2022) and
"SparseGPT" (ICML 2023); Sun et al., "A Simple and Effective Pruning Approach for
Large Language Models" (Wanda, ICLR 2024).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import DataError
from .data import run_model
from .masks import original_weight, set_mask
from .patterns import as_matrix, from_matrix
from .reconstruct import collect_statistics, layer_keep, output_error, solve_kept
from .scores import ImportanceScore
from .sensitivity import option_key

__all__ = ["LayerwisePruning", "execution_order"]


def execution_order(model: nn.Module, names: list, inputs, call: Callable = run_model) -> list:
    """``names`` in the order their modules first run on ``inputs`` (modules that never run last).

    Parameters
    ----------
    model : nn.Module
    names : list of str
        Qualified names of submodules of ``model``.
    inputs : any
        One batch of inputs, passed to ``call(model, inputs)`` (no gradients).
    """
    order, hooks = [], []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: order.append(n) if n not in order else None))
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in names if n not in order]


class LayerwisePruning:
    """Prune layer by layer on calibration inputs; with ``refit``, refit each layer by least squares.

    Parameters
    ----------
    refit : bool
        Refit every layer's kept weights so that it reproduces the dense model's output
        from its (already pruned) inputs (:func:`~sparsecc.sparsify.reconstruct.solve_kept`).
    damp : float, > 0
        Dampening of the least squares, a fraction of the mean diagonal of the layer's
        input Gram matrix.
    n_batches : int
        Calibration batches (at least one), the same ones for every layer.
    progress : bool
        Progress bars.
    """

    def __init__(self, refit: bool = False, damp: float = 0.01, n_batches: int = 4, progress: bool = True):
        self.refit, self.damp, self.n_batches, self.progress = refit, damp, n_batches, progress

    @staticmethod
    def matrix_and_score(score: ImportanceScore, name: str, weight: torch.Tensor) -> tuple:
        """The weight as a matrix (C_out, K) and its weight-only score (C_out, K), or None for input-aware scores."""
        wm = as_matrix(weight.detach())
        sc = None if score.needs_inputs else as_matrix(score.score(name, weight.detach()).to(torch.float32))
        return wm, sc

    def prune(self, engine, densities: dict, reference: nn.Module) -> None:
        """Mask (and refit) every layer of ``densities`` in ``engine.model``, in execution order.

        Parameters
        ----------
        engine : PruningEngine
            Its model (masks attached), score, plan (the patterns) and batches; the
            calibration inputs are its next :attr:`n_batches` batches.
        densities : dict name -> density in [0, 1]
        reference : nn.Module
            The dense model whose layer outputs the refit reproduces.

        Raises
        ------
        DataError
            The engine has no data.
        """
        if engine.batches is None:
            raise DataError("layer-wise pruning (reconstruct=True or method='activation') needs data= "
                            "(calibration inputs)")
        calib = [engine.batches.next()[0] for _ in range(max(1, self.n_batches))]
        order = execution_order(engine.model, [n for n in densities], calib[0])
        was = engine.model.training
        engine.model.eval()
        from tqdm.auto import tqdm

        for n in tqdm(order, desc="prune + reconstruct", disable=not self.progress, leave=False):
            mod = engine.layers[n]
            stats = collect_statistics(engine.model, reference, n, calib, run_model)
            w = original_weight(mod)
            wm, sc = self.matrix_and_score(engine.score, n, w)
            keep = layer_keep(engine.score.name, wm, stats, densities[n], engine.plan[n][0], sc, self.damp)
            if self.refit:
                with torch.no_grad():
                    w.copy_(from_matrix(solve_kept(wm, keep, stats, self.damp), w.shape))
            set_mask(mod, from_matrix(keep, w.shape))
        engine.model.train(was)

    def error_table(self, base: nn.Module, layers: dict, candidates: Callable, calib: list,
                    score: ImportanceScore) -> dict:
        """Relative output error of each layer at each candidate, pruned alone in the dense model.

        Parameters
        ----------
        base : nn.Module
            The dense model.
        layers : dict name -> nn.Module
            Layers of ``base``.
        candidates : callable name -> list of (Pattern, density)
        calib : list
            Calibration inputs.
        score : ImportanceScore
            Gradient-free.

        Returns
        -------
        dict name -> {candidate key: error}
            The error of :func:`~sparsecc.sparsify.reconstruct.output_error` with the mask
            of the layer-wise method and, with ``refit``, least-squares weights.
        """
        from tqdm.auto import tqdm

        table = {}
        for n in tqdm(list(layers), desc="output error per density", disable=not self.progress, leave=False):
            stats = collect_statistics(base, base, n, calib, run_model)
            wm, sc = self.matrix_and_score(score, n, layers[n].weight)
            row = {}
            for p, d in candidates(n):
                keep = layer_keep(score.name, wm, stats, d, p, sc, self.damp)
                new = solve_kept(wm, keep, stats, self.damp) if self.refit else wm * keep
                row[option_key(p, d)] = output_error(wm, new, stats)
            table[n] = row
        return table

    def __repr__(self) -> str:
        return f"LayerwisePruning(refit={self.refit}, damp={self.damp}, n_batches={self.n_batches})"
