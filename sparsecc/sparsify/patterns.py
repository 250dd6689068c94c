"""Sparsity patterns and turning importance scores into keep-masks.

A pattern says which weights are pruned together:

* ``unstructured``: single weights;
* ``block`` with block shape (rows, cols): whole blocks of the weight matrix
  (Narang et al., "Block-Sparse Recurrent Neural Networks", 2017);
* ``n:m``: at most N nonzeros in every group of M consecutive weights along the
  reduction axis (Mishra et al., "Accelerating Sparse Deep Neural Networks",
  NVIDIA 2021); its density is fixed at N/M;
* ``channel``: whole output channels (rows), i.e. blocks of shape (1, K).

Weights are scored and masked as a matrix ``(C_out, K)``: a linear's weight as
it is, a convolution's ``(C_out, C_in, kh, kw)`` permuted to
``(C_out, kh, kw, C_in)`` and flattened, so that N:M groups and block columns
run along input channels, as NVIDIA's ASP does for convolutions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import InvalidSparsityError
from ..formats import as_matrix, from_matrix, nm_keep  # noqa: F401 - part of this module's API


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern.

    Attributes
    ----------
    kind : {"unstructured", "block", "n:m", "channel"}
    block : (rows, cols)
        Block shape for ``kind="block"``; (1, 1) otherwise.
    n, m : int
        N and M for ``kind="n:m"``.
    """

    kind: str
    block: tuple = (1, 1)
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        if self.kind == "block":
            return "block %dx%d" % self.block
        if self.kind == "n:m":
            return "%d:%d" % (self.n, self.m)
        return self.kind

    @property
    def fixed_density(self) -> Optional[float]:
        """N/M for N:M patterns, None for patterns of any density."""
        return self.n / self.m if self.kind == "n:m" else None

    def fits(self, matrix_shape: tuple) -> bool:
        """Whether a weight matrix (C_out, K) can carry this pattern."""
        rows, k = matrix_shape
        if self.kind == "block":
            return rows % self.block[0] == 0 and k % self.block[1] == 0
        if self.kind == "n:m":
            return k % self.m == 0
        return True


UNSTRUCTURED = Pattern("unstructured")


