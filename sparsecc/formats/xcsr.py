"""Unstructured sparsity for kernels vectorized along the token dim M: the ``xcsr`` storage and registry entry.

W: (N, K) is stored row by row as in CSR (values, column indices, row pointers), with 16-bit
column indices where K < 2^15 (half the index bytes of CSR's int32). The kernel
(:mod:`sparsecc.codegen.xcsr`) reads X transposed in panels of ``mt`` rows, ``XT (M/mt, K, mt)``,
packed once per call, and for every nonzero ``w[n, k]`` broadcasts it against the contiguous
vector ``XT[:, k, :]``: one vector FMA per nonzero and ``mt / lanes`` vectors, no gather. This is
the organisation of XNNPACK's sparse 1x1 convolution (NCHW, vectorized along pixels) and of
Sputnik's row-wise SpMM (Gale et al., "Sparse GPU Kernels for Deep Learning", SC 2020), applied to
linears, where the pixels are tokens.

Why a format of its own and not CSR's storage: the value and index streams differ (flat values,
16-bit indices), and so do its kernel, runtime module (which packs X^T) and cost expression (the
X^T panel is written and read once more per call). The x86 rules are :mod:`sparsecc.targets.x86_xcsr`;
the runtime module is :class:`sparsecc.runtime.xcsr.XCSRLinear`, which registers itself and its
export converter on :data:`XCSR`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecc.errors import InvalidSparsityError
from sparsecc.formats.base import Candidate, Format, M, StorageStats, register_format

__all__ = ["XCSR", "RowSparseMatrix", "XCSRFormat", "index_dtype_for"]


def index_dtype_for(k: int) -> torch.dtype:
    """int16 column indices when every column < 2^15 fits, else int32."""
    return torch.int16 if k < 2 ** 15 else torch.int32


@dataclass
class RowSparseMatrix(StorageStats):
    """W: (N, K) row by row: ``data[p]`` at column ``indices[p]`` of row ``i`` for ``indptr[i] <= p < indptr[i+1]``.

    Attributes
    ----------
    shape : (N, K)
    data : Tensor (nnz,) float32
    indices : Tensor (nnz,) int16 (K < 2^15) or int32, sorted within each row
    indptr : Tensor (N + 1,) int32
    """

    shape: tuple
    data: torch.Tensor
    indices: torch.Tensor
    indptr: torch.Tensor

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n, _ = self.shape
        nnz = int(self.data.shape[0])
        if self.data.dim() != 1 or tuple(self.indices.shape) != (nnz,):
            raise InvalidSparsityError(f"data and indices must both have shape (nnz,), got "
                                       f"{tuple(self.data.shape)} and {tuple(self.indices.shape)}")
        if tuple(self.indptr.shape) != (n + 1,):
            raise InvalidSparsityError(f"indptr must have shape ({n + 1},), got {tuple(self.indptr.shape)}")

    format = "xcsr"

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "RowSparseMatrix":
        """Store ``weight`` (N, K), keeping exactly its nonzeros.

        Raises
        ------
        InvalidSparsityError
            Not a 2-d tensor.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise InvalidSparsityError(f"expected a 2-d weight tensor (N, K), got "
                                       f"{getattr(weight, 'shape', type(weight).__name__)}")
        w = weight.detach().to(device="cpu", dtype=torch.float32)
        n, k = w.shape
        rows, cols = (w != 0).nonzero(as_tuple=True)  # row-major: sorted by row, then column
        indptr = torch.zeros(n + 1, dtype=torch.int32)
        torch.cumsum(torch.bincount(rows, minlength=n), dim=0, out=indptr[1:])
        return cls((n, k), w[rows, cols].contiguous(), cols.to(index_dtype_for(k)).contiguous(), indptr)

    def to_dense(self) -> torch.Tensor:
        n, k = self.shape
        out = torch.zeros(n, k, dtype=self.data.dtype)
        rows = torch.repeat_interleave(torch.arange(n), (self.indptr[1:] - self.indptr[:-1]).to(torch.int64))
        out[rows, self.indices.to(torch.int64)] = self.data
        return out

    @property
    def nnz(self) -> int:
        return int(self.data.shape[0])

    def __repr__(self) -> str:
        return f"RowSparseMatrix(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f})"


class XCSRFormat(Format):
    """Unstructured W, kernels vectorized along M over a transposed X panel (see the module docstring)."""

    name = "xcsr"
    storage = RowSparseMatrix
    patterns = ("auto", "unstructured")

    def key(self, params):
        return self.name

    def candidates(self, shape, pattern, *, nm=None, column_group=None):
        return [Candidate("xcsr")] if pattern in self.patterns else []

    def to_storage(self, weight, params):
        return RowSparseMatrix.from_dense(weight)

    def stored(self, params, shape, nnz, fill_ratio):
        return int(nnz)

    def units_of(self, matrix) -> int:
        return matrix.nnz

    def flops(self, params, n, k, stored):
        return 2 * M * stored

    def bytes(self, params, n, k, stored):
        # values + 16-bit indices + row pointers; X read, X^T panel written and read, Y written
        return 6 * stored + 4 * (n + 1) + 12 * M * k + 4 * M * n

    def conv_bytes(self, params, n, k, stored, taps):
        # the direct conv: values + 32-bit offsets + row pointers; the input image (M·K/taps floats) read,
        # its zero-padded copy written and read; Y written
        return 8 * stored + 4 * (n + 1) + 12 * M * k / taps + 4 * M * n

    def calibration_weight(self, params, n, k, density, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)

    def calibration_candidates(self):
        return [Candidate("xcsr")]


XCSR = register_format(XCSRFormat())
