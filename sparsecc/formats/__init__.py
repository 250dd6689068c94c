"""Storage formats of sparse weights and their registry (pure torch and sympy; no TVM import).

One module per format, each registering one :class:`~sparsecc.formats.base.Format` entry:

=========  ==========================  =============================================
format     module                      storage
=========  ==========================  =============================================
dense      :mod:`.dense`               the torch tensor
csr        :mod:`.csr`                 :class:`BlockSparseMatrix` with block (1, 1)
bsr        :mod:`.bsr`                 :class:`BlockSparseMatrix` with block (rows, cols)
nm         :mod:`.nm`                  :class:`NMSparseMatrix` (n, m)
xcsr       :mod:`.xcsr`                :class:`RowSparseMatrix` (kernels vectorized along M)
=========  ==========================  =============================================

The candidates a weight may take are :func:`candidates`; everything else the passes,
cost model, calibration, report and export need is on the entry (see :mod:`.base`).
"""

from sparsecc.formats.base import (M, NM_PATTERN_NAMES, PATTERN_CHOICES, Candidate, Format, all_formats, as_matrix,
                                   describe, format_of, from_matrix, get_format, register_format)
from sparsecc.formats.dense import DENSE
from sparsecc.formats.bsr import (BLOCK_SHAPES, BSR, BlockFormat, BlockSparseMatrix, block_candidate, block_fill_ratio,
                                  count_nonzero_blocks)
from sparsecc.formats.csr import CSR
from sparsecc.formats.nm import NM, NM_PATTERNS, NMSparseMatrix, is_nm_sparse, nm_keep
from sparsecc.formats.xcsr import XCSR, RowSparseMatrix

__all__ = ["BLOCK_SHAPES", "BSR", "CSR", "DENSE", "M", "NM", "XCSR", "RowSparseMatrix", "NM_PATTERNS", "NM_PATTERN_NAMES", "PATTERN_CHOICES",
           "BlockFormat", "BlockSparseMatrix", "Candidate", "Format", "NMSparseMatrix", "all_formats", "as_matrix",
           "block_candidate", "block_fill_ratio", "candidates", "count_nonzero_blocks", "describe", "format_of", "from_matrix",
           "get_format", "is_nm_sparse", "nm_keep", "no_larger_than_dense", "register_format"]


def no_larger_than_dense(cands: list, shape: tuple, nnz: int, fill_ratio: dict) -> list:
    """The candidates of ``cands`` whose stored weight (values, indices, fill-in) takes no more bytes than dense.

    A format that makes the model bigger is never what a user of a sparse compiler wants, even where it
    measures faster (BSR with heavy fill-in at density 0.5 stored 1.03x the dense bytes of MiniLM).
    """
    n, k = shape
    dense = 4 * n * k
    out = []
    for c in cands:
        fmt = c.entry
        if c.is_dense or fmt.weight_bytes(c.params, n, k, fmt.stored(c.params, (n, k), nnz, fill_ratio)) <= dense:
            out.append(c)
    return out


def candidates(shape: tuple, pattern: str, density: float, *, nm=None, column_group=None,
               allowed=None) -> list:
    """Every candidate format for a weight (N, K) under ``pattern``, dense first.

    Parameters
    ----------
    shape : (N, K)
    pattern : str
        A ``pattern=`` argument (:data:`PATTERN_CHOICES`); an N:M name allows dense and that N:M format only.
    density : float
        The weight's density; a dense weight (1.0) or ``pattern="dense"`` gets dense only.
    nm : (n, m), optional
        The sparsest N:M pattern the weight satisfies (N:M candidates need it).
    column_group : int
        Blocks with more than one column must divide it (convs: C_in).
    allowed : collection of str, optional
        Format names the target can build for this layer kind (None: all).
    """
    out = [Candidate("dense")]
    if pattern == "dense" or density >= 1.0:
        return out
    for fmt in all_formats():
        if fmt.name == "dense" or (allowed is not None and fmt.name not in allowed):
            continue
        if pattern in NM_PATTERN_NAMES and fmt.name != "nm":
            continue
        out += fmt.candidates(tuple(shape), pattern, nm=nm, column_group=column_group)
    return out