def check_sparsity_value(value, where: str) -> float:
    """Validate a sparsity in [0, 1); raise :class:`InvalidSparsityError` naming ``where``."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise InvalidSparsityError(f"sparsity for {where} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= s < 1.0):
        raise InvalidSparsityError(f"sparsity for {where} must be in [0, 1), got {s}")
    return s


def parse_pattern(spec, block_shape: Optional[tuple] = None) -> Pattern:
    """Parse a user's pattern.

    Parameters
    ----------
    spec : str or Pattern
        ``"unstructured"``, ``"block"`` (block shape from ``block_shape``),
        ``"block 8x1"`` or ``"8x1"``, ``"2:4"``/``"n:m"`` (2:4 by default),
        ``"channel"``.
    block_shape : (rows, cols), optional

    Raises
    ------
    InvalidSparsityError
        Unknown pattern, N > M, or a block shape that is not two positive ints.
    """
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise InvalidSparsityError(f"pattern must be a string such as 'block' or '2:4', got {spec!r}")
    s = spec.strip().lower()
    if s == "unstructured":
        return UNSTRUCTURED
    if s == "channel":
        return Pattern("channel")
    if s == "n:m":
        s = "2:4"
    mm = re.fullmatch(r"(\d+):(\d+)", s)
    if mm:
        n, m = int(mm.group(1)), int(mm.group(2))
        if not (0 < n < m):
            raise InvalidSparsityError(f"N:M pattern needs 0 < N < M, got {spec!r}")
        return Pattern("n:m", n=n, m=m)
    mb = re.fullmatch(r"(?:block\s*)?(\d+)x(\d+)", s)
    if mb:
        block_shape = (int(mb.group(1)), int(mb.group(2)))
        s = "block"
    if s == "block":
        if block_shape is None:
            raise InvalidSparsityError("pattern 'block' needs a block shape, e.g. 'block 8x1' or block_shape=(8, 1)")
        b = tuple(block_shape)
        if len(b) != 2 or not all(isinstance(v, int) and v >= 1 for v in b):
            raise InvalidSparsityError(f"block shape must be (rows, cols) of positive ints, got {block_shape!r}")
        return Pattern("block", block=b) if b != (1, 1) else UNSTRUCTURED
    raise InvalidSparsityError(
        f"unknown pattern {spec!r}; use 'unstructured', 'block', '<rows>x<cols>', 'N:M' (e.g. '2:4') or 'channel'")


def group_scores(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Aggregate element scores (C_out, K) into one score per prunable group.

    Blocks and channels score the mean of their elements (so blocks of fill-in
    shapes compare fairly); unstructured and N:M keep element scores.

    Returns
    -------
    Tensor (C_out // br, K // bc) for block/channel patterns, else (C_out, K).
    """
    rows, k = score.shape
    if pattern.kind == "channel":
        return score.mean(dim=1, keepdim=True)
    if pattern.kind == "block":
        br, bc = pattern.block
        return score.reshape(rows // br, br, k // bc, bc).mean(dim=(1, 3))
    return score


def expand_groups(keep: torch.Tensor, pattern: Pattern, matrix_shape: tuple) -> torch.Tensor:
    """Expand a per-group keep-mask back to (C_out, K)."""
    if pattern.kind == "channel":
        return keep.expand(matrix_shape).clone()
    if pattern.kind == "block":
        br, bc = pattern.block
        return keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return keep


def topk_keep(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask keeping the ``round(density · numel)`` highest scores (ties: lowest index)."""
    flat = scores.flatten()
    n_keep = int(round(flat.numel() * density))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_keep > 0:
        order = torch.argsort(flat, descending=True, stable=True)
        keep[order[:n_keep]] = True
    return keep.reshape(scores.shape)


def global_keep(scores: dict, areas: dict, density: float) -> dict:
    """Keep-masks of one score threshold over several layers' groups.

    Groups are ranked by score over all layers together and kept, best first, until
    ``density`` of all weights is kept (each group counts its area, so blocks of
    different shapes compare by the weights they hold).

    Parameters
    ----------
    scores : dict name -> Tensor
        Group scores of each layer (any shape); ``-inf`` marks pruned groups.
    areas : dict name -> int
        Weights per group of each layer (br·bc for blocks, 1 for single weights).
    density : float in [0, 1]

    Returns
    -------
    dict name -> bool Tensor shaped like ``scores[name]``.

    Source: global magnitude pruning as compared in Blalock et al., "What is the State
    of Neural Network Pruning?" (MLSys 2020).
    """
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    area = torch.cat([torch.full((scores[n].numel(),), float(areas[n]), dtype=torch.float64) for n in names])
    order = torch.argsort(flat, descending=True, stable=True)
    n_keep = int(torch.searchsorted(torch.cumsum(area[order], 0), density * float(area.sum()), right=True))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:n_keep]] = True
    out, off = {}, 0
    for n in names:
        out[n] = keep[off: off + scores[n].numel()].reshape(scores[n].shape)
        off += scores[n].numel()
    return out


def mask_from_scores(score: torch.Tensor, density: float, pattern: Pattern) -> torch.Tensor:
    """Keep-mask (C_out, K) with the given density, pruning the lowest-scoring groups.

    Parameters
    ----------
    score : Tensor (C_out, K)
        Element importance; ``-inf`` marks weights already pruned (they stay
        pruned unless the density asks for more weights than remain).
    density : float in [0, 1]
        Fraction of weights kept (ignored for N:M, whose density is N/M).
    pattern : Pattern

    Raises
    ------
    InvalidSparsityError
        The pattern does not fit the matrix shape (the caller names the layer).
    """
    if not pattern.fits(tuple(score.shape)):
        raise InvalidSparsityError(f"pattern {pattern} does not divide a weight of shape {tuple(score.shape)}")
    if pattern.kind == "n:m":
        return nm_keep(score, pattern.n, pattern.m)
    gs = group_scores(score, pattern)
    return expand_groups(topk_keep(gs, density), pattern, tuple(score.shape))
