"""Dense storage: the weight as torch holds it, run by torch (``F.linear`` / ``F.conv2d``)."""

from __future__ import annotations

import torch

from sparsecc.formats.base import Candidate, Format, M, register_format

__all__ = ["DENSE", "DenseFormat"]


class DenseFormat(Format):
    """Always a candidate; the cost model's reference (torch's own GEMM)."""

    name = "dense"
    patterns = ("auto", "unstructured", "block", "dense", "n:m", "2:4", "1:4")

    def candidates(self, shape, pattern, *, nm=None, column_group=None):
        return [Candidate("dense")]

    def to_storage(self, weight, params):
        return weight

    def flops(self, params, n, k, stored):
        return 2 * M * n * k

    def bytes(self, params, n, k, stored):
        return 4 * n * k + 4 * M * k + 4 * M * n

    def calibration_weight(self, params, n, k, density, seed=0):
        return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))

    def calibration_candidates(self):
        return [Candidate("dense")]


DENSE = register_format(DenseFormat())
