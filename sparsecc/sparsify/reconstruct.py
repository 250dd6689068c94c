"""Layer-wise reconstruction: prune one layer at a time and refit its kept weights by least squares.

For a layer with weight ``W: (C_out, K)`` (a conv in the :func:`as_matrix`
layout, ``K = kh·kw·C_in``), let ``X_d: (T, K)`` be its inputs in the dense
reference model and ``X_p: (T, K)`` its inputs in the model being pruned (whose
earlier layers are already pruned), over ``T`` calibration tokens or pixels.
For each output row ``r`` with kept input columns ``S_r`` the kept weights solve

    min_w  || X_d · W[r]ᵀ  -  X_p[:, S_r] · wᵀ ||²

so the pruned layer reproduces the *dense* model's output from the inputs it
actually gets, which also corrects the error of the layers before it:

    w = W[r] · C[:, S_r] · (H[S_r, S_r] + λ·I)⁻¹,   H = X_pᵀ X_p,  C = X_dᵀ X_p

with a dampening ``λ = damp · mean(diag H)``. Rows with the same kept set (all
rows of a block row) share one factorization.

Which weights to keep can come from any score; :func:`activation_scores` gives
the activation-aware one, ``|W[r, j]|² · ||X_p[:, j]||²``.

Sources: the least-squares layer reconstruction with sequential, already-pruned
inputs is that of Frantar & Alistarh, "Optimal Brain Compression" (NeurIPS 2022)
and "SparseGPT" (ICML 2023); the activation-aware score is Sun et al., "A Simple
and Effective Pruning Approach for Large Language Models" (Wanda, ICLR 2024).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidSparsityError
from .patterns import Pattern, mask_from_scores

__all__ = ["InputStatistics", "activation_scores", "collect_statistics", "input_patches", "layer_keep", "output_error",
           "solve_kept", "sparsegpt_keep"]


class InputStatistics:
    """Running ``H = X_pᵀ X_p`` and ``C = X_dᵀ X_p`` (float64, ``(K, K)``) of one layer's inputs.

    ``K`` is in the :func:`~sparsecc.sparsify.patterns.as_matrix` order: a conv's
    patches are unfolded and permuted to (kh, kw, C_in).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        k = _in_features(module)
        self.H = torch.zeros(k, k, dtype=torch.float64)
        self.C = torch.zeros(k, k, dtype=torch.float64)
        self.rows = 0

    def add(self, x_pruned: torch.Tensor, x_dense: torch.Tensor) -> None:
        """Add one batch of the layer's inputs (as the module receives them)."""
        xp = input_patches(self.module, x_pruned)
        xd = input_patches(self.module, x_dense)
        if xp.shape != xd.shape:
            raise InvalidSparsityError(f"reconstruction: inputs of shapes {tuple(xp.shape)} and {tuple(xd.shape)} "
                                       f"differ between the model and its dense reference")
        self.H.addmm_(xp.T, xp)
        self.C.addmm_(xd.T, xp)
        self.rows += xp.shape[0]


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


