"""CSR: BSR with the block (1, 1) (:class:`~sparsecc.formats.bsr.BlockSparseMatrix`), its own registry entry.

The same storage, kernel template, rules and runtime module as BSR serve it; it is a separate
entry because ``pattern="unstructured"`` allows it and not BSR, and because its key
(``"csr_1x1"``) has its own calibration.
"""

from sparsecc.formats.bsr import BlockFormat
from sparsecc.formats.base import register_format

__all__ = ["CSR"]

CSR = register_format(BlockFormat("csr", ((1, 1),), ("auto", "unstructured")))