def input_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows of X the layer multiplies: (T, K) float64 in the as_matrix column order."""
    x = x.detach()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        if isinstance(module.padding, str):
            raise InvalidSparsityError(f"reconstruction does not support padding={module.padding!r}")
        cols = F.unfold(x, (kh, kw), dilation=module.dilation, padding=module.padding, stride=module.stride)
        b, _, n_pos = cols.shape
        c_in = module.in_channels
        # unfold orders K as (C_in, kh, kw); as_matrix as (kh, kw, C_in)
        cols = cols.reshape(b, c_in, kh * kw, n_pos).permute(0, 3, 2, 1).reshape(b * n_pos, kh * kw * c_in)
        return cols.double()
    return x.reshape(-1, x.shape[-1]).double()


def collect_statistics(model: nn.Module, reference: nn.Module, name: str, batches: Iterable,
                       run: Callable[[nn.Module, object], object]) -> InputStatistics:
    """Inputs of layer ``name`` in ``model`` and in the dense ``reference`` over ``batches``.

    Parameters
    ----------
    model, reference : nn.Module
        Same architecture; ``reference`` is the dense model.
    name : str
        Qualified name of a Linear or Conv2d present in both.
    batches : iterable
        Calibration inputs, each passed to ``run``.
    run : callable (module, batch) -> any
        Runs a model on one batch (no gradients needed).
    """
    mod = model.get_submodule(name)
    ref = reference.get_submodule(name)
    stats = InputStatistics(mod)
    seen = {}

    def ref_hook(m, inp):
        seen["dense"] = inp[0]
        raise _InputSeen  # the rest of the forward does not change this layer's input

    def mod_hook(m, inp):
        stats.add(inp[0], seen.pop("dense"))
        raise _InputSeen

    def same_hook(m, inp):
        stats.add(inp[0], inp[0])
        raise _InputSeen

    if mod is ref:  # the dense model's own statistics: one forward per batch
        hooks, nets = [mod.register_forward_pre_hook(same_hook)], (model,)
    else:
        hooks, nets = [ref.register_forward_pre_hook(ref_hook), mod.register_forward_pre_hook(mod_hook)], \
            (reference, model)
    try:
        with torch.no_grad():
            for b in batches:
                for net in nets:
                    try:
                        run(net, b)
                    except _InputSeen:
                        pass
    finally:
        for h in hooks:
            h.remove()
    return stats


class _InputSeen(Exception):
    """Raised by :func:`collect_statistics`'s hooks to stop a forward once the layer's input is recorded."""


def activation_scores(weight_matrix: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    """Wanda scores ``|W[r, j]|² · ||X[:, j]||²`` of a weight matrix (C_out, K), shaped like it."""
    return (weight_matrix.double().pow(2) * stats.H.diagonal().clamp_min(0).unsqueeze(0)).to(torch.float32)


def solve_kept(weight_matrix: torch.Tensor, keep: torch.Tensor, stats: InputStatistics,
               damp: float = 0.01) -> torch.Tensor:
    """Least-squares kept weights of every row (see the module docstring); pruned entries are 0.

    Parameters
    ----------
    weight_matrix : Tensor (C_out, K)
        The dense weight in the :func:`as_matrix` layout.
    keep : bool Tensor (C_out, K)
    stats : InputStatistics
    damp : float
        Dampening as a fraction of the mean diagonal of ``H`` (as SparseGPT's ``percdamp``).

    Returns
    -------
    Tensor (C_out, K), the dtype of ``weight_matrix``.
    """
    if keep.shape != weight_matrix.shape:
        raise InvalidSparsityError(f"keep-mask {tuple(keep.shape)} does not match weight {tuple(weight_matrix.shape)}")
    W = weight_matrix.detach().double()
    Hd = _damped(stats, damp)
    out = torch.zeros_like(W)
    uniq, inverse = torch.unique(keep, dim=0, return_inverse=True)
    for u in range(uniq.shape[0]):
        rows = (inverse == u).nonzero().flatten()
        S = uniq[u].nonzero().flatten()
        if S.numel() == 0:
            continue
        A = Hd[S][:, S]
        B = W[rows] @ stats.C[:, S]  # (rows, |S|)
        out[rows[:, None], S[None, :]] = torch.linalg.solve(A, B.T).T
    return out.to(weight_matrix.dtype)


def _damped(stats: InputStatistics, damp: float) -> torch.Tensor:
    H = stats.H
    lam = damp * float(H.diagonal().mean()) if stats.rows else 1.0
    if lam <= 0.0:  # all-zero inputs: any mask is as good; keep the factorizations defined
        lam = 1.0
    return H + lam * torch.eye(H.shape[0], dtype=H.dtype)


def sparsegpt_keep(weight_matrix: torch.Tensor, stats: InputStatistics, density: float, pattern: Pattern,
                   damp: float = 0.01, column_block: int = 128) -> torch.Tensor:
    """Keep-mask chosen by SparseGPT's sequential OBS updates, targeting the dense layer's outputs.

    The weight first moves to the unconstrained least-squares optimum for the
    dense outputs, ``W* = W·C·H⁻¹`` (see the module docstring), so that the
    objective becomes ``(w - W*)·H·(w - W*)ᵀ`` per row. Then the columns are
    processed left to right in blocks of ``column_block``: within a block the
    mask is chosen from the OBS saliency ``w² / [U]_jj²`` (``U`` the upper
    Cholesky factor of ``H⁻¹``) at the pattern's granularity, and each pruned
    weight's error is compensated on the columns not processed yet. Blocks of
    ``(r, c)`` sum the saliency of their elements; N:M groups lie along K.

    Only the mask is returned: the kept weights are best refit exactly with
    :func:`solve_kept` (which SparseGPT's sequential update only approximates).

    Parameters
    ----------
    weight_matrix : Tensor (C_out, K)
        The layer's dense weight in the :func:`~sparsecc.sparsify.patterns.as_matrix` layout.
    stats : InputStatistics
        The layer's input statistics (``H``, ``C``) from :func:`collect_statistics`.
    density : float in [0, 1]
        Fraction of weights kept, in every column block (ignored for N:M).
    pattern : Pattern
        Unstructured, block, N:M or channel. Channels are chosen once on whole rows.
    damp : float
        Dampening as a fraction of the mean diagonal of ``H`` (SparseGPT's ``percdamp``).
    column_block : int
        Columns per mask selection (SparseGPT's ``blocksize``; rounded to the pattern's width).

    Returns
    -------
    bool Tensor (C_out, K)

    Raises
    ------
    InvalidSparsityError
        The pattern does not divide the weight.

    Source: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
    Accurately Pruned in One-Shot" (ICML 2023), Algorithm 1 with adaptive mask
    selection; the dense-output target is that of "Optimal Brain Compression"
    (NeurIPS 2022) with already-pruned inputs.
    """
    if not pattern.fits(tuple(weight_matrix.shape)):
        raise InvalidSparsityError(f"pattern {pattern} does not divide a weight of shape "
                                   f"{tuple(weight_matrix.shape)}")
    rows, K = weight_matrix.shape
    Hd = _damped(stats, damp)
    L = torch.linalg.cholesky(Hd)
    W = torch.cholesky_solve((weight_matrix.detach().double() @ stats.C).T, L).T  # W·C·H⁻¹  (rows, K)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # H⁻¹ = Uᵀ·U
    width = {"block": pattern.block[1], "n:m": pattern.m}.get(pattern.kind, 1)
    step = K if pattern.kind == "channel" else max(width, column_block // width * width)
    keep = torch.zeros(rows, K, dtype=torch.bool)
    for i1 in range(0, K, step):
        i2 = min(K, i1 + step)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        keep1 = mask_from_scores((W1.pow(2) / d.pow(2).unsqueeze(0)).float(), density, pattern)
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            e = torch.where(keep1[:, i], torch.zeros_like(w), w) / d[i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
        keep[:, i1:i2] = keep1
    return keep


def layer_keep(method: str, weight_matrix: torch.Tensor, stats: InputStatistics, density: float,
               pattern: Pattern, score: torch.Tensor = None, damp: float = 0.01) -> torch.Tensor:
    """Keep-mask (C_out, K) of one layer in layer-wise pruning, by ``method``.

    ``"activation"``: the Wanda score (:func:`activation_scores`); ``"sparsegpt"``:
    :func:`sparsegpt_keep`; any other method: ``score`` (C_out, K), a
    weight-only score computed by the caller.
    """
    if method == "sparsegpt" and pattern.kind != "channel":
        return sparsegpt_keep(weight_matrix, stats, density, pattern, damp)
    if method in ("activation", "sparsegpt"):
        score = activation_scores(weight_matrix, stats)
    return mask_from_scores(score, density, pattern)


def output_error(weight_matrix: torch.Tensor, new_matrix: torch.Tensor, stats: InputStatistics) -> float:
    """Relative output error ``‖X·(W - W')ᵀ‖² / ‖X·Wᵀ‖²`` of replacing ``W`` by ``W'`` (both (C_out, K)).

    ``X`` are the inputs summarized by ``stats.H``; 0.0 for a layer whose output is 0.
    """
    W = weight_matrix.detach().double()
    D = W - new_matrix.detach().double()
    base = float(torch.einsum("ik,kl,il->", W, stats.H, W))
    return float(torch.einsum("ik,kl,il->", D, stats.H, D)) / base if base > 0 else 0.0
